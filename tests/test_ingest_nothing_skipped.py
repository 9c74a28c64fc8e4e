"""Nothing is skipped silently at ingest: blank images, unreadable folders and files, and crawls
whose start URL fails all end as rejects with their reason, and inputs = samples + rejected.

Ingest level (the listing, the ingest partitions and the counting stages.ingest_jobs does), no Ray.
Permissions: the tests (and CI) run as root, for whom chmod 000 denies nothing. So the in-process
test makes folders and files unreadable by monkeypatching os.scandir / Storage.read_bytes for just
those paths when root (real chmod 000 otherwise), and a second test repeats it with real permissions
in a child process: as root, one started by setpriv without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH,
so that uid 0 is held to the permission bits like any owner.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.ingest.reader import (
    SourceError,
    check_source_root,
    discover_urls,
    list_inputs,
)
from pipeline.storage import Storage
from schemas.config import CrawlSource, FetchSection, FilesSource, IngestSection
from tests.helpers.http_server import QuietHandler, serve
from tests.helpers.images import scene_jpeg
from tests.helpers.ingest import ingest_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = {"allow_private": True, "retries": 1, "backoff_s": 0.05, "timeout_s": 1.5, "connect_timeout_s": 1.0,
        "per_host_rate": 100.0}
LOCKED_DIR, LOCKED_FILE = "locked", "locked.jpg"


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def write_problem_folder(folder: Path) -> dict[str, str | None]:
    """Good images, a blank one, an unreadable-to-be sub-folder and file; relative path -> reason.
    The caller makes LOCKED_DIR and LOCKED_FILE unreadable."""
    (folder / "sub").mkdir(parents=True)
    (folder / LOCKED_DIR / "deeper").mkdir(parents=True)
    (folder / "good.jpg").write_bytes(scene_jpeg(1))
    (folder / "sub" / "good2.jpg").write_bytes(scene_jpeg(2))
    (folder / "blank.png").write_bytes(_png(Image.new("RGB", (1600, 1200), (250, 250, 250))))
    (folder / LOCKED_DIR / "inside.jpg").write_bytes(scene_jpeg(3))  # never listed: the folder is the reject
    (folder / LOCKED_DIR / "deeper" / "inside2.jpg").write_bytes(scene_jpeg(4))
    (folder / LOCKED_FILE).write_bytes(scene_jpeg(5))
    return {"good.jpg": None, "sub/good2.jpg": None, "blank.png": "blank", LOCKED_DIR: "read_error", LOCKED_FILE: "read_error"}


def check_outcome(folder: Path, expected: dict, n_inputs: int, images: list[dict], rejects: list[dict]) -> None:
    def rel(uri: str) -> str:
        return os.path.relpath(uri, folder)

    assert n_inputs == len(images) + len(rejects) == len(expected)  # inputs = samples + rejected
    assert sorted(rel(i["source_uri"]) for i in images) == sorted(k for k, v in expected.items() if v is None)
    got = {rel(r["source_uri"]): r for r in rejects}
    assert {k: r["reason"] for k, r in got.items()} == {k: v for k, v in expected.items() if v is not None}
    assert "folder" in got[LOCKED_DIR]["detail"] and "Permission" in got[LOCKED_DIR]["detail"]
    assert "Permission" in got[LOCKED_FILE]["detail"]
    assert "near-uniform" in got["blank.png"]["detail"] and got["blank.png"]["uid"]


@pytest.fixture
def deny(monkeypatch):
    """deny(folder, file): make them unreadable for this process, really when not root."""
    restore = []

    def _deny(folder: Path, file: Path) -> None:
        if os.geteuid() != 0:
            for p in (folder, file):
                os.chmod(p, 0)
                restore.append(p)
            return
        real_scandir = os.scandir
        real_read = Storage.read_bytes

        def scandir(path="."):
            if not isinstance(path, int) and os.path.abspath(os.fspath(path)) == str(folder):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        def read_bytes(self, uri):
            if uri == str(file):
                raise PermissionError(13, "Permission denied", uri)
            return real_read(self, uri)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(Storage, "read_bytes", read_bytes)

    yield _deny
    for p in restore:
        os.chmod(p, 0o755)


def test_blank_unreadable_folder_and_file_are_rejects(tmp_path, deny, caplog):
    folder = tmp_path / "in"
    expected = write_problem_folder(folder)
    deny(folder / LOCKED_DIR, folder / LOCKED_FILE)
    with caplog.at_level(logging.WARNING, logger="localcap"):
        n_inputs, images, rejects = ingest_folder(folder)
    check_outcome(folder, expected, n_inputs, images, rejects)
    assert [r.getMessage() for r in caplog.records if LOCKED_DIR in r.getMessage()]  # said on the console too


def test_source_root_unreadable_or_missing_is_a_source_error(tmp_path, deny):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    check_source_root(FilesSource(uri=str(folder)), Storage())  # readable: no error
    check_source_root(FilesSource(uri=str(folder / "*.jpg")), Storage())
    with pytest.raises(SourceError, match="does not exist"):
        check_source_root(FilesSource(uri=str(tmp_path / "nope")), Storage())
    with pytest.raises(SourceError, match="fixed folder of the glob"):
        check_source_root(FilesSource(uri=str(tmp_path / "nope" / "*.jpg")), Storage())
    deny(folder, tmp_path / "unused")
    for uri in (str(folder), str(folder / "**" / "*.jpg")):
        with pytest.raises(SourceError, match="cannot be read: PermissionError") as err:
            check_source_root(FilesSource(uri=uri), Storage())
        assert "\n" not in str(err.value) and str(folder) in str(err.value)
        with pytest.raises(SourceError, match="cannot be read: PermissionError"):
            list_inputs([FilesSource(uri=uri)], Storage())


def test_unreadable_sub_folder_of_a_glob_is_a_reject(tmp_path, deny):
    folder = tmp_path / "in"
    write_problem_folder(folder)
    deny(folder / LOCKED_DIR, folder / LOCKED_FILE)
    entries = list_inputs([FilesSource(uri=str(folder / "**" / "*.jpg"))], Storage())
    assert [(os.path.relpath(e.uri, folder), bool(e.error)) for e in entries] == [
        ("good.jpg", False), (LOCKED_DIR, True), (LOCKED_FILE, False), ("sub/good2.jpg", False)]
    # A glob that cannot reach the folder does not look into it, so it reports nothing about it.
    entries = list_inputs([FilesSource(uri=str(folder / "sub" / "*.jpg"))], Storage())
    assert [os.path.relpath(e.uri, folder) for e in entries] == ["sub/good2.jpg"]


# -- the same with real permissions, in a child process ---------------------------------------------------
CHILD = """
import json, sys
from tests.helpers.ingest import ingest_folder
from pipeline.ingest.reader import SourceError, check_source_root
from pipeline.storage import Storage
from schemas.config import FilesSource
from pathlib import Path
n, images, rejects = ingest_folder(Path(sys.argv[1]))
try:
    check_source_root(FilesSource(uri=sys.argv[2]), Storage())
    root_error = None
