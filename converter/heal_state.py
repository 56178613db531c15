"""care-heal's resumable state: model weights, optimizer, scheduler, RNG streams and the log, written as
a whole folder and swapped in, so an interruption at any moment leaves the previous checkpoint usable."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from .errors import HealError
from .write import replace_dir


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "numpy" in st:
        import numpy as np
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(work: Path, model, optimizer, scheduler, state: dict, rng: dict | None = None) -> None:
    """Write work/checkpoint/ completely, then swap it in (an interruption keeps the previous one). `rng`: the
    RNG streams to record, when they are not the current ones (care-heal interrupted within a step)."""
    from safetensors.torch import save_model

    tmp = work / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng if rng is not None else rng_state()}, tmp / "trainer_state.pt")
        replace_dir(tmp, work / "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
    except Exception as e:  # truncated / foreign checkpoint
        raise HealError(f"cannot resume from {ckpt}: {e}") from None


def load_checkpoint_weights(ckpt: Path, model) -> None:
    from safetensors.torch import load_model

    try:
        load_model(model, str(ckpt / "model.safetensors"), device=str(next(model.parameters()).device))
    except Exception as e:
        raise HealError(f"cannot resume from {ckpt}: {e}") from None


def checkpoint_bytes(model, trainable: list) -> int:
    """A lower bound of one checkpoint's size: every parameter as stored (model.safetensors) and AdamW's two moments
    of each trainable one (trainer_state.pt). For a 135M model trained whole in fp32: 1.6 GB."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 2 * sum(p.numel() * p.element_size() for _, p in trainable)


def checkpoint_due(at: int, total_steps: int, save_every: int | None, stop_after: int | None,
                   keep_checkpoint: bool) -> tuple[bool, bool]:
    """(whether heal() saves a checkpoint after step `at`, whether it stops there): at every --save-every-th step
    before the last; at the first step >= --stop-after before the last, where the run stops without writing OUT;
    and at the last step with --keep-checkpoint. The one rule for the loop and for saves_planned."""
    stop = stop_after is not None and stop_after <= at < total_steps
    periodic = bool(save_every) and at % save_every == 0
    return (at < total_steps and (periodic or stop)) or (at == total_steps and keep_checkpoint), stop


def saves_planned(step: int, total_steps: int, save_every: int | None, stop_after: int | None,
                  keep_checkpoint: bool) -> tuple[int, bool]:
    """(how many checkpoints the run from `step` will write, whether it writes OUT), by checkpoint_due. An
    interruption's save is not counted."""
    saves = 0
    for at in range(step + 1, total_steps + 1):
        save, stop = checkpoint_due(at, total_steps, save_every, stop_after, keep_checkpoint)
        saves += save
        if stop:
            return saves, False
    return saves, True


def disk_needed(output: int, checkpoint: int, saves: int, resuming: bool, writes_output: bool) -> int:
    """Free space a run needs beyond what is already used, in bytes. A save writes the new checkpoint beside the
    previous one before swapping them (two at once from the second save on, one more than a resumed run's); the
    output is written while the last checkpoint still exists."""
    if not saves:
        return output if writes_output else 0
    held = 0 if resuming else checkpoint   # the checkpoint on disk once the run has saved (a resumed one has it)
    during_saves = checkpoint + (held if saves >= 2 else 0)
    return max(during_saves, output + held if writes_output else 0)
