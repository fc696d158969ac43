"""suffix-analysis: the mechanistic study of refusal and of the adversarial suffixes that break it."""

__version__ = "0.1.0"
