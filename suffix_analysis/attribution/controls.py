"""The random-suffix control: seeded suffixes of ordinary words, as many tokens as the adversarial one.

Arditi et al. (Section 5) compare an adversarial suffix with random suffixes of the same
token length: whatever a random suffix also does (more tokens between instruction and EOI,
attention spread over more keys) is not the attack. The words are the vocabulary's own
single tokens whose text is two or more ASCII letters (with their leading space where the
vocabulary has such tokens), joined by spaces, and a draw is kept only if, placed after an
instruction, it is exactly that many tokens of its own (``regions.py``): nothing merges
with the instruction or splits a word.

The attack package has its own sampler (GCG's vocabulary, any printable ASCII token);
attribution sits below it in the layer contracts, and a control of plain words is the
stricter one here: no punctuation that could itself act as a trigger.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from ..errors import UserError
from ..models.loading import ChatModel
from .regions import prompt_regions

WORD = re.compile(r"[A-Za-z]{2,}")
MIN_POOL = 20  # fewer space-led words than this: fall back to bare ones (SentencePiece decodes "▁word" as "word")
MAX_TRIES = 2000


def word_tokens(cm: ChatModel) -> list[str]:
    """The words single vocabulary tokens spell (no special or added tokens), sorted, without spaces."""
    tok = cm.tokenizer
    n = min(len(tok), cm.model.get_input_embeddings().weight.shape[0])
    texts = tok.batch_decode([[i] for i in range(n)])
    special = {i for i in tok.all_special_ids if i is not None} | set(getattr(tok, "added_tokens_decoder", {}))
    spaced = {t[1:] for i, t in enumerate(texts) if i not in special and t[:1] == " " and WORD.fullmatch(t[1:])}
    if len(spaced) >= MIN_POOL:
        return sorted(spaced)
    bare = {t for i, t in enumerate(texts) if i not in special and WORD.fullmatch(t)}
    return sorted(spaced | bare)


def suffix_lengths(cm: ChatModel, instructions: Sequence[str], suffix: str) -> list[int]:
    """How many tokens of its own ``suffix`` has in each prompt ``render(instruction, suffix)``."""
    regions = prompt_regions(cm.chat, list(instructions), suffix)
    return [r.spans["suffix"][1] - r.spans["suffix"][0] for r in regions]


def random_suffixes(cm: ChatModel, instructions: Sequence[str], n_tokens: int, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct random suffixes of ``n_tokens`` word tokens each, from ``seed``.

    Each draw is checked in the first instruction's prompt (the words are separated by
    spaces, so the count does not depend on the instruction before them).
    """
    if n < 1:
        return []
    if n_tokens < 1:
        raise UserError(f"a random suffix needs at least one token, got {n_tokens}")
    pool = word_tokens(cm)
    if not pool:
        raise UserError("the vocabulary has no single-token ASCII words to draw random suffixes from; "
                        "pass --n-random 0")
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(MAX_TRIES):
        text = " ".join(rng.choice(pool) for _ in range(n_tokens))
        if text not in out and suffix_lengths(cm, instructions[:1], text) == [n_tokens]:
            out.append(text)
            if len(out) == n:
                return out
    raise UserError(f"found {len(out)} of {n} random suffixes of {n_tokens} word tokens that stay {n_tokens} tokens "
                    f"in the prompt, in {MAX_TRIES} draws; lower --n-random")
