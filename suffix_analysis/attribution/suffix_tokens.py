"""Which suffix tokens move the refusal direction: two interventions and a gradient, per token.

The readout is the projection of ``blocks.{layer}.hook_resid_pre`` on the unit direction,
at the EOI positions: their mean (``position="eoi"``, the default: a suffix acts on every
EOI token, and the direction is often taken at one that is not the last) or one EOI
position (e.g. ``-1``). For each suffix token ``t`` of each prompt (the suffix region of
``regions.py``, tokens as the model sees the whole prompt):

* ``effect_replace`` = readout(prompt) - readout(prompt with ``t`` replaced by a neutral
  token): by default the tokenizer's single token for ``" the"`` (a frequent word, with the
  space byte-level and SentencePiece vocabularies attach to it), configurable as text or
  id. The replacement is made in the token ids, so the length and every other token stay.
* ``effect_block`` = readout(prompt) - readout(prompt where no later position attends to
  ``t``), every layer and head (an attention-mask edit, ``masks.py``; ``t`` keeps its
  position, the positions after it keep theirs).
* ``grad_x_input``: ``sum_d (d readout / d e_t)[d] * e_t[d]`` for ``t``'s input embedding
  ``e_t`` (the embedding layer's output; Gemma's scaling afterwards is linear and leaves it
  unchanged), a first-order estimate of readout(prompt) - readout(``e_t`` = 0).

All three are positive where the token pushes the projection up. :func:`token_agreement`
gives their Spearman rank correlations per prompt (:func:`spearman`, ties averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.chat import position_ids
from ..models.hooks import run_with_hooks
from ..models.loading import ChatModel
from .batches import batch_slices, prompts, unit_direction
from .causal import check_layer
from .masks import AttentionCut, check_attention, cut_attention, layer_heads, suffix_regions
from .regions import PromptRegions

NEUTRAL = " the"


class _Reached(Exception):
    """Raised by the readout hook: nothing after the direction's layer is needed."""


def neutral_token(cm: ChatModel, neutral: str | int = NEUTRAL) -> int:
    """The id of the replacement token: ``neutral`` itself (an id) or its text's single token."""
    vocab = cm.model.get_input_embeddings().weight.shape[0]
    if isinstance(neutral, int):
        if not 0 <= neutral < vocab:
            raise UserError(f"neutral token id {neutral} is out of range for a vocabulary of {vocab}")
        return neutral
    ids = cm.tokenizer(neutral, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"the neutral text {neutral!r} is {len(ids)} tokens for this tokenizer; pass the text of "
                        "one token or a token id")
    return int(ids[0])


def readout_positions(cm: ChatModel, position: int | str) -> list[int]:
    """The EOI positions the readout averages over."""
    if position == "eoi":
        return cm.chat.eoi_positions
    if isinstance(position, int) and -cm.chat.n_eoi <= position < 0:
        return [position]
    raise UserError(f"position must be 'eoi' (the mean over EOI positions) or an EOI position "
                    f"-{cm.chat.n_eoi} .. -1, got {position!r}")


def readout(cm: ChatModel, unit: Tensor, layer: int, positions: list[int], attention_mask: Tensor,
            input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
    """``[batch]``: ``blocks.{layer}.hook_resid_pre`` at ``positions`` projected on ``unit``,
    averaged over positions (float32). Gradients flow when ``inputs_embeds`` needs them.
    The pass stops at that layer."""
    seen: dict[str, Tensor] = {}
    pos = torch.tensor(positions)

    def grab(x: Tensor, hook) -> None:
        seen["x"] = x[:, pos.to(x.device) % x.shape[1]]
        raise _Reached

    mask = attention_mask.to(cm.device)
    try:
        with run_with_hooks(cm, [(f"blocks.{layer}.hook_resid_pre", grab)]):
            cm.model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                                position_ids=position_ids(mask), use_cache=False)
    except _Reached:
        pass
    return (seen["x"].float().to(unit.device) @ unit).mean(-1)


def _gradient(cm: ChatModel, unit: Tensor, layer: int, positions: list[int], ids: Tensor) -> tuple[float, Tensor]:
    """The readout of one prompt ``ids`` ``[length]`` and its gradient x input ``[length]``."""
    with torch.enable_grad():
        emb = cm.model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)  # [1, length, d_model]
        value = readout(cm, unit, layer, positions, torch.ones_like(ids[None]), inputs_embeds=emb)
        (grad,) = torch.autograd.grad(value.sum(), emb)
    return float(value[0].detach()), (grad * emb.detach()).float().sum(-1)[0].cpu()


