"""Turn the collected numbers into the report folder: report.json is written by the CLI; here the
PNG plots (both models side by side) and the markdown summary with converted/original ratios."""
from __future__ import annotations

import shlex
from pathlib import Path

from .workload import Workload

COLORS = {"original": "#777777", "converted": "#2b7bba"}
PCTS = (50, 90, 99)


def _levels(model: dict) -> list[dict]:
    return sorted(model["levels"], key=lambda lv: lv["concurrency"])


def plot_all(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    files = []

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, m in models.items():
        lv = _levels(m)
        ax.plot([x["concurrency"] for x in lv], [x["result"]["output_throughput"] for x in lv], "o-",
                color=COLORS.get(name), label=f"{name} ({m['label']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max concurrency (vllm bench serve)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png")
    plt.close(fig)
    files.append("throughput.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for name, m in models.items():
            lv = _levels(m)
            conc = [x["concurrency"] for x in lv]
            for p, style in zip(PCTS, ("-", "--", ":")):
                ax.plot(conc, [x["result"].get(f"p{p}_{metric}_ms") for x in lv], style, marker="o",
                        color=COLORS.get(name), label=f"{name} p{p}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split()[0]} percentiles")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)
    files.append("latency.png")

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), dpi=120, sharex=True)
    for name, m in models.items():
        t_off, ts, usage, running, waiting = 0.0, [], [], [], []
        for lv in _levels(m):
            tl = lv["metrics_timeline"]
            for s in tl:
                ts.append(t_off + s["t"])
                usage.append(100 * (s.get("vllm:kv_cache_usage_perc") or 0.0))
                running.append(s.get("vllm:num_requests_running") or 0)
                waiting.append(s.get("vllm:num_requests_waiting") or 0)
            t_off += (tl[-1]["t"] if tl else 0.0) + 1.0
        axes[0].plot(ts, usage, color=COLORS.get(name), label=name)
        axes[1].plot(ts, running, color=COLORS.get(name), label=f"{name} running")
        axes[1].plot(ts, waiting, color=COLORS.get(name), ls="--", label=f"{name} waiting")
    axes[0].set_ylabel("KV cache used (% of blocks)")
    axes[0].set_title("Server /metrics during the run (levels back to back, increasing concurrency)")
    axes[1].set_ylabel("requests")
    axes[1].set_xlabel("seconds (busy span of each concurrency level, levels concatenated)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kv_usage.png")
    plt.close(fig)
    files.append("kv_usage.png")
    return files


def _hit_rate(level: dict) -> str:
    """Share of the level's prompt tokens found in the prefix cache ('n/a' for reports without it)."""
    rate = (level.get("prefix_cache") or {}).get("hit_rate")
    return "n/a" if rate is None else f"{100 * rate:.0f} %"


LATENCY_FLOOR_MS = 0.1   # a p50 below this is a stream delivered in one chunk, not a time per token


def _ratio(a, b, floor: float = 0.0) -> str:
    """a / b, or 'n/a' where either is missing, zero, or below `floor` (vLLM reports a TPOT of ~0.004 ms for a
    request whose tokens all came in one chunk: a ratio over it read 3224.94x)."""
    return f"{a / b:.2f}x" if a and b and min(a, b) >= floor else "n/a"


def _reset_line(o: dict, c: dict) -> str:
    """Whether each level started from an empty prefix cache (the levels reuse one seed's prompts)."""
    kept = [f"{name} c{lv['concurrency']}" for name, m in (("original", o), ("converted", c))
            for lv in _levels(m) if lv.get("prefix_cache_reset") is not True]
    if not kept:
        return "- prefix cache emptied before each level (every level sends the same prompts)"
    return (f"- prefix cache NOT emptied before {', '.join(kept)}: those levels may have found prompts cached by "
            f"an earlier level")


def _versions_line(report: dict) -> str:
    """Which vLLM (and care-vllm, torch) served the models started here: a run is only comparable with another on
    the same versions. (A report.json from before it was recorded has none.)"""
    v = report.get("machine", {}).get("versions")
    if not v:
        return "- versions: not recorded"
    return f"- versions: vllm {v.get('vllm')}, care-vllm {v.get('care-vllm')}, torch {v.get('torch')}"


