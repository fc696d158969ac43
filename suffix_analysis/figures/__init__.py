"""Figures drawn from a run's tables alone: no model, no torch (an import-linter contract).

``draw_all(RUN)`` writes every figure whose tables ``RUN`` holds into ``RUN/figures/``, as
PNG and PDF; ``suffix-analysis figures RUN`` does the same from the command line.
"""

from .draw import FIGURES, draw_all
from .run_tables import Tables

__all__ = ["FIGURES", "Tables", "draw_all"]
