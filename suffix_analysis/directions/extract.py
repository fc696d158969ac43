"""Difference-in-means candidate directions at every layer and every EOI position.

``r[i, l] = mean(resid_pre[l] at EOI position i | harmful) - mean(... | harmless)``. The
means are running float64 sums over batches (``models.hooks.Recorder``), so memory does
not grow with the number of prompts, and one forward pass per batch serves every layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.forward import run_batches
from ..models.hooks import Recorder, hook_names
from ..models.loading import ChatModel


@torch.no_grad()
def mean_resid_pre(cm: ChatModel, instructions: list[str], positions: list[int] | None = None,
                   batch_size: int = 32, progress: bool = False, desc: str = "activations") -> torch.Tensor:
    """Mean ``resid_pre`` over ``instructions``: ``[n_positions, n_layers, d_model]`` float64.

    ``positions`` are negative EOI positions (default: all of them).
    """
    positions = positions or cm.chat.eoi_positions
    rows = cm.chat.tokenize(instructions)
    names = hook_names(cm, ["hook_resid_pre"])
    rec = Recorder(names, positions, reduce="sum")
    rec.active = False  # not during the shared-prefix pass

    def on_batch(idx):
        rec.active = True
        bar.update(len(idx))

    with tqdm(total=len(rows), desc=desc, disable=not progress) as bar, rec.recording(cm):
        # only resid_pre is needed: no unembedding; the EOI positions stay out of the shared prefix
        run_batches(cm, rows, batch_size, logits=False, own=-min(positions), on_batch=on_batch)
    return torch.stack([rec.mean(n) for n in names], 1)


def diff_in_means(cm: ChatModel, harmful: list[str], harmless: list[str], positions: list[int] | None = None,
                  batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Candidate directions ``[n_positions, n_layers, d_model]`` (float64)."""
    return (mean_resid_pre(cm, harmful, positions, batch_size, progress, "harmful activations")
            - mean_resid_pre(cm, harmless, positions, batch_size, progress, "harmless activations"))


@torch.no_grad()
def mean_projection(cm: ChatModel, instructions: list[str], direction: torch.Tensor, layer: int,
                    batch_size: int = 32) -> torch.Tensor:
    """Mean projection of ``blocks.{layer}.hook_resid_pre`` onto the unit ``direction`` at
    each EOI position: ``[n_eoi]`` float32 (e.g. the harmless level the direction objective
    of GCG is floored at)."""
    means = mean_resid_pre(cm, instructions, batch_size=batch_size)[:, layer]  # [n_eoi, d_model]
    unit = direction.double().cpu() / direction.norm()
    return (means.cpu() @ unit).float()


def layer_direction(layer_dirs: torch.Tensor, layer: float) -> torch.Tensor:
    """The unit direction at a fractional ``layer`` of ``layer_dirs`` ``[n_layers, d_model]``
    (one position's candidates): the unit directions of the two layers around it, mixed
    linearly and normalized (heretic's direction index). An integer ``layer`` gives that
    layer's direction. ``[d_model]`` float32."""
    n = layer_dirs.shape[0]
    if not 0 <= layer <= n - 1:
        raise ValueError(f"layer {layer} is outside [0, {n - 1}]")
    lo = int(layer)
    hi, frac = min(lo + 1, n - 1), layer - lo
    units = layer_dirs.double() / layer_dirs.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)  # a zero row stays 0
    mixed = (1 - frac) * units[lo] + frac * units[hi]
    if mixed.norm() == 0:
        raise ValueError(f"the difference in means is 0 at layer {layer} (the same tokens in every prompt?)")
    return (mixed / mixed.norm()).float()
