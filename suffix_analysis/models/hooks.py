"""The hook vocabulary: TransformerLens hook names on a plain ``transformers`` model.

The suite reads and edits activations by their TransformerLens names, on the model as
``transformers`` loads it (no wrapper, works during ``generate`` and with key/value
caches). The same ``[(name, fn)]`` lists run on ``to_bridge(cm)`` with
``bridge.run_with_hooks``, where TransformerLens resolves the names itself.

    name                          shape                            site on the transformers model
    blocks.{l}.hook_resid_pre     [batch, pos, d_model]            input of decoder layer l
    blocks.{l}.hook_resid_mid     [batch, pos, d_model]            input of the norm before the MLP
    blocks.{l}.hook_resid_post    [batch, pos, d_model]            output of decoder layer l
    blocks.{l}.hook_attn_out      [batch, pos, d_model]            what attention adds to the residual
    blocks.{l}.hook_mlp_out       [batch, pos, d_model]            what the MLP adds to the residual
    blocks.{l}.attn.hook_z        [batch, pos, n_heads, d_head]    input of the output projection W_O
    blocks.{l}.attn.hook_pattern  [batch, n_heads, q_pos, k_pos]   attention probabilities (read only)

A hook function has TransformerLens's signature ``fn(activation, hook)``; it may return
a tensor of the same shape to replace the activation, or None to leave it. ``hook.name``
is the name it was registered under (on the bridge, TransformerLens's own alias for it).

``attn.hook_pattern`` exists only where the attention implementation computes the
probabilities (eager attention); :func:`run_with_hooks` switches the model to eager
attention while such a hook is on. ``transformers`` computes the attention output in the
same function as the probabilities, so a pattern cannot be replaced from outside: edit
the attention mask for knockouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from .loading import ChatModel

SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_z", "attn.hook_pattern")
_NAME = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in SITES) + r")")


@dataclass(frozen=True)
class HookPoint:
    """One named activation, as passed to hook functions (``hook.name``, ``hook.layer()``)."""

    name: str
    site: str
    layer_index: int

    def layer(self) -> int:
        return self.layer_index


HookFn = Callable[[Tensor, HookPoint], "Tensor | None"]
HookList = list[tuple["str | Callable[[str], bool]", HookFn]]


def hook_point(cm: ChatModel, name: str) -> HookPoint:
    """Parse and check a hook name against ``cm``'s layers."""
    m = _NAME.fullmatch(name)
    if not m:
        raise UserError(f"unknown hook name '{name}'; use blocks.{{layer}}.{{site}} with site one of {', '.join(SITES)}")
    layer = int(m.group(1))
    if layer >= cm.n_layers:
        raise UserError(f"hook '{name}': layer {layer} out of range for a model with {cm.n_layers} layers")
    return HookPoint(name, m.group(2), layer)


def hook_names(cm: ChatModel, sites: tuple[str, ...] | list[str] = SITES, layers: list[int] | None = None) -> list[str]:
    """Every hook name of ``cm`` for ``sites`` (default all) and ``layers`` (default all), layer by layer."""
    return [f"blocks.{l}.{s}" for l in (range(cm.n_layers) if layers is None else layers) for s in sites]


def _replace_first(args: tuple, kwargs: dict, key: str, fn: Callable[[Tensor], Tensor | None]):
    """A module's first input, from args or ``kwargs[key]``, passed through ``fn``."""
    x = args[0] if args else kwargs[key]
    new = fn(x)
    if new is None or new is x:
        return None
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, key: new}


def _replace_output(output, fn: Callable[[Tensor], Tensor | None]):
    x = output[0] if isinstance(output, tuple) else output
    new = fn(x)
    if new is None or new is x:
        return None
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _checked(point: HookPoint, fn: HookFn, x: Tensor) -> Tensor | None:
    new = fn(x, point)
    if new is not None and new is not x and new.shape != x.shape:
        raise UserError(f"hook on {point.name} returned shape {tuple(new.shape)}, expected {tuple(x.shape)}")
    # on a model spread over devices, a replacement made on another device goes where x is
    return new if new is None or new is x else new.to(x.device)


