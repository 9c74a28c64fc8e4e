"""`localcap report`: a static HTML page that shows a dataset to a person (no server, no JS).

A gallery of sampled images, each with its boxes drawn over it (SVG, in original-pixel coordinates,
so they scale with the thumbnail) and each box's caption beside it, numbered like its box; the
global caption; and plots (inline SVG) of boxes per image, box size relative to the image, caption
length, image resolution, rejection reasons, duplicates found and per-stage throughput.

Thumbnails are decoded at reduced size (`Image.draft`), made once (an existing one is kept) and
stored beside the page in `thumbs/`.
"""

from __future__ import annotations

import html
import io
import json
from collections import Counter

from PIL import Image

from pipeline.partitions import read_table
from pipeline.shards.loader import IMAGE_EXTS, read_tar_groups
from pipeline.storage import Storage, join
from pipeline.versions import DATASET, resolve

THUMB_SIDE = 480
COLORS = ["#ff2d55", "#00c7be", "#ffcc00", "#5856d6", "#34c759", "#ff9500", "#af52de", "#007aff"]
DUPLICATES = ("duplicate_exact", "duplicate_near", "duplicate_published")


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at 1/2..1/8 scale
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=80)
    return out.getvalue()


def read_text_boxes(storage: Storage, root: str, layout: str) -> list[tuple[str, dict]]:
    """(key, sample JSON) of every sample: the text_box tars (or combined tars' JSON) only."""
    folder = "text_box" if layout == "paired" else "combined"
    sizes = json.loads(storage.read_bytes(join(root, folder, "sizes.json")))
    out = []
    for tar in sorted(sizes):
        for key, group in read_tar_groups(storage, join(root, folder, tar)):
            out.append((key, json.loads(group["json"])))
    return out


def histogram_svg(title: str, values: list[float], bins: int = 12, unit: str = "") -> str:
    if not values:
        return bar_svg(title, {})
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = Counter(min(bins - 1, int((v - lo) / width)) for v in values)
    return bar_svg(title, {f"{lo + i * width:.3g}{unit}": counts.get(i, 0) for i in range(bins)})


def bar_svg(title: str, data: dict[str, float]) -> str:
    """A labelled bar chart as inline SVG."""
    w, h, pad = 420, 180, 28
    top = max(data.values(), default=0) or 1
    n = max(1, len(data))
    bw = (w - 2 * pad) / n
    bars = []
    for i, (label, value) in enumerate(data.items()):
        bh = (h - 2 * pad) * value / top
        x, y = pad + i * bw, h - pad - bh
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(1, bw - 2):.1f}" height="{bh:.1f}" fill="#007aff">'
                    f'<title>{html.escape(str(label))}: {value}</title></rect>'
                    f'<text x="{x + bw / 2:.1f}" y="{h - pad + 12}" font-size="9" text-anchor="middle">{html.escape(str(label))[:10]}</text>'
                    f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" font-size="9" text-anchor="middle">{value:g}</text>')
    body = "".join(bars) or f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="12">none</text>'
    return (f'<figure class="plot"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">{body}</svg></figure>')


def card_html(key: str, thumb: str, width: int, height: int, sample: dict) -> str:
    boxes = sample.get("box", [])
    overlay = "".join(
        f'<rect class="box" data-box="{i + 1}" x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}" fill="none" '
        f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="{max(width, height) / 250:.1f}"/>'
        f'<text x="{x1 + 4}" y="{y1 + max(width, height) / 40:.0f}" fill="{COLORS[i % len(COLORS)]}" '
        f'font-size="{max(width, height) / 40:.0f}" font-weight="bold">{i + 1}</text>'
        for i, (x1, y1, x2, y2) in enumerate(boxes))
    captions = "".join(f'<li class="caption" style="border-color:{COLORS[i % len(COLORS)]}"><b>{i + 1}</b> '
                       f'{html.escape(t) if t else "<i>(no caption)</i>"}</li>' for i, t in enumerate(sample.get("text", [])))
    global_text = sample.get("global_text")
    return (f'<article class="card" id="s-{key}"><div class="frame">'
            f'<img src="{thumb}" alt="sample {key}" loading="lazy">'
            f'<svg class="overlay" viewBox="0 0 {width} {height}" preserveAspectRatio="none">{overlay}</svg></div>'
            f'<div class="meta"><h3>{key} <small>{width}x{height}, {len(boxes)} boxes</small></h3>'
            f'<p class="global">{html.escape(global_text) if global_text else "<i>no global caption</i>"}</p>'
            f'<ol class="captions">{captions}</ol></div></article>')


