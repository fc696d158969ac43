"""Presets, loading, chat formatting, cached forward passes and the hook vocabulary."""

from .chat import ChatFormat
from .loading import ChatModel, load_model, to_bridge
from .presets import PRESETS, Preset, get_preset

__all__ = ["ChatFormat", "ChatModel", "load_model", "to_bridge", "PRESETS", "Preset", "get_preset"]
