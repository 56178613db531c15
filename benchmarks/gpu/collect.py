"""Turn what a GPU session brought back ($OUT files) into committed results + one markdown report.

    python benchmarks/gpu/collect.py --from /work/.device/<call>/files --into benchmarks/results/gpu

Reads whichever of these exist (several calls may each bring some; run once per fetched folder,
results accumulate in --into): correctness_<arch>.json, perf_throughput.json, perf_serve.json,
convert_speed_*.json, heal_*.json (+ their .png / .md / logs tarballs, copied as they are), then
(re)writes --into/REPORT.md from everything in --into, with the issue's targets checked:
  * converted width 576 within 5 % of the stock DeepSeek-style MLA 576 at every input length;
  * some converted width >= 1.3x the GQA original's output tok/s at 16K in; mixed widths >= 1.2x;
  * conversion of the 8B shape < 180 s;  * healed perplexity within 3 % of the original's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import md_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backlog import ATTEMPTS, attempt_id, on_gpu  # noqa: E402


MAX_COMMITTED_LOGS = 2 << 20   # a logs tarball above this stays out of the repository


def load(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def gpu_of(run: dict) -> str:
    return run.get("device_name") or "GPU not recorded"


def run_id(run: dict) -> tuple[str, str]:
    """A perf run's identity: what it measured and on which accelerator (sessions may be lent different kinds, an
    H100 or an H200, and a run on one must not replace the other's)."""
    return run["key"], gpu_of(run)


def merge_records(into: Path, name: str, new: dict | None, field: str = "runs", ident=run_id) -> dict | None:
    """A results file that accumulates over sessions (perf files: runs, newest wins per key and device;
    gpu_attempts.json: every item start, from which backlog.py's estimates learn): keep every record ever brought
    back, the newest per `ident`."""
    old = load(into / name) or {field: []}
    if new:
        keyed = {ident(r): r for r in old[field] + new.get(field, [])}
        old[field] = list(keyed.values())
        (into / name).write_text(json.dumps(old, indent=1))
    return old if old[field] else None


def merged_correctness(into: Path) -> dict | None:
    """One report from the per-architecture files (each GPU session may bring one), newest file last."""
    files = sorted(into.glob("correctness_*.json"), key=lambda f: f.stat().st_mtime)
    parts = [c for c in map(load, files) if c]
    if not parts:
        return None
    merged = {**parts[-1], "models": {}}
    for c in parts:
        merged["models"].update(c["models"])
    return merged


def device_names(into: Path) -> list[str]:
    """Every accelerator the collected numbers were measured on (older files did not record it)."""
    names = set()
    for f in into.glob("*.json"):
        d = load(f) or {}
        names.update(r["device_name"] for r in ([d] + list(d.get("runs", []))) if isinstance(r, dict) and on_gpu(r))
    return sorted(names)


def correctness_md(c: dict) -> str:
    rows = []
    errors = []
    for name, m in c["models"].items():
        if "error" in m:   # its vLLM worker failed: the reason, not numbers
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "FAIL (worker error)"])
            errors.append(f"- {name}: `{m['error'].strip().splitlines()[-1][:300]}`")
            continue
        widths = m.get("layer_widths") or []
        wtxt = (f"{min(widths)}..{max(widths)}" if widths and min(widths) != max(widths)
                else (str(widths[0]) if widths else "GQA"))
        rows.append([name, ", ".join(m.get("backends") or []) or "(stock)",
                     ", ".join(m.get("prefill_backend") or []) or "-", wtxt,
                     m["prompt_logprob_mean_diff"], m["prompt_logprob_max_diff"], m["generated_logprob_max_diff"],
                     m["greedy_exact"], m["worst_gap"],
                     {True: "pass", False: "FAIL"}.get(m.get("pass"), "floor")])
    long_rows = []
    for name, m in c["models"].items():
        for p in m.get("per_prompt", []):
            if p["len"] >= 8192:
                long_rows.append([name, p["len"], p.get("cached_tokens"), p["prompt_mean"], p["prompt_max"],
                                  p["gen_max"], p["worst_gap"]])
    out = (f"## Correctness ({c['dtype']} vLLM vs fp32 model_defs / transformers on {c['device']})\n\n"
           + md_table(["model", "backend", "prefill", "widths", "mean abs Δ prompt lp", "max abs Δ prompt lp",
                       "max abs Δ gen lp", "greedy exact", "worst greedy gap", "verdict"], rows))
    if errors:
        out += "\n\nWorker errors (last line; the whole tail is in the JSON):\n\n" + "\n".join(errors)
    if long_rows:
        out += ("\n\nLong prompts (prefix caching on, chunked prefill 2048): the second prompt shares 8192 "
                "tokens with the first and reads them back through the chunked-context gather.\n\n"
                + md_table(["model", "prompt len", "cached tokens", "mean abs Δ lp", "max abs Δ lp", "max abs Δ gen lp",
                            "worst greedy gap"], long_rows))
    return out


