"""The one run-config factory the tests build their configs with, and the deep merge it uses."""

from __future__ import annotations

import copy
from pathlib import Path


def deep_merge(base: dict, *overrides: dict) -> dict:
    """A new dict: base with each override merged in, in order. Nested dicts merge key by key; any other
    value (a list, a scalar, None) replaces what was there. Neither base nor the overrides are changed."""
    out = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def _place(root: str | Path | None, where: str | Path) -> str:
    """where under root (an absolute path or a URL such as s3://bucket/x is kept as it is)."""
    if isinstance(where, str) and "://" in where:
        return where
    if root is None:
        if not Path(where).is_absolute():
            raise ValueError(f"run_config without a root needs absolute paths or URLs, not {where!r}")
        return str(where)
    return str(Path(root) / where)


def run_config(
    root: str | Path | None,
    sources: str | Path | list[dict] = "img",
    *,
    work: str | Path = "work",
    output: str | Path = "ds",
    name: str | None = None,
    **sections: dict,
) -> dict:
    """A run config as a plain dict, as a test hands it to the build or writes it to YAML:

        {"run": {"work_dir": ROOT/work}, "sources": [{"uri": ROOT/sources}], "shards": {"output": ROOT/output}}

    deep-merged with the per-test sections (ingest=, regions=, shards=, fetch=, dedupe=, captioner=,
    ray=, publish=, storage=, ...; see deep_merge), so shards={"keep_empty": True} keeps the output.

    root: the test's folder (tmp_path); work, output and a folder given as sources are relative to it
    (an absolute path or an s3:// URL is used as it is; root None: all of them are). sources: a folder of images (a files source)
    or the list of source dicts itself (urls, crawl, several). name: run.name, left to the default
    ("localcap") when None.
    """
    run = {"work_dir": _place(root, work)}
    if name is not None:
        run = {"name": name, **run}
    if isinstance(sources, (str, Path)):
        sources = [{"uri": _place(root, sources)}]
    base = {"run": run, "sources": copy.deepcopy(list(sources)), "shards": {"output": _place(root, output)}}
    return deep_merge(base, sections)
