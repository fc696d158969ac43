"""Load a chat model by preset name, Hugging Face id, local folder or GGUF file.

An organism preset or a GGUF file is first made into a folder in the cache, once
(``materialize.py``, which also holds :func:`resolve`: where a model loads from).

Everything downstream takes a :class:`ChatModel`: the plain ``transformers`` model, its
tokenizer, the chat format (EOI tokens), the refusal token ids and the module map.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .chat import ChatFormat, refusal_token_ids
from .materialize import MARKER_FILE as MARKER_FILE  # re-exported, as the next: where the suite finds them
from .materialize import ORGANISM_DELTA_ENV as ORGANISM_DELTA_ENV  # re-exported: benchmarks import it from here
from .materialize import cache_dir as cache_dir
from .materialize import locate_gguf as locate_gguf
from .materialize import resolve as resolve
from .materialize import shipped_delta as shipped_delta  # re-exported: benchmarks import it from here
from .placement import Placement, check_map_names, execution_device, is_dispatched, materialized, pretrained_kwargs
from .presets import DEFAULT_MODEL, TEMPLATES, ArchSpec, Preset, arch_for

log = logging.getLogger(__name__)

# Prefix of ChatModel.fingerprint(): records whose fingerprint lacks it were made before the
# fingerprint named the weights (it hashed the config and a few embedding rows).
FINGERPRINT_SCHEME = "w1-"


def fingerprint_mismatch(recorded: str | None, cm: "ChatModel", what: str) -> str | None:
    """Why ``what`` (a run folder, a checkpoint), recorded with fingerprint ``recorded``,
    is not from ``cm``'s weights; None when it is."""
    current = cm.fingerprint()
    if recorded == current:
        return None
    if not str(recorded).startswith(FINGERPRINT_SCHEME):
        return (f"{what} was made by an older suffix-analysis, whose fingerprint did not name the weights; "
                "make it again")
    return f"{what} was made from other weights (fingerprint {recorded}) than '{cm.name}' ({current})"


# A folder this suite writes (organism, orthogonalized export) names its preset here.
DEFAULT_REFUSAL_TOKENS = ("I",)


