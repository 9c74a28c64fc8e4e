"""`localcap report`: a static HTML page that shows a dataset to a person (no server, no JS).

Plots (inline SVG) of boxes per image, box size relative to the image, caption length, image
resolution, rejection reasons, duplicates found, seconds and throughput per stage; the builds that
made the dataset; a gallery of sampled images, each with its source file name, its boxes drawn over
it and each box's caption beside it, numbered like its box (or why it has no boxes); every
near-duplicate cluster with the kept and the dropped images side by side; and the rejects table.

A card's picture sits in a box of fixed size (the image's aspect ratio, computed here) that the
thumbnail fills; the SVG overlay fills the same box with viewBox = the original pixel size, so a box
is drawn exactly over its region at any size.

The run directory (WORK/RUN_ID, named by dataset.json's config) adds why images have no boxes
(regions/status-*) and the dropped duplicates' pictures (ingest/part-*); without it the report
still renders, with names only. Thumbnails are decoded at reduced size (`Image.draft`), made once
(an existing one is kept) and stored beside the page in `thumbs/`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.partitions import read_table, read_tables
from pipeline.dataset_format import IMAGE_EXTS, REPORT_PAGE, SIZES
from pipeline.shards.reader import read_tar_groups
from pipeline.storage import Storage, is_s3, join
from pipeline.versions import DATASET, resolve, shard_root
from schemas.tables import REGION_STATUS, REJECTS

THUMB_SIDE = 480
FRAME = (380, 300)  # the largest a card's picture is on the page (CSS px)
REJECTS_SHOWN = 200
CLUSTERS_SHOWN = 24
COLORS = ["#ff2d55", "#00c7be", "#ffcc00", "#5856d6", "#34c759", "#ff9500", "#af52de", "#007aff"]
DUPLICATES = ("duplicate_exact", "duplicate_near", "duplicate_published")
CLUSTERED = ("duplicate_exact", "duplicate_near")  # the kept image is in this run (published ones are not)
NEAR_OF = re.compile(r"near duplicate of ([0-9a-f]+)")
KEPT_SOURCE = re.compile(r"(?:kept: |same bytes as )(.+)$")
CHAR_EM = 0.62  # generous mean glyph width of the page's sans-serif font, in em: label columns are sized by it


def esc(value) -> str:
    return html.escape(str(value))


def file_name(source: str) -> str:
    """The last path segment of a source URI (the whole URI when it has none)."""
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at 1/2..1/8 scale
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=80)
    return out.getvalue()


def read_text_boxes(storage: Storage, root: str, layout: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(key, sample JSON) of every sample (or the first `limit`): the text_box tars (or combined
    tars' JSON) only, read no further than needed."""
    folder = "text_box" if layout == "paired" else "combined"
    sizes = json.loads(storage.read_bytes(join(root, folder, SIZES)))
    tars_at = shard_root(storage, root)  # a published snapshot's tars are in NAME/shards/
    out = []
    for tar in sorted(sizes):
        for key, group in read_tar_groups(storage, join(tars_at, folder, tar)):
            if limit is not None and len(out) >= limit:
                return out
            out.append((key, json.loads(group["json"])))
    return out


# -- plots -------------------------------------------------------------------------------------

def _figure(title: str, w: float, h: float, body: str) -> str:
    body = body or f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="12">none</text>'
    return (f'<figure class="plot"><figcaption>{esc(title)}</figcaption>'
            f'<svg viewBox="0 0 {w:.0f} {h:.0f}" width="{w:.0f}" height="{h:.0f}" role="img" aria-label="{esc(title)}">'
            f'{body}</svg></figure>')


def bar_svg(title: str, data: dict[str, float]) -> str:
    """Horizontal bars, one row per label; the label column is as wide as the longest label."""
    font, row, bar_w = 11, 18, 240
    label_w = 10 + CHAR_EM * font * max((len(str(k)) for k in data), default=4)
    value_w = 10 + CHAR_EM * font * max((len(f"{v:g}") for v in data.values()), default=1)
    top = max(data.values(), default=0) or 1
    bars = []
    for i, (label, value) in enumerate(data.items()):
        y, bw = 4 + i * row, bar_w * value / top
        bars.append(f'<text class="label" x="{label_w - 6:.1f}" y="{y + 13}" font-size="{font}" text-anchor="end">{esc(label)}</text>'
                    f'<rect class="bar" x="{label_w:.1f}" y="{y + 2}" width="{bw:.1f}" height="{row - 4}" fill="#007aff">'
                    f'<title>{esc(label)}: {value:g}</title></rect>'
                    f'<text x="{label_w + bw + 4:.1f}" y="{y + 13}" font-size="{font}">{value:g}</text>')
    return _figure(title, label_w + bar_w + value_w, 8 + row * max(1, len(data)), "".join(bars))