def _register(cm: ChatModel, point: HookPoint, fn: HookFn):
    """Register ``fn`` on the module behind ``point``; returns the torch handle."""
    block = cm.layers[point.layer_index]
    site, arch = point.site, cm.arch
    if site == "hook_resid_pre":
        return block.register_forward_pre_hook(
            lambda m, args, kwargs: _replace_first(args, kwargs, "hidden_states", lambda x: _checked(point, fn, x)),
            with_kwargs=True)
    if site == "hook_resid_mid":
        return block.get_submodule(arch.mlp_norm).register_forward_pre_hook(
            lambda m, args, kwargs: _replace_first(args, kwargs, "hidden_states", lambda x: _checked(point, fn, x)),
            with_kwargs=True)
    if site in ("hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        module = {"hook_resid_post": block, "hook_attn_out": block.get_submodule(arch.attn_out),
                  "hook_mlp_out": block.get_submodule(arch.mlp_out)}[site]
        return module.register_forward_hook(lambda m, args, out: _replace_output(out, lambda x: _checked(point, fn, x)))
    if site == "attn.hook_z":
        heads = cm.model.config.get_text_config().num_attention_heads

        def z(x: Tensor) -> Tensor | None:  # [batch, pos, n_heads * d_head] -> [batch, pos, n_heads, d_head]
            per_head = x.view(*x.shape[:-1], heads, x.shape[-1] // heads)
            new = _checked(point, fn, per_head)
            return None if new is None or new is per_head else new.reshape(x.shape)

        return block.get_submodule(arch.o_proj).register_forward_pre_hook(
            lambda m, args, kwargs: _replace_first(args, kwargs, "input", z), with_kwargs=True)
    # attn.hook_pattern: the attention module returns (output, probabilities) under eager attention
    at = arch.pattern_output
    if at is None:
        raise UserError(f"{point.name}: {cm.model.config.model_type} attention does not return its probabilities; "
                        "attn.hook_pattern is not available for this architecture")

    def pattern(m, args, out):
        probs = out[at] if isinstance(out, tuple) and len(out) > at else None
        if probs is None:
            raise UserError(f"{point.name}: the attention implementation returned no probabilities; "
                            "load the model with attn_implementation='eager'")
        new = fn(probs, point)
        if new is not None and new is not probs:
            raise UserError(f"{point.name} is read-only on a transformers model (the output is computed with "
                            "the probabilities); knock attention out by editing the attention mask")
        return None

    return block.get_submodule(arch.attn).register_forward_hook(pattern)


def expand_hooks(cm: ChatModel, fwd_hooks: HookList) -> list[tuple[HookPoint, HookFn]]:
    """Resolve names (or name filters, as in TransformerLens) to hook points, in order."""
    out = []
    for name, fn in fwd_hooks:
        names = [n for n in hook_names(cm) if name(n)] if callable(name) else [name]
        out += [(hook_point(cm, n), fn) for n in names]
    return out


@contextmanager
def run_with_hooks(cm: ChatModel, fwd_hooks: HookList) -> Iterator[None]:
    """Run ``fwd_hooks`` (``[(name or filter, fn(activation, hook))]``) on every forward
    pass of ``cm.model`` inside the block, ``generate`` included; removed on exit.

    Hooks on one activation run in list order, each seeing the previous one's result.
    """
    points = expand_hooks(cm, fwd_hooks)
    cfg = cm.model.config
    switch = (any(p.site == "attn.hook_pattern" for p, _ in points)
              and getattr(cfg, "_attn_implementation", "eager") != "eager")
    before = cfg._attn_implementation if switch else None
    handles = []
    try:
        if switch:
            cm.model.set_attn_implementation("eager")
        for point, fn in points:
            handles.append(_register(cm, point, fn))
        yield
    finally:
        for h in handles:
            h.remove()
        if switch:
            cm.model.set_attn_implementation(before)


class Recorder:
    """Caches the named activations at chosen positions, over any number of batches.

    ``positions`` index the position axis (``pos`` for residual and ``z`` hooks, the
    query axis for patterns); negative positions count from the end, which with left
    padding is the same token in every row (the EOI tokens). ``reduce="sum"`` keeps running
    float64 sums (means over thousands of prompts without storing them), ``"stack"`` keeps
    every row. Records only while ``active`` (a shared-prefix pass must not count).

    Use :meth:`hooks` with :func:`run_with_hooks` or ``bridge.run_with_hooks``; read
    ``recorder[name]``, the hook's shape with ``pos`` cut to the chosen positions, rows
    concatenated (stack: ``[n_rows, n_positions, d_model]``, patterns ``[n_rows, n_heads,
    n_positions, k_pos]``) or summed over rows (sum: ``[n_positions, d_model]``), and
    ``recorder.count``, the rows seen.
    """

    def __init__(self, names: list[str], positions: list[int] | None = None, reduce: str = "stack",
                 device: str | torch.device = "cpu"):
        if reduce not in ("stack", "sum"):
            raise ValueError(f"reduce must be 'stack' or 'sum', got {reduce!r}")
        self.names, self.positions, self.reduce, self.device = list(names), positions, reduce, device
        self.active = True
        self.count = 0
        self._sums: dict[str, Tensor] = {}
        self._rows: dict[str, list[Tensor]] = {n: [] for n in self.names}

    def _take(self, name: str, x: Tensor) -> None:
        if not self.active:
            return
        axis = 2 if name.endswith("hook_pattern") else 1
        if self.positions is not None:
            x = x.index_select(axis, torch.tensor(self.positions, device=x.device) % x.shape[axis])
        x = x.detach()
        if self.reduce == "sum":
            s = x.to(self.device, torch.float64).sum(0)
            self._sums[name] = self._sums[name] + s if name in self._sums else s
        else:
            self._rows[name].append(x.to(self.device))
        if name == self.names[0]:
            self.count += x.shape[0]

    def hooks(self) -> HookList:
        return [(name, lambda x, hook, name=name: self._take(name, x)) for name in self.names]

    def __getitem__(self, name: str) -> Tensor:
        if self.reduce == "sum":
            return self._sums[name]
        rows = self._rows[name]
        if len({r.shape[1:] for r in rows}) > 1:
            raise UserError(f"{name}: batches recorded with different shapes {sorted({tuple(r.shape[1:]) for r in rows})}; "
                            "record patterns one batch at a time (their key axis is the batch's length)")
        return torch.cat(rows)

    def mean(self, name: str) -> Tensor:
        """``[n_positions, ...]`` mean over the rows seen (float64 with ``reduce="sum"``)."""
        return self[name] / self.count if self.reduce == "sum" else self[name].mean(0)

    @contextmanager
    def recording(self, cm: ChatModel) -> Iterator["Recorder"]:
        """Record from every forward pass of ``cm.model`` inside the block."""
        with run_with_hooks(cm, self.hooks()):
            yield self
