"""Generation, refusal judges and refusal scores."""