def column_svg(title: str, data: dict[str, float]) -> str:
    """Vertical columns (histograms); labels are never cut: when they would collide, only every k-th shows."""
    w, h, pad, font = 420, 180, 28, 9
    top = max(data.values(), default=0) or 1
    bw = (w - 2 * pad) / max(1, len(data))
    every = max(1, math.ceil((CHAR_EM * font * max((len(str(k)) for k in data), default=1) + 4) / bw))
    cols = []
    for i, (label, value) in enumerate(data.items()):
        bh = (h - 2 * pad) * value / top
        x, y = pad + i * bw, h - pad - bh
        cols.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(1, bw - 2):.1f}" height="{bh:.1f}" fill="#007aff">'
                    f'<title>{esc(label)}: {value:g}</title></rect>'
                    f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" font-size="{font}" text-anchor="middle">{value:g}</text>')
        if i % every == 0:
            cols.append(f'<text class="label" x="{x + bw / 2:.1f}" y="{h - pad + 12}" font-size="{font}" '
                        f'text-anchor="middle">{esc(label)}</text>')
    return _figure(title, w, h, "".join(cols))


def histogram_svg(title: str, values: list[float], bins: int = 12) -> str:
    if not values:
        return column_svg(title, {})
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = Counter(min(bins - 1, int((v - lo) / width)) for v in values)
    return column_svg(title, {f"{lo + i * width:.3g}": counts.get(i, 0) for i in range(bins)})


# -- build records -----------------------------------------------------------------------------

def _computed_stages(info: dict):
    """(stage, share of its partitions computed, seconds) of every build's stage that did work."""
    for build in info.get("builds") or []:
        for st in build.get("stages", []):
            if st.get("computed") and st.get("seconds") and st.get("partitions"):
                yield st["stage"], st["computed"] / st["partitions"], st["seconds"]


def stage_seconds(info: dict) -> dict[str, float]:
    """Seconds each stage cost over every attempt of the build (dataset.json's timings), else summed
    over the build records that computed part of it."""
    recorded = {k: v for k, v in info.get("timings", {}).get("stage_seconds", {}).items() if v}
    if recorded:
        return recorded
    out: dict[str, float] = {}
    for stage, _, seconds in _computed_stages(info):
        out[stage] = round(out.get(stage, 0.0) + seconds, 3)
    return out


def build_counts(info: dict) -> dict:
    """The newest build's counts (inputs, rejects): a published snapshot keeps them under `build`,
    its own `counts` being the whole dataset's."""
    build = info.get("build")
    return build["counts"] if isinstance(build, dict) and isinstance(build.get("counts"), dict) else info["counts"]


def stage_throughput(info: dict) -> dict[str, float]:
    """Inputs per second of each stage over the builds that computed it (a build that computed a
    share of a stage's partitions handled that share of the inputs); stages that did no work have none."""
    n = build_counts(info).get("inputs", 0)
    done: dict[str, list[float]] = {}
    for stage, share, seconds in _computed_stages(info):
        acc = done.setdefault(stage, [0.0, 0.0])
        acc[0] += n * share
        acc[1] += seconds
    if not done:
        done = {stage: [n, s] for stage, s in stage_seconds(info).items()}
    return {stage: round(x / s, 1) for stage, (x, s) in done.items()}


