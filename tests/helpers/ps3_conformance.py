"""Would PS3's trainer train on this dataset? Our own re-statement of the parts of its loader that decide it.

PS3's loader (github.com/berry-ding/PS3, train/src/open_clip_train/data.py at 1719180, cited as
`data.py:LINE`) reads the image/ and text_box/ tars as two WebDataset streams and pairs them by
position, then per sample draws either the global caption or `sample_n_box_each_image` boxes, cleans
and merges the drawn texts, crops the image with the boxes and turns the boxes into a selection map.
Nothing here imports PS3, torch or webdataset: every step is restated below in plain Python, with the
PS3 behaviour it mirrors named beside it, so the check runs in the test process (no Ray, no torch) and
does not depend on PS3 pinning webdataset<=0.2.86 (its `group_by_keys_nothrow`, data.py:276-301,
indexes `filesample["fname"]` on every item `tar_file_expander` yields; webdataset 1.0 also yields an
end-of-tar marker `{}` there, so PS3's grouping raises KeyError with webdataset 1.0. Not ours to fix).

`ps3_problems(DIR)` returns one line per problem, "SHARD #POSITION KEY: CATEGORY: what"; an empty
list means every sample, under every seed tried, is one PS3 neither crashes on nor trains on nothing
with. Categories:

pairing (PS3's two streams fall out of step, and its key assert fires, data.py:653-659)
  - image and text_box tars that differ in shard count, sample count or key at a position (an image
    member whose extension PS3's image stream does not take, data.py:320, or a text member group
    without .json, dropped by `filter_no_json`, data.py:199-201, shows up as a count difference);
  - sizes.json counts that disagree with the tars.
crash (PS3 raises)
  - an image PIL cannot open, or a .json that does not decode to an object: PS3's decoders
    (`decode("pilrgb", handler=log_and_continue)`, data.py:738, and data.py:794) drop the sample from
    that stream only, so every later pair is wrong and the next key comparison asserts;
  - a local draw with zero texts: `sentence_merging` divides by the number of texts (data.py:257-262);
  - a local draw of a sample without "text" (data.py:676 indexes it), or of a text without a box
    (data.py:677 indexes box by the text ids);
  - a drawn text or global_text that is not a string, e.g. "global_text": null (`filter_keywords`
    calls .replace, data.py:211; PS3 draws a global_text whenever the key exists, data.py:664-667).
nothing (PS3 trains on nothing)
  - the drawn caption is blank after PS3's clean-up: filter_keywords (data.py:209-222),
    sentence_masking (data.py:225-252; every reachable outcome is tried per text, besides the seeds'
    draws), sentence_merging (data.py:255-267), then the tokenizer's "canonicalize" clean (open_clip
    tokenizer.py:78, 104-129: punctuation removed, lower-cased, whitespace collapsed);
  - a caption equal to "[Error] No caption found!": `filter_error_caption` (data.py:204-206, applied
    at data.py:821) compares the tokenised tensor with that string, so it never removes anything and
    PS3 trains on the sentinel;
  - a drawn box whose selection map (data.py:367-370) is empty after the random resized crop, or that
    has no area inside the crop (its map is then a line along the crop's edge, none of the box). With
    scale >= 0.9 a crop keeps >= 90% of each side, so this needs a box inside the outer 10% band, or an
    image wider/taller than the ratio range allows: torchvision then falls back to a central 4:3 crop
    and boxes near the far sides are never seen.
geometry
  - a box that is not four numbers with x1 < x2, y1 < y2 inside the stored image (PS3 does not check;
    torchvision clamps it, data.py:360-362, so the map marks other pixels than the caption's), or more
    boxes than texts (the extra boxes are never drawn).
contract (the build's promise, checked directly, not by simulation)
  - a sample without any box+text: its local draws crash (above);
  - captioned datasets (dataset.json config.captioner.backend != "none"): at least one box whose text
    survives PS3's clean-up; and, with config.captioner.global_caption on (the default), a global_text
    that does. PS3 draws the global caption only when the key exists (data.py:663-670), so a sample
    without one does not crash it but never trains its global view; the build rejects such samples
    (reject reason no_global_caption), so one in a dataset is a bug.

Rules per dataset, from dataset.json:
  - boxes only (config.captioner.backend "none"): every text is "" and there is no global_text, by
    design (captions were not requested). Pairing, decoding, JSON, types, box geometry, selection maps
    and "at least one box" are judged; caption text is not (PS3 would train on "" captions: such a
    dataset is for box-level use or the MAE objective, not PS3's contrastive loss);
  - config.shards.keep_empty true: the dataset may hold samples PS3 cannot train on (no box with a
    caption, no global caption), so the contract, nothing and zero-text crash checks are waived;
    pairing, decoding, JSON, types and box geometry are still judged (they break every dataset alike);
  - no dataset.json, or one whose config lacks the captioner and shards sections (a folder made by hand
    in a test; the build records the whole resolved config): the strict rules of a captioned dataset
    with global captions; `dataset_rules(DIR).from_config` tells the two apart (conftest skips these);
  - layout "combined" (one tar, KEY.jpg + KEY.json): PS3 cannot read it (it wants the two streams), so
    its pairing check is that each key has exactly one image and one .json; the sample checks are the same.

The loader settings default to PS3's published training scripts (train/scripts/ps3_1.5k_siglip.sh,
ps3_4k_siglip.sh: --use_global_caption --global_caption_prob 0.25 --sentence_masking, and params.py's
default sample_n_box_each_image 1) and its train transform (open_clip transform.py:339-343:
RandomResizedCrop(image_size, scale=(0.9, 1.0)), torchvision's default ratio (3/4, 4/3)).
"""