@dataclass
class ChatModel:
    """A causal LM with everything the suite needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    chat: ChatFormat
    name: str
    preset: Preset | None
    refusal_ids: list[int]
    arch: ArchSpec
    # The folder (or hub id) the weights came from; None for a model built in memory.
    location: str | None = None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device (on a dispatched model the
        layers may sit elsewhere, and offloaded weights on ``meta``)."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def dispatched(self) -> bool:
        """Placed by accelerate (device map, offload or quantized weights)."""
        return is_dispatched(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.get_submodule(self.arch.layers)

    def fingerprint(self) -> str:
        """Names the weights, not the precision they are loaded in.

        A hash of the architecture and, for every parameter tensor, its name, shape and 64
        evenly spaced values rounded to bfloat16: float32 and bfloat16 loads of one
        checkpoint agree (rounding a bfloat16 value to bfloat16 changes nothing), while a
        fine-tune that leaves the config and the embedding as they were (the organism and
        its base) differs in its trained tensors. (A float16 load can round a few values to
        the other side of a bfloat16 step, and then reads as other weights.)
        Cheap even for 70B models: one small gather per tensor.
        """
        h = hashlib.sha256(self.model.config.model_type.encode())
        params = dict(self.model.named_parameters())
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            # in memory the tied head is the embedding and named once; accelerate's offload
            # unties the two Parameter objects (same values), so name it once here too
            params.pop(f"{self.arch.lm_head}.weight", None)
        for name, p in sorted(params.items()):
            if p.device.type == "meta":  # offloaded: read it from where accelerate keeps it
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner)
                with materialized(module):
                    p = getattr(module, leaf).detach().clone()
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)  # integers: the same on every device
            sample = flat[idx.to(flat.device)].to(torch.bfloat16).float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
        return FINGERPRINT_SCHEME + h.hexdigest()[:16]


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but this machine has no CUDA GPU; use --device cpu") from None
    return dev


def _pick_dtype(dtype: str, device: torch.device, preset: Preset | None) -> torch.dtype:
    if dtype == "auto":
        dtype = preset.gpu_dtype if (device.type == "cuda" and preset) else (
            "bfloat16" if device.type == "cuda" else "float32")
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise UserError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return out


def load_tokenizer(location: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(location), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer from '{location}': {str(e).splitlines()[0]}") from None
    return tok


def load_weights(location: Path | str, how: str = "", **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(location, **kwargs)`` from safetensors only: a
    pickled checkpoint (``pytorch_model.bin``) can run code as it loads, so it is refused with
    how to convert it. ``how`` ends the error message (e.g. the device map asked for)."""
    from transformers import AutoModelForCausalLM

    folder = Path(location)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"{folder} holds its weights only as a pickle (pytorch_model.bin) and the suite loads "
                        "safetensors only (a pickle can run code as it loads); convert it once, if you trust it: "
                        "python -c \"from transformers import AutoModelForCausalLM as M; "
                        f"M.from_pretrained('{folder}').save_pretrained('{folder}')\"")
    try:
        return AutoModelForCausalLM.from_pretrained(str(location), use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        hint = "; the suite loads safetensors weights only" if "safetensors" in str(e) else ""
        raise UserError(f"could not load model weights from '{location}'{how}: {str(e).splitlines()[0]}{hint}") \
            from None


def load_model(
    spec: str = DEFAULT_MODEL,
    preset: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    placement: Placement | None = None,
    progress: bool = True,
) -> ChatModel:
    """Load ``spec`` (preset name, HF id, model folder or .gguf file) as a :class:`ChatModel`.

    ``placement`` (device map, memory caps, offload, quantization) hands the weights to
    ``accelerate``; without it the whole model goes to ``device``. The chat format is checked
    before the weights load, so a model without a chat template fails fast. ``progress``:
    bars while a GGUF file or an organism is made into a folder (once per cache).
    """
    placement = placement or Placement()
    dev = _pick_device(device)  # settings first: resolving may build a model for minutes
    if dtype != "auto":
        _pick_dtype(dtype, dev, None)
    pretrained_kwargs(placement, torch.float32, cache_dir() / "offload")  # its errors, before the weights
    location, pre = resolve(spec, preset, trust_remote_code, progress=progress)
    tok = load_tokenizer(location, trust_remote_code)
    chat = ChatFormat.from_tokenizer(tok, TEMPLATES[pre.template] if pre else None)
    refusal = refusal_token_ids(tok, pre.refusal_tokens if pre else DEFAULT_REFUSAL_TOKENS)
    dt = _pick_dtype(dtype, dev, pre)
    offload = cache_dir() / "offload" / hashlib.sha256(str(location).encode()).hexdigest()[:12]
    placed = pretrained_kwargs(placement, dt, offload)
    how = " with --device-map " + placement.device_map if placement.device_map else ""
    model = load_weights(location, how, dtype=dt, trust_remote_code=trust_remote_code, **placed)
    if not placed:  # accelerate has placed a dispatched model; .to() would undo it
        model.to(dev)
    elif isinstance(placed["device_map"], dict):
        check_map_names(model, placed["device_map"], placement.device_map)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return ChatModel(
        model=model,
        tokenizer=tok,
        chat=chat,
        name=spec,
        preset=pre,
        refusal_ids=refusal,
        arch=arch_for(model.config.model_type),
        location=str(location),
    )


def to_bridge(cm: ChatModel):
    """The same model as a TransformerLens ``TransformerBridge`` (hook names
    ``blocks.{l}.hook_resid_pre`` etc.).

    The bridge wraps ``cm.model`` itself and rewrites it in place (eager attention, new
    module tree): use it for analysis, and load a fresh model for anything you export.
    """
    if cm.dispatched:
        raise UserError("a TransformerLens bridge needs the whole model on one device; this one is placed with a "
                        "device map or quantized. The suite's own hooks (models/hooks.py) work on it as it is")
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        cm.model.config._name_or_path or cm.name,
        hf_model=cm.model,
        tokenizer=cm.tokenizer,
        device=cm.device,
        dtype=cm.dtype,
    )
