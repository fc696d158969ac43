"""A sweep's figures, drawn from its ``results.csv`` alone: one per numeric metric, a bar
per job grouped by the grid's first key and coloured by its second."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..artifacts import ensure_dir
from .draw import save, theme

log = logging.getLogger(__name__)
NOT_METRICS = ("exit_code",)


def metrics(df: pd.DataFrame, grid_keys: list[str]) -> list[str]:
    """The numeric columns that are not grid values and differ between jobs (a constant is no plot)."""
    skip = {"job", "status", "error", *grid_keys, *NOT_METRICS}
    out = []
    for col in df.columns:
        if col in skip:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        if values.nunique() > 1 and df[col].map(lambda v: isinstance(v, bool)).sum() == 0:
            out.append(col)
    return out


def draw_sweep(df: pd.DataFrame, grid_keys: list[str], out: str | Path,
               formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """One figure per metric of the sweep table ``df`` into ``out``; the PNG paths."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        log.info("sweep figures: no finished job, none drawn")
        return []
    folder = ensure_dir(out)
    theme()
    x = next((k for k in grid_keys if ok[k].nunique() > 1), grid_keys[0])
    hue = next((k for k in grid_keys if k != x and ok[k].nunique() > 1), None)
    made = []
    for metric in metrics(ok, grid_keys):
        data = ok.assign(**{metric: pd.to_numeric(ok[metric], errors="coerce"), x: ok[x].astype(str)})
        if hue:
            data[hue] = data[hue].astype(str)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * data[x].nunique() + 2), 3.2))
        sns.barplot(data=data, x=x, y=metric, hue=hue, ax=ax, errorbar=("pi", 100) if len(data) > data[x].nunique()
                    else None)
        ax.set_title(f"{metric} per {x}" + (f" and {hue}" if hue else "") + f" ({len(data)} jobs)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        made.append(save(fig, folder, re.sub(r"[^A-Za-z0-9._-]+", "_", metric), formats))
    return made