def builds_html(info: dict, shown: int = 20) -> str:
    """One row per build: when, and per stage its seconds and partitions computed of all."""
    builds = (info.get("builds") or [])[-shown:]
    if not builds:
        return "<p>No build records in dataset.json.</p>"
    stages = list(dict.fromkeys(st["stage"] for b in builds for st in b.get("stages", [])))
    head = "".join(f"<th>{esc(s)}</th>" for s in stages)
    rows = []
    for b in builds:
        by = {st["stage"]: st for st in b.get("stages", [])}
        cells = "".join(f'<td>{by[s].get("seconds", 0):g} s ({by[s].get("computed", 0)}/{by[s].get("partitions", 0)})</td>'
                        if s in by else "<td></td>" for s in stages)
        rows.append(f'<tr><td>{esc(b.get("run_id"))}</td><td>{esc(b.get("finished_at"))}</td>{cells}</tr>')
    return (f'<table class="builds"><tr><th>run</th><th>finished</th>{head}</tr>{"".join(rows)}</table>'
            '<p class="note">per stage: seconds (partitions computed / partitions)</p>')


# -- the run directory -------------------------------------------------------------------------

def run_directory(storage: Storage, info: dict) -> tuple[str | None, str]:
    """(WORK/RUN_ID, or None when dataset.json names none or it cannot be read; a note for the page)."""
    work = ((info.get("config") or {}).get("run") or {}).get("work_dir")
    without = ": no reasons for missing boxes, duplicates by name only."
    if not work or not info.get("run_id"):
        return None, "The run directory is unknown (dataset.json names no config.run.work_dir)" + without
    run_dir = join(work, info["run_id"])
    try:
        found = bool(storage.list_dirs(run_dir))
    except Exception as exc:  # noqa: BLE001 - the run directory is optional; say why it is not used
        return None, f"Run directory {run_dir} not readable ({exc})" + without
    if not found:
        return None, f"Run directory {run_dir} not found" + without
    return run_dir, f"Run directory: {run_dir}"


def read_rejects(storage: Storage, root: str, run_dir: str | None) -> pa.Table:
    """The dataset's rejects.parquet; for older datasets the run directory's per-stage rejects tables."""
    columns = ["source_uri", "uid", "stage", "reason", "detail"]
    if storage.exists(join(root, "rejects.parquet")):
        return read_table(storage, join(root, "rejects.parquet"), columns)
    folders = storage.list_dirs(run_dir) if run_dir else []
    tables = [read_tables(storage, join(run_dir, d), "rejects", REJECTS, columns) for d in folders]
    return pa.concat_tables([t for t in tables if t.num_rows] or [REJECTS.empty_table().select(columns)], promote_options="default")


def region_status(storage: Storage, run_dir: str | None) -> dict[str, dict]:
    """uid -> its regions-stage status row (boxes kept, reason, detail)."""
    if run_dir is None:
        return {}
    table = read_tables(storage, join(run_dir, "regions"), "status", REGION_STATUS, ["uid", "boxes", "reason", "detail"])
    return {r["uid"]: r for r in table.to_pylist()}


def why_no_boxes(status: dict | None, run_dir: str | None) -> str:
    """Why a sample has no boxes, from its regions-stage status row."""
    if status is None:
        why = "no region status for this image" if run_dir else "the run directory is not available"
        return f"no boxes: the reason is not known ({why})"
    if status["reason"]:
        return f'no boxes: {status["reason"]}' + (f' ({status["detail"]})' if status["detail"] else "")
    return f'no boxes: the regions stage kept {status["boxes"]}, but no caption of them was accepted'


# -- thumbnails --------------------------------------------------------------------------------

def sample_thumbs(storage: Storage, root: str, out_dir: str, rows: list[dict]) -> None:
    """thumbs/KEY.jpg of these manifest rows, read from their image tars (made once)."""
    todo: dict[str, dict[str, str]] = {}
    for r in rows:
        uri = join(out_dir, "thumbs", f"{r['key']}.jpg")
        if not storage.exists(uri):
            todo.setdefault(r["shard"], {})[r["key"]] = uri
    tars_at = shard_root(storage, root)
    for shard, wanted in todo.items():
        for key, group in read_tar_groups(storage, join(tars_at, shard)):
            if key in wanted:
                storage.write_bytes(wanted[key], thumbnail(next(group[e] for e in IMAGE_EXTS if e in group)))


