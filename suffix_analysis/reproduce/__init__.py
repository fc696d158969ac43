"""``reproduce``: the paper's pipeline end to end on one model, each stage cached in ``RUN/<stage>/``.

organism -> direction -> evaluation -> attack -> transfer -> attribution, then
``summary.json``, ``stages.json``, ``figures/`` and ``report.md`` (see ``run.py``); settings
in one TOML file (``config.py``).
"""

from .config import ReproduceConfig, build_config, load_config, to_toml
from .run import reproduce

__all__ = ["ReproduceConfig", "build_config", "load_config", "reproduce", "to_toml"]
