"""The paper's figures, each drawn from the tables a ``reproduce`` run wrote (no model, no torch).

Each ``fig_*`` takes the :class:`Tables` of a run (read and checked in ``run_tables.py``)
and returns a matplotlib figure, or None when the tables it needs are not there (a stage
that was switched off). Every figure carries a footer naming the model, the evaluation data
and the direction it shows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ..artifacts import ensure_dir  # noqa: E402
from ..tables import atomic_path  # noqa: E402
from .run_tables import Tables, check_tables  # noqa: E402

log = logging.getLogger(__name__)

RATES = ("refused_rate", "complied_rate", "derailed_rate")
RATE_COLORS = {"refused_rate": "#4c72b0", "complied_rate": "#dd8452", "derailed_rate": "#8c8c8c"}
KIND_ORDER = ("harmful", "random", "adversarial", "harmless")
KIND_COLORS = dict(zip(KIND_ORDER, ("#c44e52", "#8172b3", "#dd8452", "#55a868")))


def theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    # seaborn's categorical axes make matplotlib log a line per bar group at INFO
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)


def _finish(fig, tables: Tables, title: str):
    fig.suptitle(title, fontsize=12)
    fig.text(0.01, 0.005, tables.footer(), fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def _condition_rows(t: Tables) -> pd.DataFrame | None:
    """One row per condition on harmful eval: refused / complied / derailed and refusal score."""
    ev = t.table("evaluation", "evaluation")
    tr = t.table("transfer", "transfer")
    rows = []
    names = {"baseline": "baseline", "ablation": "directional ablation", "orthogonalized": "orthogonalized"}
    if ev is not None:
        for _, r in ev.iterrows():
            if r["intervention"] in names:
                rows.append({"condition": names[r["intervention"]], "refused_rate": r["harmful_refusal_rate"],
                             "complied_rate": r.get("harmful_complied_rate"),
                             "derailed_rate": r.get("harmful_derailed_rate"),
                             "refusal_score": r["harmful_refusal_score"]})
    if tr is not None:
        for _, r in tr[tr["set"] == "held-out"].iterrows():
            rows.append({"condition": f"{r['suffix']} suffix", **{k: r[k] for k in RATES},
                         "refusal_score": r["refusal_score"]})
    return pd.DataFrame(rows) if rows else None


def _stacked_rates(ax, labels: list[str], df: pd.DataFrame, **bar) -> bool:
    """Refused / complied / derailed of each row of ``df`` as one stacked bar (refused alone
    without compliance verdicts); whether the rows were judged for compliance."""
    bottom = pd.Series(0.0, index=df.index)
    judged = bool(df["complied_rate"].notna().all())
    for rate in RATES if judged else RATES[:1]:
        vals = df[rate].astype(float).fillna(0.0)
        ax.bar(labels, vals, bottom=bottom, color=RATE_COLORS[rate], label=rate.replace("_rate", ""), **bar)
        bottom += vals
    ax.set_ylim(0, 1)
    return judged


def fig_rates(t: Tables):
    """1. Refused / complied / derailed and refusal score on harmful instructions (paper Fig. 1)."""
    df = _condition_rows(t)
    if df is None:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    judged = _stacked_rates(ax, list(df["condition"]), df)
    ax.set_ylabel("share of completions")
    ax.legend(loc="upper right", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    ax.set_title("refused / complied / derailed" if judged else "refusal rate (substring judge)", fontsize=10)
    sns.barplot(data=df, x="condition", y="refusal_score", ax=ax2, color="#4c72b0")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("")
    ax2.set_ylabel("")
    ax2.tick_params(axis="x", rotation=45)
    ax2.set_title("refusal score (log-odds of the refusal tokens)", fontsize=10)
    return _finish(fig, t, "Refusal on harmful instructions")


def fig_induced(t: Tables):
    """2. Induced refusal on harmless instructions under activation addition."""
    ev = t.table("evaluation", "evaluation")
    if ev is None:
        return None
    ev = ev[ev["intervention"].isin(["baseline", "actadd"])]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.6))
    sns.barplot(data=ev, x="condition", y="harmless_refusal_rate", ax=ax, color="#55a868")
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal rate on harmless")
    sns.barplot(data=ev, x="condition", y="harmless_refusal_score", ax=ax2, color="#55a868")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel("refusal score on harmless")
    for a in (ax, ax2):
        a.set_xlabel("")
    return _finish(fig, t, "Activation addition induces refusal on harmless instructions")


def fig_selection(t: Tables):
    """3. Direction selection: bypass, induce and KL across layers per EOI position, and a heatmap."""
    cands = t.table("direction", "candidates")
    chosen = t.json("direction/direction.json")
    if cands is None or chosen is None:
        return None
    cands = cands[cands["norm"] > 0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, col, label in zip(axes[:3], ("bypass", "induce", "kl"),
                              ("bypass score (harmful val, ablated)", "induce score (harmless val, added)",
                               "KL (harmless val, ablated)")):
        sns.lineplot(data=cands, x="layer", y=col, hue="position", palette="viridis", ax=ax, marker="o",
                     markersize=3, legend=ax is axes[0])
        ax.scatter([chosen["layer"]], [chosen[col]], s=120, facecolors="none", edgecolors="red", lw=2, zorder=5)
        ax.set_title(label, fontsize=9)
        if col == "kl":
            ax.set_yscale("symlog", linthresh=0.01)
    grid = cands.pivot_table(index="position", columns="layer", values="bypass")
    sns.heatmap(grid, ax=axes[3], cmap="RdBu_r", center=0, cbar_kws={"label": "bypass score"})
    axes[3].set_title("bypass score, EOI position x layer", fontsize=9)
    return _finish(fig, t, f"Direction selection (chosen: layer {chosen['layer']}, position {chosen['position']}, "
                           "red circle)")


def fig_cosine(t: Tables):
    """4. Cosine with the direction across layers for the four conditions, with spread."""
    cos = t.table("attribution", "cosine", ["condition", "prompt", "site", "layer", "position", "cosine"])
    chosen = t.json("direction/direction.json")
    if cos is None or chosen is None:
        return None
    cos = cos[(cos["site"] == "hook_resid_pre") & (cos["position"] == chosen["position"])].copy()
    cos["kind"] = cos["condition"].map(t.kinds())
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.lineplot(data=cos, x="layer", y="cosine", hue="kind", hue_order=[k for k in KIND_ORDER if k in
                 set(cos["kind"])], palette=KIND_COLORS, errorbar="sd", ax=ax)
    ax.axvline(chosen["layer"], color="k", ls=":", lw=1)
    ax.set_ylabel("cosine with the direction")
    ax.legend(title="")
    return _finish(fig, t, f"Cosine of resid_pre with the direction at EOI position {chosen['position']} "
                           "(mean, sd over prompts)")


def fig_top_heads(t: Tables):
    """5. The top heads' direct projection onto the direction under no / random / adversarial suffix."""
    top = t.json("attribution/top_heads.json")
    heads = t.table("attribution", "heads", ["condition", "component", "layer", "head", "position", "projection"])
    if top is None or heads is None:
        return None
    chosen = [tuple(x) for x in top["heads"]]
    h = heads[(heads["component"] == "head") & (heads["position"] == top.get("position", -1))].copy()
    h = h[pd.MultiIndex.from_arrays([h["layer"], h["head"]]).isin(chosen)]
    h["kind"] = h["condition"].map(t.kinds())
    h = h[h["kind"].isin(["harmful", "random", "adversarial"])]
    h["head_label"] = h["layer"].astype(int).astype(str) + "." + h["head"].astype(int).astype(str)
    order = [f"{layer}.{head}" for layer, head in chosen]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(order) + 2), 4))
    sns.barplot(data=h, x="head_label", y="projection", hue="kind", order=order, palette=KIND_COLORS,
                hue_order=["harmful", "random", "adversarial"], errorbar="sd", ax=ax)
    ax.set_xlabel("head (layer.head)")
    ax.set_ylabel("direct projection onto the direction")
    ax.axhline(0, color="k", lw=0.8)
    ax.legend(title="")
    return _finish(fig, t, f"Top {len(order)} heads by projection at the last token: what the suffix does to them")


