"""PREFECT_HOMEs for the CLI's subprocesses, each with a copy of one SQLite database migrated once per
test session: a fresh home would migrate its own (tens of seconds on 2 busy cores, ~15 homes a run)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DATABASE = "prefect.db"  # PREFECT_API_DATABASE_CONNECTION_URL's default: ${PREFECT_HOME}/prefect.db
_template: Path | None = None


def _migrated_template() -> Path:
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="localcap-prefect-template-"))
        atexit.register(shutil.rmtree, folder, True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        prefect = Path(sys.executable).with_name("prefect")
        subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True, timeout=300)
        assert (folder / DATABASE).is_file(), f"no {DATABASE} in {folder} after the migration"
        _template = folder
    return _template


def prefect_home(path: str | Path) -> str:
    """`path` as a PREFECT_HOME whose database is already migrated (copied once; an existing database is kept)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / DATABASE).exists():
        shutil.copyfile(_migrated_template() / DATABASE, path / DATABASE)
    return str(path)
