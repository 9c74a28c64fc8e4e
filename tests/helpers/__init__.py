"""Shared test helpers: scenes, local servers, tiny models, the PS3 conformance checker, the run-config factory."""
