"""What every command shares: the model it loads, the device profile, the direction it reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..config import setting
from ..directions.run import load_direction
from ..errors import UserError
from ..models.loading import ChatModel, load_model
from ..models.placement import Placement

log = logging.getLogger(__name__)

REFUSING_MODEL = "smollm2-135m-refusal"  # the default wherever a command studies refusal


@dataclass(frozen=True)
class ModelOptions:
    """Which model a command loads, and where."""

    model: str = setting(REFUSING_MODEL, "preset name, Hugging Face id, model folder or .gguf file")
    preset: str = setting("", "preset that supplies template and refusal tokens for a folder or HF id")
    device: str = setting("auto", "cpu, cuda, cuda:1... (auto: cuda if available)")
    dtype: str = setting("auto", "float32, bfloat16, float16 (auto: float32 on CPU)")
    trust_remote_code: bool = setting(False, "allow the model's own code (Qwen-1); off unless asked")
    placement: Placement = field(default_factory=Placement)

    def load(self, progress: bool = True) -> ChatModel:
        return load_model(self.model, preset=self.preset or None, device=self.device, dtype=self.dtype,
                          trust_remote_code=self.trust_remote_code, placement=self.placement, progress=progress)

    def on_gpu(self) -> bool:
        return (self.device == "auto" and torch.cuda.is_available()) or self.device.startswith("cuda")


def device_profile(profile: str, model: ModelOptions) -> str:
    """'gpu' (the paper's sizes) or 'cpu' (sizes that finish in minutes on a laptop); 'auto' follows the device."""
    if profile in ("gpu", "cpu"):
        return profile
    if profile != "auto":
        raise UserError(f"unknown profile '{profile}'; use auto, gpu or cpu")
    return "gpu" if model.on_gpu() else "cpu"


def direction_of(cm: ChatModel, run: str, allow_other_model: bool = False) -> tuple[torch.Tensor, dict]:
    """(vector ``[d_model]``, record) of a direction run, checked against ``cm``."""
    return load_direction(run, cm, allow_other_model=allow_other_model)


def provenance(info: dict) -> dict:
    """What outputs record about the direction they used."""
    return {"direction_run": info["run"], "direction_model": info["model"], "direction_other_model": info["other_model"],
            "position": info["position"], "layer": info["layer"]}
