"""The control condition: a random suffix of the same token length (paper, Section 5)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import setting
from ..errors import UserError
from ..models.loading import ChatModel
from ..models.suffixes import random_suffix_ids
from .base import Attack, AttackConfig, AttackResult
from .tokens import suffix_text, survives_retokenization

DRAWS = 1024  # suffixes drawn before giving up, in batches of 64


@dataclass
class RandomConfig(AttackConfig):
    """A random suffix is drawn, not optimized: it has no steps."""

    num_steps: int = setting(1, "unused: a random suffix takes no steps", cli=False)


class RandomSuffix(Attack):
    """The control: a random suffix of allowed tokens that survives retokenization.

    Draws ``suffix_len`` allowed tokens uniformly (printable ASCII, no special tokens),
    redrawing until the suffix survives decode -> encode in every given prompt, the same
    check GCG's candidates pass.
    """

    name = "random"
    config_class = RandomConfig

    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        t0 = time.perf_counter()
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(DRAWS // 64):
            cands = random_suffix_ids(cm, 64, cfg.suffix_len, gen)
            ok = survives_retokenization(cm, instructions, cands).nonzero().flatten()
            if len(ok):
                ids = cands[int(ok[0])].tolist()
                return AttackResult(suffix=suffix_text(cm, ids), suffix_ids=ids,
                                    step_seconds=[time.perf_counter() - t0], attack=self.name)
        raise UserError(f"no random suffix of {cfg.suffix_len} tokens survived decode -> encode in the prompts "
                        f"in {DRAWS} draws; try a shorter --suffix-len")
