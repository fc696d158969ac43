"""Which tokens of a prompt are template, instruction, suffix and EOI.

A prompt is ``chat.render(instruction, suffix)`` = ``prefix + instruction [+ " " + suffix] + eoi``.
Its text splits into four character spans (the space joining instruction and suffix
belongs to the suffix, as byte-level and SentencePiece tokenizers attach a space to the
word after it). The regions of the *tokens* are read from the tokenization of the whole
prompt (the fast tokenizer's character offsets), never from tokenizing the pieces alone,
because tokens merge across the boundaries (Llama-2's ``"[INST] "`` + ``"Write"`` gives
``"▁Write"``; a suffix may fuse with the instruction's last characters).

Rule for a token whose characters fall in more than one region (a *straddler*): it
belongs to the region holding its first non-whitespace character (its first character
when it is all whitespace or empty). So ``"▁Write"`` is instruction, not template, and
``"a. Su"`` across ``"...sea." | " Sure"`` is instruction. Assignments never go back to
an earlier region, so every region is one contiguous span (possibly empty). The EOI
region is always the last ``chat.n_eoi`` tokens, as everywhere else in the suite
(``ChatFormat.tokenize`` refuses prompts whose EOI tokens merge with the text before).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..models.chat import ChatFormat
from .batches import prompts

REGIONS: tuple[str, ...] = ("template", "instruction", "suffix", "eoi")


@dataclass(frozen=True)
class Straddler:
    """A token whose characters lie in more than one region."""

    position: int  # token index in the unpadded prompt
    text: str  # the characters it covers
    regions: tuple[str, ...]  # regions it covers characters of, in order
    assigned: str  # the region the rule gave it


@dataclass(frozen=True)
class PromptRegions:
    """The regions of one prompt.

    ``spans[region]`` is ``(start, end)``, a half-open token range in the unpadded prompt
    (``ids``); ``chars[region]`` the character range in ``text``; ``offsets[t]`` the
    characters of token ``t``. ``pad`` is the row's left padding in the batch it was made
    with, so :meth:`padded` gives positions in that padded batch.
    """

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    chars: dict[str, tuple[int, int]]
    spans: dict[str, tuple[int, int]]
    straddlers: tuple[Straddler, ...]
    pad: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def padded(self, region: str) -> tuple[int, int]:
        """``(start, end)`` of ``region`` in the left-padded batch."""
        start, end = self.spans[region]
        return start + self.pad, end + self.pad

    def labels(self) -> list[str]:
        """The region of every token, ``[length]``."""
        out: list[str] = []
        for r in REGIONS:
            out += [r] * (self.spans[r][1] - self.spans[r][0])
        return out

    def with_pad(self, pad: int) -> "PromptRegions":
        """The same regions for a batch in which this row has ``pad`` padding tokens on the left."""
        return dataclasses.replace(self, pad=pad)


def _char_spans(chat: ChatFormat, instruction: str, suffix: str | None) -> tuple[str, dict[str, tuple[int, int]]]:
    # Built the way ChatFormat.render builds the text, and checked against it.
    body = instruction.strip()
    tail = f" {suffix}" if suffix else ""
    text = chat.render(instruction, suffix)
    cuts = [0, len(chat.prefix), len(chat.prefix) + len(body), len(chat.prefix) + len(body) + len(tail), len(text)]
    if text != chat.prefix + body + tail + chat.eoi:
        raise UserError("ChatFormat.render no longer builds prefix + instruction + ' ' + suffix + eoi; "
                        "update attribution/regions.py to match it")
    return text, {r: (cuts[k], cuts[k + 1]) for k, r in enumerate(REGIONS)}


def _owner_char(text: str, start: int, end: int) -> int:
    """The character that decides a token's region: its first non-whitespace one."""
    for c in range(start, end):
        if not text[c].isspace():
            return c
    return start


def _assign(text: str, offsets: list[tuple[int, int]], chars: dict[str, tuple[int, int]], n_eoi: int,
            ) -> tuple[list[int], list[Straddler]]:
    """Region index of every token, and the straddlers."""
    ends = [chars[r][1] for r in REGIONS]
    last_body = REGIONS.index("suffix")
    owners, straddlers = [], []
    floor = 0
    for t, (s, e) in enumerate(offsets):
        if t >= len(offsets) - n_eoi:
            owner = len(REGIONS) - 1
        else:
            # bisect_right on the ends skips empty regions: char c is in the first region ending after it.
            owner = min(bisect.bisect_right(ends, _owner_char(text, s, e)), last_body)
        owner = max(owner, floor)  # monotone: a zero-width or odd offset cannot reopen a region
        floor = owner
        owners.append(owner)
        covered = tuple(r for r in REGIONS if s < chars[r][1] and chars[r][0] < e)
        if len(covered) > 1:
            straddlers.append(Straddler(t, text[s:e], covered, REGIONS[owner]))
    return owners, straddlers


def prompt_regions(chat: ChatFormat, instructions: Sequence[str],
                   suffixes: str | Sequence[str | None] | None = None) -> list[PromptRegions]:
    """The regions of each prompt ``chat.render(instruction, suffix)`` (``suffixes``: one per
    instruction, one string for all, or None).

    Tokens are those of ``chat.tokenize`` (the model's input); ``pad`` is set for the
    left-padded batch of these prompts (``chat.encode``). Needs a fast tokenizer (it reads
    character offsets).
    """
    tok = chat.tokenizer
    if not getattr(tok, "is_fast", False):
        raise UserError("token regions need a fast tokenizer (character offsets); load the model's tokenizer "
                        "with use_fast=True")
    instructions, suffixes = prompts(instructions, suffixes)
    rows = chat.tokenize(instructions, suffixes)
    width = max((len(r) for r in rows), default=0)
    out = []
    for instruction, suffix, ids in zip(instructions, suffixes, rows):
        text, chars = _char_spans(chat, instruction, suffix)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(ids):
            raise UserError(f"the tokenizer gives other tokens with offsets than without for {text!r}")
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        owners, straddlers = _assign(text, offsets, chars, chat.n_eoi)
        spans = {}
        for k, r in enumerate(REGIONS):
            members = [t for t, o in enumerate(owners) if o == k]
            # an empty region sits where it would start: after every token of an earlier region
            start = members[0] if members else sum(1 for o in owners if o < k)
            spans[r] = (start, start + len(members))
        out.append(PromptRegions(text=text, ids=tuple(ids), offsets=tuple(offsets), chars=chars, spans=spans,
                                 straddlers=tuple(straddlers), pad=width - len(ids)))
    return out


def region_masks(regions: Sequence[PromptRegions], width: int | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """``[batch, n_regions, width]`` bool: which padded positions belong to each region.

    ``width`` is the padded length (default: the longest prompt), rows left-padded as
    ``chat.encode`` pads them; padding belongs to no region.
    """
    width = max(r.length for r in regions) if width is None else width
    masks = torch.zeros(len(regions), len(REGIONS), width, dtype=torch.bool)
    for b, reg in enumerate(regions):
        pad = width - reg.length
        if pad < 0:
            raise UserError(f"a prompt of {reg.length} tokens does not fit a batch of width {width}")
        for k, r in enumerate(REGIONS):
            start, end = reg.spans[r]
            masks[b, k, pad + start:pad + end] = True
    return masks.to(device)
