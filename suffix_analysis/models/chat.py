"""Chat formatting and batched, left-padded encoding with aligned EOI positions.

A prompt is ``prefix + instruction [+ " " + suffix] + eoi``: ``prefix`` and ``eoi`` are
what the chat template puts before and after the user's text. With left padding, the EOI
tokens sit at the same negative positions ``-n_eoi .. -1`` in every row of a batch, which
is what lets the suite index "position -2" across prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError

_SENTINEL = "\u2063SUFFIXANALYSISINSTRUCTION\u2063"


@dataclass
class ChatFormat:
    """Splits a tokenizer's chat template around the user's instruction.

    Attributes:
        prefix: text before the instruction (system prompt, BOS, role header).
        eoi: text after the instruction up to where the response starts.
        eoi_ids: token ids of ``eoi``; the model's last ``len(eoi_ids)`` input positions.
    """

    tokenizer: object
    template: str
    prefix: str
    eoi: str
    eoi_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_tokenizer(cls, tokenizer, fallback_template: str | None = None) -> "ChatFormat":
        template = getattr(tokenizer, "chat_template", None) or fallback_template
        if not template:
            raise UserError(
                "the tokenizer has no chat template and no preset supplies one; "
                "pass --preset NAME (see `suffix-analysis presets`)"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        if text.count(_SENTINEL) != 1:
            raise UserError("the chat template does not place the user's message exactly once")
        prefix, eoi = text.split(_SENTINEL)
        if not eoi:
            raise UserError("the chat template puts nothing after the instruction (no EOI tokens)")
        eoi_ids = tokenizer(eoi, add_special_tokens=False)["input_ids"]
        return cls(tokenizer=tokenizer, template=template, prefix=prefix, eoi=eoi, eoi_ids=list(eoi_ids))

    @property
    def n_eoi(self) -> int:
        return len(self.eoi_ids)

    @property
    def eoi_positions(self) -> list[int]:
        """Negative positions of the EOI tokens, e.g. ``[-5, -4, -3, -2, -1]``."""
        return list(range(-self.n_eoi, 0))

    def render(self, instruction: str, suffix: str | None = None) -> str:
        """The full prompt text; an adversarial ``suffix`` goes after the instruction, before EOI."""
        body = instruction.strip()
        if suffix:
            body = f"{body} {suffix}"
        return self.prefix + body + self.eoi

    def tokenize(self, instructions: list[str], suffixes: list[str | None] | None = None) -> list[list[int]]:
        """Token ids of each full prompt, tokenized as one string (as the model sees it).

        Raises if tokenization merges a row's EOI tokens with its instruction (the EOI
        positions would then be wrong for that row).
        """
        if suffixes is None:
            suffixes = [None] * len(instructions)
        texts = [self.render(i, s) for i, s in zip(instructions, suffixes)]
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        n = self.n_eoi
        for text, ids in zip(texts, rows):
            if ids[-n:] != self.eoi_ids:
                raise UserError(f"EOI tokens merged with the instruction when tokenizing {text!r}")
        return rows

    def encode(
        self,
        instructions: list[str],
        suffixes: list[str | None] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask``, each ``[batch, pos]``."""
        return pad_left(self.tokenize(instructions, suffixes), pad_token_id(self.tokenizer), device)


def pad_left(rows: list[list[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` ``[batch, pos]``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token: ``[batch, pos]``.

    A plain forward pass numbers positions from the left edge, padding included; models
    with absolute position embeddings would then see different positions per row.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_token_id(tokenizer) -> int:
    """The pad id; tokenizers without one pad with EOS (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return tokenizer.eos_token_id


def refusal_token_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Ids of the refusal tokens; each must be a single token for this tokenizer."""
    ids = []
    for t in tokens:
        enc = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise UserError(f"refusal token {t!r} is {len(enc)} tokens for this tokenizer; presets need 1")
        ids.append(enc[0])
    return ids
