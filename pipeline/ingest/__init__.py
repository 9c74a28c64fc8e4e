"""Ingest: list sources, decode-validate each file, write the images and rejects tables."""
