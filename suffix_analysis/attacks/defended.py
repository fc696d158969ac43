"""GCG against a defended model: the adaptive attacker of hijacking suppression.

An attacker who knows the defence optimizes the suffix through it. Every pass here, the
gradient pass and the candidates' scoring, runs the whole sequence (prompt, suffix, EOI,
target) under :func:`~suffix_analysis.defences.suppression.suppressing` with ``prompt_len``
set, so the defence acts on the EOI rows and, where it defends generated tokens, on the
target's rows exactly as it would while the model generates that target. The defence's
choice of what to scale is a hard threshold: the gradient treats it as fixed (it flows
through the scaled attention, not through the choice), the usual way around a
non-differentiable step (BPDA, Athalye et al. 2018). The candidates' losses are exact.

This is plain GCG (one swap per candidate, the best candidate kept each step) without the
engine's caches and packing (``attacks/gcg``): the defence reads each pass's prompt layout,
which those shortcuts split up. It is sized for the CPU: a few prompts, tens of steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import setting
from ..defences.suppression import Suppression, suppressing
from ..errors import UserError
from ..metrics import token_ce
from ..models.loading import ChatModel
from ..models.suffixes import allowed_token_mask, suffix_text, survives_retokenization
from .tokens import sample_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefendedGCGConfig:
    """The adaptive attacker's search (CPU sizes)."""

    num_steps: int = setting(20, "GCG steps")
    search_width: int = setting(64, "candidates per step")
    topk: int = setting(64, "token swaps per suffix position, from the gradient")
    batch_size: int = setting(32, "candidates per forward pass")
    seed: int = setting(0, "seed of the candidate sampling")

    def validate(self) -> None:
        if min(self.num_steps, self.search_width, self.topk, self.batch_size) < 1:
            raise UserError("num_steps, search_width, topk and batch_size must be at least 1")


@dataclass
class DefendedGCGResult:
    suffix: str  # the best suffix found (lowest loss through the defence)
    suffix_ids: list[int]
    losses: list[float] = field(default_factory=list)  # per step: the kept candidate's summed target CE
    initial_loss: float = 0.0  # the starting suffix's, through the defence
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Layout:
    """One instruction's tokens around the suffix, and its target."""

    def __init__(self, cm: ChatModel, instruction: str, target: str):
        tok = cm.tokenizer
        self.before = tok(cm.chat.prefix + instruction.strip(), add_special_tokens=False)["input_ids"]
        self.after = list(cm.chat.eoi_ids)
        self.target = tok(target, add_special_tokens=False)["input_ids"]
        if not self.target:
            raise UserError(f"empty target for instruction {instruction!r}")

    def ids(self, suffix: Tensor) -> Tensor:
        """``[c, L]`` token ids for ``c`` suffixes ``[c, n]``."""
        c = suffix.shape[0]
        pre = torch.tensor(self.before, device=suffix.device).expand(c, -1)
        post = torch.tensor(self.after + self.target, device=suffix.device).expand(c, -1)
        return torch.cat([pre, suffix, post], 1)

    def prompt_len(self, n: int) -> int:
        return len(self.before) + n + len(self.after)


def _target_ce(cm: ChatModel, layout: _Layout, logits: Tensor, n: int) -> Tensor:
    """Mean target cross-entropy per row ``[c]`` of full-sequence logits ``[c, L, vocab]``."""
    p = layout.prompt_len(n)
    tgt = torch.tensor(layout.target, device=logits.device)
    return token_ce(logits[:, p - 1: p - 1 + len(layout.target)].float(), tgt.expand(logits.shape[0], -1)).mean(-1)


