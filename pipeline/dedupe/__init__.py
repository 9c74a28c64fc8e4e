"""The dedupe stage's room (the algorithms are in the top-level `dedupe` package)."""
