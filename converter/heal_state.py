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
