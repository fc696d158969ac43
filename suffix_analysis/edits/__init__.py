"""Weight edits searched against two objectives (refusals, side effects): the Pareto edit."""
