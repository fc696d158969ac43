"""The attribution run's summary: ``summary.json``'s headline numbers, built from the tables
of a run folder (:func:`build_summary`), and a few lines to read at a glance (:func:`summary_table`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..tables import read_table, table_path
from .config import SUMMARY_K
from .record import KINDS, Condition, _load_conditions, _read


def _num(x) -> float | None:
    """A JSON number: None for NaN, infinity or missing."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _by_kind(values: dict[str, float | None], conditions: list[Condition], kinds=KINDS) -> dict[str, float | None]:
    """Per-condition values as per-kind means (the random draws averaged)."""
    out = {}
    for kind in kinds:
        vals = [values[c.name] for c in conditions if c.kind == kind and values.get(c.name) is not None]
        out[kind] = _num(sum(vals) / len(vals)) if vals else None
    return out


def _drop(cos: dict, kind: str) -> float | None:
    h, n, x = cos["harmful"], cos["harmless"], cos[kind]
    if None in (h, n, x) or h == n:
        return None
    return _num((h - x) / (h - n))


def _kept(values: dict, kind: str) -> float | None:
    """The share of the harmful-harmless gap that ``kind`` keeps (1: as harmful, 0: as harmless)."""
    d = _drop(values, kind) if values else None
    return None if d is None else _num(1 - d)


def _ratio_of_means(df: pd.DataFrame, new: str, into: str, src: str) -> float | None:
    """``(mean new - mean into) / (mean from - mean into)``: a share of the mean gap, robust to
    prompts whose own gap is near zero."""
    if df.empty:
        return None
    gap = df[src].mean() - df[into].mean()
    return _num((df[new].mean() - df[into].mean()) / gap) if gap != 0 else None


