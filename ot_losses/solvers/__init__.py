"""Solvers: validate -> backend half-steps -> shared loop -> result."""
