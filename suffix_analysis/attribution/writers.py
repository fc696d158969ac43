"""How attention writes into the residual stream, split per head.

Attention's output at a position is ``o = sum_h z_h @ W_O[h] + b`` (``z`` is
``attn.hook_z``, ``W_O[h]`` the ``[d_head, d_model]`` slice of the output projection for
head ``h``, ``b`` its bias, if any). On pre-norm architectures ``o`` is what the residual
stream receives. Gemma-2/3 add a norm after it: the residual receives
``RMSNorm(o) = gain * o * s`` with ``s = 1 / sqrt(mean(o**2) + eps)``, one scalar per position.
For the forward pass at hand this is still a sum over heads, ``sum_h s * gain * (z_h @ W_O[h])
+ s * gain * b``, exactly; but a head's part depends on the others through ``s`` (remove
a head and ``s`` changes), so it is an attribution of this pass, not a linear model of
the layer. :func:`post_norm` checks numerically that the norm is of this form and refuses
any other norm (a LayerNorm's bias and centering would need parts of their own).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..models.loading import ChatModel
from ..models.placement import execution_device, materialized


def n_heads(cm: ChatModel) -> int:
    return cm.model.config.get_text_config().num_attention_heads


def _o_proj(cm: ChatModel, layer: int) -> torch.nn.Module:
    module = cm.layers[layer].get_submodule(cm.arch.o_proj)
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.ndim != 2:
        raise UserError(f"{cm.arch.o_proj} of layer {layer} is not a linear layer; per-head attribution needs W_O")
    if not module.weight.is_floating_point() or getattr(cm.model, "is_quantized", False):
        raise UserError("per-head attribution reads W_O, which --quantize stores packed; load the model without "
                        "--quantize (a --device-map spreads it over devices in full precision)")
    return module


def head_weights(cm: ChatModel, layer: int) -> Tensor:
    """``W_O`` of ``layer`` split per head: ``[n_heads, d_head, d_model]`` float32, so that
    ``z[..., h, :] @ W[h]`` is head ``h``'s output."""
    with materialized(_o_proj(cm, layer)) as o_proj:
        w = o_proj.weight.detach().float().to(cm.device)  # nn.Linear: [d_model, n_heads * d_head]
    h = n_heads(cm)
    if w.shape[1] % h:
        raise UserError(f"the output projection of layer {layer} has {w.shape[1]} inputs, not a multiple of "
                        f"{h} heads")
    return w.T.reshape(h, w.shape[1] // h, w.shape[0])


def output_bias(cm: ChatModel, layer: int) -> Tensor:
    """The output projection's bias ``[d_model]`` float32 (zeros when it has none)."""
    with materialized(_o_proj(cm, layer)) as module:
        b = getattr(module, "bias", None)
        return torch.zeros(module.weight.shape[0], device=cm.device) if b is None else b.detach().float().to(cm.device)


@dataclass(frozen=True)
class PostNorm:
    """An RMSNorm after attention: ``norm(o) = gain * o / sqrt(mean(o**2) + eps)``."""

    gain: Tensor  # [d_model] float32
    eps: float

    def scale(self, o: Tensor) -> Tensor:
        """``[..., 1]``: the per-position factor ``1 / sqrt(mean(o**2) + eps)`` of the attention output ``o``."""
        return torch.rsqrt(o.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def apply(self, y: Tensor, scale: Tensor) -> Tensor:
        """A part ``y`` of ``o`` ``[..., d_model]`` as the residual stream receives it (``scale`` broadcast)."""
        return y * scale * self.gain


def post_norm(cm: ChatModel, layer: int) -> PostNorm | None:
    """The norm between ``layer``'s attention and the residual stream; None where there is none.

    Probes the module on random inputs: it must equal ``gain * x * rsqrt(mean(x**2) + eps)``
    with ``gain`` its weight or ``1 + weight`` (Gemma's convention); anything else raises.
    """
    if not cm.arch.post_norm_writers:
        return None
    module = cm.layers[layer].get_submodule(cm.arch.attn_out)
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    unsupported = UserError(
        f"{cm.model.config.model_type}: the norm after attention in layer {layer} ({type(module).__name__}) is not "
        "an RMSNorm, so its output cannot be split exactly per head; attribute hook_attn_out as a whole")
    if (not isinstance(weight, torch.Tensor) or weight.shape != (cm.d_model,) or eps is None
            or getattr(module, "bias", None) is not None):
        raise unsupported
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(8, cm.d_model, generator=gen)).to(execution_device(module), weight.dtype)
    with torch.no_grad():
        out = module(x).float().to(cm.device)
    x = x.to(cm.device)
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    with materialized(module):
        weight = module.weight.detach().float().to(cm.device)
    base = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + float(eps))
    for gain in (1.0 + weight, weight):
        want = base * gain
        if (out - want).abs().max() <= tol * want.abs().max().clamp_min(1e-12):
            return PostNorm(gain=gain, eps=float(eps))
    raise unsupported


def value_proj(cm: ChatModel, layer: int) -> torch.nn.Module:
    attn = cm.layers[layer].get_submodule(cm.arch.attn)
    v = getattr(attn, "v_proj", None)
    if not isinstance(v, torch.nn.Module):
        raise UserError(f"{cm.model.config.model_type}: attention of layer {layer} has no separate v_proj; "
                        "per-source writes need the value vectors")
    return v


@contextmanager
def recording_values(cm: ChatModel, layers: list[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the block, ``values[l]`` holds the last pass's value vectors of layer ``l``,
    ``[batch, pos, n_heads, d_head]`` float32, repeated per query head for grouped-query
    attention (query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``, as
    ``transformers``' ``repeat_kv`` does)."""
    values: dict[int, Tensor] = {}
    heads = n_heads(cm)
    handles = []

    def hook(layer: int, d_head: int):
        def record(module, args, out):
            v = out.detach().float().to(cm.device)  # with the patterns, which are recorded there
            v = v.view(*v.shape[:-1], v.shape[-1] // d_head, d_head)
            values[layer] = v.repeat_interleave(heads // v.shape[-2], dim=-2)
        return record

    try:
        for l in layers:
            d_head = _o_proj(cm, l).weight.shape[1] // heads
            handles.append(value_proj(cm, l).register_forward_hook(hook(l, d_head)))
        yield values
    finally:
        for h in handles:
            h.remove()