def build_summary(out: Path, record: dict) -> dict:
    """``summary.json``'s content, from the tables of the run folder ``out``."""
    conds = _load_conditions(out)
    layer, position = record["direction"]["layer"], record["direction"]["position"]
    notes = []
    cos = read_table(out, "cosine", ["condition", "site", "layer", "position", "cosine"])
    at = cos[(cos["site"] == "hook_resid_pre") & (cos["layer"] == layer) & (cos["position"] == position)]
    cosine = _by_kind(at.groupby("condition", observed=True)["cosine"].mean().to_dict(), conds)
    top = _read(out, "top_heads.json")
    top8 = [tuple(x) for x in top["top8"]]
    hj = read_table(out, "hijack", ["condition", "layer", "head", "destination", "region", "mass"])
    hj = hj[(hj["destination"] == -1) & pd.MultiIndex.from_arrays([hj["layer"], hj["head"]]).isin(top8)]
    attention = {}
    for region in ("instruction", "suffix", "template", "eoi"):
        means = hj[hj["region"] == region].groupby("condition", observed=True)["mass"].mean().to_dict()
        for kind, v in _by_kind(means, conds, ("harmful", "random", "adversarial")).items():
            attention.setdefault(kind, {})[region] = v
    patch = read_table(out, "patching")
    k8 = int(patch["n_heads"][patch["n_heads"] <= SUMMARY_K].max())
    p8 = patch[(patch["n_heads"] == k8) & (patch["patch"] == "harmful->adversarial")]
    ko = read_table(out, "knockout")
    ko_all = ko[ko["cut"] == "all"]
    kinds = {c.name: c.kind for c in conds}
    score = _by_kind(ko_all.groupby("condition", observed=True)["score_plain"].mean().to_dict(), conds,
                     ("harmful", "random", "adversarial"))
    score["harmful"] = _num(ko_all["score_harmful"].mean()) if len(ko_all) else None
    ko_adv = ko_all[ko_all["condition"].map(kinds) == "adversarial"]
    ko_rnd = ko_all[ko_all["condition"].map(kinds) == "random"]
    gen_path = out / "knockout_completions.json"
    if gen_path.is_file():
        gen = _read(out, gen_path.name)
        restored, n_made = gen["restored"], gen["n_made_answer"]
        if n_made == 0:
            notes.append("knockout_restored: the suffix made no prompt answer that was refused without it")
    else:
        restored = n_made = None
        notes.append("knockout_restored: no judge was given, so the answers under knockout were not generated "
                     "and judged (the refusal scores in knockout.csv are measured)")
    harm = {}
    if table_path(out, "harmfulness") is not None:
        hf = read_table(out, "harmfulness", ["condition", "layer", "projection"])
        harm = _by_kind(hf[hf["layer"] == layer].groupby("condition", observed=True)["projection"].mean().to_dict(),
                        conds)
    agreement = None
    if table_path(out, "suffix_token_agreement") is not None:
        ag = read_table(out, "suffix_token_agreement")
        agreement = {c: _num(ag[c].mean()) for c in ("replace_vs_grad", "block_vs_grad", "replace_vs_block")}
    else:
        notes.append("suffix token effects: not computed (token_effects off)")
    return {
        "model": record["model"], "fingerprint": record["fingerprint"],
        "layer": layer, "position": position, "hook": f"blocks.{layer}.hook_resid_pre",
        "suffix": record["suffix"], "suffix_tokens": _read(out, "conditions.json")["suffix_tokens"],
        "n_harmful": record["n_harmful"], "n_harmless": record["n_harmless"],
        "n_random": sum(c.kind == "random" for c in conds),
        "random_suffixes": [c.suffix for c in conds if c.kind == "random"],
        "cosine": cosine,
        "cosine_drop_adversarial": _drop(cosine, "adversarial"), "cosine_drop_random": _drop(cosine, "random"),
        # the harmfulness direction at the last user token, at the direction's layer: 1 = harmful, 0 = harmless
        "harmfulness": harm or None,
        "harmfulness_kept_adversarial": _kept(harm, "adversarial"), "harmfulness_kept_random": _kept(harm, "random"),
        "top_heads": [list(x) for x in top8],
        "top8_projection": _by_kind({k: _num(v) for k, v in top["projection_top8"].items()}, conds),
        "top8_attention": attention,
        "refusal_score": score,
        "patch_restored": _ratio_of_means(p8, "score_patched", "score_into", "score_from"),
        "patch_projection_restored": _ratio_of_means(p8, "projection_patched", "projection_into", "projection_from"),
        "patch_heads": k8,
        "knockout_restored": _num(restored), "knockout_n_made_answer": n_made,
        "knockout_score_restored": _ratio_of_means(ko_adv, "score_knockout", "score_plain", "score_harmful"),
        "knockout_score_restored_random": _ratio_of_means(ko_rnd, "score_knockout", "score_plain", "score_harmful"),
        "suffix_token_agreement": agreement,
        "stage_seconds": record.get("stages", {}),
        "notes": notes,
    }


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_table(summary: dict) -> str:
    """A few lines to read at a glance."""
    s = summary

    def kinds(d: dict) -> str:
        return "  ".join(f"{k} {_f(d.get(k))}" for k in KINDS if k in d)

    att = s["top8_attention"]
    judged = (f"{_f(s['knockout_restored'], '.2f')} of the {s['knockout_n_made_answer']} prompts the suffix made "
              "answer refuse again" if s["knockout_n_made_answer"] is not None else "not judged (no judge)")
    lines = [
        f"{s['model']} ({s['fingerprint']}), direction at {s['hook']}, position {s['position']}; "
        f"{s['n_harmful']} harmful, {s['n_harmless']} harmless prompts; suffix of {s['suffix_tokens']} tokens, "
        f"{s['n_random']} random controls",
        f"cosine with the direction   {kinds(s['cosine'])}",
        f"  drop from harmful, share of the harmful - harmless gap: adversarial {_f(s['cosine_drop_adversarial'])}, "
        f"random {_f(s['cosine_drop_random'])}",
        f"refusal score, last token   {kinds(s['refusal_score'])}",
        *([f"harmfulness at the last user token (harmful 1, harmless 0): adversarial "
           f"{_f(s['harmfulness_kept_adversarial'])}, random {_f(s['harmfulness_kept_random'])}"]
          if s.get("harmfulness") else []),
        f"top {len(s['top_heads'])} heads  " + " ".join(f"L{l}H{h}" for l, h in s["top_heads"]),
        f"  summed projection         {kinds(s['top8_projection'])}",
        *(f"  attention of last token, {k + ':':12s} " + "  ".join(
            f"{r} {_f(att[k].get(r), '.2f')}" for r in ("instruction", "suffix", "template"))
          for k in ("harmful", "random", "adversarial") if k in att),
        f"patching the top {s['patch_heads']} heads harmful -> adversarial restores {_f(s['patch_restored'])} of the "
        f"refusal-score gap ({_f(s['patch_projection_restored'])} of the projection's)",
        f"EOI -> suffix knockout, all layers: refusal score restored {_f(s['knockout_score_restored'])} "
        f"(random suffixes {_f(s['knockout_score_restored_random'])}); answers: {judged}",
    ]
    return "\n".join(lines)