def fig_hijack(t: Tables):
    """6. Top heads' attention from the last token to template / instruction / suffix, and the
    per-layer dominance of the suffix."""
    top = t.json("attribution/top_heads.json")
    hj = t.table("attribution", "hijack", ["condition", "layer", "head", "destination", "region", "mass"])
    dom = t.table("attribution", "hijack_dominance", ["condition", "layer", "destination", "region", "dominance"])
    if top is None or hj is None or dom is None:
        return None
    kinds = t.kinds()
    chosen = [tuple(x) for x in top["heads"]]
    a = hj[(hj["destination"] == -1) & pd.MultiIndex.from_arrays([hj["layer"], hj["head"]]).isin(chosen)].copy()
    a["kind"] = a["condition"].map(kinds)
    a = a[a["kind"].isin(["harmful", "random", "adversarial"])]
    d = dom[(dom["destination"] == -1) & (dom["region"] == "suffix")].copy()
    d["kind"] = d["condition"].map(kinds)
    d = d[d["kind"].isin(["random", "adversarial"])]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    sns.barplot(data=a, x="region", y="mass", hue="kind", order=["template", "instruction", "suffix", "eoi"],
                hue_order=["harmful", "random", "adversarial"], palette=KIND_COLORS, errorbar="sd", ax=ax)
    ax.set_ylabel("attention from the last token")
    ax.set_title(f"top {len(chosen)} heads' attention", fontsize=10)
    ax.legend(title="")
    sns.lineplot(data=d, x="layer", y="dominance", hue="kind", palette=KIND_COLORS, errorbar="sd", ax=ax2)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel("dominance of the suffix on the last token")
    ax2.set_title("per-layer dominance of the suffix (share of the attention write)", fontsize=10)
    ax2.legend(title="")
    return _finish(fig, t, "Attention hijacking: the suffix takes the top heads' attention")


