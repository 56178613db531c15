"""The figures written beside a checkpoint. care_ranks.png: per-layer K and V ranks (like the CARE
paper's Fig. 3), with the mean ranks for reference, so a user sees at a glance where the adjusted
allocation spent the budget. heal_curve.png: care-heal's losses and held-out perplexity."""
from __future__ import annotations

from pathlib import Path


def plot_ranks(k_ranks: list[int], v_ranks: list[int], rope_dim: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(k_ranks)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 3), 3.6), dpi=120)
    if not any(k_ranks):   # a joint K/V latent (care-convert --latent joint): one rank per layer
        ax.bar(layers, v_ranks, width=0.6, label="joint K/V latent rank", color="#6a4c93")
        ax.axhline(sum(v_ranks) / len(v_ranks), color="#6a4c93", ls="--", lw=0.8, label="mean")
    else:
        w = 0.4
        ax.bar([l - w / 2 for l in layers], k_ranks, width=w, label="K rank (NoPE latent)", color="#3b6ea5")
        ax.bar([l + w / 2 for l in layers], v_ranks, width=w, label="V rank", color="#e08a3c")
        ax.axhline(sum(k_ranks) / len(k_ranks), color="#3b6ea5", ls="--", lw=0.8, label="mean K")
        ax.axhline(sum(v_ranks) / len(v_ranks), color="#e08a3c", ls="--", lw=0.8, label="mean V")
    ax.set_xlabel("layer")
    ax.set_ylabel("latent rank")
    ax.set_title(f"{title}  (+ rope key {rope_dim} per layer)", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heal_curve(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_eval = bool(log["eval"])
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(11 if has_eval else 6, 3.8), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
    tok = [s["tokens"] for s in log["steps"]]
    for key, color in (("loss", "#222222"), ("ce", "#3b6ea5")):
        ax.plot(tok, [s[key] for s in log["steps"]], color=color, lw=1.2, label=key)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss, CE")
    ax.set_title(f"care-heal: L = CE + {log['args']['beta']}·τ²·KD (τ={log['args']['tau']})", fontsize=9)
    kd_ax = ax.twinx()   # KD is much smaller than CE: its own axis
    kd_ax.plot(tok, [s["kd"] for s in log["steps"]], color="#e08a3c", lw=1.2, label="kd (right axis)")
    kd_ax.set_ylabel("KD  KL(teacher‖student)", color="#e08a3c")
    lines = ax.get_lines() + kd_ax.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8)
    if has_eval:
        ax = axes[0][1]
        ax.plot([e["tokens"] for e in log["eval"]], [e["ppl"] for e in log["eval"]], "o-", color="#3b6ea5",
                label="healed student")
        if log.get("teacher_ppl") is not None:
            ax.axhline(log["teacher_ppl"], color="#2a9d4b", ls="--", label="teacher (original)")
        ppls = [e["ppl"] for e in log["eval"]] + ([log["teacher_ppl"]] if log.get("teacher_ppl") else [])
        if max(ppls) > 3 * min(ppls):
            ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("held-out perplexity", fontsize=9)
        ax.legend(fontsize=8)
    from matplotlib.ticker import EngFormatter

    for a in axes[0]:
        a.xaxis.set_major_formatter(EngFormatter())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
