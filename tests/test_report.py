"""The HTML report, rendered by headless Chromium (Debian's package, installed here when missing):
what a person would see, one card per sampled image with its boxes drawn and captions beside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.html_report import COLORS, write_report
from pipeline.shards.writer import write_tar
from schemas.sample import TextBoxSample
from schemas.tables import MANIFEST
from tests.images import scene_jpeg

ARTIFACTS = Path(os.environ.get("LOCALCAP_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("needs Debian's chromium (apt-get install chromium; the test installs it when run as root)")
    return found


def _headless(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


SAMPLES = {  # key: (size, boxes, captions, global caption)
    "00000001": ((1600, 1200), [[100, 100, 500, 400], [900, 600, 1400, 1100]], ["a red kite", "a wooden bench"], "a park"),
    "00000002": ((1400, 1400), [[200, 300, 600, 700]], ["a street sign"], "a crossing"),
    "00000003": ((2000, 1200), [], [], None),
}


def _dataset(root: Path) -> Path:
    """A paired dataset with known boxes and captions, in the shard format."""
    ds = root / "ds"
    images, texts, manifest = [], [], []
    for i, (key, ((w, h), boxes, caps, glob)) in enumerate(SAMPLES.items()):
        images.append((f"{key}.jpg", scene_jpeg(900 + i, w, h)))
        texts.append((f"{key}.json", TextBoxSample(text=caps, box=boxes, global_text=glob).to_json_bytes()))
        manifest.append({"key": key, "uid": key * 4, "shard": "image/image_000000.tar", "source": f"/src/{key}.jpg",
                         "width": w, "height": h, "boxes": len(boxes)})
    for folder, members in (("image", images), ("text_box", texts)):
        (ds / folder).mkdir(parents=True)
        write_tar(str(ds / folder / f"{folder}_000000.tar"), members)
        (ds / folder / "sizes.json").write_text(json.dumps({f"{folder}_000000.tar": len(SAMPLES)}))
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST), ds / "manifest.parquet")
    (ds / "dataset.json").write_text(json.dumps({
        "name": "report-test", "run_id": "r", "layout": "paired", "created_at": "2026-11-22T00:00:00Z",
        "counts": {"inputs": 5, "samples": 3, "shards": 1, "rejected": 2,
                   "rejected_by_reason": {"too_small": 1, "duplicate_near": 1}},
        "timings": {"stage_seconds": {"ingest": 1.0, "shard": 0.5}}}))
    return ds


class _Cards(HTMLParser):
    """Cards of the rendered DOM: key, boxes drawn, caption texts, global caption."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.field: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "article" and "card" in classes:
            self.cards.append({"key": a["id"].removeprefix("s-"), "boxes": 0, "captions": [], "global": ""})
        elif tag == "rect" and "box" in classes:
            self.cards[-1]["boxes"] += 1
        elif tag == "li" and "caption" in classes:
            self.cards[-1]["captions"].append("")
            self.field = "caption"
        elif tag == "p" and "global" in classes:
            self.field = "global"

    def handle_endtag(self, tag):
        if tag in ("li", "p"):
            self.field = None

    def handle_data(self, data):
        if self.field == "caption":
            self.cards[-1]["captions"][-1] += data
        elif self.field == "global":
            self.cards[-1]["global"] += data


def test_report_renders_cards_with_boxes_and_captions(chromium, tmp_path):
    out = tmp_path / "report"
    page = write_report(str(_dataset(tmp_path)), str(out), n_samples=10)
    first_thumb = (out / "thumbs" / "00000001.jpg").stat().st_mtime_ns
    write_report(str(tmp_path / "ds"), str(out), n_samples=10)
    assert (out / "thumbs" / "00000001.jpg").stat().st_mtime_ns == first_thumb  # thumbnails are made once
    assert max(Image.open(out / "thumbs" / "00000001.jpg").size) <= 480

    dom = _headless(chromium, "--dump-dom", f"file://{page}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Cards()
    parser.feed(dom.stdout)
    cards = {c["key"]: c for c in parser.cards}
    assert sorted(cards) == sorted(SAMPLES)  # one card per sampled image
    for key, (_, boxes, caps, glob) in SAMPLES.items():
        card = cards[key]
        assert card["boxes"] == len(boxes)
        assert [c.split(" ", 1)[1] for c in card["captions"]] == caps  # "1 a red kite": numbered like its box
        assert card["global"] == (glob or "no global caption")
    for title in ("boxes per image", "caption length (words)", "rejections by reason", "duplicates found", "throughput per stage"):
        assert title in dom.stdout

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    done = _headless(chromium, "--window-size=1400,1800", f"--screenshot={shot}", f"file://{page}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    box_red = np.array([int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - box_red).sum(axis=1) < 40).sum() > 100  # the first box's outline is on screen
