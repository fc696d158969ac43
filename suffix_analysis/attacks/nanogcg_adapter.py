"""nanoGCG (the package people use today) as a registered attack, when it is installed.

nanogcg 0.3.0 pins ``transformers<=4.47.1``, so it usually lives in its own environment
(see ``benchmarks/bench_gcg.py``); in an environment that has both, this adapter runs it
on the same model and returns the suite's :class:`AttackResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import UserError
from ..models.loading import ChatModel
from .base import Attack, AttackConfig, AttackResult


@dataclass
class NanoGCGConfig(AttackConfig):
    """nanoGCG's own settings (nanogcg.GCGConfig), under this suite's names."""

    search_width: int = setting(512, "candidate suffixes per step")
    topk: int = setting(256, "token swaps considered per position")
    n_replace: int = setting(1, "positions swapped per candidate")
    buffer_size: int = setting(0, "candidate buffer size (0: none)")
    init: str = setting("x", "initial suffix token, repeated")
    allow_non_ascii: bool = setting(False, "allow non-ASCII tokens")
    filter_retokenization: bool = setting(True, "nanoGCG's filter_ids")
    early_stop: bool = setting(True, "stop when the target is the greedy continuation")
    use_prefix_cache: bool = setting(True, "nanoGCG's prefix cache (breaks with transformers 5)")


class NanoGCG(Attack):
    name = "nanogcg"
    config_class = NanoGCGConfig

    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        try:
            import nanogcg
        except ImportError:
            raise UserError("the nanogcg attack needs the nanogcg package: pip install 'suffix-analysis[nanogcg]' "
                            "(in an environment with the transformers version it pins)") from None
        if len(instructions) != 1:
            raise UserError("nanogcg optimizes a suffix for one prompt; pass one instruction")
        c = self.config
        t0 = time.perf_counter()
        result = nanogcg.run(
            cm.model, cm.tokenizer, [{"role": "user", "content": instructions[0].strip() + " {optim_str}"}],
            targets[0],
            nanogcg.GCGConfig(num_steps=c.num_steps, optim_str_init=" ".join([c.init] * c.suffix_len),
                              search_width=c.search_width, topk=c.topk, n_replace=c.n_replace,
                              buffer_size=c.buffer_size, allow_non_ascii=c.allow_non_ascii,
                              filter_ids=c.filter_retokenization, early_stop=c.early_stop,
                              use_prefix_cache=c.use_prefix_cache, seed=c.seed, verbosity="WARNING"))
        total = time.perf_counter() - t0
        n = max(len(result.losses), 1)
        ids = cm.tokenizer(result.best_string, add_special_tokens=False)["input_ids"]
        return AttackResult(suffix=result.best_string, suffix_ids=ids, losses=list(result.losses),
                            suffixes=list(result.strings), step_seconds=[total / n] * n, attack=self.name,
                            extra={"note": "nanogcg reports no per-step times; step_seconds is the mean"})