def fig_suffix_tokens(t: Tables):
    """7. Per-suffix-token effect on the direction's projection (tokens printed under the bars)."""
    st = t.table("attribution", "suffix_tokens")
    if st is None:
        return None
    cols = {"effect_replace": "replace with a neutral token", "effect_block": "block attention to it",
            "grad_x_input": "gradient x input"}
    m = st.groupby("suffix_index").agg(token=("token", "first"), **{c: (c, "mean") for c in cols}).reset_index()
    long = m.melt(id_vars=["suffix_index", "token"], value_vars=list(cols), var_name="measure", value_name="effect")
    long["measure"] = long["measure"].map(cols)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(m) + 2), 4.2))
    sns.barplot(data=long, x="suffix_index", y="effect", hue="measure", ax=ax)
    ax.set_xticks(range(len(m)))
    ax.set_xticklabels([repr(x)[1:-1] for x in m["token"]], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("suffix token")
    ax.set_ylabel("its effect on the projection\n(negative: it pushes it down)")
    ax.axhline(0, color="k", lw=0.8)
    ax.legend(title="", fontsize=8)
    return _finish(fig, t, "Which suffix tokens suppress the direction")


def fig_causal(t: Tables):
    """8. Patching (refusal score restored vs heads patched) and knockout of EOI -> suffix attention."""
    patch = t.table("attribution", "patching")
    ko = t.table("attribution", "knockout")
    if patch is None or ko is None:
        return None
    kinds = t.kinds()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    sns.lineplot(data=patch, x="n_heads", y="score_restored", hue="patch", marker="o", errorbar="sd", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("top heads patched")
    ax.set_ylabel("share of the refusal-score gap restored")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1, color="k", ls=":", lw=0.8)
    ax.legend(title="", fontsize=8)
    k = ko[ko["cut"] == "all"].copy()
    k["kind"] = k["condition"].map(kinds)
    long = pd.concat([k.assign(score=k["score_plain"], which="with suffix"),
                      k.assign(score=k["score_knockout"], which="suffix attention knocked out")])
    harmful = float(k["score_harmful"].mean()) if len(k) else None
    sns.barplot(data=long, x="kind", y="score", hue="which", errorbar="sd", ax=ax2)
    if harmful is not None:
        ax2.axhline(harmful, color=KIND_COLORS["harmful"], ls="--", lw=1, label="harmful, no suffix")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("")
    ax2.set_ylabel("refusal score")
    ax2.legend(title="", fontsize=8)
    gen = t.json("attribution/knockout_completions.json")
    if gen and gen.get("restored") is not None:
        ax2.set_title(f"generated answers: knockout restores refusal on {gen['restored']:.0%} of "
                      f"{gen['n_made_answer']} jailbroken prompts", fontsize=9)
    return _finish(fig, t, "Causal checks: patching top heads, knocking out attention to the suffix")


def fig_attack(t: Tables):
    """9. GCG loss per step (with the random control's level) and the suffix's transfer."""
    losses = t.table("attack", "losses")
    control = t.json("attack/random.json")
    tr = t.table("transfer", "transfer")
    if losses is None:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    sns.lineplot(data=losses, x="step", y="loss", ax=ax, color=KIND_COLORS["adversarial"], label="GCG suffix")
    if control and control.get("loss") is not None:
        ax.axhline(control["loss"], color=KIND_COLORS["random"], ls="--", label="random suffix")
    ax.set_ylabel("objective (summed over training prompts)")
    ax.legend(title="")
    if tr is not None:
        long = tr.melt(id_vars=["suffix", "set"], value_vars=[r for r in RATES if tr[r].notna().all()],
                       var_name="rate", value_name="share")
        long["rate"] = long["rate"].str.replace("_rate", "")
        long["group"] = long["suffix"] + ", " + long["set"]
        sns.barplot(data=long, x="group", y="share", hue="rate", ax=ax2,
                    palette={r.replace("_rate", ""): c for r, c in RATE_COLORS.items()})
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("")
        ax2.set_title("transfer: optimized-on (train) vs held-out instructions", fontsize=10)
        ax2.legend(title="", fontsize=8)
    return _finish(fig, t, "The universal suffix: optimization and transfer")


def fig_side_effects(t: Tables):
    """10. A table: cross-entropy and KL of the ablated and orthogonalized models against the baseline."""
    ev = t.table("evaluation", "evaluation")
    if ev is None:
        return None
    cols = [c for c in ("kl_harmless", "ce_harmless_completions", "ce_corpus", "harmful_refusal_rate",
                        "harmless_refusal_rate") if c in ev]
    fig, ax = plt.subplots(figsize=(2.2 + 1.7 * len(cols), 0.5 + 0.45 * len(ev)))
    ax.axis("off")
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in ev[cols].itertuples(index=False)]
    tab = ax.table(cellText=cells, rowLabels=list(ev["condition"]), colLabels=cols, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.4)
    return _finish(fig, t, "Side effects: first-token KL and cross-entropy against the baseline")