def ingest_thumbs(storage: Storage, out_dir: str, run_dir: str | None, uids: set[str]) -> set[str]:
    """thumbs/UID.jpg of images in the run's ingest tables (made once); the uids that have one."""
    have = {u for u in uids if storage.exists(join(out_dir, "thumbs", f"{u}.jpg"))}
    missing = uids - have
    folder = join(run_dir, "ingest") if run_dir else None
    for name in storage.list_prefix(folder) if folder and missing else []:
        if not (name.startswith("part-") and name.endswith(".parquet")):
            continue
        uri = join(folder, name)
        source = storage.open_read(uri, seekable=True) if is_s3(uri) else uri
        table = pq.read_table(source, columns=["uid", "image"], filters=[("uid", "in", sorted(missing))])
        for uid, data in zip(table["uid"].to_pylist(), table["image"].to_pylist()):
            if uid in missing:
                storage.write_bytes(join(out_dir, "thumbs", f"{uid}.jpg"), thumbnail(data))
                missing.discard(uid)
                have.add(uid)
        if not missing:
            break
    return have


THUMB_SRC = re.compile(r'src="(thumbs/[0-9a-zA-Z_-]+\.jpg)"')


def self_contained(page: str, read: Callable[[str], bytes]) -> str:
    """The page with its thumbnails inlined as data: URIs (`read(relative path)` gives their bytes):
    one file that opens from any single URL, a presigned S3 link included (a presigned page's
    relative thumbs/ links would not be signed)."""
    def inline(m: re.Match) -> str:
        return f'src="data:image/jpeg;base64,{base64.b64encode(read(m.group(1))).decode()}"'

    return THUMB_SRC.sub(inline, page)


def publish_report(storage: Storage, page_uri: str, version_uri: str) -> str:
    """The build's report (index.html + thumbs/ in the run directory) as one self-contained page
    beside a published version, NAME/vN/report.html; its URI."""
    folder = page_uri.rsplit("/", 1)[0]
    page = self_contained(storage.read_bytes(page_uri).decode(), lambda rel: storage.read_bytes(join(folder, rel)))
    target = join(version_uri, REPORT_PAGE)
    storage.write_bytes(target, page.encode())
    return target


# -- page parts --------------------------------------------------------------------------------

