"""The healing fine-tune behind `care-heal CONVERTED OUT --teacher ORIGINAL --text FILES... --tokens N` (its command
line, and the checks that need no model: converter/heal_cli.py, converter/heal_options.py).

A converted care_mla checkpoint is trained briefly so that it gets back to the original model's
quality (care-spec §8, CARE paper Eq. 6-8), with

    L = CE(student) + beta * tau^2 * KL(softmax(z_teacher / tau) || softmax(z_student / tau))

where the teacher is the ORIGINAL GQA model (frozen, eval mode), CE is the ordinary next-token
cross entropy without temperature, and KL is averaged over all token positions (the tau^2 factor
keeps the KD gradient's size independent of tau).

Defaults and why:
* tau = 1.0: the student starts as a close approximation of the teacher and the goal is to give
  back exactly the teacher's next-token distribution *as it is sampled from* (temperature 1).
  A softer target (tau 2) spends gradient on matching the far tail of the vocabulary, which
  matters when distilling from scratch but not when repairing an approximation; and at tau = 1
  the KD term is exactly the forward KL that the quality metrics (perplexity) see.
* beta = 1.0: the spec's suggestion; CE on the healing text and KD to the teacher get equal weight,
  so healing text that differs from the pretraining data cannot pull the model far from the
  original (KD anchors it) while CE still uses the real labels.
* lr 2e-5, warmup ratio 0.03, cosine decay to 0, AdamW (weight decay 0.01 on matrices only, not on
  norm weights), gradient clipping at 1.0: the TransMLA healing recipe (the only complete published
  one; the CARE paper's LR sweep is {1e-6 .. 5e-4} with its best at 2e-6 for 8B models, small
  models tolerate more). 3 % warmup avoids full-size Adam steps on the freshly converted weights.
* seqlen 512, batch 8 x grad-accum 8 = 64 sequences per update (the paper's "64" global batch).
* the latent factors are balanced first (balance_latents: each kv_b_proj column of unit norm, the same model), so
  that AdamW's steps, ~lr on every entry, are of one relative size on both sides of the latent.
* --train all (the paper trains the full model); --train attention trains only the MLA layers'
  self_attn parameters and leaves every other tensor bit-identical.
* --kv-blocks train: as converted, kv_b_proj is block-diagonal (each head's keys read only c_K,
  its values only c_V); healing trains the zero blocks too, as the paper's code trains the whole
  up-projection. --kv-blocks keep keeps them exactly zero (their gradients are zeroed before
  clipping, so AdamW never moves them), which keeps vLLM's CPU key/value split decode for the
  healed layers. Measured on CPU (benchmarks/results/heal_kv_blocks/): keeping them cost 2 % of
  held-out perplexity on SmolLM2 at KV 0.5 after 100K tokens (47.34 vs 46.38) and nothing on
  qwen3-small (80.83 both), so training them is the default.

Data: .txt / .jsonl files (converter.calib_data.read_texts: "text" records, or "messages"
conversations rendered with the model's chat template, which is how an instruct model keeps its
chat behaviour through healing), tokenized once, documents joined by
EOS, packed into non-overlapping seqlen windows (BOS first when the tokenizer has one), visited in
a seeded random order (a new permutation per epoch); training stops after --tokens tokens
(rounded up to whole updates). converter/heal_data.py.

Output: OUT has the converted layout exactly (config.json copied verbatim, same tensor names,
shapes and dtype, tied embeddings still tied) plus heal_log.json, heal_curve.png and the model card
with a "Healing" section added. Work happens
in OUT.partial/ beside OUT and is renamed to OUT only at the end, so an error never leaves a
partial OUT. The resumable state lives in OUT.partial/checkpoint/ (model, optimizer, scheduler, step, RNG, data
position, log so far), written every --save-every steps and when the run is interrupted (Ctrl-C, SIGTERM, SIGHUP:
the state after the last finished update, _save_at_interrupt); `--resume` continues from it and gives the same
result as an uninterrupted run (converter/heal_state.py). Bad input exits with code 2 and one line.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli_checks import check_free_space, size_text, tensor_bytes
from .errors import HealError
from .heal_data import WindowOrder, pack_windows, read_docs
from .heal_cli import main  # noqa: F401  (care-heal's entry point until it had a module of its own: old installs)
from .heal_options import FINGERPRINT_KEYS, HealOptions, check_inputs, partial_dir, teacher_revision
from .heal_state import (checkpoint_bytes, checkpoint_due, disk_needed, load_checkpoint_weights, load_trainer_state,
                         rng_state, save_checkpoint, saves_planned, set_rng_state)
from .interrupts import describe, interrupts_held, say
from .model_card import add_healing
from .plot import plot_heal_curve
from .source_match import mismatch, shape_of_config
from .versions import recorded_versions
from .write import replace_dir

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
HEAL_FILES = ("heal_log.json", "heal_curve.png")
# ----------------------------------------------------------------------------------------- losses

def heal_losses(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor, tau: float):
    """(CE of the student without temperature, KL(teacher_tau || student_tau) averaged over tokens)."""
    V = s_logits.shape[-1]
    s = s_logits.float()
    ce = F.cross_entropy(s[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    ls = F.log_softmax(s.reshape(-1, V) / tau, -1)
    lt = F.log_softmax(t_logits.float().reshape(-1, V) / tau, -1)
    kd = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    return ce, kd


def perplexity(model, tokenizer, texts, seqlen, max_tokens, device, batch_size, progress: bool) -> float:
    was_training = model.training
    model.eval()
    try:
        from .eval_cli import perplexity as eval_perplexity

        with torch.no_grad(), _autocast(device):
            return float(eval_perplexity(model, tokenizer, texts, seqlen, max_tokens, device, batch_size,
                                         progress)["ppl"])
    finally:
        model.train(was_training)


def _autocast(device: str):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- training

def kv_split_masks(model) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(kv_b_proj weight, 0/1 mask) of every trainable attention layer whose kv_b_proj is
    block-diagonal, as care-convert writes it: each head's key rows read only c_K (the first r_K
    latent columns), its value rows only c_V. vLLM's CPU backend decodes such a layer with the
    key/value split (scores over [c_K | k_pe], values over c_V; care_vllm/backends/cpu.py), which
    reads 0.55-0.75x the attention FLOPs of the joint latent; a layer whose zero blocks were
    trained falls back to the joint form. --kv-blocks keep zeroes those blocks' gradients, so with
    AdamW (zero gradient -> zero moments -> zero step; decoupled decay of 0 is 0) they stay exactly
    zero. Layers already filled (a healed checkpoint healed again) are left unconstrained."""
    from model_defs.modeling_care import CareMLAAttention

    masks = []
    for attn in model.modules():
        if not isinstance(attn, CareMLAAttention) or not attn.kv_b_proj.weight.requires_grad:
            continue
        w = attn.kv_b_proj.weight
        mask = torch.zeros(attn.n_h, 2, attn.d_h, attn.rank, dtype=w.dtype, device=w.device)
        mask[:, 0, :, : attn.r_k] = 1           # key rows read c_K
        mask[:, 1, :, attn.r_k:] = 1            # value rows read c_V
        mask = mask.view_as(w)
        if not (w.detach() * (1 - mask)).any():
            masks.append((w, mask))
    return masks


