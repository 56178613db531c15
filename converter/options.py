"""care-convert's options: the keyword arguments of converter.pipeline.convert, their defaults and their checks.

Torch-free (as are the constants the converter's modules take from here), so that care-convert's command line
refuses a bad option before the ~5 s import of torch and transformers (converter/cli.py), as it refuses a
mistyped path. What needs the source's shape (a budget above its parity, a rope key wider than its keys) is
checked from its config.json or GGUF metadata before loading where that can be read (converter/source_checks.py),
and from the loaded model's config in any case (converter/cache_plan.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from . import source_rope
from .cli_checks import check_device
from .errors import ConversionError

METHODS = ("care", "svd", "asvd")                 # converter/factorize.py
POLICIES = ("uniform", "adjusted")                # per-layer ranks, converter/allocate.py
OBJECTIVES = ("kv", "attention")
LATENTS = ("separate", "joint")                   # joint: converter/joint_latent.py
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype's, besides auto
CALIB_DTYPES = ("float32", "bfloat16")            # --calib-dtype's
AUTO = "auto"   # --k-share and --joint-key-weight: chosen by scoring candidates (kshare_auto.py, joint_latent.py)
SCORE_TOKENS = 4096   # calibration tokens those candidates are scored on (whole windows, at least one)
RIDGE = 0.01   # the o_proj refit's ridge as a fraction of mean diag(C_o'o'): --o-proj-refit-ridge (docs/RESULTS.md)


def parse_shard_size(size: int | str) -> int:
    """Bytes of a shard size such as "2GB" or "500MB" (huggingface_hub's units); ValueError unless positive."""
    from huggingface_hub.serialization._base import parse_size_to_int

    nbytes = parse_size_to_int(size) if isinstance(size, str) else int(size)
    if nbytes <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return nbytes


@dataclass
class Options:
    method: str = "care"
    ranks: str = "adjusted"
    kv_ratio: float | None = None
    kv_width: int | None = None
    rope_dim: int | None = None
    calib_samples: int = 256
    calib_seqlen: int = 256
    calib_batch: int = 8
    device: str = "cpu"
    seed: int = 0
    dtype: str = "auto"
    min_rank_frac: float = 0.5
    max_rank_frac: float = 2.0
    k_share: float | str | None = None   # or "auto" (converter/kshare_auto.py)
    k_share_score_tokens: int = SCORE_TOKENS   # calibration tokens "auto" scores its candidates on
    rank_multiple: int = 1        # ranks in units of this many values (allocate.py: kernel-friendly widths)
    overwrite: bool = False
    stats_cache: str | None = None
    calib_dtype: str = "float32"
    rope_select: str = "qk"
    rope_distance: float = 1024.0
    objective: str = "kv"
    latent: str = "separate"      # or "joint": one latent for keys and values (converter/joint_latent.py)
    joint_key_weight: float | str | None = None  # joint + --objective attention: key errors' weight against values'
    #                                              (None: joint_latent.DEFAULT_KEY_WEIGHT), or "auto"
    max_shard_size: str = "2GB"
    revision: str | None = None   # Hub revision when the source is a repo id
    o_proj_refit: bool = True     # least-squares refit of o_proj to the converted attention (converter/refit.py)
    o_proj_refit_ridge: float = RIDGE   # its ridge, as a fraction of the mean diagonal of C_o'o'
    hf_overrides: dict | None = None   # rope/context settings for the source config (source_rope.apply_overrides)

    @property
    def applied_refit_ridge(self) -> float | None:
        """The refit's ridge as config.json and care_report.json record it: None without the refit."""
        return self.o_proj_refit_ridge if self.o_proj_refit else None

    def validate(self) -> None:
        if self.hf_overrides is not None:
            source_rope.check_overrides(self.hf_overrides)
        if self.method not in METHODS:
            raise ConversionError(f"unknown --method {self.method!r} (choose from {', '.join(METHODS)})")
        if not 0 <= self.seed < 2**63:   # (torch's generator seed: beyond it an OverflowError traceback)
            raise ConversionError(f"--seed must be in [0, 2**63) (got {self.seed})")
        if self.ranks not in POLICIES:
            raise ConversionError(f"unknown --ranks {self.ranks!r} (choose from {', '.join(POLICIES)})")
        if self.kv_ratio is not None and self.kv_width is not None:
            raise ConversionError("give either --kv-ratio or --kv-width, not both")
        if self.kv_ratio is not None and not (0 < self.kv_ratio <= 1.0):
            why = "a budget above parity (1.0) is refused" if self.kv_ratio > 1 else "it is the kept share of the cache"
            raise ConversionError(f"--kv-ratio must be in (0, 1]: {why} (got {self.kv_ratio})")
        if self.k_share is not None and self.k_share != AUTO and not (
                isinstance(self.k_share, (int, float)) and 0 < self.k_share < 1):
            raise ConversionError(f"--k-share must be in (0, 1), the fraction of the latent given to K, or "
                                  f"{AUTO} (got {self.k_share})")
        if self.k_share_score_tokens < 1:
            raise ConversionError(f"--k-share-score-tokens must be >= 1 (got {self.k_share_score_tokens})")
        if self.rope_dim is not None and (self.rope_dim <= 0 or self.rope_dim % 2):
            raise ConversionError(f"--rope-dim must be a positive even number (got {self.rope_dim})")
        if self.rank_multiple < 1:
            raise ConversionError(f"--rank-multiple must be a positive number of values (got {self.rank_multiple})")
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.calib_batch < 1:
            raise ConversionError(f"--calib-samples and --calib-batch must be >= 1 and --calib-seqlen >= 2 (got "
                                  f"{self.calib_samples}, {self.calib_batch}, {self.calib_seqlen})")
        if not (math.isfinite(self.min_rank_frac) and math.isfinite(self.max_rank_frac)
                and 0 <= self.min_rank_frac <= 1 <= self.max_rank_frac):
            raise ConversionError(f"--min-rank-frac must be in [0, 1] and --max-rank-frac >= 1: the per-layer bounds "
                                  f"of adjusted ranks as fractions of the uniform rank (got {self.min_rank_frac}, "
                                  f"{self.max_rank_frac})")
        if not (math.isfinite(self.rope_distance) and self.rope_distance > 0):
            raise ConversionError(f"--rope-distance must be a positive number of tokens (got {self.rope_distance})")
        if self.rope_select not in ("qk", "key"):
            raise ConversionError(f"unknown --rope-select {self.rope_select!r} (choose from qk, key)")
        if self.objective not in OBJECTIVES:
            raise ConversionError(f"unknown --objective {self.objective!r} (choose from {', '.join(OBJECTIVES)})")
        if self.latent not in LATENTS:
            raise ConversionError(f"unknown --latent {self.latent!r} (choose from {', '.join(LATENTS)})")
        if self.latent == "joint" and self.k_share is not None:
            raise ConversionError("--k-share splits separate K and V latents: a joint latent (--latent joint) has no "
                                  "split; drop --k-share")
        if self.joint_key_weight is not None:
            if self.latent != "joint" or self.objective != "attention":
                raise ConversionError("--joint-key-weight sets how a joint latent's attention objective weighs keys "
                                      "against values: it needs --latent joint --objective attention")
            # (beyond 1e6 either way one part's error no longer counts at all; at 1e305 the weighting overflowed
            # and the checkpoint was NaN with exit 0)
            if self.joint_key_weight != AUTO and not (
                    isinstance(self.joint_key_weight, (int, float)) and math.isfinite(self.joint_key_weight)
                    and 1e-6 <= self.joint_key_weight <= 1e6):
                raise ConversionError(f"--joint-key-weight must be a positive number in [1e-6, 1e6] or {AUTO} "
                                      f"(got {self.joint_key_weight})")
        if self.objective != "kv" and self.method != "care":
            raise ConversionError(f"--objective {self.objective} needs --method care (got {self.method})")
        # (above 1e6 the refit returns o_proj unchanged to 1e-6 and its reported errors cancel to 0.0; below 1e-9
        # the fit of a rank-deficient moment gave o_proj entries of 6.5e7)
        if not (math.isfinite(self.o_proj_refit_ridge) and 1e-9 <= self.o_proj_refit_ridge <= 1e6):
            raise ConversionError(f"--o-proj-refit-ridge must be a positive number in [1e-9, 1e6]: the ridge that "
                                  f"keeps o_proj near the original where calibration says little (got "
                                  f"{self.o_proj_refit_ridge}; --no-o-proj-refit keeps the original o_proj)")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ConversionError(f"unknown --calib-dtype {self.calib_dtype!r} (choose from {', '.join(CALIB_DTYPES)})")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ConversionError(f"unknown --dtype {self.dtype!r} (choose from auto, {', '.join(DTYPE_NAMES)})")
        try:
            parse_shard_size(self.max_shard_size)
        except ValueError:
            raise ConversionError(f"--max-shard-size must be a positive size such as 2GB or 500MB "
                                  f"(got {self.max_shard_size!r})") from None
        if self.stats_cache is not None:
            cache = Path(self.stats_cache)
            if cache.is_dir():
                raise ConversionError(f"--stats-cache {cache}: is a folder; give a file path, "
                                      f"e.g. {cache / 'stats.pt'}")
            if not cache.parent.is_dir():
                raise ConversionError(f"--stats-cache {cache}: its folder does not exist")
        check_device(self.device)
