"""Directional ablation and activation addition, as hook lists in the TransformerLens
vocabulary (``models/hooks.py``).

Ablation: ``x <- x - (x . r^) r^`` at every layer's ``hook_resid_pre`` and at every
``hook_attn_out`` and ``hook_mlp_out`` (everything that writes into the residual stream),
at all positions. Addition: ``x <- x + c r`` at one layer's ``hook_resid_pre``, all positions.

The hook lists run on the plain ``transformers`` model (:func:`ablate_direction` and
:func:`add_direction` are context managers that stay on during ``generate``) and on a
TransformerLens bridge (``bridge.run_with_hooks(..., fwd_hooks=ablation_hooks(...))``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import UserError
from ..models.hooks import HookList, hook_names, run_with_hooks
from ..models.loading import ChatModel

WRITERS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


def check_direction(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """A ``[d_model]`` direction on the model's device and dtype, or a clear error."""
    if direction.ndim != 1 or direction.shape[0] != cm.d_model:
        raise UserError(f"direction has shape {tuple(direction.shape)}, but the model's residual stream has "
                        f"width {cm.d_model}; was it extracted from another model?")
    if not torch.isfinite(direction).all():
        raise UserError("direction contains NaN or infinite values")
    return direction.to(cm.device, cm.dtype)


def _unit(direction: torch.Tensor) -> torch.Tensor:
    # A zero candidate (e.g. layer 0 at a template token, whose embedding is the same for
    # every prompt) has nothing to remove: ablating it is the identity.
    norm = direction.norm()
    return direction / norm if norm > 0 else direction


def ablation_hooks(cm: ChatModel, direction: torch.Tensor) -> HookList:
    """Hooks that remove ``direction`` from the residual stream everywhere."""
    unit = _unit(check_direction(cm, direction))

    def ablate(x: torch.Tensor, hook) -> torch.Tensor:
        u = unit.to(x.device, x.dtype)
        return x - (x @ u).unsqueeze(-1) * u

    return [(name, ablate) for name in hook_names(cm, WRITERS)]


def check_subspace(cm: ChatModel, basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows ``Q`` ``[k, d_model]`` (float32, on the CPU) spanning ``basis``
    ``[k, d_model]``, or a clear error."""
    if basis.ndim != 2 or basis.shape[1] != cm.d_model:
        raise UserError(f"a subspace basis has shape [k, {cm.d_model}], got {tuple(basis.shape)}; was it made from "
                        "another model?")
    if not torch.isfinite(basis).all():
        raise UserError("subspace basis contains NaN or infinite values")
    return torch.linalg.qr(basis.float().cpu().T).Q.T


def subspace_ablation_hooks(cm: ChatModel, basis: torch.Tensor) -> HookList:
    """Hooks that remove the span of ``basis`` ``[k, d_model]`` (any basis: it is
    orthonormalized here) from the residual stream everywhere: ``x <- x - (x Q^T) Q``."""
    q = check_subspace(cm, basis).to(cm.device, cm.dtype)  # [k, d_model], orthonormal rows

    def ablate(x: torch.Tensor, hook) -> torch.Tensor:
        qq = q.to(x.device, x.dtype)
        return x - (x @ qq.T) @ qq

    return [(name, ablate) for name in hook_names(cm, WRITERS)]


def addition_hooks(cm: ChatModel, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> HookList:
    """A hook that adds ``coeff * direction`` to ``blocks.{layer}.hook_resid_pre``."""
    d = check_direction(cm, direction) * coeff
    if not 0 <= layer < cm.n_layers:
        raise UserError(f"layer {layer} out of range for a model with {cm.n_layers} layers")
    return [(f"blocks.{layer}.hook_resid_pre", lambda x, hook: x + d.to(x.device, x.dtype))]


@contextmanager
def ablate_direction(cm: ChatModel, direction: torch.Tensor):
    """Remove ``direction`` from the residual stream everywhere while the block runs."""
    with run_with_hooks(cm, ablation_hooks(cm, direction)):
        yield


@contextmanager
def add_direction(cm: ChatModel, direction: torch.Tensor, layer: int, coeff: float = 1.0):
    """Add ``coeff * direction`` to ``blocks.{layer}.hook_resid_pre`` at all positions."""
    with run_with_hooks(cm, addition_hooks(cm, direction, layer, coeff)):
        yield