def throughput_md(runs: list[dict]) -> tuple[str, list[str]]:
    """One table per shape, input length and accelerator: a ratio or a target is only ever taken between runs on
    the same kind of GPU (a GQA run on an H100 against a converted one on an H200 would mostly measure the cards)."""
    by = {}
    for r in runs:
        by.setdefault((r["shape"], r["input_len"], gpu_of(r)), {})[r["model"]] = r
    parts, verdicts = [], []
    for (shape, n_in, gpu), ms in sorted(by.items()):
        base, mla = ms.get("gqa", {}).get("output_tok_s"), ms.get("mla576", {}).get("output_tok_s")
        rows = []
        for name, r in sorted(ms.items(), key=lambda kv: kv[1]["kv_values_per_token"], reverse=True):
            tok = r.get("output_tok_s")
            rows.append([name, r["kv_values_per_token"], f"{r.get('kv_cache_tokens', 0):,}" if r.get("kv_cache_tokens") else "-",
                         tok if tok is not None else f"rc {r.get('rc')}", r.get("total_tok_s"),
                         f"{tok / base:.2f}x" if tok and base else "-", f"{tok / mla:.2f}x" if tok and mla else "-",
                         ", ".join(r.get("backends") or []), r.get("num_prompts")])
        parts.append(f"### {shape}, {n_in} in / {next(iter(ms.values()))['output_len']} out on {gpu} "
                     f"(`vllm bench throughput`)\n\n"
                     + md_table(["model", "KV values/token", "KV cache tokens", "output tok/s", "total tok/s",
                                 "vs GQA", "vs stock MLA 576", "attention backend", "prompts"], rows))
        c576 = ms.get("care576", {}).get("output_tok_s")
        if c576 and mla:
            verdicts.append(f"{shape} {n_in} in on {gpu}: care576 / stock MLA 576 = {c576 / mla:.3f} "
                            f"({'within' if c576 >= 0.95 * mla else 'NOT within'} 5 %)")
        converted = [((r.get("output_tok_s") or 0) / base, n) for n, r in ms.items()
                     if n not in ("gqa", "mla576")] if base else []
        if n_in >= 16384 and converted:   # (a session may bring back the GQA run alone)
            best = max(converted)
            verdicts.append(f"{shape} {n_in} in on {gpu}: best converted width {best[1]} = {best[0]:.2f}x GQA "
                            f"(target >= 1.3x: {'met' if best[0] >= 1.3 else 'NOT met'})")
            mixed = ms.get("mixed", {}).get("output_tok_s")
            if mixed:
                verdicts.append(f"{shape} {n_in} in on {gpu}: mixed widths = {mixed / base:.2f}x GQA "
                                f"(target >= 1.2x: {'met' if mixed / base >= 1.2 else 'NOT met'})")
    return "\n\n".join(parts), verdicts


def serve_md(runs: list[dict]) -> str:
    rows = [[r["shape"], r["model"], r["input_len"], gpu_of(r), r["kv_values_per_token"], r.get("output_throughput"),
             r.get("mean_ttft_ms"), r.get("p99_ttft_ms"), r.get("mean_tpot_ms"), r.get("p99_tpot_ms"),
             r.get("completed"), r.get("num_prompts")]
            for r in sorted(runs, key=lambda r: (r["shape"], r["input_len"], gpu_of(r), r["model"]))]
    return ("## `vllm bench serve` (random dataset, all requests at once)\n\n"
            + md_table(["shape", "model", "in", "GPU", "KV values/token", "output tok/s", "mean TTFT ms", "p99 TTFT ms",
                        "mean TPOT ms", "p99 TPOT ms", "completed", "prompts"], rows))


