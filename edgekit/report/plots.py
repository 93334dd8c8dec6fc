"""Report plots (matplotlib, Agg): quality against size, and decode speed per file."""

from __future__ import annotations

from pathlib import Path


def quality_vs_size(points: list[tuple[str, float, float]], out: Path) -> Path:
    """points: (label, size MB, KL to teacher). Lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, size, kl in points:
        ax.scatter(size, kl, s=36)
        ax.annotate(label, (size, kl), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL(teacher || model), nats/token (holdout)")
    ax.set_title("Quality against size (lower-left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def decode_speed(rows: list[dict], out: Path) -> Path:
    """Measured decode tok/s per file and target, with the roofline ceiling as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['file']}\n{r['backend']}, {r['target']}" for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.55 * len(rows)), dpi=110)
    y = range(len(rows))
    ax.barh(y, [r["decode_tps"] for r in rows], label="measured decode")
    ax.scatter([r["roofline_tps"] for r in rows], y, marker="|", s=300, color="black", label="roofline")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("tokens/s")
    ax.set_title("Decode speed (measured on this machine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
