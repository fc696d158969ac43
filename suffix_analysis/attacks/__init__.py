"""Adversarial suffix attacks: the interface, GCG, a random-suffix control, a nanogcg adapter."""

from .base import Attack, AttackConfig, AttackResult, get_attack, list_attacks, register_attack

__all__ = ["Attack", "AttackConfig", "AttackResult", "get_attack", "list_attacks", "register_attack"]
