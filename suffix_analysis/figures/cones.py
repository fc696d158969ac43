"""Refusal against cone dimension, from a ``cones.csv`` table alone (``benchmarks/bench_cones.py``
writes it: one row per cone dimension and checked vector, as ``directions.rdo.check_cone``
scores them on held-out prompts)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..errors import UserError  # noqa: E402
from .draw import save, theme  # noqa: E402

COLUMNS = ("cone_dim", "vector", "refusing_ablated", "refusing_added", "kl")


def fig_cones(table: pd.DataFrame):
    """Left: harmful prompts bypassed (ablated); middle: harmless prompts refusing (added);
    right: first-token KL on harmless prompts (ablated); each against the cone dimension, for
    the basis vectors (worst), the random cone vectors (worst and mean) and the whole subspace."""
    t = table.copy()
    t["group"] = t["vector"].str.split().str[0]  # basis / sample / subspace
    t["bypassed"] = 1 - t["refusing_ablated"]
    dims = sorted(t["cone_dim"].unique())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("bypassed", "harmful bypassed, ablated (%)", True), ("refusing_added", "harmless refusing, added (%)", True),
              ("kl", "first-token KL, harmless, ablated", False))
    styles = {"basis": ("#4c72b0", "o"), "sample": ("#dd8452", "s"), "subspace": ("#55a868", "^")}
    for ax, (col, label, pct) in zip(axes, panels):
        scale = 100 if pct else 1
        for group, (color, marker) in styles.items():
            g = t[t["group"] == group].dropna(subset=[col])
            if g.empty:
                continue
            by = g.groupby("cone_dim")[col]
            worst = by.min() if col != "kl" else by.max()
            ax.plot(worst.index, scale * worst.values, color=color, marker=marker,
                    label=f"{group} ({'worst' if group != 'subspace' else 'whole span'})")
            if group == "sample":
                mean = by.mean()
                ax.plot(mean.index, scale * mean.values, color=color, marker=marker, ls="--", alpha=0.6,
                        label="sample (mean)")
        if pct:
            ax.axhline(80, color="#8c8c8c", lw=0.8, ls=":")
            ax.set_ylim(-3, 103)
        ax.set_xticks(dims)
        ax.set_xlabel("cone dimension k")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Refusal cones: does every vector of a k-dimensional cone mediate refusal? (dotted: the paper's 80%)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def draw_cones(table_path: str | Path, out: str | Path | None = None) -> Path:
    """``cones.png`` beside ``table_path`` (or in ``out``)."""
    path = Path(table_path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} not found; benchmarks/bench_cones.py writes it")
    table = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise UserError(f"{path} lacks the column {missing[0]}; is it a cones table?")
    theme()
    return save(fig_cones(table), Path(out) if out else path.parent, "cones", ("png",))
