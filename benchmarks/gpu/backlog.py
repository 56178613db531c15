"""What the GPU sessions still owe issue 4, in the order to do it, and what fits in the call at hand.

    python benchmarks/gpu/backlog.py                 # on the CPU machine: done / pending, time estimates
    python benchmarks/gpu/backlog.py run --step v2 --hard-stop-s 450 --out $OUT --work /tmp/care --tokenizer TOK

Why a backlog: a lent GPU session has 15 minutes of device time in all (machine start, calls, idle
waits) and one call at most 10, while issue 4's measurements take about an hour of runs. So they are
one ordered list spread over as many sessions as the draw lends. Each session makes two calls
(`step.sh v1`, `step.sh v2`: vLLM travels in two parts); each call takes the queue's pending items
in order and starts one only when its time estimate fits before the call's hard stop (a run killed
at the limit brings back nothing), moving on to shorter ones otherwise. `collect.py` commits what
came back under benchmarks/results/gpu/, which travels with the next session's checkout: that is
what marks an item done. The estimates come from those committed runs (the slowest of the same
kind, shape and length) and, before any GPU run exists, from the defaults below (guesses from the
H100 anchors in ../shared/gpu/README.md plus ~90 s of vLLM start per engine).

An item is pending until its result is committed: a complete correctness file from a GPU (pass or
FAIL: a failure is a finding to fix, and rerunning unchanged code would only spend the lease; after
the fix, `--redo correctness:ARCH`); a perf run on a GPU with exit code 0 and a measured throughput
(a crashed run stays pending); a conversion of the full 8B/4B shape with the issue's calibration size
on a GPU. A CPU dry run never counts. `--redo KIND:ARG` reruns a done item.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perf import device_name, run_key, run_logged, stopping_cleanly  # noqa: E402
RESULTS = HERE.parents[0] / "results" / "gpu"

FULL_CALIBRATION_TOKENS = 256 * 2048          # the conversion-speed setting
ATTEMPTS = "gpu_attempts.json"   # every item started on a GPU: its seconds and exit code (collect.py keeps them all)
KILLED_RC = -9                   # run_logged's exit code for a run it stopped at its time limit

# (kind, argument); step v1 takes `convert` (needs no vLLM), step v2 everything else.
BACKLOG = """
convert      llama3-8b
convert      qwen3-4b
correctness  llama
throughput   llama3-8b:gqa@16384
throughput   llama3-8b:care576@16384
throughput   llama3-8b:mixed@16384
throughput   llama3-8b:mla576@16384
correctness  qwen3
serve        llama3-8b:gqa@1024,8192,16384
serve        llama3-8b:care576@1024,8192,16384
serve        llama3-8b:mixed@1024,8192,16384
throughput   llama3-8b:care576@8192
throughput   llama3-8b:mla576@8192
throughput   llama3-8b:gqa@8192
throughput   llama3-8b:mixed@8192
throughput   llama3-8b:care576@1024
throughput   llama3-8b:mla576@1024
throughput   llama3-8b:gqa@1024
throughput   llama3-8b:mixed@1024
throughput   qwen3-4b:gqa@16384
throughput   qwen3-4b:care576@16384
throughput   qwen3-4b:mixed@16384
serve        qwen3-4b:gqa@1024,8192,16384
serve        qwen3-4b:care576@1024,8192,16384
serve        qwen3-4b:mixed@1024,8192,16384
throughput   llama3-8b:parity@16384
throughput   llama3-8b:uniform1024@16384
serve        llama3-8b:mla576@1024,8192,16384
"""

# seconds, vLLM start included; 4B-shaped runs take SMALL_SHAPE_FACTOR of the 8B's. The conversions
# include the o_proj refit (converter default since 2026-12-03; on the CPU it takes 2.3x the calibration
# at these shapes: benchmarks/results/convert_speed_llama3-8b-2layers_cpu_refit.md), hence more than the
# 150 / 90 s guessed before it. Correctness serves four models per architecture since the `rope96`
# conversion was added (2026-12-04; 210 s guessed for three).
DEFAULT_S = {"convert:llama3-8b": 220, "convert:qwen3-4b": 130, "correctness": 270,
             "throughput": {1024: 120, 8192: 190, 16384: 215},
             "serve_start": 100, "serve": {1024: 45, 8192: 110, 16384: 125}}
SMALL_SHAPE_FACTOR = {"qwen3-4b": 0.7}


@dataclass(frozen=True)
class Item:
    kind: str        # convert | correctness | throughput | serve
    arg: str         # shape | arch | "shape:model@len[,len...]"

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}"

    @property
    def step(self) -> str:
        return "v1" if self.kind == "convert" else "v2"

    def perf_parts(self) -> tuple[str, str, list[int]]:
        shape, rest = self.arg.split(":")
        model, lens = rest.split("@")
        return shape, model, [int(x) for x in lens.split(",")]

    def perf_keys(self) -> list[str]:
        shape, model, lens = self.perf_parts()
        return [run_key(shape, model, n, self.kind) for n in lens]


def backlog() -> list[Item]:
    return [Item(*line.split()) for line in BACKLOG.strip().splitlines()]


# ------------------------------------------------------------------------------------------------
# what is already measured: committed results, plus this machine's earlier calls and this call

def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def on_gpu(result: dict) -> bool:
    """Whether a result file or run was measured on a GPU (a CPU dry run never counts)."""
    return result.get("device_name") not in (None, "cpu")


def measured(run: dict) -> bool:
    """A perf run that measured what the issue asks: on a GPU, exit code 0, a throughput. (A CPU dry
    run, with shortened lengths, measures nothing.)"""
    measure = "output_tok_s" if run.get("key", "").endswith("/throughput") else "output_throughput"
    return bool(run.get("rc") == 0 and run.get(measure) and on_gpu(run) and not run.get("len_divisor"))


class Results:
    """Everything measured so far, from several folders (committed, work, this call's $OUT)."""

    def __init__(self, folders: list[Path]):
        self.perf: dict[str, dict] = {}
        self.correctness: dict[str, dict] = {}
        self.convert: dict[str, dict] = {}
        self.attempts: dict[tuple, dict] = {}   # (item, device, date) -> an item's start on a GPU, however it ended
        for d in folders:
            for a in (_load(d / ATTEMPTS) or {}).get("attempts", []):
                self.attempts[attempt_id(a)] = a
            for mode in ("throughput", "serve"):
                for r in (_load(d / f"perf_{mode}.json") or {}).get("runs", []):
                    self.perf[r["key"]] = r
            for f in sorted(d.glob("correctness_*.json")):
                c = _load(f)
                if c:
                    self.correctness[f.stem.removeprefix("correctness_")] = c
            for f in sorted(d.glob("convert_speed_*_gpu.json")):
                c = _load(f)
                if c:
                    self.convert[c["shape"]] = c

    def done(self, item: Item) -> bool:
        if item.kind == "convert":
            c = self.convert.get(item.arg)
            return bool(c and c.get("calibration_tokens", 0) >= FULL_CALIBRATION_TOKENS and on_gpu(c))
        if item.kind == "correctness":
            c = self.correctness.get(item.arg)
            return bool(c and c.get("complete") and on_gpu(c))
        return not self.pending_lens(item)

    def ran(self, item: Item) -> bool:
        """The item ran to the end without an error, whatever it measured (how a CPU dry run passes)."""
        if item.kind == "convert":
            return item.arg in self.convert
        if item.kind == "correctness":
            c = self.correctness.get(item.arg)
            return bool(c and c.get("complete") and not c.get("failed"))
        return all(self.perf.get(k, {}).get("rc") == 0 for k in item.perf_keys())

    def pending_lens(self, item: Item) -> list[int]:
        _shape, _model, lens = item.perf_parts()
        return [n for n, key in zip(lens, item.perf_keys()) if not measured(self.perf.get(key, {}))]

    def estimate_s(self, item: Item) -> float:
        """Seconds the item should take: the slowest committed run like it, else the default; and more than the
        longest time it ran before it was stopped at its limit (else a session would start it again, to be
        stopped at the same point, in every session)."""
        killed = [a["wall_s"] for a in self.attempts.values() if a["item"] == item.name and a["rc"] == KILLED_RC]
        return beyond(self._estimate_s(item), killed)

    def _estimate_s(self, item: Item) -> float:
        if item.kind == "convert":
            c = self.convert.get(item.arg)
            if c and on_gpu(c):
                return c.get("build_random_model_s", 0) + c["convert_total_s"] + 20
            return DEFAULT_S[item.name]
        if item.kind == "correctness":
            seen = [c["total_s"] for c in self.correctness.values() if c.get("total_s") and on_gpu(c)]
            return max(seen) if seen else DEFAULT_S["correctness"]
        shape, _model, _ = item.perf_parts()
        scale = SMALL_SHAPE_FACTOR.get(shape, 1.0)

        def like(n: int) -> float:
            same = [r for r in self.perf.values() if r.get("shape") == shape and r.get("input_len") == n
                    and r["key"].endswith(item.kind)]
            seen = [r["wall_s"] for r in same if measured(r)]
            killed = [r["wall_s"] for r in same if r.get("rc") == KILLED_RC and on_gpu(r) and r.get("wall_s")]
            return beyond(max(seen) if seen else DEFAULT_S[item.kind][n] * scale, killed)

        lens = self.pending_lens(item) or item.perf_parts()[2]
        if item.kind == "throughput":
            return sum(like(n) for n in lens)
        starts = [r["server_start_s"] for r in self.perf.values() if r.get("shape") == shape
                  and r.get("server_start_s") and measured(r)]
        return (max(starts) if starts else DEFAULT_S["serve_start"] * scale) + sum(like(n) for n in lens)


def beyond(estimate: float, killed_after_s: list[float]) -> float:
    """An estimate, raised above the longest run that was stopped at its limit (it needs more than that)."""
    return max(estimate, max(killed_after_s) + max(60.0, 0.25 * max(killed_after_s))) if killed_after_s else estimate


def attempt_id(a: dict) -> tuple:
    return a["item"], a.get("device_name"), a.get("date")


def record_attempt(out: Path, item: Item, wall_s: float, rc: int, limit_s: float, device: str) -> None:
    """Add an item's start on a GPU to $OUT/gpu_attempts.json (a CPU dry run records nothing)."""
    if device == "cpu":
        return
    old = _load(out / ATTEMPTS) or {"attempts": []}
    old["attempts"].append({"item": item.name, "wall_s": round(wall_s, 1), "rc": rc, "limit_s": round(limit_s, 1),
                            "device_name": device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    (out / ATTEMPTS).write_text(json.dumps(old, indent=1))


# ------------------------------------------------------------------------------------------------
# running the pending items of one step on the device

def item_command(item: Item, args, results: Results) -> list[str]:
    py = sys.executable
    if item.kind == "convert":
        return [py, str(HERE.parent / "convert_speed.py"), "--shape", item.arg, "--device", args.device,
                *shlex.split(args.speed_args), "--out-json", str(args.out / f"convert_speed_{item.arg}_gpu.json")]
    if item.kind == "correctness":
        return [py, str(HERE / "correctness.py"), "--archs", item.arg, "--device", args.device,
                "--work", str(args.work / "corr"), *shlex.split(args.corr_args),
                "--out-json", str(args.out / f"correctness_{item.arg}.json")]
    shape, model, all_lens = item.perf_parts()
    lens = ",".join(map(str, results.pending_lens(item) or all_lens))      # all of them: a --redo
    return [py, str(HERE / "perf.py"), "--mode", item.kind, "--tokenizer", str(args.tokenizer),
            "--work", str(args.work / "perf"), "--out-json", str(args.out / f"perf_{item.kind}.json"),
            "--plan", f"{shape}:{model}@{lens}", *shlex.split(args.perf_args)]


def run(args) -> int:
    t0 = time.time()
    keep = args.work / "results"          # survives between calls while the machine stays warm
    keep.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    redo = set(args.redo)
    folders = [] if args.ignore_committed else [RESULTS]
    summary, started = [], 0
    for item in (i for i in backlog() if i.step == args.step):
        results = Results(folders + [keep, args.out])
        if results.done(item) and item.name not in redo:
            continue
        if args.max_items is not None and started >= args.max_items:
            break
        left = args.hard_stop_s - (time.time() - t0)
        est = results.estimate_s(item) * args.estimate_factor
        if est > left:
            summary.append(f"skipped  {item.name}: needs ~{est:.0f} s, {left:.0f} s left")
            print(summary[-1], flush=True)
            continue
        cmd = item_command(item, args, results)
        if item.kind in ("throughput", "serve"):   # perf.py stops its own runs in time, and kills them at the limit
            cmd += ["--budget-s", f"{left:.0f}", "--hard-stop-s", f"{left - 5:.0f}"]
        print(f"start    {item.name} (~{est:.0f} s, {left:.0f} s left): {' '.join(cmd[1:])}", flush=True)
        t1 = time.time()
        started += 1
        rc = run_logged(cmd, args.work / f"{item.name.replace(':', '_').replace('/', '_')}.log", left - 3)
        record_attempt(args.out, item, time.time() - t1, rc, left - 3, args.device)
        for f in args.out.glob("*.json"):      # keep this call's results for the machine's next call
            (keep / f.name).write_text(f.read_text())
        after = Results(folders + [keep, args.out])
        verdict = ("done    " if after.done(item) else
                   "ran      (not counted as done: a CPU dry run)" if args.device == "cpu" and after.ran(item) else
                   "FAILED  ")
        summary.append(f"{verdict} {item.name}: rc {rc}, {time.time() - t1:.0f} s (estimated {est:.0f})")
        print(summary[-1], flush=True)
        redo.discard(item.name)
    print(f"\nbacklog step {args.step}, {time.time() - t0:.0f} s of {args.hard_stop_s:.0f}:\n  " +
          "\n  ".join(summary or ["nothing pending fits or nothing is pending"]), flush=True)
    return 0


def show(args) -> int:
    results = Results([RESULTS])
    total = {"v1": 0.0, "v2": 0.0}
    for item in backlog():
        done = results.done(item)
        est = 0.0 if done else results.estimate_s(item)
        total[item.step] += est
        print(f"{item.step}  {'done   ' if done else 'pending'}  {item.name:45s} {'' if done else f'~{est:.0f} s'}")
    print(f"\npending: v1 ~{total['v1']:.0f} s, v2 ~{total['v2']:.0f} s of runs "
          f"(a 15-minute lease, after the machine's start: v1 up to ~270 s of runs, then v2 ~370 s; v2 ~540 s when "
          f"v1 only stashes: benchmarks/gpu/README.md)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run the pending items of a step that fit (on the device)")
    r.add_argument("--step", choices=["v1", "v2"], required=True)
    r.add_argument("--hard-stop-s", type=float, required=True, help="every item must end within this many seconds")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--tokenizer", type=Path, default=None)
    r.add_argument("--device", default="cuda")
    r.add_argument("--speed-args", default="", help="extra args for convert_speed.py (dry runs: toy sizes)")
    r.add_argument("--corr-args", default="", help="extra args for correctness.py")
    r.add_argument("--perf-args", default="", help="extra args for perf.py")
    r.add_argument("--estimate-factor", type=float, default=1.0, help="scale every estimate (dry runs: 0)")
    r.add_argument("--ignore-committed", action="store_true", help="treat committed results as not done (dry runs)")
    r.add_argument("--max-items", type=int, default=None, help="start at most this many items (dry runs)")
    r.add_argument("--redo", action="append", default=[], help="KIND:ARG to run even if done (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    return show(args)


if __name__ == "__main__":
    sys.exit(stopping_cleanly(main, "backlog.py")())
