"""Report plots (matplotlib, Agg): quality against size, and decode speed per file."""

from __future__ import annotations

from pathlib import Path


def _figure(height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, height), dpi=110)


def _save(fig, ax, title: str, xlabel: str, out: Path) -> Path:
    """Finish and write the figure; `out` appears whole or not at all."""
    import matplotlib.pyplot as plt

    from edgekit.fsutil import atomic_path

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def quality_vs_size(points: list[tuple[str, float, float]], out: Path,
                    ylabel: str = "KL(teacher || model), nats/token (holdout)") -> Path:
    """points: (label, size MB, loss: KL to teacher by default). Lower-left is better."""
    fig, ax = _figure(4.2)
    for label, size, kl in points:
        ax.scatter(size, kl, s=36)
        ax.annotate(label, (size, kl), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, ax, "Quality against size (lower-left is better)", "file size (MB)", out)


def decode_speed(rows: list[dict], out: Path) -> Path:
    """Measured decode tok/s per file and target, with the roofline ceiling as a marker."""
    fig, ax = _figure(0.6 + 0.55 * len(rows))
    y = range(len(rows))
    ax.barh(y, [r["decode_tps"] for r in rows], label="measured decode")
    ax.scatter([r["roofline_tps"] for r in rows], y, marker="|", s=300, color="black", label="roofline")
    ax.set_yticks(list(y), [f"{r['file']}\n{r['backend']}, {r['target']}" for r in rows], fontsize=7)
    ax.legend(fontsize=7)
    return _save(fig, ax, "Decode speed (measured on this machine)", "tokens/s", out)
