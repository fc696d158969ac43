"""nanoGCG (the package people use today) as a registered attack, run in its own environment.

nanogcg 0.3.0 pins ``transformers<=4.47.1`` and this suite needs transformers 5, so nanoGCG
runs in a separate virtual environment (:mod:`.nanogcg_env`): ``--nanogcg-python`` (default
``$NANOGCG_PYTHON``, else the one ``python -m suffix_analysis.attacks.nanogcg_env`` makes in
the suite's cache folder). The model is handed over as a folder transformers 4.47 loads, the
prompt, target and settings as JSON; the suffix, its token ids, per-step losses and seconds
come back as JSON and become the suite's :class:`AttackResult`. ``success`` is the suite's
own check, not nanoGCG's: the target is the greedy continuation of the prompt with the
suffix, rendered as text and tokenized whole (as the suffix is used afterwards).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import setting
from ..errors import UserError
from ..models.loading import ChatModel
from .base import Attack, AttackConfig, AttackResult
from .nanogcg_env import check_python, export_model, resolve_python, run_nanogcg

log = logging.getLogger(__name__)


@dataclass
class NanoGCGConfig(AttackConfig):
    """nanoGCG's own settings (nanogcg.GCGConfig), under this suite's names, and where it runs."""

    search_width: int = setting(512, "candidate suffixes per step")
    topk: int = setting(256, "token swaps considered per position")
    n_replace: int = setting(1, "positions swapped per candidate")
    buffer_size: int = setting(0, "candidate buffer size (0: none)")
    init: str = setting("x", "initial suffix token, repeated")
    allow_non_ascii: bool = setting(False, "allow non-ASCII tokens")
    filter_retokenization: bool = setting(True, "nanoGCG's filter_ids")
    early_stop: bool = setting(True, "stop when the target is the greedy continuation")
    use_prefix_cache: bool = setting(True, "nanoGCG's prefix cache")
    nanogcg_python: str = setting("", "python of an environment with nanogcg 0.3.0 (default: $NANOGCG_PYTHON, else "
                                      "the one `python -m suffix_analysis.attacks.nanogcg_env` makes in the cache)")

    def validate(self) -> None:
        super().validate()
        # Here, so that a missing environment is reported before the model is loaded.
        check_python(resolve_python(self.nanogcg_python))

    def gcg_arguments(self, init: str) -> dict:
        """nanogcg.GCGConfig's arguments, with ``init`` as the initial suffix string."""
        return dict(num_steps=self.num_steps, optim_str_init=init, search_width=self.search_width, topk=self.topk,
                    n_replace=self.n_replace, buffer_size=self.buffer_size, allow_non_ascii=self.allow_non_ascii,
                    filter_ids=self.filter_retokenization, early_stop=self.early_stop,
                    use_prefix_cache=self.use_prefix_cache, seed=self.seed, verbosity="WARNING")


def init_string(tokenizer, init: str, n: int) -> str:
    """An initial suffix string that nanoGCG (which tokenizes it alone) reads as ``n`` tokens:
    ``init`` repeated, cut to ``n`` tokens when the spaced repeats are more."""
    text = " ".join([init] * n)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > n:
        text = tokenizer.decode(ids[:n])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != n:
        raise UserError(f"initial suffix {init!r} repeated does not tokenize to --suffix-len {n} tokens "
                        f"({len(ids)}); pick another --init")
    return text


@torch.no_grad()
def target_is_greedy(cm: ChatModel, instruction: str, suffix: str, target: str) -> bool:
    """Whether every target token is the model's likeliest next token after the prompt with
    ``suffix`` (rendered as text, tokenized whole) and the target tokens before it."""
    prompt = cm.chat.tokenize([instruction], [suffix])[0]
    tgt = cm.tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + tgt], device=cm.device)
    logits = cm.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    return bool((logits.argmax(-1).cpu() == torch.tensor(tgt)).all())


class NanoGCG(Attack):
    name = "nanogcg"
    config_class = NanoGCGConfig

    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        if len(instructions) != 1:
            raise UserError("nanogcg optimizes a suffix for one prompt; pass one instruction")
        if resume:
            raise UserError("nanogcg keeps no checkpoints to resume from; run it again without --resume")
        c = self.config
        python = resolve_python(c.nanogcg_python)
        check_python(python)
        init = init_string(cm.tokenizer, c.init, c.suffix_len)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            log_file = out / "nanogcg.log"
        else:  # outside the work folder, so that a failure's output can still be read
            fd, name = tempfile.mkstemp(prefix="nanogcg-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
        with tempfile.TemporaryDirectory(prefix="nanogcg-") as work:
            spec = export_model(cm, Path(work) / "model")
            spec.update(instruction=instructions[0], target=targets[0], threads=torch.get_num_threads(),
                        gcg=c.gcg_arguments(init))
            r = run_nanogcg(python, spec, Path(work), log_file)
        if out is None:
            log_file.unlink()
        success = target_is_greedy(cm, instructions[0], r["best_string"], targets[0])
        log.info("nanoGCG: %d steps, best loss %.4f, target %s the greedy continuation", len(r["losses"]),
                 r["best_loss"], "is" if success else "is not")
        return AttackResult(
            suffix=r["best_string"], suffix_ids=r["best_ids"], losses=r["losses"], suffixes=r["strings"],
            step_seconds=r["step_seconds"], success=success, attack=self.name,
            extra={"python": str(python), "versions": r["versions"], "best_loss": r["best_loss"],
                   "optim_str_init": init,
                   "note": "losses and suffix_ids are nanoGCG's, which tokenizes the prompt in pieces around the "
                           "suffix; success is the suite's check on the prompt rendered as text"})