@torch.no_grad()
def defended_loss(cm: ChatModel, defence: Suppression | None, layouts: list[_Layout], cands: Tensor,
                  batch_size: int = 32) -> Tensor:
    """Summed target CE over the prompts of each candidate suffix ``[c, n]`` -> ``[c]``,
    through the defence (``None``: the undefended model)."""
    n, total = cands.shape[1], torch.zeros(cands.shape[0])
    for lay in layouts:
        for s in range(0, cands.shape[0], batch_size):
            ids = lay.ids(cands[s:s + batch_size].to(cm.device))
            ctx = suppressing(cm, defence, prompt_len=lay.prompt_len(n)) if defence else torch.no_grad()
            with ctx:
                logits = cm.model(input_ids=ids).logits
            total[s:s + batch_size] += _target_ce(cm, lay, logits, n).cpu()
    return total


def _gradient(cm: ChatModel, defence: Suppression, layouts: list[_Layout], suffix: Tensor) -> Tensor:
    """d(summed target CE)/d(one-hot suffix) ``[n, vocab]``, through the defence."""
    embed = cm.model.get_input_embeddings()
    n = suffix.shape[0]
    one_hot = torch.nn.functional.one_hot(suffix, embed.weight.shape[0]).to(embed.weight.dtype)
    one_hot.requires_grad_(True)
    for lay in layouts:
        ids = lay.ids(suffix[None].to(cm.device))[0]
        p0 = len(lay.before)
        embeds = torch.cat([embed(ids[:p0]), one_hot @ embed.weight, embed(ids[p0 + n:])], 0)[None]
        with suppressing(cm, defence, prompt_len=lay.prompt_len(n)):
            logits = cm.model(inputs_embeds=embeds).logits
        _target_ce(cm, lay, logits, n).sum().backward()
    return one_hot.grad.detach()


def run_defended_gcg(cm: ChatModel, defence: Suppression, instructions: list[str], targets: list[str],
                     init_suffix: str, cfg: DefendedGCGConfig = DefendedGCGConfig(),
                     progress: bool = True) -> DefendedGCGResult:
    """Optimize one suffix over ``instructions`` (each with its ``targets`` answer) against the
    model defended by ``defence``, starting from ``init_suffix``."""
    cfg.validate()
    if len(instructions) != len(targets) or not instructions:
        raise UserError(f"{len(instructions)} instructions but {len(targets)} targets; give one target each")
    if not init_suffix.strip():
        raise UserError("the adaptive attacker starts from a suffix; give the one to adapt")
    tok = cm.tokenizer
    layouts = [_Layout(cm, i, t) for i, t in zip(instructions, targets)]
    suffix = torch.tensor(tok(" " + init_suffix.strip(), add_special_tokens=False)["input_ids"])
    vocab = cm.model.get_input_embeddings().weight.shape[0]
    allowed = allowed_token_mask(tok, vocab).to(cm.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in cm.model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:  # gradients for the suffix only
        p.requires_grad_(False)
    t0 = time.perf_counter()
    best_ids, best = suffix.clone(), float(defended_loss(cm, defence, layouts, suffix[None], cfg.batch_size)[0])
    result = DefendedGCGResult(suffix_text(cm, suffix.tolist()), suffix.tolist(), initial_loss=best)
    try:
        for _ in tqdm(range(cfg.num_steps), desc="GCG against the defence", unit="step", disable=not progress):
            grad = _gradient(cm, defence, layouts, suffix).float()
            grad[:, ~allowed] = float("inf")
            cands = sample_candidates(suffix, grad, cfg.search_width, cfg.topk, 1, gen)  # one swap each
            keep = survives_retokenization(cm, instructions, cands)  # what the model will be given
            if keep.any():
                cands = cands[keep]
            losses = defended_loss(cm, defence, layouts, cands, cfg.batch_size)
            i = int(losses.argmin())
            suffix = cands[i]
            result.losses.append(float(losses[i]))
            if losses[i] < best:
                best, best_ids = float(losses[i]), suffix.clone()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    result.suffix, result.suffix_ids = suffix_text(cm, best_ids.tolist()), best_ids.tolist()
    result.seconds = round(time.perf_counter() - t0, 1)
    log.info("adaptive GCG: loss %.3f -> %.3f through the defence in %d steps (%.0f s): %r", result.initial_loss,
             best, cfg.num_steps, result.seconds, result.suffix)
    return result