CSS = """body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{margin:0;background:#fff;padding:8px;border:1px solid #ddd}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:16px}
.card{display:flex;gap:12px;background:#fff;border:1px solid #ddd;padding:8px}
.frame{position:relative;flex:0 0 280px}.frame img{width:280px;display:block}
.overlay{position:absolute;left:0;top:0;width:100%;height:100%}
.captions{padding-left:0;list-style:none}.caption{border-left:4px solid;padding-left:6px;margin:4px 0;font-size:13px}
.global{font-style:italic;font-size:13px}h3{margin:0;font-size:14px}small{color:#777;font-weight:normal}"""


def write_report(dataset_uri: str, out_dir: str, n_samples: int = 24, storage: Storage | None = None) -> str:
    """Render the report into out_dir (path or s3://); the page's URI."""
    storage = storage or Storage()
    root = resolve(storage, dataset_uri)
    info = json.loads(storage.read_bytes(join(root, DATASET)))
    layout = info["layout"]
    manifest = read_table(storage, join(root, "manifest.parquet")).to_pylist()
    texts = dict(read_text_boxes(storage, root, layout))

    step = max(1, len(manifest) // max(1, n_samples))
    picked = manifest[::step][:n_samples]
    by_shard: dict[str, list[dict]] = {}
    for row in picked:
        by_shard.setdefault(row["shard"], []).append(row)
    cards = {}
    for shard, rows in by_shard.items():
        thumbs = {r["key"]: join(out_dir, "thumbs", f"{r['key']}.jpg") for r in rows}
        todo = {k for k, uri in thumbs.items() if not storage.exists(uri)}  # made once
        if todo:
            for key, group in read_tar_groups(storage, join(root, shard)):
                if key in todo:
                    storage.write_bytes(thumbs[key], thumbnail(next(group[e] for e in IMAGE_EXTS if e in group)))
        for r in rows:
            cards[r["key"]] = card_html(r["key"], f"thumbs/{r['key']}.jpg", r["width"], r["height"], texts.get(r["key"], {}))

    boxes = [s.get("box", []) for s in texts.values()]
    size_of = {r["key"]: (r["width"], r["height"]) for r in manifest}
    rel = [round(((b[2] - b[0]) * (b[3] - b[1]) / (size_of[k][0] * size_of[k][1])) ** 0.5, 4)
           for k, s in texts.items() for b in s.get("box", [])]
    words = [len(t.split()) for s in texts.values() for t in s.get("text", []) if t]
    counts = info["counts"]
    seconds = info.get("timings", {}).get("stage_seconds", {})
    throughput = {stage: round(counts["inputs"] / s, 1) for stage, s in seconds.items() if s}
    plots = [
        bar_svg("boxes per image", dict(sorted(Counter(len(b) for b in boxes).items()))),
        histogram_svg("box side relative to the image (sqrt of area fraction)", rel),
        histogram_svg("caption length (words)", [float(w) for w in words]),
        histogram_svg("image resolution (megapixels)", [w * h / 1e6 for w, h in size_of.values()], unit=""),
        bar_svg("rejections by reason", counts.get("rejected_by_reason", {})),
        bar_svg("duplicates found", {k.removeprefix("duplicate_"): counts.get("rejected_by_reason", {}).get(k, 0) for k in DUPLICATES}),
        bar_svg("throughput per stage (inputs/s)", throughput),
    ]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(info["name"])} - localcap report</title>'
            f'<style>{CSS}</style></head><body><h1>{html.escape(info["name"])}</h1>'
            f'<p class="summary">{counts["samples"]} samples in {counts["shards"]} shards from {counts["inputs"]} inputs, '
            f'{counts["rejected"]} rejected; layout {layout}; built {info["created_at"]} (run {html.escape(info["run_id"])}); '
            f'{len(picked)} samples shown. Source: {html.escape(root)}</p>'
            f'<section class="plots">{"".join(plots)}</section><h2>Samples</h2>'
            f'<section class="gallery">{"".join(cards[r["key"]] for r in picked)}</section></body></html>')
    page_uri = join(out_dir, "index.html")
    storage.write_bytes(page_uri, page.encode())
    return page_uri

