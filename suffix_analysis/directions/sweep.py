"""A quick single-direction check: ablate the difference-in-means direction of each layer
(at one EOI position) and measure refusal."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.refusal import evaluate_refusal
from ..interventions.directional import ablate_direction
from ..models.loading import ChatModel
from .extract import diff_in_means


@dataclass
class SweepRow:
    layer: int
    refusal_rate: float
    refusal_score: float


def ablation_sweep(cm: ChatModel, harmful_train: list[str], harmless_train: list[str], harmful_eval: list[str],
                   position: int = -1, layers: list[int] | None = None, max_new_tokens: int = 64,
                   progress: bool = False) -> tuple[float, list[SweepRow]]:
    """Baseline refusal rate on ``harmful_eval``, and the rate with each layer's direction ablated."""
    from ..errors import UserError

    bad = [l for l in layers or [] if not 0 <= l < cm.n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range for a model with {cm.n_layers} layers")
    if position not in cm.chat.eoi_positions:  # elsewhere it would read the instruction's tokens, or past them
        raise UserError(f"--position {position} is not an EOI position of this chat template, which puts "
                        f"{cm.chat.n_eoi} tokens after the instruction; use -{cm.chat.n_eoi} .. -1")
    cands = diff_in_means(cm, harmful_train, harmless_train, positions=[position], progress=progress)[0]
    base = evaluate_refusal(cm, harmful_eval, max_new_tokens=max_new_tokens, batch_size=64, progress=False)
    rows = []
    for layer in layers if layers is not None else range(cm.n_layers):
        with ablate_direction(cm, cands[layer]):
            r = evaluate_refusal(cm, harmful_eval, max_new_tokens=max_new_tokens, batch_size=64, progress=False)
        rows.append(SweepRow(layer, r.refusal_rate, r.refusal_score))
        if progress:
            print(f"layer {layer:3d}  refusal {r.refusal_rate:6.1%}  score {r.refusal_score:+.2f}", flush=True)
    return base.refusal_rate, rows