def speed_md(speeds: dict[str, dict]) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for name, s in sorted(speeds.items()):
        st = s["seconds"]
        rows.append([s["shape"], s["layers"], s["calibration_tokens"], *(st.get(k, "-") for k in
                     ("calibrate", "rope_map", "factorize", "allocate", "assemble", "refit", "report", "write")),
                     s["convert_total_s"], s.get("peak_gpu_mem_gib")])
        if s["shape"] == "llama3-8b" and s["layers"] == 32 and s["calibration_tokens"] >= 256 * 2048:
            verdicts.append(f"8B conversion: {s['convert_total_s']:.0f} s (target < 180 s: "
                            f"{'met' if s['convert_total_s'] < 180 else 'NOT met'})")
    return ("## Conversion speed (random weights, seconds per stage)\n\n"
            + md_table(["shape", "layers", "calib tokens", "calibrate", "rope_map", "factorize", "allocate",
                        "assemble", "refit", "report", "write", "total s", "peak GPU GiB"], rows)), verdicts


def heal_md(heals: dict[str, dict]) -> tuple[str, list[str]]:
    parts, verdicts = [], []
    for name, log in sorted(heals.items()):
        t = log.get("teacher_ppl")
        rows = [[f"{e['tokens']:,}", f"{e['ppl']:.3f}", f"{100 * (e['ppl'] / t - 1):+.1f} %" if t else "-"]
                for e in log["eval"]]
        parts.append(f"### {name}: held-out perplexity vs tokens trained (original {t:.3f}; step 0 = unhealed)\n\n"
                     + md_table(["tokens", "ppl", "vs original"], rows)
                     + f"\n\n{log['seconds']:.0f} s of training; args: `{json.dumps(log['args'])}`")
        if t and log["eval"]:
            last = log["eval"][-1]["ppl"]
            verdicts.append(f"{name}: healed ppl {last:.3f} vs original {t:.3f} = {100 * (last / t - 1):+.1f} % "
                            f"(target within 3 %: {'met' if last <= 1.03 * t else 'NOT met'})")
    return "## Healing (care-heal on the GPU)\n\n" + "\n\n".join(parts), verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", action="append", default=[], help="fetched $OUT folder (repeatable)")
    ap.add_argument("--into", default=str(Path(__file__).resolve().parents[1] / "results" / "gpu"))
    args = ap.parse_args(argv)
    into = Path(args.into)
    into.mkdir(parents=True, exist_ok=True)
    for src in map(Path, args.src):
        merge_records(into, "perf_throughput.json", load(src / "perf_throughput.json"))
        merge_records(into, "perf_serve.json", load(src / "perf_serve.json"))
        merge_records(into, ATTEMPTS, load(src / ATTEMPTS), "attempts", attempt_id)
        for f in src.iterdir():
            if f.name.startswith(("perf_throughput", "perf_serve")) or f.name == ATTEMPTS:
                continue
            if f.suffix == ".gz" and f.stat().st_size > MAX_COMMITTED_LOGS:
                print(f"not copied (over {MAX_COMMITTED_LOGS >> 20} MiB; the working tree travels with every "
                      f"device call): {f}", file=sys.stderr)
                continue
            if f.suffix in (".json", ".md", ".png", ".gz"):
                shutil.copy(f, into / f.name)

    sections, verdicts = [], []
    c = merged_correctness(into)
    if c:
        sections.append(correctness_md(c))
        verdicts += [f"correctness {n}: {'pass' if m.get('pass') else 'FAIL'}" for n, m in c["models"].items()
                     if "pass" in m]
    speeds = {f.stem: load(f) for f in sorted(into.glob("convert_speed_*.json"))}
    if speeds:
        s, v = speed_md(speeds)
        sections.append(s)
        verdicts += v
    tp = load(into / "perf_throughput.json")
    if tp and tp["runs"]:
        s, v = throughput_md(tp["runs"])
        sections.append("## Throughput (random weights, `--load-format dummy`)\n\n" + s)
        verdicts += v
    sv = load(into / "perf_serve.json")
    if sv and sv["runs"]:
        sections.append(serve_md(sv["runs"]))
    heals = {f.stem.removeprefix("heal_"): load(f) for f in sorted(into.glob("heal_*.json"))}
    if heals:
        s, v = heal_md(heals)
        sections.append(s)
        verdicts += v
    gpus = ", ".join(device_names(into)) or "GPU not recorded"
    report = (f"# GPU results ({gpus}; vLLM 0.32.0 from ../shared/gpu/bundle)\n\n"
              "Produced by benchmarks/gpu/step.sh on the lent GPU (commands: benchmarks/gpu/README.md); "
              "this file is regenerated by `python benchmarks/gpu/collect.py`; what is still to measure: "
              "`python benchmarks/gpu/backlog.py`.\n\n## Targets\n\n"
              + "\n".join(f"- {v}" for v in verdicts) + "\n\n" + "\n\n".join(sections) + "\n")
    (into / "REPORT.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
