"""care_ranks.png: per-layer K and V ranks (like the CARE paper's Fig. 3), with the uniform rank for
reference, so a user sees at a glance where the adjusted allocation spent the budget."""
from __future__ import annotations

from pathlib import Path


def plot_ranks(k_ranks: list[int], v_ranks: list[int], rope_dim: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(k_ranks)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 3), 3.6), dpi=120)
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