def frame_size(width: int, height: int, bound: tuple[int, int] = FRAME) -> tuple[int, int]:
    """CSS size of a card's picture: the image's aspect ratio, as large as fits in `bound`."""
    scale = min(bound[0] / width, bound[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def card_html(key: str, thumb: str, width: int, height: int, sample: dict, source: str = "", no_boxes: str = "") -> str:
    """One sample: its picture with the boxes over it, source name, global caption, box captions."""
    boxes = sample.get("box", [])
    font = max(width, height) / 30
    overlay = "".join(
        f'<rect class="box" data-box="{i + 1}" x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}" fill="none" '
        f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="2" vector-effect="non-scaling-stroke"/>'
        f'<text x="{x1 + font / 4:.0f}" y="{y1 + font:.0f}" fill="{COLORS[i % len(COLORS)]}" '
        f'font-size="{font:.0f}" font-weight="bold" stroke="#000" stroke-width="{font / 10:.1f}" paint-order="stroke">{i + 1}</text>'
        for i, (x1, y1, x2, y2) in enumerate(boxes))
    captions = "".join(f'<li class="caption" style="border-color:{COLORS[i % len(COLORS)]}"><b>{i + 1}</b> '
                       f'{esc(t) if t else "<i>(no caption)</i>"}</li>' for i, t in enumerate(sample.get("text", [])))
    global_text = sample.get("global_text")
    fw, fh = frame_size(width, height)
    return (f'<article class="card" id="s-{key}"><div class="frame" style="width:{fw}px;height:{fh}px">'
            f'<img src="{thumb}" alt="sample {key}" width="{fw}" height="{fh}" loading="lazy">'
            f'<svg class="overlay" viewBox="0 0 {width} {height}" preserveAspectRatio="none">{overlay}</svg></div>'
            f'<div class="meta"><h3>{key} <small>{width}x{height}, {len(boxes)} boxes</small></h3>'
            f'<p class="source" title="{esc(source)}">{esc(file_name(source))}</p>'
            f'<p class="global">{esc(global_text) if global_text else "<i>no global caption</i>"}</p>'
            f'<ol class="captions">{captions}</ol>'
            + (f'<p class="why">{esc(no_boxes)}</p>' if not boxes and no_boxes else "") + '</div></article>')


def _picture(thumb: str | None, role: str, source: str, note: str = "") -> str:
    img = f'<img src="{thumb}" alt="{role}" loading="lazy">' if thumb else '<div class="noimg">no picture</div>'
    note = f'<br><small>{esc(note)}</small>' if note else ""
    return (f'<figure class="{role}">{img}<figcaption><b>{role}</b> '
            f'<span title="{esc(source)}">{esc(file_name(source))}</span>{note}</figcaption></figure>')


def duplicate_clusters(rejects: list[dict]) -> dict[str, list[dict]]:
    """kept uid -> the rejects that duplicate it (exact duplicates share its uid; near ones name it)."""
    out: dict[str, list[dict]] = {}
    for r in rejects:
        near = NEAR_OF.match(r["detail"] or "")
        kept = r["uid"] if r["reason"] == "duplicate_exact" else near.group(1) if near else None
        if kept:
            out.setdefault(kept, []).append(r)
    return out


def rejects_html(rejects: pa.Table) -> str:
    """The first REJECTS_SHOWN rejects (source, stage, reason, detail) and how many more there are."""
    if not rejects.num_rows:
        return "<p>No rejects recorded.</p>"
    rows = "".join(f'<tr><td>{esc(r["source_uri"])}</td><td>{esc(r["stage"])}</td><td>{esc(r["reason"])}</td>'
                   f'<td>{esc(r["detail"] or "")}</td></tr>' for r in rejects.slice(0, REJECTS_SHOWN).to_pylist())
    more = rejects.num_rows - min(REJECTS_SHOWN, rejects.num_rows)
    return (f'<table class="rejects"><tr><th>source</th><th>stage</th><th>reason</th><th>detail</th></tr>{rows}</table>'
            + (f'<p class="more">{more} more rejects not shown.</p>' if more else ""))


CSS = """body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.plot{margin:0;background:#fff;padding:8px;border:1px solid #ddd}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:16px}
.card{display:flex;gap:12px;background:#fff;border:1px solid #ddd;padding:8px}
.frame{position:relative;flex:none;align-self:flex-start}.frame img{display:block;width:100%;height:100%}
.overlay{position:absolute;inset:0;width:100%;height:100%}
.captions{padding-left:0;list-style:none}.caption{border-left:4px solid;padding-left:6px;margin:4px 0;font-size:13px}
.global{font-style:italic;font-size:13px}.source,.why{font-size:12px;color:#555;margin:4px 0;overflow-wrap:anywhere}.why{color:#b00}
.meta{min-width:0}h3{margin:0;font-size:14px;overflow-wrap:anywhere}
.box{filter:drop-shadow(0 0 1px #000) drop-shadow(0 0 1px #000)}small{color:#777;font-weight:normal}
.cluster{display:flex;flex-wrap:wrap;gap:8px;background:#fff;border:1px solid #ddd;padding:8px;margin-bottom:12px}
.cluster figure{margin:0;max-width:180px;font-size:12px;overflow-wrap:anywhere}.cluster img{max-width:180px;max-height:180px;display:block}
.cluster .kept img{outline:3px solid #34c759}.cluster .dropped img{outline:3px solid #ff2d55;opacity:.85}
.noimg{width:120px;height:80px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
table{border-collapse:collapse;background:#fff;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
.rejects td{overflow-wrap:anywhere;max-width:520px}.note,.more{font-size:12px;color:#555}"""


def write_report(dataset_uri: str, out_dir: str, n_samples: int = 24, storage: Storage | None = None) -> str:
    """Render the report into out_dir (path or s3://); the page's URI."""
    storage = storage or Storage()
    root = resolve(storage, dataset_uri)
    info = json.loads(storage.read_bytes(join(root, DATASET)))
    layout = info["layout"]
    manifest = read_table(storage, join(root, "manifest.parquet")).to_pylist()
    texts = dict(read_text_boxes(storage, root, layout))
    run_dir, run_note = run_directory(storage, info)
    status = region_status(storage, run_dir)
    rejects = read_rejects(storage, root, run_dir)
    by_uid = {r["uid"]: r for r in manifest}

    step = max(1, len(manifest) // max(1, n_samples))
    picked = manifest[::step][:n_samples]
    dups = rejects.filter(pc.is_in(rejects["reason"], value_set=pa.array(CLUSTERED)))
    clusters = duplicate_clusters(dups.to_pylist())
    shown = dict(list(clusters.items())[:CLUSTERS_SHOWN])
    sample_thumbs(storage, root, out_dir, picked + [by_uid[u] for u in shown if u in by_uid])
    uids = {u for kept, dropped in shown.items() for u in [kept, *(r["uid"] for r in dropped)] if u and u not in by_uid}
    from_ingest = ingest_thumbs(storage, out_dir, run_dir, uids)

    cards = "".join(card_html(r["key"], f"thumbs/{r['key']}.jpg", r["width"], r["height"], texts.get(r["key"], {}),
                              r["source"], why_no_boxes(status.get(r["uid"]), run_dir)) for r in picked)

    def thumb(uid: str) -> str | None:
        return f"thumbs/{by_uid[uid]['key']}.jpg" if uid in by_uid else f"thumbs/{uid}.jpg" if uid in from_ingest else None

    groups = []
    for kept, dropped in shown.items():
        kept_source = by_uid[kept]["source"] if kept in by_uid else next(
            (m.group(1) for r in dropped if (m := KEPT_SOURCE.search(r["detail"] or ""))), kept)
        groups.append('<div class="cluster">' + _picture(thumb(kept), "kept", kept_source)
                      + "".join(_picture(thumb(r["uid"]), "dropped", r["source_uri"], r["reason"]) for r in dropped) + "</div>")
    more = len(clusters) - len(shown)
    clusters_html = (("".join(groups) or "<p>No duplicate clusters.</p>")
                     + (f'<p class="more">{more} more clusters not shown.</p>' if more else ""))

    boxes = [s.get("box", []) for s in texts.values()]
    size_of = {r["key"]: (r["width"], r["height"]) for r in manifest}
    rel = [round(((b[2] - b[0]) * (b[3] - b[1]) / (size_of[k][0] * size_of[k][1])) ** 0.5, 4)
           for k, s in texts.items() for b in s.get("box", [])]
    words = [len(t.split()) for s in texts.values() for t in s.get("text", []) if t]
    counts, built = info["counts"], build_counts(info)
    by_reason = built.get("rejected_by_reason", {})
    whole = (f' (the whole dataset: +{counts.get("added", "?")} -{counts.get("removed", "?")} since '
             f'{esc(info.get("parent") or "nothing")}; the newest build\'s {built.get("inputs", "?")} inputs, {built.get("rejected", "?")} rejected)'
             if built is not counts else f' from {counts["inputs"]} inputs, {counts["rejected"]} rejected')
    plots = [
        column_svg("boxes per image", {str(k): v for k, v in sorted(Counter(len(b) for b in boxes).items())}),
        histogram_svg("box side relative to the image (sqrt of area fraction)", rel),
        histogram_svg("caption length (words)", [float(w) for w in words]),
        histogram_svg("image resolution (megapixels)", [w * h / 1e6 for w, h in size_of.values()]),
        bar_svg("rejections by reason", by_reason),
        bar_svg("images without boxes, by reason", info.get("statistics", {}).get("no_boxes_by_reason", {})),
        bar_svg("duplicates found", {k: by_reason.get(k, 0) for k in DUPLICATES}),
        bar_svg("duplicates dropped, by how they matched", info.get("statistics", {}).get("duplicates_by_match", {})),
        column_svg("box long side / image short side", info.get("statistics", {}).get("box_side_fraction_by_size", {})),
        bar_svg("seconds per stage", stage_seconds(info)),
        bar_svg("throughput per stage (inputs/s, over the builds that computed it)", stage_throughput(info)),
    ]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(info["name"])} - localcap report</title>'
            f'<style>{CSS}</style></head><body><h1>{esc(info["name"])}</h1>'
            f'<p class="summary">{counts["samples"]} samples in {counts["shards"]} shards{whole}; layout {layout}; built {esc(info["created_at"])} (run {esc(info["run_id"])}); '
            f'{len(picked)} samples shown. Source: {esc(root)}</p><p class="note">{esc(run_note)}</p>'
            f'<section class="plots">{"".join(plots)}</section><h2>Builds</h2>{builds_html(info)}'
            f'<h2>Samples</h2><section class="gallery">{cards}</section>'
            f'<h2>Duplicate clusters</h2><section class="clusters">{clusters_html}</section>'
            f'<h2>Rejects</h2><section>{rejects_html(rejects)}</section></body></html>')
    page_uri = join(out_dir, "index.html")
    storage.write_bytes(page_uri, page.encode())
    return page_uri
