"""The attribution run's record and inputs: the prompt conditions, what a stage reads
(``_Run``), the checks made before anything is written, and the run folder's ``run.json``
(opened, or refused when it was made from another model, direction, suffix, data or config)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.loading import ChatModel, fingerprint_mismatch
from ..runs import digest, read_json
from ..runs import open_run as open_run_folder
from .batches import unit_direction
from .causal import check_layer
from .config import AttributionConfig
from .masks import check_attention, suffix_regions

Judge = Callable[[list[str], list[str]], list[bool]]  # (instructions, completions) -> refused

KINDS = ("harmful", "random", "adversarial", "harmless")
# Settings a rerun may change: batching only pads differently, token_effects only adds or skips stage 5.
_FREE = ("batch_size", "token_effects")


@dataclass
class Condition:
    """One prompt set: ``prompts`` (``harmful`` or ``harmless`` instructions) with ``suffix``."""

    name: str  # harmful, random_0 .., adversarial, harmless
    kind: str  # one of KINDS
    prompts: str
    suffix: str | None
    suffix_tokens: list[int] | None = None  # how many tokens of its own the suffix has, per prompt


@dataclass
class _Run:
    """Everything a stage reads."""

    cm: ChatModel
    direction: Tensor
    layer: int
    position: int
    harmful: list[str]
    harmless: list[str]
    suffix: str
    out: Path
    config: AttributionConfig
    judge: Judge | None
    progress: bool
    record: dict
    conditions: list[Condition] = field(default_factory=list)

    def instructions(self, c: Condition) -> list[str]:
        return self.harmful if c.prompts == "harmful" else self.harmless

    def bar(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress)

    def top_heads(self) -> dict:
        return _read(self.out, "top_heads.json")


# --- inputs and the run record -------------------------------------------------------------------

def _read(out: Path, name: str):
    """A JSON file of the run, or one line saying it is corrupt and how to make it again."""
    return read_json(out / name, f"remove it and rerun `suffix-analysis attribute --out {out}` (finished stages are "
                                 "kept)")


def direction_hash(direction: Tensor) -> str:
    """16 hex digits naming the direction's float32 values."""
    return hashlib.sha256(direction.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def recorded_config(config: AttributionConfig) -> dict:
    """The config as run.json holds it (``patch_ks`` as ``"1,2,4"`` however it was given)."""
    return {**asdict(config), "patch_ks": ",".join(str(k) for k in config.ks())}


def data_hash(harmful: Sequence[str], harmless: Sequence[str]) -> str:
    return digest([list(harmful), list(harmless)])


def _instruction_list(items, what: str, limit: int) -> list[str]:
    if isinstance(items, str) or not all(isinstance(x, str) for x in items):
        raise UserError(f"{what} instructions must be a list of strings")
    items = list(items)[:limit] if limit else list(items)
    if not items:
        raise UserError(f"no {what} instructions given; pass at least one")
    return items


def _check_inputs(cm: ChatModel, direction, layer: int, position: int, harmful, harmless, suffix,
                  config: AttributionConfig) -> tuple[list[str], list[str]]:
    """Every check that needs no forward pass, before anything is written."""
    config.validate()
    harmful = _instruction_list(harmful, "harmful", config.n_prompts)
    harmless = _instruction_list(harmless, "harmless", config.n_prompts)
    if not isinstance(direction, Tensor):
        raise UserError(f"the direction must be a tensor [d_model], got {type(direction).__name__}")
    unit_direction(cm, direction)  # width, finite, non-zero
    check_layer(cm, layer)
    if position not in cm.chat.eoi_positions:
        raise UserError(f"direction position {position} is not an EOI position; use -{cm.chat.n_eoi} .. -1")
    if not isinstance(suffix, str) or not suffix.strip():
        raise UserError(f"the adversarial suffix is empty ({suffix!r}); pass the suffix text or a suffix run")
    suffix_regions(cm, harmful, [suffix] * len(harmful))  # a suffix of no tokens of its own
    check_attention(cm)  # knockouts edit the attention mask
    return harmful, harmless


def _explain(new: dict, old: dict, changed: list[str]) -> str | None:
    """What differs between a run folder (``old``) and this run (``new``), in words."""
    if "direction" in changed:
        d_old, d_new = old.get("direction", {}), new["direction"]
        return (f"with another direction (layer {d_old.get('layer')}, position {d_old.get('position')}, hash "
                f"{d_old.get('hash')}; this one: layer {d_new['layer']}, position {d_new['position']}, hash "
                f"{d_new['hash']})")
    if "suffix" in changed:
        return f"with another suffix ({old.get('suffix')!r})"
    if {"data", "n_harmful", "n_harmless"} & set(changed):
        return f"with other instructions ({old.get('n_harmful')} harmful, {old.get('n_harmless')} harmless, or other ones)"
    settings = [c.removeprefix("config.") for c in changed if c.startswith("config.")]
    return f"with other settings ({', '.join(settings)})" if settings else None


def open_run(cm: ChatModel, out: Path, record: dict) -> dict:
    """The run folder's record: ``record`` written into a new folder, or the folder's own if
    it was made from the same model, direction, suffix, data and config (else an error)."""
    def same_model(old: dict) -> str | None:
        return fingerprint_mismatch(old.get("fingerprint"), cm, f"run folder {out} (model '{old.get('model')}')")

    return open_run_folder(out, "attribution", record, free=_FREE, explain=partial(_explain, record),
                           same_model=same_model)


def _load_conditions(out: Path) -> list[Condition]:
    return [Condition(**c) for c in _read(out, "conditions.json")["conditions"]]
