"""care-heal's options and the checks of its input that need no model: torch-free, so that the command line
(converter/heal_cli.py) refuses a mistyped path or option at once instead of after the ~5 s import of torch
and transformers. converter.heal.heal() runs the same checks for callers that use it directly."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from .calib_data import check_files
from .cli_checks import check_device, check_free_space, prepare_out, read_converted_config, read_json, tensor_bytes
from .errors import HealError

TRAIN = ("attention", "all")     # --train: the MLA self_attn parameters only, or every parameter
KV_BLOCKS = ("keep", "train")    # --kv-blocks: kv_b_proj's zero blocks kept zero, or trained
FP32_MAX = 3.4028234663852886e38   # (torch.finfo(torch.float32).max, without importing torch)

# what must be equal for --resume to continue the same run
FINGERPRINT_KEYS = ("tokens", "tau", "beta", "lr", "weight_decay", "warmup_ratio", "seqlen", "batch_size",
                    "grad_accum", "max_grad_norm", "train", "kv_blocks", "seed")


@dataclass
class HealOptions:
    tokens: int = 0
    tau: float = 1.0
    beta: float = 1.0
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seqlen: int = 512
    batch_size: int = 8
    grad_accum: int = 8
    train: str = "all"
    kv_blocks: str = "train"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    seed: int = 0
    eval_text: list = field(default_factory=list)
    eval_every: int | None = None
    eval_tokens: int = 32768
    eval_teacher: bool = False
    save_every: int | None = None
    stop_after: int | None = None
    resume: bool = False
    keep_checkpoint: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.tokens <= 0:
            raise HealError(f"--tokens must be positive (got {self.tokens})")
        if self.seqlen < 2:
            raise HealError(f"--seqlen must be >= 2 (got {self.seqlen})")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise HealError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.eval_tokens < 2:   # (a perplexity scores each token after the first)
            raise HealError(f"--eval-tokens must be >= 2 (got {self.eval_tokens})")
        if not 0 <= self.seed < 2**32:   # (the data order seeds torch with seed * 1_000_003 + epoch, an int64)
            raise HealError(f"--seed must be in [0, 2**32) (got {self.seed})")
        for name in ("eval_every", "save_every", "stop_after"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise HealError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
        # (comparisons alone let nan through: a nan --lr trained to nan weights)
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise HealError(f"--tau must be a positive number (got {self.tau})")
        finite = all(math.isfinite(v) for v in (self.beta, self.lr, self.weight_decay, self.max_grad_norm))
        # (the optimizer holds lr in fp32: above its range, 3.4e38, AdamW failed with a traceback)
        if not finite or self.beta < 0 or not 0 < self.lr <= FP32_MAX or self.weight_decay < 0 \
                or self.max_grad_norm < 0:
            raise HealError(f"--beta, --weight-decay, --max-grad-norm must be >= 0 and --lr > 0, all finite and "
                            f"--lr within fp32 (got {self.beta}, {self.weight_decay}, {self.max_grad_norm}, {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise HealError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.train not in TRAIN:
            raise HealError(f"--train must be 'attention' or 'all' (got {self.train!r})")
        if self.kv_blocks not in KV_BLOCKS:
            raise HealError(f"--kv-blocks must be 'keep' or 'train' (got {self.kv_blocks!r})")
        check_device(self.device, HealError)
        if self.eval_teacher and not self.eval_text:
            raise HealError("--eval-teacher needs --eval-text")


def parse_tokens(s: str) -> int:
    """'20000', '50k', '10M', '1.5B' -> int."""
    s = str(s).strip()
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(s[-1:].lower(), 1)
    try:
        return int(float(s[:-1] if mult > 1 else s) * mult)
    except (ValueError, OverflowError):   # (int() of nan: ValueError; of inf: OverflowError)
        raise argparse.ArgumentTypeError(f"not a token count: {s!r} (e.g. 200000, 50k, 10M)") from None


def check_converted(path: Path) -> dict:
    if not path.is_dir():
        raise HealError(f"converted checkpoint not found: {path}")
    cfg = read_converted_config(path, HealError)
    if not list(path.glob("*.safetensors")):
        raise HealError(f"{path}: no *.safetensors weights")
    return cfg


def teacher_revision(teacher: str, converted_cfg: dict) -> str | None:
    """A Hub teacher named as at conversion time is read at the commit the student was converted from."""
    same_hub_source = teacher == converted_cfg.get("source_model") and not Path(teacher).exists()
    return converted_cfg.get("source_revision") if same_hub_source else None


def check_teacher(teacher: str, converted: Path, converted_cfg: dict) -> None:
    """Before loading: the teacher exists, is not a care_mla checkpoint, is of an architecture care-convert takes,
    and has the shape of the model `converted` was converted from (converter/source_match.py), as far as its
    config.json or GGUF metadata can be read without loading it. A repo id not in the local Hugging Face cache is
    checked once loaded (converter/heal.py)."""
    from .architectures import check_stored_config
    from .errors import ConversionError
    from .hub import SMOLLM2_ALIAS, looks_like_repo_id
    from .source_checks import source_config
    from .source_match import mismatch, shape_of_json

    p = Path(teacher)
    if teacher != SMOLLM2_ALIAS and not p.exists() and not looks_like_repo_id(teacher):
        raise HealError(f"teacher not found: {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise HealError(f"teacher {p}: not a checkpoint folder (no config.json)")
        read_json(p / "config.json", HealError, named="teacher ")
    found = source_config(teacher, teacher_revision(teacher, converted_cfg))
    if found is None:
        return
    where, raw, from_gguf_metadata = found
    if raw.get("model_type") == "care_mla":
        raise HealError(f"teacher {teacher} is a converted care_mla checkpoint; the teacher is the ORIGINAL model")
    if not from_gguf_metadata:
        try:
            check_stored_config(raw, f"teacher {where}")
        except ConversionError as e:
            raise HealError(str(e)) from None
    problem = mismatch(converted_cfg, shape_of_json(raw), role="teacher", original_name=teacher,
                       converted_name=str(converted))
    if problem:
        raise HealError(problem)


def check_inputs(converted: Path, out: Path, teacher: str, text_files: list, opts: HealOptions) -> dict:
    """Everything about a heal request that can be checked without a model: the options, the converted
    checkpoint (its config.json is returned), the teacher (check_teacher), OUT and OUT.partial/ (an interrupted
    run), and that the text files exist (their contents are read, and an empty text refused, when the run starts)."""
    opts.validate()
    src_cfg = check_converted(converted)
    check_teacher(str(teacher), converted, src_cfg)
    prepare_out(out, opts.overwrite, [("converted checkpoint", converted), ("teacher", teacher),
                                      *(("--text file", f) for f in text_files),
                                      *(("--eval-text file", f) for f in opts.eval_text or ())])
    check_free_space(out, tensor_bytes(converted), "the healed checkpoint", HealError)   # (its size: same tensors)
    work = partial_dir(out)
    if opts.resume:
        if not (work / "checkpoint" / "trainer_state.pt").is_file():
            raise HealError(f"--resume: no checkpoint at {work / 'checkpoint'}")
    elif work.exists() and not opts.overwrite:
        raise HealError(f"{work} exists (an interrupted run): pass --resume to continue it or "
                        f"--overwrite to start over")
    check_files(text_files, "--text")
    if opts.eval_text:
        check_files(opts.eval_text, "--eval-text")
    return src_cfg


def partial_dir(out: Path) -> Path:
    """Where a run works (and keeps its resumable checkpoint) until it renames the result to OUT."""
    return out.parent / f"{out.name}.partial"
