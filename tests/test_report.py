"""The HTML report, rendered by headless Chromium (Debian's package, installed here when missing):
what a person would see, one card per sampled image with its boxes drawn and captions beside, the
duplicate clusters, the rejects and the build timings; and, measured in the rendered page, that
every box lies on its region and no plot label is cut or overlaps."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.partitions import part_name
from pipeline.report import COLORS, write_report
from pipeline.shards.writer import write_tar
from schemas.sample import TextBoxSample
from schemas.tables import IMAGES, MANIFEST, REGION_STATUS, REJECTS
from tests.helpers.images import scene_jpeg

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
GEOMETRY_SAMPLES = {  # wide, tall and square images, boxes at the corners and in the middle
    "0000000a": ((4000, 1000), [[0, 0, 1000, 250], [3000, 750, 4000, 1000], [1800, 400, 2200, 600]], ["a", "b", "c"], "wide"),
    "0000000b": ((1000, 4000), [[0, 0, 250, 1000], [750, 3000, 1000, 4000], [400, 1800, 600, 2200]], ["a", "b", "c"], "tall"),
    "0000000c": ((1500, 1500), [[0, 0, 300, 300], [1200, 1200, 1500, 1500], [600, 600, 900, 900]], ["a", "b", "c"], "square"),
}
NO_BOXES = ("too_plain", "best score 0.12 < regions.min_score 0.3")
NEAR_UID, FILLERS = "dd" * 16, 250


def _uid(key: str) -> str:
    return key * 4


def _rejects() -> list[dict]:
    """A near duplicate of sample 1, an exact duplicate of sample 2, and more rejects than the table shows."""
    near = {"source_uri": "/src/00000001-copy.jpg", "uid": NEAR_UID, "stage": "dedupe", "reason": "duplicate_near",
            "detail": f"near duplicate of {_uid('00000001')}, kept: /src/00000001.jpg", "retryable": False}
    exact = {"source_uri": "/src/00000002-again.jpg", "uid": _uid("00000002"), "stage": "dedupe", "reason": "duplicate_exact",
             "detail": "same bytes as /src/00000002.jpg", "retryable": False}
    small = [{"source_uri": f"/src/small_{i:03d}.jpg", "uid": f"{i:032x}", "stage": "ingest", "reason": "too_small",
              "detail": "short side 480 < ingest.min_side 1024", "retryable": False} for i in range(FILLERS)]
    return [near, exact, *small]


BUILDS = [  # the first build computed everything but the caption stage; the rerun skipped every partition
    {"run_id": "r", "finished_at": "2026-11-22T00:00:00Z", "computed": 7, "stages": [
        {"stage": "ingest", "partitions": 2, "computed": 2, "skipped": 0, "seconds": 4.0, "rows": {"images": 5}},
        {"stage": "dedupe", "partitions": 1, "computed": 1, "skipped": 0, "seconds": 1.0, "rows": {}},
        {"stage": "regions", "partitions": 2, "computed": 2, "skipped": 0, "seconds": 8.0, "rows": {}},
        {"stage": "caption", "partitions": 2, "computed": 0, "skipped": 2, "seconds": 0.02, "rows": {}},
        {"stage": "shard", "partitions": 1, "computed": 1, "skipped": 0, "seconds": 0.5, "rows": {}}]},
    {"run_id": "r", "finished_at": "2026-11-23T00:00:00Z", "computed": 0, "stages": [
        {"stage": s, "partitions": 2, "computed": 0, "skipped": 2, "seconds": 0.01, "rows": {}}
        for s in ("ingest", "dedupe", "regions", "caption", "shard")]},
]


def _dataset(root: Path, samples: dict = SAMPLES, run: bool = True) -> Path:
    """A paired dataset with known boxes and captions in the shard format, with rejects.parquet, build
    records and (run=True) its run directory: region status and the ingest table of the dropped duplicates."""
    ds, run_dir = root / "ds", root / "work" / "r"
    images, texts, manifest, status = [], [], [], []
    for i, (key, ((w, h), boxes, caps, glob)) in enumerate(samples.items()):
        images.append((f"{key}.jpg", scene_jpeg(900 + i, w, h)))
        texts.append((f"{key}.json", TextBoxSample(text=caps, box=boxes, global_text=glob).to_json_bytes()))
        manifest.append({"key": key, "uid": _uid(key), "shard": "image/image_000000.tar", "source": f"/src/{key}.jpg",
                         "width": w, "height": h, "boxes": len(boxes)})
        reason, detail = (None, None) if boxes else NO_BOXES
        status.append({"uid": _uid(key), "method": "salient", "boxes": len(boxes), "reason": reason, "detail": detail,
                       "decode_ms": 1.0, "segment_ms": 1.0, "score_ms": 1.0})
    for folder, members in (("image", images), ("text_box", texts)):
        (ds / folder).mkdir(parents=True)
        write_tar(str(ds / folder / f"{folder}_000000.tar"), members)
        (ds / folder / "sizes.json").write_text(json.dumps({f"{folder}_000000.tar": len(samples)}))
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST), ds / "manifest.parquet")
    rejects = _rejects()
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS), ds / "rejects.parquet")
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    (ds / "dataset.json").write_text(json.dumps({
        "name": "report-test", "run_id": "r", "layout": "paired", "created_at": "2026-11-22T00:00:00Z",
        "counts": {"inputs": len(samples) + len(rejects), "samples": len(samples), "shards": 1, "rejected": len(rejects),
                   "rejected_by_reason": dict(sorted(by_reason.items()))},
        "statistics": {"no_boxes_by_reason": {NO_BOXES[0]: sum(1 for s in status if s["reason"])}},
        "timings": {"stage_seconds": {"ingest": 4.0, "dedupe": 1.0, "regions": 8.0, "caption": 0.0, "shard": 0.5}},
        "builds": BUILDS,  # keep_empty: the sample without boxes is one on purpose (the report says why it has none)
        "config": {"run": {"work_dir": str(root / "work")}, "shards": {"keep_empty": True}}}))
    if run:
        (run_dir / "regions").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(status, schema=REGION_STATUS), run_dir / "regions" / part_name(0, "status"))
        (run_dir / "ingest").mkdir()
        near = scene_jpeg(900, 1200, 900)  # sample 1's scene, smaller
        pq.write_table(pa.Table.from_pylist([{
            "uid": NEAR_UID, "sha256": NEAR_UID * 2, "source_uri": "/src/00000001-copy.jpg", "width": 1200, "height": 900,
            "format": "JPEG", "n_bytes": len(near), "image": near, "phash": 0, "dhash": 0, "fine_sig": bytes(256),
            "struct_hash": 0, "struct_sig": bytes(256), "crop_hashes": [], "crop_points": [], "thumb": near, "meta": "{}"}],
            schema=IMAGES), run_dir / "ingest" / part_name(0))
    return ds


class _Page(HTMLParser):
    """What the page shows: cards (key, boxes drawn, captions, global caption, source, why no boxes),
    duplicate clusters (role, picture, name of each figure), rejects-table rows, plot labels by title."""

    CARD_FIELDS = ("caption", "global", "source", "why")

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.clusters: list[list[dict]] = []
        self.rejects: list[list[str]] = []
        self.plots: dict[str, list[str]] = {}
        self.field: str | None = None
        self.where: str | None = None  # the section being read: card, cluster, rejects, plot

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "article" and "card" in classes:
            self.where = "card"
            self.cards.append({"key": a["id"].removeprefix("s-"), "boxes": 0, "captions": [], "global": "", "source": "", "why": ""})
        elif tag == "div" and "cluster" in classes:
            self.where = "cluster"
            self.clusters.append([])
        elif tag == "table" and "rejects" in classes:
            self.where = "rejects"
        elif tag == "figure" and "plot" in classes:
            self.where = "plot"
            self.plot = []
        elif tag == "figcaption" and self.where == "plot":
            self.field = "title"
            self.title = ""
        elif tag == "text" and "label" in classes and self.where == "plot":
            self.field = "label"
            self.plot.append("")
        elif tag == "rect" and "box" in classes:
            self.cards[-1]["boxes"] += 1
        elif tag == "figure" and self.where == "cluster":
            self.clusters[-1].append({"role": classes[0], "img": None, "name": ""})
        elif tag == "img" and self.where == "cluster":
            self.clusters[-1][-1]["img"] = a["src"]
        elif tag == "span" and self.where == "cluster":
            self.field = "name"
        elif tag == "tr" and self.where == "rejects":
            self.rejects.append([])
        elif tag == "td" and self.where == "rejects":
            self.rejects[-1].append("")
            self.field = "td"
        elif self.where == "card" and tag in ("li", "p") and classes and classes[0] in self.CARD_FIELDS:
            self.field = classes[0]
            if self.field == "caption":
                self.cards[-1]["captions"].append("")

    def handle_endtag(self, tag):
        if tag in ("li", "p", "span", "td", "text", "figcaption"):
            self.field = None
        if tag == "table" and self.where == "rejects" or tag == "article":
            self.where = None
        if tag == "figure" and self.where == "plot":
            self.plots[self.title] = self.plot
            self.where = None

    def handle_data(self, data):
        if self.field == "caption":
            self.cards[-1]["captions"][-1] += data
        elif self.field in ("global", "source", "why"):
            self.cards[-1][self.field] += data
        elif self.field == "name":
            self.clusters[-1][-1]["name"] += data
        elif self.field == "td":
            self.rejects[-1][-1] += data
        elif self.field == "title":
            self.title += data
        elif self.field == "label":
            self.plot[-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _plot(page: _Page, title: str) -> list[str]:
    return next(labels for t, labels in page.plots.items() if t.startswith(title))


def test_report_renders_cards_with_boxes_and_captions(chromium, tmp_path):
    out = tmp_path / "report"
    page = write_report(str(_dataset(tmp_path)), str(out), n_samples=10)
    first_thumb = (out / "thumbs" / "00000001.jpg").stat().st_mtime_ns
    write_report(str(tmp_path / "ds"), str(out), n_samples=10)
    assert (out / "thumbs" / "00000001.jpg").stat().st_mtime_ns == first_thumb  # thumbnails are made once
    assert max(Image.open(out / "thumbs" / "00000001.jpg").size) <= 480

    dom = _headless(chromium, "--dump-dom", f"file://{page}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = _parse(dom.stdout)
    cards = {c["key"]: c for c in shown.cards}
    assert sorted(cards) == sorted(SAMPLES)  # one card per sampled image
    for key, (_, boxes, caps, glob) in SAMPLES.items():
        card = cards[key]
        assert card["boxes"] == len(boxes)
        assert [c.split(" ", 1)[1] for c in card["captions"]] == caps  # "1 a red kite": numbered like its box
        assert card["global"] == (glob or "no global caption")
        assert card["source"] == f"{key}.jpg"  # the source file's name
        assert card["why"] == ("" if boxes else f"no boxes: {NO_BOXES[0]} ({NO_BOXES[1]})")  # from regions/status-*

    # Each duplicate cluster: the kept image beside the dropped ones, all with pictures.
    clusters = {c[0]["name"]: c for c in shown.clusters}
    assert sorted(clusters) == ["00000001.jpg", "00000002.jpg"]
    assert [(f["role"], f["name"], f["img"]) for f in clusters["00000001.jpg"]] == [
        ("kept", "00000001.jpg", "thumbs/00000001.jpg"), ("dropped", "00000001-copy.jpg", f"thumbs/{NEAR_UID}.jpg")]
    assert [(f["role"], f["name"]) for f in clusters["00000002.jpg"]] == [("kept", "00000002.jpg"), ("dropped", "00000002-again.jpg")]
    assert clusters["00000002.jpg"][1]["img"] == "thumbs/00000002.jpg"  # exact duplicate: the same picture
    assert max(Image.open(out / "thumbs" / f"{NEAR_UID}.jpg").size) <= 480  # the dropped one, from the ingest table

    # The rejects table: source, stage, reason, detail; capped, saying how many more.
    assert len(shown.rejects) == 1 + 200  # header + the rows shown
    assert shown.rejects[1] == ["/src/00000001-copy.jpg", "dedupe", "duplicate_near", _rejects()[0]["detail"]]
    assert f"{len(_rejects()) - 200} more rejects not shown" in dom.stdout

    # Plots: whole labels; seconds and throughput only for stages that did work.
    assert set(_plot(shown, "rejections by reason")) == {"duplicate_exact", "duplicate_near", "too_small"}
    assert _plot(shown, "seconds per stage") == ["ingest", "dedupe", "regions", "shard"]
    assert _plot(shown, "throughput per stage") == ["ingest", "dedupe", "regions", "shard"]  # not caption (0 computed)
    inputs = len(SAMPLES) + len(_rejects())
    assert all(f">{round(inputs / s, 1):g}</text>" in dom.stdout for s in (4.0, 8.0))  # ingest, regions: inputs / seconds
    for title in ("boxes per image", "caption length (words)", "duplicates found", "images without boxes"):
        assert title in dom.stdout
    assert "<table class=\"builds\">" in dom.stdout and "4 s (2/2)" in dom.stdout

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    done = _headless(chromium, "--window-size=1400,2400", f"--screenshot={shot}", f"file://{page}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    box_red = np.array([int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - box_red).sum(axis=1) < 40).sum() > 100  # the first box's outline is on screen


def test_report_without_run_directory_or_build_records(tmp_path):
    """The work dir gone: duplicates by name, no reason for missing boxes; an older dataset.json (no
    config, no builds, no rejects.parquet): seconds and throughput from timings.stage_seconds."""
    ds = _dataset(tmp_path, run=False)
    shown = _parse(Path(write_report(str(ds), str(tmp_path / "a"))).read_text())
    why = {c["key"]: c["why"] for c in shown.cards}["00000003"]
    assert why == "no boxes: the reason is not known (the run directory is not available)"
    assert [(f["role"], f["name"], f["img"]) for f in shown.clusters[0]] == [
        ("kept", "00000001.jpg", "thumbs/00000001.jpg"), ("dropped", "00000001-copy.jpg", None)]

    info = json.loads((ds / "dataset.json").read_text())
    for key in ("builds", "config", "statistics"):
        del info[key]
    (ds / "dataset.json").write_text(json.dumps(info))
    (ds / "rejects.parquet").unlink()
    text = Path(write_report(str(ds), str(tmp_path / "b"))).read_text()
    shown = _parse(text)
    assert shown.clusters == [] and "No rejects recorded." in text and "No build records" in text
    assert _plot(shown, "seconds per stage") == ["ingest", "dedupe", "regions", "shard"]
    assert _plot(shown, "throughput per stage") == ["ingest", "dedupe", "regions", "shard"]


MEASURE = """<script>addEventListener('load', () => {
  const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  const cards = [...document.querySelectorAll('article.card')].map(c => {
    const img = c.querySelector('img');
    return {key: c.id.slice(2), img: r(img), loaded: img.complete && img.naturalWidth > 0,
            boxes: [...c.querySelectorAll('rect.box')].map(r)};
  });
  const plots = [...document.querySelectorAll('figure.plot svg')].map(s => ({svg: r(s),
    labels: [...s.querySelectorAll('text.label')].map(t => [t.textContent, ...r(t)]),
    bars: [...s.querySelectorAll('rect.bar')].map(r)}));
  const pre = document.createElement('pre');
  pre.id = 'geometry';
  pre.textContent = JSON.stringify({cards, plots});
  document.body.appendChild(pre);
});</script>"""


def _measure(chromium: str, page: Path) -> dict:
    """Rendered geometry (CSS px) of the page's cards and plots, measured by a script injected into a copy."""
    probe = page.with_name("measure.html")
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = _headless(chromium, "--window-size=1400,3000", "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="geometry">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, dom.stdout[-2000:]
    return json.loads(html.unescape(found.group(1)))


def misplaced_boxes(geometry: dict, samples: dict, tolerance: float = 2.0) -> list[str]:
    """Boxes drawn more than `tolerance` px from where their coordinates put them on the rendered image."""
    bad = []
    for card in geometry["cards"]:
        (w, h), boxes = samples[card["key"]][0], samples[card["key"]][1]
        left, top, right, bottom = card["img"]
        sx, sy = (right - left) / w, (bottom - top) / h
        if not card["loaded"] or abs(sx - sy) * max(w, h) > tolerance:
            bad.append(f"{card['key']}: image not loaded or distorted: {card}")
        if len(card["boxes"]) != len(boxes):
            bad.append(f"{card['key']}: {len(card['boxes'])} boxes drawn, {len(boxes)} expected")
        for (x1, y1, x2, y2), got in zip(boxes, card["boxes"]):
            want = [left + x1 * sx, top + y1 * sy, left + x2 * sx, top + y2 * sy]
            if max(abs(a - b) for a, b in zip(got, want)) > tolerance:
                bad.append(f"{card['key']} box {[x1, y1, x2, y2]}: drawn at {[round(v, 1) for v in got]}, "
                           f"expected {[round(v, 1) for v in want]}")
    return bad


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def bad_labels(geometry: dict) -> list[str]:
    """Plot labels that leave their SVG (cut off) or overlap a bar or another label."""
    bad = []
    for plot in geometry["plots"]:
        sl, st, sr, sb = plot["svg"]
        labels = [(text, box) for text, *box in plot["labels"]]
        for i, (text, box) in enumerate(labels):
            if box[0] < sl - 0.5 or box[2] > sr + 0.5 or box[1] < st - 0.5 or box[3] > sb + 0.5:
                bad.append(f"{text!r} leaves its plot: {box} outside {plot['svg']}")
            if any(_overlap(box, bar) for bar in plot["bars"]) or any(_overlap(box, other) for _, other in labels[i + 1:]):
                bad.append(f"{text!r} overlaps a bar or a label")
    return bad


def test_boxes_sit_on_their_regions_and_labels_fit(chromium, tmp_path):
    """Wide (4000x1000), tall (1000x4000) and square images: each box within 2 px of its region on
    the rendered image; every plot label whole inside its plot, clear of bars and other labels."""
    ds = _dataset(tmp_path, GEOMETRY_SAMPLES, run=False)
    info = json.loads((ds / "dataset.json").read_text())
    del info["config"]  # not a build, a drawing test: PS3's crops of 4:1 images may well miss its corner boxes
    (ds / "dataset.json").write_text(json.dumps(info))
    page = Path(write_report(str(ds), str(tmp_path / "report")))
    geometry = _measure(chromium, page)
    assert sorted(c["key"] for c in geometry["cards"]) == sorted(GEOMETRY_SAMPLES)
    assert misplaced_boxes(geometry, GEOMETRY_SAMPLES) == []
    assert bad_labels(geometry) == []
    assert any(text == "duplicate_near" for p in geometry["plots"] for text, *_ in p["labels"])  # never "duplicate_"
    shot = ARTIFACTS / "report-geometry.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _headless(chromium, "--window-size=1400,2400", f"--screenshot={shot}", f"file://{page}")


STRETCHED = """<!doctype html><html><head><style>
.card{display:flex;gap:12px;padding:8px;height:420px}.frame{position:relative;flex:0 0 280px}.frame img{width:280px;display:block}
.overlay{position:absolute;left:0;top:0;width:100%;height:100%}</style></head><body>CARDS</body></html>"""


def test_box_check_fails_on_an_overlay_stretched_to_the_card(chromium, tmp_path):
    """The measurement above catches the old layout (SVG stretched to the card's height, not the image's)."""
    cards = []
    for key, ((w, h), boxes, *_) in GEOMETRY_SAMPLES.items():
        Image.new("RGB", (w // 10, h // 10), "gray").save(tmp_path / f"{key}.jpg")
        rects = "".join(f'<rect class="box" x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}"/>' for x1, y1, x2, y2 in boxes)
        cards.append(f'<article class="card" id="s-{key}"><div class="frame"><img src="{key}.jpg">'
                     f'<svg class="overlay" viewBox="0 0 {w} {h}" preserveAspectRatio="none">{rects}</svg></div></article>')
    page = tmp_path / "index.html"
    page.write_text(STRETCHED.replace("CARDS", "".join(cards)))
    bad = misplaced_boxes(_measure(chromium, page), GEOMETRY_SAMPLES)
    assert any(b.startswith("0000000a box") for b in bad) and any(b.startswith("0000000c box") for b in bad), bad


def test_report_serve_answers_over_http_on_localhost(tmp_path):
    """`localcap report --serve`: the report over HTTP on 127.0.0.1 (a file:// link opens nowhere)."""
    import signal
    import sys
    import urllib.request

    ds = _dataset(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "report", str(ds), "--out", str(tmp_path / "r"), "--serve", "--port", "0"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].split()[1]
        assert lines[0].startswith("report: ") and url.startswith("http://127.0.0.1:"), lines
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert page == (tmp_path / "r" / "index.html").read_text()
        thumb = url.replace("index.html", "thumbs/00000001.jpg")
        assert urllib.request.urlopen(thumb, timeout=10).read() == (tmp_path / "r" / "thumbs" / "00000001.jpg").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)  # SIGINT may be ignored here: under xdist the workers' children inherit that
        proc.wait(20)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
