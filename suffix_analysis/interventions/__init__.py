"""Directional ablation and activation addition, on the plain transformers model."""