def balance_latents(model) -> None:
    """Give every latent dimension a kv_b_proj column of unit norm, its scale moved to what produces it
    (CareMLAAttention.scale_latent_): the same model, parametrized so that AdamW's steps, ~lr on every entry,
    are of one size relative to both factors. Why: the split of scale is free, and care-convert left it to an
    output weighting's arbitrary scale until factorize._unit_columns (2026-12): SmolLM2 converted with
    `--latent joint --objective attention` had kv_a_proj latent rows ~1e-4 and kv_b_proj ~60, and 16 updates at
    the default lr made its held-out perplexity 2.4x worse, not better. Checkpoints converted since are nearly
    balanced already; this makes older ones heal as well. Zero blocks of kv_b_proj stay zero (--kv-blocks keep)."""
    from model_defs.modeling_care import CareMLAAttention

    for attn in model.modules():
        if isinstance(attn, CareMLAAttention) and attn.rank:
            norms = attn.kv_b_proj.weight.detach().double().norm(dim=0)
            attn.scale_latent_(torch.where(norms > 0, norms, torch.ones_like(norms)))


def heal(converted: str | Path, out: str | Path, *, teacher: str, text_files: list, **kw) -> dict:
    """Heal `converted` into `out` (see the module docstring); returns the heal log dict. With progress=False
    (--no-progress) the libraries' bars (transformers' weight loading) are off too, for the call only."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not kw.get("progress", True):
        hf_logging.disable_progress_bar()
    try:
        return _heal(converted, out, teacher=teacher, text_files=text_files, **kw)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _heal(converted: Path | str, out: Path | str, *, teacher: str, text_files: list, **kw) -> dict:
    t_start = time.perf_counter()
    opts = HealOptions(**kw)
    converted, out = Path(converted), Path(out)
    src_cfg = check_inputs(converted, out, teacher, text_files, opts)
    work = partial_dir(out)
    ckpt = work / "checkpoint"
    if work.exists() and not opts.resume:   # --overwrite (check_inputs refused it otherwise)
        shutil.rmtree(work)
    docs = read_docs(text_files, "--text")
    eval_docs = read_docs(opts.eval_text, "--eval-text") if opts.eval_text else None

    from transformers import AutoTokenizer

    import model_defs  # noqa: F401  (registers care_mla with the Auto classes)

    from .checked_load import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(converted)
    windows = pack_windows(tokenizer, docs, opts.seqlen)
    if eval_docs is not None:   # (too short to score is found now, not at the step-0 evaluation after the models load)
        from .eval_cli import EvalError, text_windows

        try:
            text_windows(tokenizer, eval_docs, opts.seqlen, opts.eval_tokens)
        except EvalError as e:
            raise HealError(f"--eval-text: {e}") from None
    per_step = opts.batch_size * opts.grad_accum
    tokens_per_step = per_step * opts.seqlen
    total_steps = max(1, math.ceil(opts.tokens / tokens_per_step))
    # (the schedule's step 0 is at lr 0, the warmup's start; with warmup_steps == total_steps, a one-update run,
    # nothing trained and the run still wrote HEALED: the last update is never a warmup step)
    warmup_steps = min(math.ceil(opts.warmup_ratio * total_steps), total_steps - 1)
    eval_every = opts.eval_every or max(1, total_steps // 10)
    fingerprint = {"converted": str(converted.resolve()), "teacher": str(teacher),
                   "text": [str(Path(f).resolve()) for f in text_files], "windows": int(len(windows)),
                   **{k: getattr(opts, k) for k in FINGERPRINT_KEYS}}

    state = None
    if opts.resume:
        state = load_trainer_state(ckpt)
        made_with = {"kv_blocks": "train", **state.get("fingerprint", {})}   # runs from before --kv-blocks trained them
        diff = [k for k in fingerprint if made_with.get(k) != fingerprint[k]]
        if diff:
            raise HealError(f"--resume: the checkpoint was made with other settings ({', '.join(diff)}); "
                            f"use the same arguments, or --overwrite to start over")

    # ---- models
    from .load import load_source

    device = opts.device
    # with the rope settings the student was converted with (care-convert --hf-overrides)
    src = load_source(teacher, teacher_revision(teacher, src_cfg), hf_overrides=src_cfg.get("source_hf_overrides"),
                      role="teacher")
    teacher_model = src.model
    problem = mismatch(src_cfg, shape_of_config(teacher_model.config), role="teacher", original_name=str(teacher),
                       converted_name=str(converted))
    if problem:   # (checked before loading where the teacher's files could be read: heal_options.check_teacher)
        raise HealError(problem)
    teacher_model.requires_grad_(False).eval()
    teacher_model.to(device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)

    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    student = load_causal_lm(converted, f"the converted model {converted}", HealError, dtype=torch.float32)
    balance_latents(student)   # (a resumed run loads its checkpoint's weights over these)
    if opts.train == "attention":
        for name, p in student.named_parameters():
            p.requires_grad_(".self_attn." in name)
    if opts.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.to(device).train()

    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    split_masks = kv_split_masks(student) if opts.kv_blocks == "keep" else []
    groups = [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    log = {"args": {"converted": str(converted), "teacher": str(teacher), "text": [str(f) for f in text_files],
                    "out": str(out), **{k: v for k, v in asdict(opts).items() if k not in ("progress",)},
                    "eval_every": eval_every},
           "total_steps": total_steps, "warmup_steps": warmup_steps, "tokens_per_step": tokens_per_step,
           "train_windows": int(len(windows)),
           "trainable_parameters": sum(p.numel() for _, p in trainable),
           "kv_split_layers": len(split_masks),
           "steps": [], "eval": [], "teacher_ppl": None, "tokens_seen": 0, "seconds": 0.0,
           "resumed_at_steps": [], "versions": recorded_versions()}
    step = 0
    if opts.resume:
        load_checkpoint_weights(ckpt, student)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        log = state["log"]
        state = None
        log["resumed_at_steps"].append(step)
        log["args"].update(save_every=opts.save_every, stop_after=opts.stop_after, resume=True)
        log["versions"] = recorded_versions()   # (what finished the run)
    check_room_for_checkpoints(student, trainable, converted, out, step, total_steps, opts)
    work.mkdir(exist_ok=True)

    def eval_due(at: int) -> bool:
        return at % eval_every == 0 or at == total_steps

    def evaluate(at: int) -> None:
        if eval_docs is None:
            return
        if log["teacher_ppl"] is None and opts.eval_teacher:
            log["teacher_ppl"] = perplexity(teacher_model, tokenizer, eval_docs, opts.seqlen, opts.eval_tokens,
                                            device, opts.batch_size, opts.progress)
        ppl = perplexity(student, tokenizer, eval_docs, opts.seqlen, opts.eval_tokens, device, opts.batch_size,
                         opts.progress)
        log["eval"].append({"step": at, "tokens": at * tokens_per_step, "ppl": ppl})

    def save(rng: dict | None = None) -> None:
        nonlocal saved_step
        log["seconds"] = round(seconds_before + time.perf_counter() - t_loop, 3)
        try:
            save_checkpoint(work, student, optimizer, scheduler,
                            {"step": step, "samples_seen": step * per_step, "fingerprint": fingerprint, "log": log},
                            rng=rng)
        except OSError as err:   # (a full disk, a quota): one line, and what is left to resume from
            raise HealError(f"could not save the checkpoint after step {step}: {err}"
                            + (f"; {ckpt} still holds step {saved_step} (--resume continues from there)"
                               if saved_step else "")) from err
        saved_step = step

    seconds_before = log["seconds"]
    t_loop = time.perf_counter()
    saved_step = step                 # the step the checkpoint in OUT.partial/ holds (0: none)
    rng_at_step = rng_state()         # the RNG streams as the last finished update left them
    written = False                   # OUT is in place (what is left is removing OUT.partial/)
    try:
        if eval_due(step) and not any(e["step"] == step for e in log["eval"]):   # (a resumed run stopped in it)
            evaluate(step)
        order = WindowOrder(len(windows), opts.seed)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="heal", unit="step", disable=not opts.progress,
                   dynamic_ncols=True)
        stopped = False
        while step < total_steps:
            optimizer.zero_grad(set_to_none=True)
            ce_sum = kd_sum = 0.0
            lr = scheduler.get_last_lr()[0]
            for micro in range(opts.grad_accum):
                first = (step * opts.grad_accum + micro) * opts.batch_size
                x = windows[[order(first + j) for j in range(opts.batch_size)]].long().to(device)
                with _autocast(device):
                    with torch.no_grad():
                        t_logits = teacher_model(input_ids=x, use_cache=False).logits
                    s_logits = student(input_ids=x, use_cache=False).logits
                ce, kd = heal_losses(s_logits, t_logits, x, opts.tau)
                loss = ce + opts.beta * opts.tau ** 2 * kd
                (loss / opts.grad_accum).backward()
                ce_sum += ce.item()
                kd_sum += kd.item()
                del t_logits, s_logits, loss
            for p, mask in split_masks:       # before clipping: the norm is that of the real update
                if p.grad is not None:
                    p.grad.mul_(mask)
            if opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], opts.max_grad_norm)
            with interrupts_held():   # weights, optimizer, schedule, count and log move to the next step together
                optimizer.step()
                scheduler.step()
                step += 1
                ce_m, kd_m = ce_sum / opts.grad_accum, kd_sum / opts.grad_accum
                loss_m = ce_m + opts.beta * opts.tau ** 2 * kd_m
                if not math.isfinite(loss_m):   # the weights are lost from here on: stop before writing them
                    raise HealError(f"training diverged: the loss was {loss_m} at step {step} (lr {lr:.3g}); "
                                    f"nothing was written: lower --lr (and keep --max-grad-norm > 0)")
                log["steps"].append({"step": step, "tokens": step * tokens_per_step, "loss": loss_m, "ce": ce_m,
                                     "kd": kd_m, "lr": lr})
                log["tokens_seen"] = step * tokens_per_step
                rng_at_step = rng_state()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_m:.4f}", ce=f"{ce_m:.3f}", kd=f"{kd_m:.4f}", lr=f"{lr:.2e}")
            if eval_due(step):
                evaluate(step)
                if log["eval"]:
                    bar.set_postfix(loss=f"{loss_m:.4f}", ppl=f"{log['eval'][-1]['ppl']:.3f}", lr=f"{lr:.2e}")
            save_now, stop_now = checkpoint_due(step, total_steps, opts.save_every, opts.stop_after,
                                                opts.keep_checkpoint)
            if save_now:
                save()
            if stop_now:
                stopped = True
                break
        bar.close()
        log["seconds"] = round(seconds_before + time.perf_counter() - t_loop, 3)
        if stopped:
            log["stopped_at_step"] = step
            return log
        log["setup_seconds_last_run"] = round(t_loop - t_start, 3)
        _write_output(student, converted, out, work, log, opts)
        written = True
        shutil.rmtree(work, ignore_errors=True)
    except BaseException as e:
        # (a signal held while write.replace_dir swapped OUT in; one held at a checkpoint's swap names the checkpoint)
        written = written or getattr(e, "swapped_in", None) == out
        try:   # Ctrl-C, SIGTERM, SIGHUP (converter/interrupts.py) within the loop or the write: save the last
            # finished update (a resumed run whose loop is done writes OUT)
            if isinstance(e, KeyboardInterrupt) and not written and step > saved_step:
                _save_at_interrupt(e, save, rng_at_step, step, total_steps, work)
        finally:   # (a second Ctrl-C during that save included) keep OUT.partial only with something to resume from
            if written or not (ckpt / "trainer_state.pt").is_file():
                shutil.rmtree(work, ignore_errors=True)
            if written:
                e.out_written = True   # (an interruption once OUT was in place: care-heal's last line says so)
        raise
    return log


def check_room_for_checkpoints(student, trainable: list, converted: Path, out: Path, step: int, total_steps: int,
                               opts: HealOptions) -> None:
    """Refuse, before the first step, a run whose checkpoints (--save-every, --stop-after, --keep-checkpoint) cannot
    fit beside its output: each holds the fp32 weights and AdamW's moments (trained whole: 3x an fp32 output's size,
    6x a bf16 one's, ~96 GB for 8B), and a full disk would otherwise end the run at its first save, possibly hours
    in. check_inputs already made sure of the output alone."""
    saves, writes_output = saves_planned(step, total_steps, opts.save_every, opts.stop_after, opts.keep_checkpoint)
    if saves:
        one = checkpoint_bytes(student, trainable)
        check_free_space(out, disk_needed(tensor_bytes(converted), one, saves, opts.resume, writes_output),
                         f"{'the healed checkpoint and ' if writes_output else ''}{saves} training checkpoint"
                         f"{'s' if saves > 1 else ''} of at least {size_text(one)} each (--save-every / "
                         f"--stop-after / --keep-checkpoint; two are on disk while one is saved)", HealError)


def _save_at_interrupt(e: KeyboardInterrupt, save, rng: dict, step: int, total_steps: int, work: Path) -> None:
    """Save the state of the last finished update (`step`) when a run is interrupted within the training loop or
    while OUT is written after it, so that `--resume` continues from there (or only writes OUT), to the weights the
    uninterrupted run gives. Why it is that state: an interruption lands either within a step's forward and
    backward passes, which change no weights, optimizer or schedule state (the gradients, which are discarded,
    are all they touch), or within an evaluation, a checkpoint save or the write (which casts copies:
    output_state_dict), and never within the update itself (interrupts_held). The step's RNG streams are the
    ones saved when the update finished. A second Ctrl-C abandons the save (the previous checkpoint, if any,
    stays); a repeated SIGTERM or SIGHUP is ignored, and a scheduler's SIGKILL ends the save, which happens the
    same way. The step saved is recorded on the exception for care-heal's last line."""
    say(f"care-heal: {describe(e)}; saving the state after step {step} of {total_steps} to {work / 'checkpoint'}")
    try:
        save(rng)
    except Exception as err:   # (a full disk): the interruption stays what ends the run
        say(f"care-heal: could not save the state ({type(err).__name__}: {err})")
        return
    e.heal_saved = (step, total_steps)


