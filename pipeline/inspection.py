"""What `localcap inspect` prints about a dataset directory."""

from __future__ import annotations

import io

from pipeline.partitions import read_table
from pipeline.dataset_format import SIZES, TAR_SUFFIX, brace_list, folders, text_box_tar
from pipeline.shards.metadata import (
    BadMetadata,
    check_path,
    parse_dataset_json,
    parse_sizes,
)
from pipeline.shards.reader import iter_tar
from pipeline.storage import Storage, is_s3, join
from pipeline.versions import tar_url


def describe_dataset(dataset: str, storage: Storage | None = None, n_samples: int = 1) -> str:
    storage = storage or Storage()
    # dataset.json and sizes.json may come from anywhere (a published version): parsed and checked.
    info = parse_dataset_json(storage.read_bytes(join(dataset, "dataset.json")), join(dataset, "dataset.json"))
    manifest = read_table(storage, join(dataset, "manifest.parquet"))
    counts, stats = info["counts"], info.get("statistics") or {}
    out = [
        f"dataset   {dataset}",
        (f"name      {info.get('name', '?')}  (run {info.get('run_id', '?')}, layout {info['layout']}, "
         f"created {info.get('created_at', '?')})"),
    ]
    build = info.get("build")
    if isinstance(build, dict) and isinstance(build.get("counts"), dict):  # a published snapshot: the whole dataset
        out.append(f"samples   {counts['samples']} in {counts['shards']} shards, the whole dataset: +{counts.get('added', '?')} "
                   f"-{counts.get('removed', '?')} since {info.get('parent') or 'nothing (the first version)'}")
        counts = {**build["counts"], "rejected": f"{build['counts'].get('rejected', '?')} of the newest build's "
                  f"{build['counts'].get('inputs', '?')} inputs"}
    else:
        out.append(f"samples   {counts['samples']} in {counts['shards']} shards, from {counts.get('inputs', '?')} inputs")
    out.append(f"rejected  {counts.get('rejected', '?')}" + "".join(f"\n  {k:<20} {v}" for k, v in counts.get("rejected_by_reason", {}).items()))
    if stats.get("width"):
        out.append(f"size      width {stats['width']['min']}-{stats['width']['max']}, height {stats['height']['min']}-{stats['height']['max']}, "
                   f"median {stats['megapixels']['median']} MP")
        out += box_lines(stats, info.get("timings", {}))
    cap = info.get("captions")
    if cap:
        out.append(f"captions  {cap['by_status'].get('ok', 0)} ok of {cap['total']} ({cap['global_captions']} global) by {cap['model']} "
                   f"via {cap['backend']}, prompt {cap['prompt_id']}, {cap['generated_tokens']} tokens generated")
        rejected = {k: v for k, v in cap["by_status"].items() if k != "ok"}
        if rejected:
            out.append("          not used: " + ", ".join(f"{k} {v}" for k, v in rejected.items()))
    history = info.get("history") or []
    if history:
        out.append(f"versions  {len(history)}: " + ", ".join(
            f"+{h.get('added', 0)}" + (f" -{h['removed']}" if h.get("removed") else "") for h in history[-10:] if isinstance(h, dict)))
    urls = {}
    for folder in folders(info["layout"]):
        sizes_uri = join(dataset, folder, SIZES)
        sizes = parse_sizes(storage.read_bytes(sizes_uri), sizes_uri, folder)
        out.append(f"{folder + '/':<10}" + ", ".join(f"{k} ({v})" for k, v in sizes.items()))
        urls[folder] = brace_list([tar_url(storage, dataset, f"{folder}/{name}") for name in sorted(sizes)]) if sizes else ""
    args = {"image": "train_data_image", "text_box": "train_data_text_box", "combined": "train_data"}
    out.append("PS3 urls  webdataset URL lists for PS3's trainer (its args named beside them)")
    out += [f"  {args[f]:<20} {u}" for f, u in urls.items()]
    rows = manifest.slice(0, n_samples).to_pylist()
    for row in rows:
        out.append(f"sample    key {row['key']}  {row['width']}x{row['height']}  {row['shard']}  from {row['source']}")
        out.append("          " + _sample_json(storage, dataset, info["layout"], row))
    return "\n".join(out)


def box_lines(stats: dict, timings: dict) -> list[str]:
    """Boxes per image, box sides as a fraction of the image's short side, why some have none."""
    b = stats["boxes_per_image"]
    out = [f"boxes     per image: min {b['min']}, median {b['median']}, max {b['max']}, mean {b['mean']}"]
    for axis in ("width", "height"):
        f = stats.get(f"box_{axis}_fraction") or {}
        if f:
            out.append(f"          box {axis} / short side: min {f['min']:.3f}, median {f['median']:.3f}, max {f['max']:.3f}")
    if stats.get("images_by_box_count"):
        out.append("          images with n boxes: " + ", ".join(f"{k}: {v}" for k, v in stats["images_by_box_count"].items()))
    if stats.get("box_side_fraction_by_size"):
        out.append("          box long side / short side: " + ", ".join(f"{k}: {v}" for k, v in stats["box_side_fraction_by_size"].items()))
    if stats.get("no_boxes_by_reason"):
        out.append("          no boxes: " + ", ".join(f"{k} {v}" for k, v in stats["no_boxes_by_reason"].items()))
    if stats.get("duplicates_by_match"):
        out.append("duplicates dropped, by match: " + ", ".join(f"{k} {v}" for k, v in stats["duplicates_by_match"].items()))
    ms = timings.get("regions_ms_per_image") or {}
    if ms:
        out.append("          proposer ms/image: " + ", ".join(f"{k} {v}" for k, v in ms.items()))
    return out


def _sample_json(storage: Storage, dataset: str, layout: str, row: dict) -> str:
    shard = row["shard"]
    text_tar = text_box_tar(shard) if isinstance(shard, str) and layout == "paired" else shard
    try:  # a manifest row names a tar of the dataset, nothing else
        if not str(check_path(text_tar)).endswith(TAR_SUFFIX):
            raise BadMetadata(f"{text_tar!r} is not a tar")
    except BadMetadata as exc:
        raise BadMetadata(f"{join(dataset, 'manifest.parquet')}: shard {exc}") from None
    uri = tar_url(storage, dataset, text_tar)
    # Local tars are read member by member; an S3 tar is fetched whole.
    source = io.BytesIO(storage.read_bytes(uri)) if is_s3(uri) else uri
    wanted = f"{row['key']}.json"
    for _name, data in iter_tar(source, uri, seekable=True, select=wanted.__eq__):
        return data.decode()
    return "(json missing)"
