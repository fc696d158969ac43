"""Low-rank weight deltas: a trained model shipped as its base plus ``W + B A`` per matrix.

The refusal organism ships as such a delta (``suffix_analysis/data/organism/``): a few MB
of factors instead of a 540 MB model. The file is a safetensors file of

    {module}.lora_A   [rank, in_features]    bfloat16
    {module}.lora_B   [out_features, rank]   bfloat16 (the adapter's scale folded in)

with metadata naming its format, its base (preset name and the SHA-256 of the base's
weights, :func:`state_sha256`), and the SHA-256 of the merged weights.

**The merge is bit-identical on every machine.** A float32 matmul ``B @ A`` sums in an
order that depends on the CPU's BLAS kernel, so two machines can round differently. Here
every product of two bfloat16 numbers is exact in float64 (8 + 8 significant bits), and
the rank-one terms are added one after another in float64 elementwise (IEEE-rounded,
order fixed), then added to the float32 weight in float64 and rounded once to float32.
Nothing depends on the kernel, so the merged weights (and their checksum) are the same
everywhere. (``peft`` merges with a float32 matmul, which is why the suite merges itself.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError

FORMAT = "suffix-analysis-lowrank-delta/1"


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class LowRankDelta:
    """The factors of a delta and what its file says of itself."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    meta: dict[str, str]
    path: Path | None = None

    @property
    def base(self) -> str:
        return self.meta["base"]

    @property
    def base_sha256(self) -> str:
        return self.meta["base_sha256"]

    @property
    def merged_sha256(self) -> str:
        return self.meta["merged_sha256"]

    def record(self) -> dict:
        """The JSON fields of the metadata (recipe, evaluation...), decoded."""
        out = {}
        for k, v in self.meta.items():
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out


def save_delta(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict) -> Path:
    """Write the factors (as bfloat16) and ``meta`` (values JSON-encoded unless strings), atomically."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora_A"] = a.detach().to(torch.bfloat16).contiguous().cpu()
        tensors[f"{name}.lora_B"] = b.detach().to(torch.bfloat16).contiguous().cpu()
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_delta(path: str | Path) -> LowRankDelta:
    """Read a delta file, or a one-line :class:`UserError` saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"low-rank delta not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path} is not a readable safetensors delta ({str(e).splitlines()[0]}); "
                        "it may be truncated: reinstall suffix-analysis or rebuild it with `suffix-analysis "
                        "organism build`") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a suffix-analysis low-rank delta (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
    missing = [k for k in ("base", "base_sha256", "merged_sha256") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks the metadata {', '.join(missing)}; rebuild it with `suffix-analysis organism "
                        "build`")
    factors = {}
    for key in tensors:
        name, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or f"{name}.lora_A" not in tensors or f"{name}.lora_B" not in tensors:
            raise UserError(f"{path}: tensor {key!r} is not half of an (A, B) pair")
        if part == "lora_A":
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise UserError(f"{path}: {name} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                                "not [rank, in] and [out, rank]")
            if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
                raise UserError(f"{path}: {name} is stored as {a.dtype}/{b.dtype}; deltas are bfloat16")
            factors[name] = (a, b)
    if not factors:
        raise UserError(f"{path} holds no factors")
    return LowRankDelta(factors=factors, meta=meta, path=path)


def delta_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in float64, summed rank-one term by rank-one term (exact products, fixed
    order: the same bits on every machine). ``[out, in]``"""
    a64, b64 = a.double(), b.double()
    acc = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for k in range(a.shape[0]):
        acc.add_(b64[:, k:k + 1] * a64[k:k + 1, :])  # add_ of a product, never a fused multiply-add
    return acc


def merge_delta(state: dict[str, torch.Tensor], delta: LowRankDelta, progress: bool = False) -> dict[str, torch.Tensor]:
    """``state`` (float32 base weights, modified in place and returned) with the delta added.

    A factor whose module is not in ``state``, or whose shape does not fit the weight, is a
    one-line error: the delta belongs to another base.
    """
    from tqdm.auto import tqdm

    where = delta.path or "the delta"
    for name, (a, b) in delta.factors.items():
        w = state.get(f"{name}.weight")
        if w is None:
            raise UserError(f"{where} edits {name}, which the base model does not have: it was made for another base")
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise UserError(f"{where} edits {name} with a delta of shape {(b.shape[0], a.shape[1])}, but the base's "
                            f"weight is {tuple(w.shape)}: it was made for another base")
        if w.dtype != torch.float32:
            raise UserError(f"{name} of the base is {w.dtype}; the delta merges into float32 weights")
    for name, (a, b) in tqdm(sorted(delta.factors.items()), desc="applying the organism's delta", unit="matrix",
                             disable=not progress, leave=False):
        key = f"{name}.weight"
        state[key] = (state[key].double() + delta_weight(a, b)).float()
    return state