def _write_output(student, converted: Path, out: Path, work: Path, log: dict, opts: HealOptions) -> None:
    from .load import DTYPES

    src_cfg = json.loads((converted / "config.json").read_text())
    dtype = DTYPES.get(str(src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "float32"), torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if opts.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        student.save_pretrained(tmp, state_dict=output_state_dict(student, dtype))
        for f in converted.iterdir():  # config (verbatim), tokenizer, templates, care_report, plot
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in HEAL_FILES:
                shutil.copy(f, tmp / f.name)
        _check_layout(converted, tmp)
        add_healing(tmp / "README.md", log)
        (tmp / "heal_log.json").write_text(json.dumps(log, indent=1) + "\n")
        plot_heal_curve(log, tmp / "heal_curve.png")
        if opts.keep_checkpoint and (work / "checkpoint").is_dir():
            shutil.move(work / "checkpoint", tmp / "checkpoint")
        replace_dir(tmp, out)
    except BaseException:
        if (tmp / "checkpoint").is_dir() and not (work / "checkpoint").exists():   # (--keep-checkpoint's, kept)
            shutil.move(tmp / "checkpoint", work / "checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_state_dict(student, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The student's weights as the output stores them (floating point ones in `dtype`, on the CPU), as copies:
    the student keeps its training weights while OUT is written, so that an interruption then can still save
    them to resume from (heal). Tensors the model ties (an embedding shared with the LM head) stay one tensor, as
    save_pretrained expects; those already in `dtype` on the CPU are not copied. The copies take the output's
    size in host memory (16 GB for an 8B model in bf16)."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in student.state_dict().items():
        key = (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.detach().to("cpu", dtype=dtype) if t.is_floating_point() else t.detach().cpu()
        out[name] = cast[key]
    return out


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


def _check_layout(converted: Path, healed: Path) -> None:
    a, b = tensor_shapes(converted), tensor_shapes(healed)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:5]
        raise RuntimeError(f"healed checkpoint layout differs from the converted one: {diff}")


if __name__ == "__main__":   # `python -m converter.heal`, as in the committed benchmark command lines
    sys.exit(main())
