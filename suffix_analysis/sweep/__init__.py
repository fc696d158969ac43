"""Sweeps: a grid of suffix-analysis commands (models x attacks x seeds x instruction sets),
run as Ray tasks across GPUs and machines, or one after another in this process.

``spec`` reads the sweep file into jobs, ``jobs`` runs one job (one command, its own run
folder), ``run`` schedules them and writes the table and figures.
"""

from .run import run_sweep
from .spec import SweepSpec, load_sweep

__all__ = ["SweepSpec", "load_sweep", "run_sweep"]
