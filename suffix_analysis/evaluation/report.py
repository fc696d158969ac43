"""The paper's evaluation of a refusal direction: what ablation, addition and the
orthogonalized model do to refusal, and what they cost elsewhere (KL, cross-entropy)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..interventions.directional import ablate_direction, add_direction
from ..metrics import first_token_kl
from ..models.loading import ChatModel
from .loss import completion_ce, corpus_ce
from .refusal import evaluate_refusal


def _kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return first_token_kl(clean_logits, logits).mean().item()


def evaluate_direction(
    cm: ChatModel,
    direction: torch.Tensor,
    layer: int,
    harmful: list[str],
    harmless: list[str],
    coeff: float = 1.0,
    corpus: list[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    orthogonalized: ChatModel | None = None,
    progress: bool = False,
    judge=None,
    compliance=None,
    judge_harmless: bool = True,
    reports: dict | None = None,
    extra: list[tuple[str, object]] | None = None,
) -> list[dict]:
    """One row per condition: baseline, ablation, activation addition (and the orthogonalized model).

    Columns: refusal rate/score on ``harmful`` and on ``harmless`` (and, with a compliance
    judge, the complied and derailed rates of each; of harmful only without ``judge_harmless``),
    first-token KL on harmless against the baseline, CE of the baseline's own harmless
    completions, CE on ``corpus`` (not for a condition with its own ``completion_ce``, the
    defence: plain text has no user message to defend). ``reports``, if given, receives each condition's
    :class:`~suffix_analysis.evaluation.refusal.RefusalReport` pair as ``{name: (harmful, harmless)}``.
    """
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, judge=judge,
              compliance=compliance)
    conditions = [("baseline", cm, nullcontext()), ("ablation", cm, ablate_direction(cm, direction)),
                  (f"actadd (x{coeff:g}, layer {layer})", cm, add_direction(cm, direction, layer, coeff))]
    if orthogonalized is not None:
        conditions.append(("orthogonalized", orthogonalized, nullcontext()))
    conditions += [(name, cm, ctx) for name, ctx in extra or ()]
    rows, clean = [], None
    for name, model, ctx in conditions:
        own_ce = getattr(ctx, "completion_ce", None)  # a condition that scores CE its own way (the defence)
        with ctx:
            h = evaluate_refusal(model, harmful, **kw)
            n = evaluate_refusal(model, harmless, **{**kw, "compliance": compliance if judge_harmless else None})
            if clean is None:
                clean = n
            if reports is not None:
                reports[name] = (h, n)
            row = {
                "condition": name,
                "harmful_refusal_rate": h.refusal_rate,
                "harmful_refusal_score": h.refusal_score,
                "harmless_refusal_rate": n.refusal_rate,
                "harmless_refusal_score": n.refusal_score,
                **({"harmful_complied_rate": h.complied_rate, "harmful_derailed_rate": h.derailed_rate}
                   if compliance is not None else {}),
                **({"harmless_complied_rate": n.complied_rate, "harmless_derailed_rate": n.derailed_rate}
                   if compliance is not None and judge_harmless else {}),
                "kl_harmless": _kl(clean.first_logits, n.first_logits),
            }
            if own_ce is None:
                row["ce_harmless_completions"] = completion_ce(model, harmless, clean.completions)
                if corpus:
                    row["ce_corpus"] = corpus_ce(model, corpus)
        if own_ce is not None:  # outside the block: it runs its own
            row["ce_harmless_completions"] = own_ce(model, harmless, clean.completions)
        rows.append(row)
    return rows
