"""Candidate refusal directions (difference in means) and their selection."""
