"""Where a model's weights live: one device, several (``accelerate`` device maps), CPU and
disk offload, or 4-/8-bit weights (``bitsandbytes``).

Nothing here places a layer itself: :class:`Placement` becomes the ``device_map``,
``max_memory``, ``offload_folder`` and ``quantization_config`` arguments of
``from_pretrained``, and ``accelerate`` moves every module's inputs to where its weights
are. What the rest of the suite needs to know about a dispatched model is in three helpers:

- :func:`execution_device`: where a module computes (its weights can be on ``meta`` while
  offloaded, so a parameter's ``.device`` is not the answer);
- :func:`materialized`: a context in which an offloaded module's weights are real tensors
  (to read ``W_O`` or the embedding matrix outside a forward pass);
- :func:`is_dispatched`: whether ``accelerate`` placed the model (then it is not moved
  with ``.to()``, and it is exported from its checkpoint files, not from memory).

Hooks need nothing special: a tensor a hook adds is moved to the activation's device
(``models/hooks.py``), and ``accelerate`` moves each module's inputs itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import setting
from ..errors import UserError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE = ("4bit", "8bit")
_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)


@dataclass(frozen=True)
class Placement:
    """How ``from_pretrained`` places the weights. All empty: the whole model on ``--device``."""

    device_map: str = setting("", help="spread the model over devices with accelerate: auto, balanced, "
                                       "balanced_low_0, sequential, or a JSON file {module name: device} "
                                       "(devices: 0 or cuda:0, cpu, disk)")
    max_memory: str = setting("", help="memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    offload_folder: str = setting("", help="folder for the weights a device map sends to 'disk' "
                                           "(default: offload/ in the cache)")
    quantize: str = setting("", help="load the linear layers' weights in 4bit or 8bit with bitsandbytes "
                                     "(CUDA only; implies --device-map auto unless one is given)")

    def __post_init__(self):
        if self.quantize and self.quantize not in QUANTIZE:
            raise UserError(f"--quantize '{self.quantize}': use {' or '.join(QUANTIZE)}")
        if (self.max_memory or self.offload_folder) and not (self.device_map or self.quantize):
            raise UserError("--max-memory and --offload-folder place a model over devices: add --device-map auto")

    @property
    def dispatched(self) -> bool:
        return bool(self.device_map or self.quantize)


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_device(value, where: str) -> None:
    """A device as accelerate names it (int GPU index, 'cuda:N', 'cpu', 'disk', 'mps'), known to exist."""
    text = str(value)
    if text in ("cpu", "disk"):
        return
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{where} names device 'mps', but this machine has no Apple GPU")
        return
    m = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", text)
    if not m or isinstance(value, bool):
        raise UserError(f"{where} names device '{text}'; use a GPU index (0, cuda:1), cpu or disk")
    index = int(m.group(1) or 0)
    if index >= _gpu_count():
        have = f"{_gpu_count()} CUDA GPU(s)" if _gpu_count() else "no CUDA GPU"
        raise UserError(f"{where} names device '{text}', but this machine has {have}; "
                        "use the devices it has (cpu, disk" + (", 0.." + str(_gpu_count() - 1) if _gpu_count() else "")
                        + ")")


def _device_key(text: str):
    """accelerate's key for a device: GPU index as int, else the name."""
    m = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    return int(m.group(1)) if m else text


def parse_device_map(spec: str) -> str | dict:
    """``--device-map``: a strategy name, or the mapping in a JSON file with every device checked."""
    if spec in STRATEGIES:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--device-map '{spec}': not a strategy ({', '.join(STRATEGIES)}) and not a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--device-map {spec}: not valid JSON ({e}); write {{\"module.name\": device, ...}}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--device-map {spec}: expected a non-empty JSON object {{\"module.name\": device, ...}}")
    out = {}
    for name, dev in mapping.items():
        _check_device(dev, f"--device-map {spec} (module '{name}')")
        out[name] = _device_key(str(dev)) if not isinstance(dev, int) else dev
    return out


def parse_max_memory(spec: str) -> dict | None:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` -> ``{0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}``."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not key or not _SIZE.fullmatch(size.strip()):
            raise UserError(f"--max-memory '{part}': write DEVICE=SIZE, e.g. 0=70GiB or cpu=200GiB")
        _check_device(key.strip(), "--max-memory")
        out[_device_key(key.strip())] = size.strip()
    return out


def check_map_names(model: torch.nn.Module, mapping: dict, spec: str) -> None:
    """A device map whose module names the model lacks would be ignored in silence."""
    names = {n for n, _ in model.named_modules()}
    unknown = [k for k in mapping if k not in names]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        raise UserError(f"--device-map {spec}: the model has no module '{unknown[0]}'"
                        + (f" (did you mean '{near[0]}'?)" if near else ""))


def quantization_config(quantize: str, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``--quantize``, or a one-line error where it cannot run."""
    if not quantize:
        return None
    if not torch.cuda.is_available():
        raise UserError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes' 4/8-bit kernels); "
                        "on this machine load the model without --quantize")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def pretrained_kwargs(placement: Placement, dtype: torch.dtype, offload_default: Path) -> dict:
    """The ``from_pretrained`` arguments for ``placement`` (empty when it places nothing)."""
    if not placement.dispatched:
        return {}
    if importlib.util.find_spec("accelerate") is None:
        raise UserError("--device-map needs accelerate: pip install accelerate")
    kw: dict = {"device_map": parse_device_map(placement.device_map or "auto")}
    memory = parse_max_memory(placement.max_memory)
    if memory:
        kw["max_memory"] = memory
    # where accelerate puts what fits nowhere else; it decides that only while loading
    kw["offload_folder"] = str(Path(placement.offload_folder or offload_default).expanduser())
    q = quantization_config(placement.quantize, dtype)
    if q is not None:
        kw["quantization_config"] = q
    return kw


def _hook_device(module: torch.nn.Module):
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it placed the module,
    else the device of its first real (non-meta) parameter or buffer; CPU when it has none."""
    for m in module.modules():
        dev = _hook_device(m)
        if dev is not None:
            return dev
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed ``model`` (a device map or quantized weights)."""
    return bool(getattr(model, "hf_device_map", None)) or bool(getattr(model, "is_quantized", False))


def devices_of(model: torch.nn.Module) -> dict[str, int]:
    """``{device: n_parameters}`` as the model is placed ('disk' and 'cpu' for offloaded weights)."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return {str(execution_device(model)): sum(p.numel() for p in model.parameters())}
    out: dict[str, int] = {}
    for name, dev in mapping.items():
        module = model.get_submodule(name) if name else model
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        out[key] = out.get(key, 0) + sum(p.numel() for p in module.parameters())
    return out


@contextmanager
def materialized(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with its weights as real tensors inside the block: an offloaded module's
    weights are loaded to its execution device (and dropped again on exit); for any other
    module this does nothing."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        yield module
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in module.modules():
            stack.enter_context(align_module_device(m))
        yield module
