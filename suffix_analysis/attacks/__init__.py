"""Adversarial suffix attacks: the interface, GCG, a random-suffix control, a nanogcg adapter.

The built-in attacks are found through the entry point group ``suffix_analysis.attacks``
(:func:`get_attack`), so this package imports none of them.
"""

from .base import Attack, AttackConfig, AttackResult, get_attack, list_attacks, register_attack

__all__ = ["Attack", "AttackConfig", "AttackResult", "get_attack", "list_attacks", "register_attack"]
