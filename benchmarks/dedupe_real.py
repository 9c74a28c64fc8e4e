"""Near-duplicate detection on real pictures: precision and recall of duplicate pairs.

The set is a few dozen desktop wallpapers (photos, renders, patterns) in which some are the same
picture: the `sway-*` files (sizes and portrait crops of one picture), the gnome43 light/dark pairs,
gnome338's adwaita day / morning / night, and two byte-identical lomiri files. Everything else is a
distinct picture. Derived from a few distinct pictures: crops (a third and a half of the area, at
several positions) and resizes / re-encodes. Every image goes through the real ingest code
(pipeline.ingest.decode.decode_validate, hashes from the <= 256 px thumbnail) and the real clustering
(dedupe.clusters.dedupe_images); a predicted pair is two images in one cluster.

    python benchmarks/dedupe_real.py [--cache DIR]      # the set: benchmarks/real_photos (fetched on first use)

Each half of the set (packages[].split) is one run; the BENCH lines give the validation half, the
tuning half's figure beside each in brackets. Last lines, machine-readable:
    BENCH dup_pair_precision=...
    BENCH dup_pair_recall=...
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "real_photos"))

import fetch as real_photos  # noqa: E402

from dedupe import clusters  # noqa: E402
from dedupe.hashing import fine_distance  # noqa: E402
from pipeline.ingest.decode import decode_validate  # noqa: E402
from schemas.config import DedupeSection, IngestSection  # noqa: E402
from schemas.tables import IMAGES, rows_to_table  # noqa: E402


# Derived images: (picture id, kind, parameters). Crops keep `area` of the picture at (fx, fy) (the
# crop's top-left as a fraction of the free room), `aspect` > 1 making it wider than the picture.
DERIVED = [
    ("gnome338-road", "crop", {"area": 1 / 3, "at": (0.0, 0.0)}),
    ("gnome338-road", "crop", {"area": 1 / 3, "at": (0.5, 0.5)}),
    ("gnome338-road", "crop", {"area": 1 / 2, "at": (1.0, 1.0)}),
    ("ukui-goldfish", "crop", {"area": 1 / 3, "at": (0.2, 0.8)}),
    ("ukui-the-mouse", "crop", {"area": 1 / 3, "at": (0.7, 0.3)}),
    ("ukui-desert", "crop", {"area": 1 / 3, "at": (1.0, 0.0)}),
    ("gnome338-seasunset", "crop", {"area": 1 / 2, "at": (0.3, 0.6)}),
    ("ukui-calla", "crop", {"area": 1 / 3, "at": (0.5, 0.5), "aspect": 0.6}),
    ("ukui-city", "crop", {"area": 1 / 3, "at": (0.5, 0.2)}),
    ("gnome43-pixels-l", "crop", {"area": 1 / 3, "at": (0.1, 0.9)}),
    ("gnome338-icetwigs", "crop", {"area": 1 / 2, "at": (0.0, 1.0), "aspect": 1.5}),
    ("gnome338-road", "resize", {"scale": 0.3, "quality": 70}),
    ("ukui-goldfish", "resize", {"scale": 0.5, "quality": 85}),
    ("gnome338-dark_ivy", "resize", {"scale": 0.25, "quality": 60}),
    ("ukui-rhythm", "resize", {"scale": 1.0, "quality": 50}),
    # full-height thirds at the same pixel scale (a portrait cut of a landscape picture), both halves
    ("gnome338-road", "crop", {"area": 1 / 3, "aspect": 1 / 3, "at": (0.0, 0.0)}),
    ("ukui-city", "crop", {"area": 1 / 3, "aspect": 1 / 3, "at": (1.0, 0.0)}),
    ("budgie-roman-colosseum", "crop", {"area": 1 / 3, "aspect": 1 / 3, "at": (0.0, 0.0)}),
    ("budgie-singaporean-cityscape", "crop", {"area": 1 / 3, "aspect": 1 / 3, "at": (0.5, 0.0)}),
    ("lomiri1604-wine-by-jakkub-mede", "crop", {"area": 1 / 3, "aspect": 3.0, "at": (0.0, 1.0)}),
    ("wesnoth-landscape-castle", "crop", {"area": 1 / 3, "aspect": 1 / 3, "at": (1.0, 0.0)}),
    ("budgie-perched-osprey", "resize", {"scale": 0.5, "quality": 80}),
    ("lomiri1604-friends-by-aitzol-berasategi", "resize", {"scale": 0.4, "quality": 75}),
]


def load_set(cache: Path | None = None) -> tuple[list[tuple[str, bytes]], dict[str, str], dict[str, str], dict[str, str]]:
    """(picture id, original bytes) of every picture of the set, fetched into the cache when missing
    (benchmarks/real_photos/fetch.py), with each picture's duplicate group and each group's kind."""
    spec = real_photos.load_set()
    root = real_photos.fetch(cache, quiet=True)
    pictures = [(p["id"], real_photos.picture_path(root, p).read_bytes()) for p in spec["pictures"]]
    landscape = {p["id"]: p["width"] >= p["height"] for p in spec["pictures"]}
    group, kind = {}, {}
    for i, g in enumerate(spec["duplicate_groups"]):
        for member in g["members"]:
            group[member] = f"group{i}"
        kind[f"group{i}"] = g["kind"]
    aspect = {p["id"]: p["width"] / p["height"] for p in spec["pictures"]}
    for pid, a in aspect.items():  # files of one picture in another shape are crops of it
        kind[pid] = a
    split = real_photos.package_split(spec)
    half = {p["id"]: split[p["package"]] for p in spec["pictures"]}
    return pictures, group, kind, half


def group_of(pid: str, groups: dict[str, str]) -> str:
    """The picture a file shows (files of one group are duplicates of each other)."""
    pid = pid.split("~")[0]  # derived images: "<picture id>~<how>"
    return groups.get(pid, pid)


def pair_kind(a: str, b: str, groups: dict[str, str], kinds: dict[str, str]) -> str:
    if "~" in a or "~" in b:
        return "derived crop" if "~crop" in a or "~crop" in b else "derived size"
    kind = kinds.get(group_of(a, groups), "other")
    if kind == "size and crop":
        return "size" if abs(kinds[a] / kinds[b] - 1) < 0.03 else "crop"
    return kind


def derive(pid: str, data: bytes, kind: str, params: dict) -> tuple[str, bytes]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if kind == "crop":
        side, aspect = params["area"] ** 0.5, params.get("aspect", 1.0)
        cw, ch = min(w, int(w * side * aspect ** 0.5)), min(h, int(h * side / aspect ** 0.5))
        x0, y0 = int((w - cw) * params["at"][0]), int((h - ch) * params["at"][1])
        out = img.crop((x0, y0, x0 + cw, y0 + ch))
        name = f"{pid}~crop{params['area']:.2f}@{params['at'][0]},{params['at'][1]}"
        quality = 90
    else:
        s = params["scale"]
        out = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS) if s != 1.0 else img
        name = f"{pid}~resize{s}q{params['quality']}"
        quality = params["quality"]
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return name, buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="picture cache (default: $LOCALCAP_REAL_PHOTOS or ~/.cache/localcap/real-photos)")
    args = ap.parse_args()

    originals, groups, kinds, half = load_set(args.cache)
    by_id = dict(originals)
    figures = {}
    for which in ("tuning", "validation"):  # each half is its own run: no pair crosses halves
        own = [(pid, data) for pid, data in originals if half[pid] == which]
        items = own + [derive(pid, by_id[pid], kind, params) for pid, kind, params in DERIVED if pid in by_id and half[pid] == which]
        print(f"== {which} half")
        figures[which] = evaluate(items, len(own), groups, kinds)
    for name, key in (("dup_pair_precision", 0), ("dup_pair_recall", 1)):
        print(f"BENCH {name}={figures['validation'][key]:.4f}   (tuning half: {figures['tuning'][key]:.4f})")


def evaluate(items: list[tuple[str, bytes]], n_originals: int, groups: dict, kinds: dict) -> tuple[float, float]:
    """(pair precision, pair recall) of one run of the real ingest and clustering over `items`."""
    # Small sizes (sway 768x1024, the resizes) are part of the set: min_side is lowered for them.
    limits = IngestSection(min_side=256, max_pixels=max(IngestSection().max_pixels, 10240 * 4320))
    start = time.perf_counter()
    rows, names = [], []
    for name, data in items:
        row = decode_validate(data, f"mem://{name}", limits)
        if not isinstance(row, dict):
            print(f"rejected by ingest: {name}: {row}")
            continue
        rows.append(row)
        names.append(name)
    ingest_s = time.perf_counter() - start
    images = rows_to_table(rows, IMAGES)
    cfg = DedupeSection()
    start = time.perf_counter()
    table, _ = clusters.dedupe_images(images, None, cfg.exact, cfg.near, cfg.radius, cfg.fine_threshold)
    dedupe_s = time.perf_counter() - start
    cluster = dict(zip(table["uid"].to_pylist(), table["cluster"].to_pylist()))
    uids = images["uid"].to_pylist()

    by_kind: dict[str, list[int]] = {}  # kind -> [found, total]
    tp = fp = 0
    false_pairs = []
    for i, j in itertools.combinations(range(len(names)), 2):
        same = group_of(names[i], groups) == group_of(names[j], groups)
        merged = cluster[uids[i]] == cluster[uids[j]]
        if same:
            counts = by_kind.setdefault(pair_kind(names[i], names[j], groups, kinds), [0, 0])
            counts[0] += merged
            counts[1] += 1
            tp += merged
        elif merged:
            fp += 1
            false_pairs.append((names[i], names[j]))
    positives = sum(t for _, t in by_kind.values())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else 1.0

    print(f"{len(names)} images ({n_originals} pictures, {len(names) - n_originals} derived), "
          f"ingest {ingest_s:.1f} s, dedupe {dedupe_s:.2f} s")
    for kind in sorted(by_kind):
        found, total = by_kind[kind]
        print(f"  {kind:13s} recall {found / total:.3f} ({found}/{total} pairs)")
    missed = [(names[i], names[j]) for i, j in itertools.combinations(range(len(names)), 2)
              if group_of(names[i], groups) == group_of(names[j], groups) and cluster[uids[i]] != cluster[uids[j]]]
    for a, b in missed:
        print(f"  missed: {a} ~ {b}")
    for a, b in false_pairs:
        print(f"  FALSE MERGE: {a} ~ {b}")

    # The closest distinct pairs on each signature, against the thresholds that confirm pairs.
    distinct = [(i, j) for i, j in itertools.combinations(range(len(names)), 2) if group_of(names[i], groups) != group_of(names[j], groups)]
    a, b = np.array([p[0] for p in distinct]), np.array([p[1] for p in distinct])
    fine_sig, phash = clusters.signatures(images["fine_sig"]), images["phash"].to_numpy()
    fine = fine_distance(fine_sig[a], fine_sig[b])
    k = int(np.argmin(fine))
    print(f"closest distinct pair (fine signature): {names[a[k]]} ~ {names[b[k]]}: fine distance {fine[k]:.2f} "
          f"(threshold {cfg.fine_threshold}), pHash distance {int(np.bitwise_count(phash[a[k]] ^ phash[b[k]]))}")
    if "struct_sig" in images.column_names:  # the structure signature (theme variants)
        from dedupe.hashing import structure_correlation

        w, h = images["width"].to_numpy().astype(float), images["height"].to_numpy().astype(float)
        struct_sig, struct_hash = clusters.signatures(images["struct_sig"]), images["struct_hash"].to_numpy()
        shape = np.abs(np.log(w[a] / h[a]) - np.log(w[b] / h[b])) <= clusters.MAX_ASPECT_CHANGE
        corr = np.where(shape, structure_correlation(struct_sig[a], struct_sig[b]), -1.0)
        k = int(np.argmax(corr))
        print(f"closest distinct pair (structure, same shape): {names[a[k]]} ~ {names[b[k]]}: correlation {corr[k]:.2f} "
              f"(threshold {clusters.STRUCT_MIN_CORRELATION}), structure-hash distance "
              f"{int(np.bitwise_count(struct_hash[a[k]] ^ struct_hash[b[k]]))}")
    if "crop_hashes" in images.column_names:  # the keypoint windows (crops)
        windows = [np.array(h, np.uint64) for h in images["crop_hashes"].to_pylist()]
        closest = min(((int(np.bitwise_count(windows[i][:, None] ^ windows[j][None, :]).min()), i, j) for i, j in distinct
                       if len(windows[i]) and len(windows[j])), default=None)
        if closest:
            print(f"closest distinct pair (keypoint windows): {names[closest[1]]} ~ {names[closest[2]]}: "
                  f"{closest[0]} bits (candidates within {clusters.CROP_RADIUS})")
    return precision, recall


if __name__ == "__main__":
    main()