except SourceError as exc:
    root_error = str(exc)
print(json.dumps({"n": n, "images": images, "rejects": rejects, "root_error": root_error}))
"""


def _unprivileged() -> list[str]:
    """A command prefix under which this uid is held to the permission bits, or skip."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is not installed: cannot drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]


def test_real_permissions_in_a_child_process(tmp_path):
    folder = tmp_path / "in"
    expected = write_problem_folder(folder)
    (folder / "listonly").mkdir()  # can be listed (r) but not searched (no x): its files cannot be opened
    (folder / "listonly" / "a.jpg").write_bytes(scene_jpeg(6))
    expected["listonly/a.jpg"] = "read_error"
    locked_root = tmp_path / "locked-root"
    locked_root.mkdir()
    os.chmod(folder / LOCKED_DIR, 0)
    os.chmod(folder / LOCKED_FILE, 0)
    os.chmod(folder / "listonly", 0o400)
    os.chmod(locked_root, 0)
    try:
        out = subprocess.run([*_unprivileged(), sys.executable, "-c", CHILD, str(folder), str(locked_root)],
                             check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=120)
    finally:
        for p, mode in ((folder / LOCKED_DIR, 0o755), (folder / LOCKED_FILE, 0o644), (folder / "listonly", 0o755), (locked_root, 0o755)):
            os.chmod(p, mode)
    if out.returncode != 0 and "setpriv" in out.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    check_outcome(folder, expected, got["n"], got["images"], got["rejects"])
    listonly = next(r for r in got["rejects"] if r["source_uri"].endswith("listonly/a.jpg"))
    assert "unreadable file" in listonly["detail"]
    assert got["root_error"] and "cannot be read: PermissionError" in got["root_error"]


