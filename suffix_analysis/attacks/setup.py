"""Attack set-up, in one place for every caller (the attack command, ``reproduce``, sweeps):
the instructions a suffix is optimized on, their targets, and the attack object built with
the direction and objective references its config asks for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import setting
from ..datasets import load_instructions
from ..errors import UserError
from ..evaluation.compliance import DEFAULT_REFERENCE
from ..models.loading import ChatModel, load_model
from .base import Attack, AttackConfig
from .targets import answer_targets, default_target, load_targets

TARGETS_HELP = ("target responses: 'default' ('Sure, here is ...'), 'answers[:MODEL]' (the start of MODEL's own "
                "answers; default MODEL smollm2-135m, the organism's base), 'ablated' (the start of the attacked "
                "model's own answers with the direction ablated), or a file aligned with the instructions")
# The reference that answers: the compliance judge's (the organism's base, in the family's own words).
ANSWER_REFERENCE = DEFAULT_REFERENCE


@dataclass
class AttackInputs:
    """What a suffix is optimized on."""

    instructions: str = setting("harmful:train", "instructions the suffix must work on: a file (.json/.csv/.txt), "
                                                 "a shipped set (harmful:train) or a dataset name")
    n_prompts: int = setting(1, "optimize one universal suffix over the first N instructions")
    targets: str = setting("default", TARGETS_HELP)
    target_tokens: int = setting(10, "answer targets ('answers', 'ablated'): tokens of each answer kept")

    def validate(self) -> None:
        if self.n_prompts < 1:
            raise UserError(f"n_prompts must be at least 1, got {self.n_prompts}")
        if self.target_tokens < 1:
            raise UserError(f"target_tokens must be at least 1, got {self.target_tokens}")
        if not self.targets:
            raise UserError("targets is empty; use 'default', 'answers[:MODEL]', 'ablated' or a file")

    @property
    def needs_direction(self) -> bool:
        return self.targets == "ablated"

    def targets_from(self) -> str:
        """How the targets were made, as records name it (``answers:MODEL`` spelled out)."""
        if self.targets == "answers":
            return f"answers:{ANSWER_REFERENCE}"
        return self.targets


def attack_instructions(inputs: AttackInputs, data_dir: str | None = None) -> list[str]:
    """The first ``n_prompts`` instructions of ``inputs.instructions``."""
    return [x.instruction for x in load_instructions(inputs.instructions, data_dir)][: inputs.n_prompts]


def attack_targets(inputs: AttackInputs, instructions: list[str], cm: ChatModel | None = None,
                   direction: torch.Tensor | None = None, device: str = "auto", progress: bool = False) -> list[str]:
    """A target per instruction, as ``inputs.targets`` says. ``cm`` (the attacked model) and
    ``direction`` ``[d_model]`` are needed for 'ablated' targets only; 'answers:MODEL' loads MODEL."""
    spec = inputs.targets
    if spec == "default":
        return [default_target(i) for i in instructions]
    if spec == "ablated":
        if cm is None or direction is None:
            raise UserError("targets 'ablated' need a direction (--direction RUN): the direction ablated while the "
                            "model answers")
        return answer_targets(cm, instructions, inputs.target_tokens, progress=progress, direction=direction)
    if spec == "answers" or spec.startswith("answers:"):
        reference = spec.partition(":")[2] or ANSWER_REFERENCE
        ref = cm if cm is not None and cm.name == reference else load_model(reference, device=device, progress=progress)
        return answer_targets(ref, instructions, inputs.target_tokens, progress=progress)
    return load_targets(spec, len(instructions))


def build_attack(cls: type[Attack], config: AttackConfig, cm: ChatModel,
                 direction: tuple[torch.Tensor, int] | None = None, data_dir: str | None = None) -> Attack:
    """``cls(config)`` with the direction ``(vector [d_model], layer)`` and the references its
    objective needs, for attacks that use one (``cls.uses_direction``)."""
    if not cls.uses_direction:
        return cls(config)
    terms = set(getattr(config, "terms", ()))
    if direction is None:
        missing = sorted(terms & set(cls.direction_terms))
        if missing:
            raise UserError(f"--objective {missing[0]} needs --direction RUN")
        return cls(config)
    vector, layer = direction
    return cls(config, direction=(vector, layer), **cls.references(config, cm, vector, layer, data_dir))