from __future__ import annotations

import html
import io
import json
import math
import random
import re
import string
import tarfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# PS3's image stream keeps members with these (lower-cased) extensions, data.py:320 (and 738's rename).
PS3_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif")
ERROR_SENTINEL = "[Error] No caption found!"  # data.py:205
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?]) +")  # the split of filter_keywords, sentence_masking, sentence_merging
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext (data.py:24, 276, 304)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class LoaderArgs:
    """The PS3 arguments that decide a draw (defaults: its published training scripts)."""

    use_global_caption: bool = True  # --use_global_caption in both scripts (params.py:499, default off)
    global_caption_prob: float = 0.25  # --global_caption_prob 0.25 in both scripts (params.py:505, default 0.5)
    sample_n_box_each_image: int = 1  # params.py:511 default; the scripts keep it
    sentence_masking: bool = True  # --sentence_masking in both scripts (data.py:812-815)
    image_size: int = 1512  # PS3-1.5K's largest scale (model_configs/PS3-1.5K-SigLIP.json ps3_scales)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # AugmentationCfg.scale, transform.py:63
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default ratio


@dataclass(frozen=True)
class DatasetRules:
    captioned: bool = True  # texts are captions that must train (captioner.backend != "none")
    need_global: bool = True  # every sample needs a global_text (captioning with captioner.global_caption)
    keep_empty: bool = False  # shards.keep_empty: untrainable samples allowed, only structure is checked
    layout: str = "paired"
    from_config: bool = False  # read from dataset.json's config (False: a hand-made folder, strict defaults)


