"""Plots from benchmark rows (matplotlib, PNG): time vs M per provider."""

from __future__ import annotations

from pathlib import Path


def plot_time_vs_m(rows: list[dict], path: Path, title: str) -> Path | None:
    """One panel per (N x K, op): p50 time against M, a line per provider. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("M") and r.get("N") and r.get("p50_ms")]  # error rows have no time
    panels = sorted({(r["N"], r["K"], r["op"]) for r in rows})
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (n, k, op) in zip(axes.flat, panels, strict=False):
        chosen = [r for r in rows if (r.get("N"), r.get("K"), r["op"]) == (n, k, op)]
        for provider in sorted({r["provider"] for r in chosen}):
            points = sorted((r["M"], r["p50_ms"]) for r in chosen if r["provider"] == provider)
            ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.set(xscale="log", yscale="log", xlabel="M", ylabel="p50 ms", title=f"{op} {n}x{k}")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
