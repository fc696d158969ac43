"""Labelled tensors as tidy pandas DataFrames (one row per element)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from torch import Tensor


def tidy(values: Tensor, axes: Sequence[tuple[str, Sequence]], value: str = "value") -> pd.DataFrame:
    """One row per element of ``values``, a column per axis (``(name, labels)`` in axis
    order) holding its label, and ``value``."""
    if tuple(values.shape) != tuple(len(labels) for _, labels in axes):
        raise ValueError(f"values of shape {tuple(values.shape)} do not match axes "
                         f"{[(name, len(labels)) for name, labels in axes]}")
    index = pd.MultiIndex.from_product([list(labels) for _, labels in axes], names=[name for name, _ in axes])
    return pd.DataFrame({value: values.detach().double().cpu().reshape(-1).numpy()}, index=index).reset_index()
