"""The code part of a stage's fingerprint, computed from its imports instead of listed by hand.

A stage's partitions are stale when any of our source files that its module can reach through
imports changes: its own module, every module of ours it imports (at the top or inside a function,
`import a.b` or `from a import b`), transitively, and the `__init__.py` of every package on the way
(importing a module runs them). Found by reading the sources (ast), without importing anything, so
the fingerprint also covers lazily imported modules such as a GPU back end.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding our top-level packages
PACKAGES = ("pipeline", "schemas", "captioners", "dedupe", "flows")  # what "ours" means; others are versioned by the environment


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module `name` under `root` (a package's __init__.py), else None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, name: str) -> set[str]:
    """Dotted names a module's source imports (with `from a import b`, both a and a.b: b may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def module_closure(name: str, root: Path = ROOT, ours: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> file of `name` and every module of ours it reaches through imports."""
    seen: dict[str, Path] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        path = module_file(current, root)
        if path is None:
            continue  # a name imported from a module (from a import function), not a module
        seen[current] = path
        parents = [".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1)]
        todo.extend(parents)
        todo.extend(n for n in _imported_names(path, current) if n.split(".")[0] in ours)
    return seen


def code_fingerprint(name: str, root: Path | None = None) -> str:
    """Hash of the sources of `module_closure(name)` (under ROOT by default): any edit to one of
    them changes it. Read once per process: the code does not change under a running run."""
    return _code_fingerprint(name, root or ROOT)


@lru_cache(maxsize=None)
def _code_fingerprint(name: str, root: Path) -> str:
    h = hashlib.sha256()
    for module, path in sorted(module_closure(name, root).items()):
        h.update(module.encode() + b"\x00" + path.read_bytes() + b"\x00")
    return h.hexdigest()[:32]
