"""Suffix tokens: which tokens a suffix may use, its text, the retokenization check, and
random suffixes.

Shared by GCG and the random-suffix control (``attacks/``), and by the organism's recipe,
which trains on random suffixes drawn the same way, so all of them draw from one vocabulary.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .loading import ChatModel

_MASK_CACHE: dict[tuple, Tensor] = {}


# A word token: letters only, optionally after one space (byte-level BPE's word start).
WORD_TOKEN = re.compile(r" ?[A-Za-z]{2,}")


def allowed_token_mask(tokenizer, vocab_size: int, allow_non_ascii: bool = False, words_only: bool = False) -> Tensor:
    """``[vocab_size]`` bool: tokens a suffix may use (no special tokens; printable ASCII unless
    allowed; with ``words_only``, only word tokens: no code, markup, digits or punctuation).

    The vocabulary is decoded in one batched call and cached per tokenizer.
    """
    key = (tokenizer.name_or_path, len(tokenizer), vocab_size, allow_non_ascii, words_only)
    if key not in _MASK_CACHE:
        n = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        if words_only:
            ok = [bool(WORD_TOKEN.fullmatch(t)) for t in texts]
        else:
            ok = [bool(t) and (allow_non_ascii or (t.isascii() and t.isprintable())) for t in texts]
        mask[:n] = torch.tensor(ok)
        special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
        special += [i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i < vocab_size]
        mask[special] = False
        _MASK_CACHE[key] = mask
    return _MASK_CACHE[key]


def suffix_text(cm: ChatModel, ids: list[int]) -> str:
    """The suffix as the user types it after "instruction ": decoded, without its leading space."""
    text = cm.tokenizer.decode(ids)
    return text[1:] if text.startswith(" ") else text


def survives_retokenization(cm: ChatModel, instructions: list[str], cands: Tensor) -> Tensor:
    """``[n]`` bool: candidate suffix ``cands[i]`` (``[n, suffix_len]`` ids), decoded and
    placed after each instruction, encodes back to the same tokens in every prompt."""
    tok = cm.tokenizer
    rows = cands.tolist()
    texts = tok.batch_decode(rows)
    # a suffix that does not start with a space cannot be rendered after "instruction "
    ok = torch.tensor([t.startswith(" ") for t in texts])
    eoi = list(cm.chat.eoi_ids)
    for instruction in instructions:
        before = tok(cm.chat.prefix + instruction.strip(), add_special_tokens=False)["input_ids"]
        rendered = [cm.chat.render(instruction, t[1:] if t.startswith(" ") else None) for t in texts]
        enc = tok(rendered, add_special_tokens=False)["input_ids"]
        ok &= torch.tensor([e == before + c + eoi for e, c in zip(enc, rows)])
    return ok


def random_suffix_ids(cm: ChatModel, n: int, length: int, generator: torch.Generator) -> Tensor:
    """``[n, length]`` allowed token ids drawn uniformly (no retokenization check)."""
    vocab = cm.model.get_input_embeddings().weight.shape[0]
    allowed = allowed_token_mask(cm.tokenizer, vocab).nonzero().squeeze(1)
    return allowed[torch.randint(0, len(allowed), (n, length), generator=generator)]