@torch.no_grad()
def _variants(cm: ChatModel, unit: Tensor, layer: int, positions: list[int], ids: Tensor, span: tuple[int, int],
              neutral: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Readouts ``[n_suffix]`` with each suffix token replaced, and with each one blocked."""
    start, end = span
    targets = torch.arange(start, end, device=ids.device)
    replaced, blocked = [], []
    for part in batch_slices(len(targets), batch_size):
        t = targets[part]
        rows = ids.repeat(len(t), 1)  # [n, length]
        mask = torch.ones_like(rows)
        rows[torch.arange(len(t)), t] = neutral
        replaced.append(readout(cm, unit, layer, positions, mask, input_ids=rows))
        keys = torch.zeros(len(t), ids.numel(), dtype=torch.bool)
        keys[torch.arange(len(t)), t.cpu()] = True
        cut = AttentionCut(keys=keys, queries_from=t.cpu() + 1, heads=layer_heads(cm))
        with cut_attention(cm, cut):
            blocked.append(readout(cm, unit, layer, positions, mask, input_ids=ids.repeat(len(t), 1)))
    return torch.cat(replaced).cpu(), torch.cat(blocked).cpu()


def suffix_token_effects(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str],
    direction: Tensor,
    layer: int,
    position: int | str = "eoi",
    neutral: str | int = NEUTRAL,
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """Per suffix token: ``effect_replace``, ``effect_block`` and ``grad_x_input`` on the
    projection of ``blocks.{layer}.hook_resid_pre`` on ``direction`` ``[d_model]`` (made
    unit) at ``position`` (``"eoi"``: the EOI mean; or an EOI position). The module
    docstring defines each.

    Returns one row per prompt x suffix token: ``prompt``, ``suffix_index`` (0-based in the
    suffix), ``position`` (index in the unpadded prompt), ``token_id``, ``token`` (decoded
    text), ``hook``, ``readout`` (the unedited prompt's projection), ``effect_replace``,
    ``effect_block``, ``grad_x_input``. Each prompt costs one gradient pass and two passes
    per suffix token, in batches of ``batch_size`` rows, each stopped at ``layer``.
    """
    check_attention(cm)
    instructions, suffixes = prompts(instructions, suffixes)
    if any(s is None for s in suffixes):
        raise UserError("every prompt needs a suffix to attribute; pass one suffix per instruction or one for all")
    unit, layer = unit_direction(cm, direction), check_layer(cm, layer)
    positions, neutral_id = readout_positions(cm, position), neutral_token(cm, neutral)
    regions: list[PromptRegions] = suffix_regions(cm, instructions, suffixes)
    hook = f"blocks.{layer}.hook_resid_pre"
    rows = []
    for p, reg in enumerate(tqdm(regions, desc="suffix tokens", disable=not progress)):
        ids = torch.tensor(reg.ids, device=cm.device)
        start, end = reg.spans["suffix"]
        plain, gxi = _gradient(cm, unit, layer, positions, ids)
        replaced, blocked = _variants(cm, unit, layer, positions, ids, (start, end), neutral_id, batch_size)
        for k, t in enumerate(range(start, end)):
            rows.append({"prompt": p, "suffix_index": k, "position": t, "token_id": reg.ids[t],
                         "token": cm.tokenizer.decode([reg.ids[t]]), "hook": hook, "readout": plain,
                         "effect_replace": plain - float(replaced[k]), "effect_block": plain - float(blocked[k]),
                         "grad_x_input": float(gxi[t])})
    return pd.DataFrame(rows)


@torch.no_grad()
def suffix_token_attention(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str],
    heads: Sequence[Sequence[int]],
    destination: int = -1,
) -> pd.DataFrame:
    """The attention each of ``heads`` (``[layer, head]`` pairs) pays each suffix token from
    the EOI position ``destination`` (``blocks.{layer}.attn.hook_pattern``), one prompt at a
    time (no padding).

    Returns one row per prompt x suffix token x head: ``prompt``, ``suffix_index``, ``token``,
    ``layer``, ``head``, ``hook``, ``attention`` (the probability, in [0, 1]).
    """
    from ..models.hooks import Recorder

    check_attention(cm)
    instructions, suffixes = prompts(instructions, suffixes)
    regions: list[PromptRegions] = suffix_regions(cm, instructions, suffixes)
    layers = sorted({int(l) for l, _ in heads})
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    rows = []
    for p, reg in enumerate(regions):
        ids = torch.tensor([reg.ids], device=cm.device)
        rec = Recorder(names, positions=[destination], device="cpu")
        with run_with_hooks(cm, rec.hooks()):
            cm.model(input_ids=ids)
        start, end = reg.spans["suffix"]
        for l, h in heads:
            pattern = rec[f"blocks.{l}.attn.hook_pattern"][0, int(h), 0].float()  # [k_pos]
            for k, t in enumerate(range(start, end)):
                rows.append({"prompt": p, "suffix_index": k, "token": cm.tokenizer.decode([reg.ids[t]]),
                             "layer": int(l), "head": int(h), "hook": f"blocks.{l}.attn.hook_pattern",
                             "attention": float(pattern[t])})
    return pd.DataFrame(rows)


def ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1D tensor, ties given their mean rank (float64)."""
    _, inverse, counts = torch.unique(x.double(), sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2).double()[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equal-length 1D tensors (ties averaged); NaN with
    fewer than two values or a constant one."""
    a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
    if a.numel() != b.numel():
        raise UserError(f"spearman needs two equal-length series, got {a.numel()} and {b.numel()} values")
    if a.numel() < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def token_agreement(effects: pd.DataFrame) -> pd.DataFrame:
    """Per prompt of :func:`suffix_token_effects`'s frame: ``n_tokens`` and the Spearman
    correlations ``replace_vs_grad``, ``block_vs_grad``, ``replace_vs_block``."""
    pairs = {"replace_vs_grad": ("effect_replace", "grad_x_input"),
             "block_vs_grad": ("effect_block", "grad_x_input"),
             "replace_vs_block": ("effect_replace", "effect_block")}
    rows = []
    for prompt, g in effects.groupby("prompt", sort=True):
        row = {"prompt": prompt, "n_tokens": len(g)}
        for name, (x, y) in pairs.items():
            row[name] = spearman(torch.tensor(g[x].to_numpy()), torch.tensor(g[y].to_numpy()))
        rows.append(row)
    return pd.DataFrame(rows)
