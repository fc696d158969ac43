"""Prompts in batches, and the forward passes the measurements here make: a plain padded
pass over every position (:func:`forward`), and for measurements that read only the last
positions, passes after the shared chat prefix (:func:`recorded`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import UserError
from ..interventions.directional import check_direction
from ..models.chat import position_ids
from ..models.forward import prefix_batches
from ..models.hooks import Recorder
from ..models.loading import ChatModel


def prompts(instructions: Sequence[str], suffixes: str | Sequence[str | None] | None = None,
            ) -> tuple[list[str], list[str | None]]:
    """Instructions and one suffix per instruction (a single string is every prompt's suffix)."""
    if isinstance(instructions, str):
        raise UserError("instructions must be a list of strings, not one string; wrap it in a list")
    instructions = list(instructions)
    if not instructions:
        raise UserError("no instructions given; pass at least one")
    if suffixes is None or isinstance(suffixes, str):
        return instructions, [suffixes] * len(instructions)
    suffixes = list(suffixes)
    if len(suffixes) != len(instructions):
        raise UserError(f"{len(instructions)} instructions but {len(suffixes)} suffixes; pass one suffix per "
                        "instruction, one string for all, or None")
    return instructions, suffixes


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def unit_direction(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """``[d_model]`` float32 unit vector on the model's device (projections are taken in float32)."""
    d = check_direction(cm, direction).float()
    norm = d.norm()
    if norm == 0:
        raise UserError("the direction is the zero vector; nothing to project onto")
    return d / norm


@torch.no_grad()
def forward(cm: ChatModel, batch: dict[str, torch.Tensor]) -> None:
    """One pass of the decoder stack over a left-padded ``batch`` (``input_ids``,
    ``attention_mask`` ``[batch, pos]``), for the hooks it fires.

    Position ids start at each row's first real token, so a padded row computes what it
    computes alone; the base model skips the unembedding, which nothing here reads.
    """
    mask = batch["attention_mask"].to(cm.device)
    cm.model.base_model(input_ids=batch["input_ids"].to(cm.device), attention_mask=mask,
                        position_ids=position_ids(mask), use_cache=False)


@torch.no_grad()
def recorded(cm: ChatModel, instructions: list[str], suffixes: list[str | None], names: list[str],
             positions: list[int], batch_size: int = 16) -> Iterator[tuple[list[int], Recorder]]:
    """Each batch's prompt indices and a :class:`Recorder` of ``names`` at ``positions``
    (negative, counted from the end) over its pass, for measurements that read only the
    last positions of each prompt.

    Prompts of similar length run together after their shared chat prefix, which is run
    once (``models.forward.prefix_batches``); the base model skips the unembedding. The
    indices come in length order, not the order of ``instructions``.
    """
    rows = cm.chat.tokenize(instructions, suffixes)
    for idx, kwargs in prefix_batches(cm, rows, batch_size, own=-min(positions)):
        rec = Recorder(names, positions=positions, device=cm.device)
        with rec.recording(cm):
            cm.model.base_model(**kwargs)
        yield idx, rec


def in_order(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The batches' rows ``[batch, ...]`` of (indices, tensor) pairs, put back in prompt order."""
    idx = [i for ix, _ in parts for i in ix]
    out = torch.cat([t for _, t in parts])
    return out[torch.argsort(torch.tensor(idx))]
