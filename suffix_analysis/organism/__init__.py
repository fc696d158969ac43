"""The refusal organism's recipe: how the shipped delta was trained, and how to train it again.

Loading the organism needs none of this: ``models/materialize.py`` merges the shipped delta
(``suffix_analysis/data/organism/``) into its base. This package trains and evaluates, so
it sits above ``evaluation/``: ``recipe.py`` (the settings), ``training.py`` (adapter,
examples, losses, the two stages), ``builder.py`` (``build``), ``faithfulness.py``
(``organism evaluate``).
"""

from .builder import build
from .recipe import ORGANISM_PRESET, OrganismRecipe

__all__ = ["ORGANISM_PRESET", "OrganismRecipe", "build"]