def dataset_rules(dataset_dir: str | Path) -> DatasetRules:
    """The rules for a dataset folder, from its dataset.json's `config` (strict defaults without one)."""
    root = Path(dataset_dir)
    layout = "combined" if (root / "combined").is_dir() and not (root / "image").is_dir() else "paired"
    try:
        config = json.loads((root / "dataset.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        config = None
    if not isinstance(config, dict) or not {"captioner", "shards"} <= config.keys():
        return DatasetRules(layout=layout)  # not written by the build (it records the whole resolved config)
    captioner = config.get("captioner") or {}
    shards = config.get("shards") or {}
    captioned = captioner.get("backend", "none") != "none"
    return DatasetRules(captioned=captioned, need_global=captioned and bool(captioner.get("global_caption", True)),
                        keep_empty=bool(shards.get("keep_empty", False)), layout=shards.get("layout", layout), from_config=True)


# ---- text: PS3's clean-up, restated ----------------------------------------------------------------

def _sentences(text: str) -> list[str]:
    return _SENTENCE_SPLIT.split(text)


def filter_keywords(text: str) -> str:
    """data.py:209-222: drop the two "close-up of" openings, then a last sentence that mentions both
    "text" and "visible" (PS3's "there is no visible text" tail) when there is more than one."""
    text = text.replace("The second image is a close-up of", "").replace("The image is a close-up of", "")
    sentences = _sentences(text)
    if "text" in sentences[-1] and "visible" in sentences[-1] and len(sentences) > 1:
        sentences = sentences[:-1]
    return " ".join(sentences)


def sentence_masking(text: str, rng: random.Random) -> str:
    """data.py:225-252: a random run of sentences, starting at one of the first three."""
    sentences = _sentences(text)
    start = rng.randint(0, min(len(sentences) - 1, 2))
    n = rng.randint(min(len(sentences), 1), max(len(sentences) - start, 1))
    return " ".join(sentences[start:start + n])


def sentence_masking_outcomes(text: str) -> set[str]:
    """Every string sentence_masking can return for `text` (same bounds as its two randint calls)."""
    sentences = _sentences(text)
    out = set()
    for start in range(min(len(sentences) - 1, 2) + 1):
        for n in range(min(len(sentences), 1), max(len(sentences) - start, 1) + 1):
            out.add(" ".join(sentences[start:start + n]))
    return out


def sentence_merging(texts: list[str], rng: random.Random) -> str:
    """data.py:255-267: pool the texts' sentences and keep len(pool) // len(texts) of them, in order.
    With no texts this divides by zero, as PS3 does (ZeroDivisionError)."""
    pool = [s for t in texts for s in _sentences(t)]
    keep = len(pool) // len(texts)
    return " ".join(pool[i] for i in sorted(rng.sample(range(len(pool)), keep)))


def tokenizer_clean(text: str) -> str:
    """The text PS3's tokenizer encodes (HFTokenizer with clean="canonicalize", PS3-*.json text_cfg):
    basic_clean (tokenizer.py:66-69; ftfy.fix_text is left out: it never empties a string), then
    canonicalize_text (tokenizer.py:104-129): "_" to space, punctuation removed, lower case, whitespace
    collapsed. An empty result is a caption of padding only."""
    text = html.unescape(html.unescape(text)).strip()
    text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return " ".join(text.split())


def trains_on_text(text: str, masking: bool) -> bool:
    """Whether every outcome of PS3's per-text clean-up of `text` leaves something to tokenise."""
    kept = filter_keywords(text)
    outcomes = sentence_masking_outcomes(kept) if masking else {kept}
    return all(tokenizer_clean(o) for o in outcomes)


# ---- image: PS3's crop, box transform and selection map, restated ------------------------------------

def random_resized_crop(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop picks it (make_params/get_params): ten tries
    of an area fraction in `scale` and a log-uniform aspect in `ratio` that fits, else a centre crop at
    the nearest allowed aspect. Python's RNG stands in for torch's (the distribution is the same)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform_box(box: list[int], crop: tuple[int, int, int, int], size: int) -> tuple[tuple[int, int, int, int], bool]:
    """(the box after the resized crop, whether any of it was inside the crop).

    PS3 wraps each box as tv_tensors.BoundingBoxes(b, "XYXY", canvas_size=(H, W)) (data.py:360): JSON
    ints give an int64 tensor. torchvision's crop subtracts (left, top) and clamps to the crop
    (crop_bounding_boxes -> clamp_bounding_boxes), its resize multiplies by float32 ratios new/old and
    casts back to int64, i.e. truncates (resize_bounding_boxes, `.to(bounding_boxes.dtype)`)."""
    top, left, h, w = crop
    x1, x2 = (min(max(v - left, 0), w) for v in (box[0], box[2]))
    y1, y2 = (min(max(v - top, 0), h) for v in (box[1], box[3]))
    inside = x2 > x1 and y2 > y1
    rx, ry = np.float32(size / w), np.float32(size / h)
    scaled = tuple(int(np.float32(v) * r) for v, r in ((x1, rx), (y1, ry), (x2, rx), (y2, ry)))
    return scaled, inside


def selection_map_cells(boxes: Iterable[tuple[int, int, int, int]], size: int) -> int:
    """Pixels set in PS3's gt_selection_map (data.py:368-370): a size x size zero map, and for each box
    rows floor(y1):ceil(y2)+1, columns floor(x1):ceil(x2)+1 set to 1 (Python slices: clipped at size)."""
    cells = set()
    for x1, y1, x2, y2 in boxes:
        rows = range(math.floor(y1), min(math.ceil(y2) + 1, size))
        cols = range(math.floor(x1), min(math.ceil(x2) + 1, size))
        if rows and cols:
            cells.add((rows.start, rows.stop, cols.start, cols.stop))
    return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in cells)  # an upper bound; only 0 vs > 0 matters


# ---- reading the tars the way PS3's two streams do --------------------------------------------------

@dataclass
class _Sample:
    where: str  # "image/image_000000.tar #3 KEY"
    key: str
    size: tuple[int, int] | None = None  # stored pixels (PIL's .size, before any EXIF rotation: PS3 ignores EXIF)
    data: dict | None = None  # the text_box JSON


@dataclass
class _Report:
    """Problems by sample, in reading order; draw problems count the seeds they happened in."""

    problems: dict[str, dict[str, int | None]] = field(default_factory=lambda: defaultdict(dict))
    order: list[str] = field(default_factory=list)

    def add(self, where: str, message: str, draw: bool = False) -> None:
        if where not in self.problems:
            self.order.append(where)
        seen = self.problems[where]
        seen[message] = (seen.get(message) or 0) + 1 if draw else None

    def lines(self, n_seeds: int, max_problems: int | None) -> list[str]:
        out = [f"{where}: {message}" + ("" if times is None else f" (in {times}/{n_seeds} seeds)")
               for where in self.order for message, times in self.problems[where].items()]
        if max_problems is not None and len(out) > max_problems:
            out = out[:max_problems] + [f"... and {len(out) - max_problems} more"]
        return out


def _split_name(name: str) -> tuple[str | None, str | None]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _members(path: Path) -> list[tuple[str, bytes]]:
    """Regular members in file order, without webdataset's skipped meta names ("__*__")."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):
                continue
            out.append((m.name, tar.extractfile(m).read()))
    return out


def _image_stream(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """PS3's image stream (group_by_keys_nothrow_image_only, data.py:304-323): every member with an
    image extension is one sample keyed by its prefix; other members are ignored."""
    out = []
    for name, data in members:
        prefix, suffix = _split_name(name)
        if prefix is not None and suffix.lower() in PS3_IMAGE_EXTS:
            out.append((prefix, data))
    return out


def _groups(members: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """group_by_keys_nothrow (data.py:276-301): consecutive members with one prefix form a sample; a
    repeated suffix starts a new one; names webdataset cannot split are skipped."""
    groups: list[tuple[str, dict[str, bytes]]] = []
    for name, data in members:
        prefix, suffix = _split_name(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if not groups or groups[-1][0] != prefix or suffix in groups[-1][1]:
            groups.append((prefix, {}))
        groups[-1][1][suffix] = data
    return groups


def _text_stream(members: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """PS3's text stream: the groups, without those lacking a .json (filter_no_json, data.py:199-201, 780)."""
    return [(k, g) for k, g in _groups(members) if "json" in g]


def _open_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # header only; raises on non-images and decompression bombs
        return img.size


def _parse_json(raw: bytes) -> dict:
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"JSON is a {type(data).__name__}, not an object")
    return data


def _shard_index(name: str) -> str:
    return name.rsplit("_", 1)[-1]


def _tars(root: Path, folder: str, stem: str) -> list[Path]:
    """The tars PS3 would be given for `folder`: those in it; for a published snapshot (files.json
    format 2: tars in NAME/shards/, shared by the versions) the ones its sizes.json names there,
    which are the snapshot's URL lists (dataset.json shard_urls)."""
    try:
        listing = json.loads((root / "files.json").read_text())
        snapshot = isinstance(listing, dict) and listing.get("format") == 2
    except (OSError, ValueError):
        snapshot = False
    if not snapshot:
        return sorted((root / folder).glob(f"{stem}_*.tar")) if (root / folder).is_dir() else []
    sizes = json.loads((root / folder / "sizes.json").read_text())
    return [root.parent / "shards" / folder / name for name in sorted(sizes)]


def _declared_samples(root: Path) -> int | None:
    try:
        return json.loads((root / "dataset.json").read_text())["counts"]["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_paired(root: Path, report: _Report) -> list[_Sample]:
    images = {_shard_index(p.name): p for p in _tars(root, "image", "image")}
    texts = {_shard_index(p.name): p for p in _tars(root, "text_box", "text_box")}
    if not images and not texts and _declared_samples(root) != 0:  # an idle night's build holds nothing, and says so
        report.add(str(root.name), "pairing: no image/ or text_box/ tars")
    for index in sorted(set(images) ^ set(texts)):
        side = "image" if index in images else "text_box"
        report.add(f"{side}/{side}_{index}", "pairing: shard has no partner in the other folder: PS3's two shard lists "
                   "differ in length, so its resampled/shuffled streams pair different shards")
    samples: list[_Sample] = []
    for index in sorted(set(images) & set(texts)):
        img_name, txt_name = f"image/{images[index].name}", f"text_box/{texts[index].name}"
        image_stream = _image_stream(_members(images[index]))
        text_stream = _text_stream(_members(texts[index]))
        for folder, name, count in (("image", images[index].name, len(image_stream)), ("text_box", texts[index].name, len(text_stream))):
            _check_sizes_json(root / folder, name, count, report)
        if len(image_stream) != len(text_stream):
            report.add(img_name, f"pairing: {len(image_stream)} image samples vs {len(text_stream)} text_box samples in {txt_name}: "
                       "PS3 pairs by position, so the streams drift apart")
        for pos, ((ikey, idata), (tkey, tgroup)) in enumerate(zip(image_stream, text_stream)):
            where = f"{img_name} #{pos} {ikey}"
            if ikey.split("/")[-1] != tkey.split("/")[-1]:  # the assert of data.py:653-659
                report.add(where, f"pairing: image key {ikey} vs text_box key {tkey} at the same position: "
                           "PS3's assert fails (data.py:653-659)")
                break
            sample = _Sample(where, ikey)
            if not _load(sample, idata, tgroup["json"], report):
                break  # PS3's decode handler drops this one in one stream only: every later pair is off by one
            samples.append(sample)
    return samples


def _check_sizes_json(folder: Path, name: str, count: int, report: _Report) -> None:
    try:
        sizes = json.loads((folder / "sizes.json").read_text())
    except (OSError, ValueError):
        return  # optional for PS3 (get_dataset_size, data.py:106-125, falls back to --train-num-samples)
    if name in sizes and sizes[name] != count:
        report.add(f"{folder.name}/{name}", f"pairing: sizes.json says {sizes[name]} samples, the tar holds {count}")


def _read_combined(root: Path, report: _Report) -> list[_Sample]:
    samples = []
    for path in _tars(root, "combined", "shard"):
        groups = _groups(_members(path))
        for pos, (key, group) in enumerate(groups):
            where = f"combined/{path.name} #{pos} {key}"
            exts = [e for e in group if e in PS3_IMAGE_EXTS]
            if len(exts) != 1 or "json" not in group:
                report.add(where, f"pairing: key holds members {sorted(group)}, not one image and one .json")
                continue
            sample = _Sample(where, key)
            if _load(sample, group[exts[0]], group["json"], report):
                samples.append(sample)
    return samples


def _load(sample: _Sample, image: bytes, raw_json: bytes, report: _Report) -> bool:
    try:
        sample.size = _open_size(image)
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, PS3's decode handler drops the image
        report.add(sample.where, f"crash: image does not open with PIL ({type(e).__name__}: {e}); PS3 drops it from the image stream only")
        return False
    try:
        sample.data = _parse_json(raw_json)
    except Exception as e:  # noqa: BLE001
        report.add(sample.where, f"crash: text_box JSON does not decode ({type(e).__name__}: {e}); PS3 drops it from the text stream only")
        return False
    return True


# ---- the per-sample checks ----------------------------------------------------------------------------

def _is_box(b) -> bool:
    return isinstance(b, list) and len(b) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in b)


def _static_checks(s: _Sample, rules: DatasetRules, args: LoaderArgs, report: _Report) -> None:
    """What needs no draw: the sample's structure, its boxes against the stored image, and the build's contract."""
    d, (width, height) = s.data, s.size
    texts, boxes = d.get("text"), d.get("box")
    if "text" in d and not isinstance(texts, list):
        report.add(s.where, f"crash: 'text' is a {type(texts).__name__}, not a list (the local draw samples range(len(text)), data.py:676)")
    if "box" in d and not isinstance(boxes, list):
        report.add(s.where, f"crash: 'box' is a {type(boxes).__name__}, not a list")
    texts = texts if isinstance(texts, list) else []
    boxes = boxes if isinstance(boxes, list) else []
    if len(boxes) < len(texts):
        report.add(s.where, f"crash: {len(texts)} texts for {len(boxes)} boxes (the draw indexes box by text ids, data.py:677)")
    elif len(boxes) > len(texts):
        report.add(s.where, f"geometry: {len(texts)} texts for {len(boxes)} boxes: PS3 never draws the boxes past the last text")
    for i, b in enumerate(boxes):
        if not _is_box(b):
            report.add(s.where, f"geometry: box {i} {b!r} is not four numbers")
        elif not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            report.add(s.where, f"geometry: box {i} {b} is not x1<x2, y1<y2 inside the stored {width}x{height} image "
                       "(PS3 clamps it silently, so its selection map marks other pixels than the caption's)")
    if not all(isinstance(t, str) for t in texts):
        report.add(s.where, "crash: a text is not a string (filter_keywords calls .replace on it, data.py:211)")
    if "global_text" in d and not isinstance(d["global_text"], str):
        report.add(s.where, f"crash: global_text is {d['global_text']!r}: PS3 draws it (p={args.global_caption_prob}) "
                   "and filter_keywords fails on it (data.py:211); leave the key out instead")
    if rules.keep_empty:
        return  # untrainable samples are allowed in this dataset: only the structure above is judged
    if not texts:
        report.add(s.where, "contract: no box with a text: PS3's local draw of it has zero texts and "
                   "sentence_merging divides by zero (data.py:257-262)")
    if rules.captioned:
        fine = {i for i, t in enumerate(texts) if isinstance(t, str) and trains_on_text(t, args.sentence_masking)}
        if texts and not fine:
            report.add(s.where, "nothing: no box caption survives PS3's clean-up (filter_keywords, sentence_masking, canonicalize)")
        for i, t in enumerate(texts):
            if fine and i not in fine and isinstance(t, str):
                report.add(s.where, f"nothing: text {i} {t[:60]!r} can be blank after PS3's clean-up, "
                           f"so a draw of box {i} trains on nothing")
            if t == ERROR_SENTINEL:
                report.add(s.where, f"nothing: text {i} is PS3's error sentinel, which filter_error_caption never removes "
                           "(it compares the token tensor with the string, data.py:204-206, 821)")
    if rules.need_global:
        g = d.get("global_text")
        if "global_text" not in d:
            report.add(s.where, "contract: no global_text, though captioning with global captions ran: PS3 never draws "
                       "this sample's global view (data.py:663-670)")
        elif isinstance(g, str) and not trains_on_text(g, args.sentence_masking):
            report.add(s.where, f"nothing: global_text {g[:60]!r} can be blank after PS3's clean-up, so a global draw trains on nothing")


def _draw(s: _Sample, rules: DatasetRules, args: LoaderArgs, rng: random.Random, aux: random.Random) -> str | None:
    """One pass of CombinedDataset_ImageTextBox.__iter__ (data.py:661-677) and _preprocess_image_text_box
    (data.py:342-381) over this sample: None if it trains, else what goes wrong. `rng` is the loader's
    self.rng (one per stream, seeded per epoch, consumed sample by sample); `aux` stands in for the
    module-level `random` of sentence_masking/sentence_merging and for torch's RNG in RandomResizedCrop."""
    d = s.data
    if args.use_global_caption:  # data.py:663-672: the coin only when both keys exist
        if "global_text" in d and "text" in d:
            use_global = rng.random() < args.global_caption_prob
        else:
            use_global = "global_text" in d
    else:
        use_global = False
    kind = "global" if use_global else "local"
    width, height = s.size
    if use_global:
        texts, boxes = [d["global_text"]], [[0, 0, width, height]]  # data.py:674; the whole image, data.py:358-359
    else:
        if "text" not in d:
            return "crash: a local draw of a sample without 'text' (KeyError, data.py:676)"
        all_texts = d["text"] if isinstance(d["text"], list) else []
        ids = rng.sample(range(len(all_texts)), min(args.sample_n_box_each_image, len(all_texts)))  # data.py:676
        all_boxes = d.get("box") if isinstance(d.get("box"), list) else []
        if any(i >= len(all_boxes) for i in ids):
            return "crash: a local draw of a text without a box (IndexError, data.py:677)"
        texts, boxes = [all_texts[i] for i in ids], [all_boxes[i] for i in ids]
    # The image and its boxes are transformed first (data.py:362), then the texts (data.py:364).
    crop = random_resized_crop(width, height, aux, args.crop_scale, args.crop_ratio)
    problem = None
    if not use_global and boxes and all(_is_box(b) for b in boxes) and not rules.keep_empty:
        moved = [transform_box([int(v) for v in b], crop, args.image_size) for b in boxes]
        if selection_map_cells([m for m, _ in moved], args.image_size) == 0:
            problem = "nothing: a local draw's selection map is empty after the resized crop (data.py:368-370)"
        elif not any(inside for _, inside in moved):
            problem = "nothing: a local draw's box lies outside the resized crop (its map is the crop's edge line, none of the box)"
    if not all(isinstance(t, str) for t in texts):  # a type error: judged in keep_empty datasets too
        return f"crash: a {kind} draw of a text that is not a string (filter_keywords, data.py:211)"
    cleaned = [filter_keywords(t) for t in texts]  # data.py:812-815, per drawn text
    if args.sentence_masking:
        cleaned = [sentence_masking(t, aux) for t in cleaned]
    try:
        caption = sentence_merging(cleaned, aux)
    except ZeroDivisionError:
        return None if rules.keep_empty else "crash: a local draw with zero texts: ZeroDivisionError in sentence_merging (data.py:262)"
    if rules.captioned and not rules.keep_empty and not tokenizer_clean(caption):
        return problem or f"nothing: a {kind} draw's caption is blank after PS3's clean-up"
    return problem


def ps3_problems(dataset_dir: str | Path, seeds: Iterable[int] = range(50), *, args: LoaderArgs = LoaderArgs(),
                 rules: DatasetRules | None = None, max_problems: int | None = 200) -> list[str]:
    """Every problem PS3's loader would have with the local dataset folder `dataset_dir` (see the module
    docstring); [] when none. Each seed is one epoch of PS3's per-stream RNG over all samples in order."""
    root = Path(dataset_dir)
    rules = rules or dataset_rules(root)
    seeds = list(seeds)
    report = _Report()
    samples = _read_combined(root, report) if rules.layout == "combined" else _read_paired(root, report)
    for s in samples:
        _static_checks(s, rules, args, report)
    for seed in seeds:
        rng, aux = random.Random(seed), random.Random(f"aux-{seed}")
        for s in samples:
            problem = _draw(s, rules, args, rng, aux)
            if problem:
                report.add(s.where, problem, draw=True)
    return report.lines(len(seeds), max_problems)


# ---- finding the datasets a test session built (used by tests/conftest.py) ----------------------------

DATASET_FOLDERS = ("image", "text_box", "combined")


def find_datasets(base: str | Path) -> list[Path]:
    """Folders under `base` with a dataset.json and an image/, text_box/ or combined/ folder (not
    descending into a dataset, nor following links)."""
    found, stack = [], [Path(base)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        names = {e.name for e in entries}
        if "dataset.json" in names and names & set(DATASET_FOLDERS):
            found.append(folder)
            continue
        # NAME/_staged/ID/ holds a snapshot's metadata before it becomes NAME/vN/: not a dataset anyone reads.
        stack.extend(e for e in entries if e.is_dir() and not e.is_symlink() and not e.name.startswith("_"))
    return sorted(found)


def dataset_signature(folder: Path) -> tuple:
    """What changes when a dataset is rewritten: dataset.json's and every tar's mtime and size."""
    sig = []
    for p in [folder / "dataset.json", *sorted(q for sub in DATASET_FOLDERS for q in (folder / sub).glob("*.tar")),
              *sorted(folder.glob("*/sizes.json"))]:
        try:
            st = p.stat()
        except OSError:
            continue
        sig.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(sig)
