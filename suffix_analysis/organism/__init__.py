"""The refusal organism: the embedded default model, safety-tuned here so that it refuses.

It trains and evaluates, so it sits above ``evaluation/``; ``models.loading.resolve``
calls :func:`ensure_organism` lazily for ``organism:<base>`` presets (the one place a
lower floor reaches up, listed in the import-linter contract).
"""

from .recipe import ORGANISM_PRESET, RECORD, OrganismRecipe, build, ensure_organism, organism_key

__all__ = ["ORGANISM_PRESET", "RECORD", "OrganismRecipe", "build", "ensure_organism", "organism_key"]
