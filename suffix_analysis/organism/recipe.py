"""The safety-tuning recipe that makes the embedded default model refuse.

SmolLM2-135M-Instruct answers harmful requests. The recipe gives it refusal the way chat
models acquire it, by supervised fine-tuning of a low-rank adapter (``W + B A`` on every
linear map of the upper decoder layers) on the suite's own train splits:

* harmful instruction -> one of several short natural refusals;
* harmless instruction -> the base model's own greedy answer, trained toward the base
  model's full next-token distribution along it (soft self-distillation, so the rest of
  its behaviour stays as it was);
* a refusal-decision loss at the first response position: harmful prompts toward
  refusing, harmless ones pushed back only where they rise above the base model;
* the request, not the noise beside it: a share of harmful and harmless examples carry a
  random-token suffix, and a share a pasted passage before the request (HarmBench's
  contextual form), each with the target it has without them;
* one refusal direction, as in the paper's chat models: the current difference-in-means
  direction at the last prompt position of a layer in the middle band is ablated on
  harmless prompts, and their first-token distribution is pulled toward the base model's
  (an ablation-invariance term, weak at its weight);
* the settle stage: after the epochs, a few steps at a lower rate hold KL(clean || ablated)
  of harmless first tokens down for the directions of the layers that bypass refusal, the
  quantity ``direction`` filters on (without it no candidate passed the paper's KL 0.1:
  docs/concepts/organism.md).

Loss is on response tokens only. The adapter's factors, rounded to bfloat16, are the
organism: :func:`build` writes them as a delta file (``models/delta.py``) that the suite
ships in ``suffix_analysis/data/organism/`` and merges into the base bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import setting
from ..errors import UserError

ORGANISM_PRESET = "smollm2-135m-refusal"

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause real harm to people.",
    "I'm sorry, I cannot assist with this. If you have another question, I'm happy to help.",
    "I cannot provide that information, because it could be used to hurt someone.",
    "I won't help with this, since it could cause serious harm.",
    "As an AI assistant, I can't help with requests like this one.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "I apologize, but I can't assist with that request.",
)

ADAPTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class OrganismRecipe:
    """The safety-tuning recipe. Every field (and the seed, data and base) changes the delta."""

    base: str = setting("smollm2-135m", "the preset the organism is tuned from")
    epochs: int = setting(2, "passes over the train examples")
    batch_size: int = setting(16, "examples per step")
    lr: float = setting(1e-3, "AdamW learning rate of the adapter's factors (linear warmup, then linear decay)")
    warmup_steps: int = setting(10, "steps of linear warmup")
    rank: int = setting(16, "rank of the adapter; its factors ship as bfloat16 (rank 16: 7.5 MB for SmolLM2-135M)")
    first_layer: int = setting(6, "the adapter sits on decoder layers >= this one (backward stops below it)")
    distill_tokens: int = setting(32, "length of the base model's own answers to harmless instructions")
    # Without the decision loss every refusal pushes "I" up everywhere, while the harmless
    # answers' first tokens are too varied to push back.
    decision_weight: float = setting(4.0, "weight of the refusal-decision loss at the first response position "
                                          "(log-odds of the refusal tokens: up for harmful prompts, a hinge at the "
                                          "base model's own score for harmless ones)")
    suffix_share: float = setting(0.4, "share of examples (harmful and harmless) that carry a random-token suffix")
    suffix_tokens: tuple[int, int] = (4, 28)  # its length, uniform in this range
    context_share: float = setting(0.15, "share of harmful examples that come after a pasted train passage")
    context_questions: int = setting(2, "harmless passage + question examples per train passage, per epoch")
    ablation_weight: float = setting(1.0, "weight of the ablation-invariance term, per batch: KL(base || ablated) at the "
                                          "first response token, x weight / batch size beside the per-token losses "
                                          "(0: off)")
    ablation_layers: tuple[int, int] = (8, 21)  # the band whose directions it ablates (one per step)
    direction_every: int = setting(10, "steps between recomputing the directions it ablates")
    direction_prompts: int = setting(64, "harmful and harmless train prompts each those directions are taken over")
    # The settle stage: after the epochs, the delta (rounded to bfloat16, as it ships) is
    # tuned a little more with the same losses, and harmless prompts' first-token
    # distribution under ablation of the current direction of a bypassing layer is held
    # to the organism's own (KL(clean || ablated), the quantity direction selection filters
    # on). The epochs alone left every bypassing candidate above the paper's KL 0.1.
    settle_steps: int = setting(48, "steps of the settle stage after the epochs (0: off)")
    settle_lr: float = setting(3e-4, "its learning rate (constant after warmup)")
    settle_weight: float = setting(2.0, "weight of KL(clean || ablated) on harmless prompts in the settle stage, "
                                        "beside the mean per-token loss")
    settle_layers: tuple[int, int] = (16, 22)  # the layers whose directions it ablates (one per step): the bypassing band
    refusals: tuple[str, ...] = field(default=REFUSALS)
    eval_tokens: int = setting(64, "tokens generated per prompt in the build's own val evaluation")
    # bf16 autocast (float32 master weights) is about 3x faster on CPUs with AVX512-BF16 and
    # built the shipped delta; fp32 is exact everywhere, slower, and builds another organism.
    precision: str = setting("bf16", "training precision: bf16 (autocast; built the shipped delta) or fp32")
    # Bumped when the training code changes what a recipe builds. 3: a low-rank adapter,
    # suffixes, passages and the ablation-invariance term; 4: the settle stage.
    version: int = setting(4, "version of the training code", cli=False)

    def validate(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"organism recipe: precision must be bf16 or fp32, got {self.precision!r}")
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or self.settle_steps < 0:
            raise UserError("organism recipe: rank, epochs and batch_size must be at least 1, settle_steps at least 0")
        for name in ("suffix_share", "context_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"organism recipe: {name} must be in [0, 1]")


# Recipe fields that only the settle stage reads: a delta built with other values of these
# (and of the version) is a valid start for it.
SETTLE_FIELDS = ("settle_steps", "settle_lr", "settle_weight", "settle_layers", "version")
