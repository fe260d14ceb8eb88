"""PNG plots of a latency table: per-layer staircases, and predicted against measured latency."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from latprune.io import write_bytes_atomic
from latprune.latency_tables.table import LatencyTable

__all__ = ["pyplot", "save_png", "plot_staircases", "plot_validation"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def plot_staircases(table: LatencyTable, path: Path, max_layers: int = 4, inputs: int = 3) -> Path:
    """Latency against output channels, for a few input widths, of the ``max_layers`` signatures
    that cost most at dense widths (steps in these curves are what ``round_to`` is for)."""
    plt = pyplot()
    costly = sorted(table.layers.values(), key=lambda t: -float(t.median_ms[-1, -1]))[:max_layers]
    fig, axes = plt.subplots(1, len(costly), figsize=(4.2 * len(costly), 3.4), squeeze=False)
    for ax, t in zip(axes[0], costly):
        rows = np.unique(np.linspace(0, len(t.c_in_grid) - 1, min(inputs, len(t.c_in_grid))).round().astype(int))
        for i in rows:
            label = "depthwise" if t.signature.kind == "dwconv" else f"c_in {t.c_in_grid[i]}"
            ax.step(t.c_out_grid, t.median_ms[i], where="post", marker=".", label=label)
        s = t.signature
        ax.set_title(f"{s.kind} {s.kernel[0]}x{s.kernel[1]} s{s.stride[0]} in {s.in_hw[0]}x{s.in_hw[1]}", fontsize=9)
        ax.set_xlabel("output channels")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fp = table.fingerprint
    fig.suptitle(f"{fp.runtime} {fp.runtime_version} ({fp.provider}), batch {fp.batch}, {fp.threads} threads",
                 fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def plot_validation(table: LatencyTable, path: Path) -> Path:
    """Predicted against measured whole-model latency: the fit's points and the validation set."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    fit = table.e2e.points
    if fit:
        ax.scatter([p["measured_ms"] for p in fit], [table.e2e.predict(p["layers_ms"]) for p in fit],
                   marker="s", label="fit points", alpha=0.8)
    v = table.validation or {}
    pts = v.get("points", [])
    if pts:
        ax.scatter([p["measured_ms"] for p in pts], [p["predicted_ms"] for p in pts], label=(
            f"validation (K={v['k']}): median {100 * v['median_rel_err']:.1f} %, p90 {100 * v['p90_rel_err']:.1f} %"),
            alpha=0.8)
    vals = [p["measured_ms"] for p in [*fit, *pts]] or [table.dense_ms]
    lo, hi = 0.9 * min(vals), 1.1 * max(vals)
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=0.8, label="exact")
    ax.fill_between(xs, 0.9 * xs, 1.1 * xs, color="k", alpha=0.08, label="+-10 %")
    ax.set_xlabel("measured end to end (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)