def fig_defence(t: Tables):
    """11. Hijacking suppression: refused / complied / derailed with and without the defence,
    for no suffix, the adversarial suffix and the random one; its cost on harmless prompts."""
    df = t.table("defence", "defence")
    if df is None:
        return None
    df = df.assign(defended=df["defended"].astype(str).str.lower().isin(("true", "1")))
    harmful, harmless = df[df["set"] == "harmful"], df[df["set"] == "harmless"]
    order = {k: i for i, k in enumerate(("none", "random", "adversarial"))}  # each suffix's pair side by side
    harmful = harmful.assign(o=harmful["suffix"].map(order).fillna(len(order))).sort_values(["o", "defended"])
    labels = list(harmful["suffix"] + harmful["defended"].map({False: "\nundefended", True: "\ndefended"}))
    edges = ["k" if d else "none" for d in harmful["defended"]]  # defended bars outlined
    fig, ax = plt.subplots(figsize=(9, 4))
    _stacked_rates(ax, labels, harmful, edgecolor=edges)
    ax.set_ylabel("share of harmful completions")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if len(harmless) == 2:
        on, off = harmless[harmless["defended"]].iloc[0], harmless[~harmless["defended"]].iloc[0]
        ax.set_title(f"harmless: false refusals {off['refused_rate']:.1%} -> {on['refused_rate']:.1%}, first-token "
                     f"KL {on['kl']:.3f}, CE {off['ce']:.3f} -> {on['ce']:.3f}", fontsize=9)
    return _finish(fig, t, "Hijacking suppression against the universal suffix")


FIGURES = (
    ("01_refusal_rates", fig_rates), ("02_induced_refusal", fig_induced), ("03_direction_selection", fig_selection),
    ("04_cosine_layers", fig_cosine), ("05_top_heads", fig_top_heads), ("06_attention_hijacking", fig_hijack),
    ("07_suffix_tokens", fig_suffix_tokens), ("08_patching_knockout", fig_causal), ("09_attack", fig_attack),
    ("10_side_effects", fig_side_effects), ("11_defence", fig_defence),
)


def draw_all(run: str | Path, out: str | Path | None = None, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Every figure whose tables are in ``run`` into ``out`` (default ``run/figures``), and
    ``report.html`` beside them (in ``run``, or in ``out``'s parent); the PNG paths, in
    figure order. A figure whose tables are missing is skipped and logged."""
    t = Tables(Path(run).expanduser())
    check_tables(t)
    folder = ensure_dir(Path(out) if out else t.run / "figures")
    theme()
    made = []
    for name, fn in FIGURES:
        fig = fn(t)
        if fig is None:
            log.info("figure %s: its tables are not in %s, skipped", name, t.run)
            continue
        made.append(save(fig, folder, name, formats))
    from .report_html import write_report_html

    write_report_html(t.run, folder.parent if out else t.run, figures=folder)
    return made


def save(fig, folder: Path, name: str, formats: tuple[str, ...] = ("png", "pdf")) -> Path:
    """``fig`` as ``folder/name.{png,pdf}``, each written atomically, then closed; the first path."""
    paths = []
    for ext in formats:
        path = folder / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths[0]
