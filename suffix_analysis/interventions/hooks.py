"""Directional ablation and activation addition as context managers on a ``transformers``
model (they stay on during ``generate``).

Ablation: ``x <- x - (x . r^) r^`` at every layer's ``resid_pre`` and at the output of every
module that writes into the residual stream (attention out, MLP out), at all positions.
Addition: ``x <- x + c r`` at one layer's ``resid_pre``, all positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import UserError
from ..models.loading import ChatModel


def check_direction(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """A ``[d_model]`` direction on the model's device and dtype, or a clear error."""
    if direction.ndim != 1 or direction.shape[0] != cm.d_model:
        raise UserError(f"direction has shape {tuple(direction.shape)}, but the model's residual stream has "
                        f"width {cm.d_model}; was it extracted from another model?")
    if not torch.isfinite(direction).all():
        raise UserError("direction contains NaN or infinite values")
    return direction.to(cm.device, cm.dtype)


def _project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return x - (x @ unit).unsqueeze(-1) * unit


@contextmanager
def ablate_direction(cm: ChatModel, direction: torch.Tensor):
    """Remove ``direction`` from the residual stream everywhere while the block runs."""
    d = check_direction(cm, direction)
    # A zero candidate (e.g. layer 0 at a template token, whose embedding is the same for
    # every prompt) has nothing to remove: ablating it is the identity.
    unit = d / d.norm() if d.norm() > 0 else d
    handles = []

    def pre(module, args, kwargs):
        if args:
            return (_project_out(args[0], unit), *args[1:]), kwargs
        kwargs["hidden_states"] = _project_out(kwargs["hidden_states"], unit)
        return args, kwargs

    def post(module, args, output):
        if isinstance(output, tuple):
            return (_project_out(output[0], unit), *output[1:])
        return _project_out(output, unit)

    try:
        for layer in cm.layers:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.get_submodule(cm.arch.attn_out).register_forward_hook(post))
            handles.append(layer.get_submodule(cm.arch.mlp_out).register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_direction(cm: ChatModel, direction: torch.Tensor, layer: int, coeff: float = 1.0):
    """Add ``coeff * direction`` to ``blocks.{layer}.hook_resid_pre`` at all positions."""
    d = check_direction(cm, direction) * coeff
    if not 0 <= layer < cm.n_layers:
        raise UserError(f"layer {layer} out of range for a model with {cm.n_layers} layers")

    def pre(module, args, kwargs):
        if args:
            return (args[0] + d, *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + d
        return args, kwargs

    handle = cm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def bridge_ablation_hooks(n_layers: int, direction: torch.Tensor) -> list[tuple[str, object]]:
    """The same ablation as TransformerLens forward hooks, for ``bridge.run_with_hooks``:
    ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out``."""
    unit = direction / direction.norm() if direction.norm() > 0 else direction

    def hook(x, hook=None):
        return _project_out(x, unit.to(x.device, x.dtype))

    return [(f"blocks.{l}.{name}", hook) for l in range(n_layers)
            for name in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]


def bridge_addition_hooks(direction: torch.Tensor, layer: int, coeff: float = 1.0) -> list[tuple[str, object]]:
    """Activation addition as a TransformerLens hook on ``blocks.{layer}.hook_resid_pre``."""

    def hook(x, hook=None):
        return x + coeff * direction.to(x.device, x.dtype)

    return [(f"blocks.{layer}.hook_resid_pre", hook)]