# -- a crawl whose start URL fails -----------------------------------------------------------------------
class NotFound(QuietHandler):
    def do_GET(self):  # robots.txt too: 404 means "no rules", so the start page itself is fetched
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _crawl_ingest(start: str, tmp_path: Path, robots: bool = True) -> tuple[int, list[dict], list[dict]]:
    """Discover the crawl into a urls table and ingest it, as the ingest stage does."""
    from pipeline.ingest.downloader import fetch_partition
    from pipeline.partitions import part_name, read_table

    fetch, limits, storage = FetchSection(**FAST), IngestSection(min_side=64), Storage()
    folder = str(tmp_path / "urls")
    fps, n_urls = discover_urls([CrawlSource(type="crawl", start_urls=[start], robots=robots)], fetch, limits.max_bytes,
                                storage, folder, progress=False)
    images, rejects = [], []
    for k in range(len(fps)):
        i, r = fetch_partition(read_table(storage, f"{folder}/{part_name(k)}").to_pylist(), fetch, limits)
        images += i.to_pylist()
        rejects += r.to_pylist()
    return n_urls, images, rejects


def test_crawl_start_url_404_is_a_reject_with_a_warning(tmp_path, caplog):
    httpd, base = serve(NotFound)
    try:
        with caplog.at_level(logging.WARNING, logger="localcap"):
            n, images, rejects = _crawl_ingest(base + "/gallery/", tmp_path)
    finally:
        httpd.shutdown()
    assert n == len(images) + len(rejects) == 1
    (rej,) = rejects
    assert (rej["source_uri"], rej["reason"]) == (base + "/gallery/", "http_status") and "HTTP 404" in rej["detail"]
    warned = [r for r in caplog.records if r.name == "localcap" and r.levelno == logging.WARNING]
    assert any(base + "/gallery/" in r.getMessage() and "http_status" in r.getMessage() for r in warned)


@pytest.mark.parametrize("robots", [True, False])
def test_crawl_start_url_refused_is_a_connection_error_reject(tmp_path, caplog, robots):
    start = f"http://127.0.0.1:{_closed_port()}/"
    with caplog.at_level(logging.WARNING, logger="localcap"):
        n, images, rejects = _crawl_ingest(start, tmp_path, robots)
    assert n == len(rejects) == 1 and not images
    (rej,) = rejects
    assert (rej["source_uri"], rej["reason"]) == (start, "connection_error")
    assert ("robots.txt" in rej["detail"]) is robots  # with robots on, the site was found down fetching robots.txt
    assert any(start in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_unreadable_sub_folder_of_a_url_list_source_is_a_reject(tmp_path, deny):
    from pipeline.ingest.downloader import fetch_partition
    from pipeline.partitions import part_name, read_table
    from schemas.config import UrlListSource

    lists = tmp_path / "lists"
    (lists / LOCKED_DIR).mkdir(parents=True)
    (lists / LOCKED_DIR / "more.txt").write_text("http://127.0.0.1:9/never-read.jpg\n")
    (lists / "a.csv").write_text("url,caption\n,a row without a URL\n")
    deny(lists / LOCKED_DIR, tmp_path / "unused")
    fetch, storage = FetchSection(**FAST), Storage()
    fps, n_urls = discover_urls([UrlListSource(type="urls", uri=str(lists))], fetch, 10**7, storage, str(tmp_path / "urls"), False)
    rows = [r for k in range(len(fps)) for r in read_table(storage, str(tmp_path / "urls" / part_name(k))).to_pylist()]
    images, rejects = fetch_partition(rows, fetch, IngestSection())
    assert n_urls == images.num_rows + rejects.num_rows == 2
    got = {r["source_uri"]: (r["reason"], r["detail"]) for r in rejects.to_pylist()}
    assert got[str(lists / LOCKED_DIR)][0] == "read_error" and "folder" in got[str(lists / LOCKED_DIR)][1]
    assert got[f"{lists / 'a.csv'}#row=0"][0] == "bad_url"
