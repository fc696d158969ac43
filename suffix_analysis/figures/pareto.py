"""The Pareto edit's figure, from its ``trials.csv`` alone: harmful prompts refused against
first-token KL on harmless prompts for every trial, the front, the paper's edit (trial 0)
and the chosen edit; beside it, the chosen profile's shares per layer (from ``edit.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..errors import UserError  # noqa: E402
from .draw import save, theme  # noqa: E402


def fig_pareto(trials: pd.DataFrame, shares: dict[str, float] | None = None, title: str = ""):
    """Refused (share) against KL; ``shares``: ``{hook site: share}`` of the chosen edit."""
    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 6, 4.2), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(trials["kl"], 100 * trials["refused"], s=14, color="#bbbbbb", label="trial")
    front = trials[trials["pareto"].astype(bool)].sort_values("kl")
    ax.step(front["kl"], 100 * front["refused"], where="post", color="#4c72b0", lw=1.2)
    ax.scatter(front["kl"], 100 * front["refused"], s=22, color="#4c72b0", label="Pareto front")
    paper = trials[trials["trial"] == 0]
    ax.scatter(paper["kl"], 100 * paper["refused"], s=60, marker="s", facecolor="none", edgecolor="#c44e52",
               label="trial 0: the paper's edit")
    chosen = trials[trials["chosen"].astype(bool)]
    ax.scatter(chosen["kl"], 100 * chosen["refused"], s=120, marker="*", color="#dd8452", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("first-token KL, harmless val (log)")
    ax.set_ylabel("harmful val refused (%)")
    ax.legend(fontsize=8)
    if shares:
        ax2 = axes[0, 1]
        layers = sorted({int(k.split(".")[1]) for k in shares if "hook_attn_out" in k})
        ax2.plot(layers, [shares[f"blocks.{l}.hook_attn_out"] for l in layers], marker="o", ms=3, label="attention out")
        ax2.plot(layers, [shares[f"blocks.{l}.hook_mlp_out"] for l in layers], marker="o", ms=3, label="MLP out")
        ax2.axhline(shares.get("blocks.0.hook_resid_pre", 0), color="#8c8c8c", ls="--", lw=1, label="embeddings")
        ax2.set_xlabel("layer")
        ax2.set_ylabel("share of the direction removed")
        ax2.set_title("the chosen edit's weight profile", fontsize=10)
        ax2.legend(fontsize=8)
    fig.suptitle(title or "Pareto edit: refusals against side effects", fontsize=12)
    fig.tight_layout()
    return fig


def draw_pareto(run: str | Path, out: str | Path | None = None, formats: tuple[str, ...] = ("png",)) -> Path:
    """``RUN/pareto.png`` (or in ``out``) from ``RUN/trials.csv`` and, if there, ``RUN/edit.json``."""
    run = Path(run).expanduser()
    path = run / "trials.csv"
    if not path.is_file():
        raise UserError(f"{run} has no trials.csv; run `suffix-analysis edit --out {run}` first")
    trials = pd.read_csv(path)
    edit = run / "edit.json"
    shares = json.loads(edit.read_text(encoding="utf-8")).get("shares") if edit.is_file() else None
    theme()
    fig = fig_pareto(trials, shares, f"Pareto edit: {len(trials)} trials, {int(trials['pareto'].sum())} on the front")
    return save(fig, Path(out) if out else run, "pareto", formats)