def _server_line(role: str, model: dict) -> str:
    """How a model's server ran: the `vllm serve` settings care-bench gave it (after the host, port and served
    name), or that it was a running server whose settings care-bench does not know (its KV budget included)."""
    args = model.get("server")
    if not args:
        return (f"- {role} server: running at {model.get('base_url')} (not started here: its settings, KV budget "
                f"included, are not known)")
    settings = args[args.index("--served-model-name") + 2:] if "--served-model-name" in args else args
    return f"- {role} server: `vllm serve` with `{shlex.join(settings)}`" if settings else \
        f"- {role} server: `vllm serve` with its defaults"


def summary_markdown(report: dict) -> str:
    o, c = report["models"]["original"], report["models"]["converted"]
    wl = report["workload"]
    lines = [
        "# care-bench report", "",
        f"- original: `{o['path']}` ({o['label']})",
        f"- converted: `{c['path']}` ({c['label']})",
        f"- workload: `vllm bench serve`, {Workload(**wl).describe()}, "
        f"{wl['num_prompts']} prompts, request rate {wl['request_rate']}, seed {wl['seed']}",
        f"- KV cache tokens: original {o.get('kv_cache_tokens')}, converted {c.get('kv_cache_tokens')} "
        f"({_ratio(c.get('kv_cache_tokens'), o.get('kv_cache_tokens'))})",
        f"- KV values per token (all layers): original {o.get('cache_values_per_token')}, "
        f"converted {c.get('cache_values_per_token')}",
        _server_line("original", o),
        _server_line("converted", c),
        _reset_line(o, c),
        _versions_line(report),
        "", "| concurrency | model | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | prefix-cache hits |",
        "|---|---|---|---|---|---|",
    ]
    for lo, lc in zip(_levels(o), _levels(c)):
        for name, lv in (("original", lo), ("converted", lc)):
            r = lv["result"]
            lines.append(f"| {lv['concurrency']} | {name} | {r['output_throughput']:.1f} | "
                         f"{r.get('p50_ttft_ms', 0):.1f} / {r.get('p99_ttft_ms', 0):.1f} | "
                         f"{r.get('p50_tpot_ms', 0):.1f} / {r.get('p99_tpot_ms', 0):.1f} | {_hit_rate(lv)} |")
        lines.append(f"| {lo['concurrency']} | **converted / original** (TTFT, TPOT: p50) | "
                     f"{_ratio(lc['result']['output_throughput'], lo['result']['output_throughput'])} | "
                     f"{_ratio(lc['result'].get('p50_ttft_ms'), lo['result'].get('p50_ttft_ms'), LATENCY_FLOOR_MS)} | "
                     f"{_ratio(lc['result'].get('p50_tpot_ms'), lo['result'].get('p50_tpot_ms'), LATENCY_FLOOR_MS)} "
                     f"| |")
    spec = [(lv["concurrency"], name, lv["spec_decode"]) for lo, lc in zip(_levels(o), _levels(c))
            for name, lv in (("original", lo), ("converted", lc)) if lv.get("spec_decode")]
    if spec:
        lines += ["", "Speculative decoding (drafted tokens accepted): " + "; ".join(
            f"c{conc} {name} {100 * sd['acceptance_rate']:.0f} % ({sd['accepted_tokens']:.0f}/{sd['draft_tokens']:.0f})"
            for conc, name, sd in spec)]
    q = report.get("quality") or {}
    if q:
        lines += ["", "## Quality", ""]
        if "perplexity" in q:
            po, pc = q["perplexity"]["original"], q["perplexity"]["converted"]
            lines.append(f"- held-out perplexity ({po['tokens']} tokens): original {po['ppl']:.3f}, "
                         f"converted {pc['ppl']:.3f} ({_ratio(pc['ppl'], po['ppl'])})")
        if "greedy_agreement" in q:
            g = q["greedy_agreement"]
            lines.append(f"- greedy agreement on {g['prompts']} fixed prompts ({q['agreement_max_tokens']} tokens): "
                         f"exact match {100 * g['exact_match_rate']:.0f} %, mean shared prefix "
                         f"{100 * g['mean_shared_prefix_fraction']:.0f} %")
    lines += ["", "Plots: throughput.png, latency.png, kv_usage.png. Raw `vllm bench serve` JSON: raw/.", ""]
    return "\n".join(lines)
