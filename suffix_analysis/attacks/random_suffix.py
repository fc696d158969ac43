"""The control condition: a random suffix of the same token length (paper, Section 5)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..models.loading import ChatModel
from .base import Attack, AttackConfig, AttackResult, register_attack
from .gcg import allowed_token_mask


@register_attack
class RandomSuffix(Attack):
    """Draws ``suffix_len`` allowed tokens uniformly (printable ASCII, no special tokens),
    redrawing until the suffix survives decode -> encode after a space."""

    name = "random"
    config_class = AttackConfig

    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        t0 = time.perf_counter()
        cfg = self.config
        tok = cm.tokenizer
        vocab = cm.model.get_input_embeddings().weight.shape[0]
        allowed = allowed_token_mask(tok, vocab).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(1000):
            ids = allowed[torch.randint(0, len(allowed), (cfg.suffix_len,), generator=gen)].tolist()
            text = tok.decode(ids)
            if text.startswith(" ") and tok(text, add_special_tokens=False)["input_ids"] == ids:
                break
        return AttackResult(suffix=text[1:] if text.startswith(" ") else text, suffix_ids=ids,
                            step_seconds=[time.perf_counter() - t0], attack=self.name)
