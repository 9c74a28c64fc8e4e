"""The `build_dataset` Prefect flow: one coarse task per stage, Ray underneath.

Prefect tracks stages (retries, logs, a markdown artifact of counts); Ray schedules the partitions.
With no PREFECT_API_URL set, Prefect runs the flow against a temporary local server: no server to
deploy for a local run.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows import events
from pipeline.dataset_card import write_dataset_card
from pipeline.executor import StageReport, init_ray
from pipeline.preflight import check_cluster, check_run
from pipeline.report import publish_report, read_text_boxes, write_report
from pipeline.stage import RunContext, Stage, StageResult, make_context, stages_for
from pipeline.status import PREFECT_RUN, PUBLICATION, publication, publication_line, rows_text
from pipeline.storage import is_s3, join
from pipeline.versions import publish_version
from schemas.config import RunConfig, check_run_id, load_config, parse_config, read_yaml


class StageFailed(RuntimeError):
    """A stage failed for good: one line naming the stage and the error (the CLI prints it)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage} failed: {reason}")
        self.stage, self.reason = stage, reason


# Failures no retry can fix: the task fails at once instead of repeating them prefect.retries times.
PERMANENT = (ValueError, TypeError, KeyError, AttributeError, AssertionError, FileNotFoundError, NotADirectoryError,
             IsADirectoryError, PermissionError, FileExistsError, NotImplementedError)


def retryable(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only what may be temporary (connections, lost workers, ...)."""
    return not isinstance(state.data, PERMANENT)


def run_stage_task(stage_task, opts: dict, *args):
    """Call a task with the run's retry options (`opts` may rename it: one task per stage); a failure
    becomes StageFailed naming the stage."""
    name = opts.get("name", stage_task.name)
    try:
        return stage_task.with_options(**opts)(*args)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the original exception
        raise StageFailed(name, error_line(cause)) from exc


def error_line(exc: BaseException) -> str:
    """`Type: message` on one line: a message's first line, or a carried traceback's last (Ray's)."""
    text = str(exc).strip()
    lines = text.splitlines() or [""]
    return f"{type(exc).__name__}: {lines[-1] if 'Traceback' in text else lines[0]}"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def run_id_of_flow_run() -> str | None:
    """The localcap run id of a Prefect flow run started without one (a deployment's): from the flow
    run's scheduled time and id, so that Prefect's Retry of that flow run resumes the same localcap run."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    start = flow_run.scheduled_start_time
    # The id's last hex digits: its first ones are a timestamp (UUIDv7), shared by runs scheduled together.
    return start.strftime("%Y%m%d-%H%M%S") + "-" + flow_run.id.replace("-", "")[-6:]


def run_id_for(run_id: str | None) -> str:
    """The run id a flow works under: the one it was given, else its flow run's, else a new one."""
    return check_run_id(run_id or run_id_of_flow_run() or new_run_id())


def link_prefect_run(ctx: RunContext) -> None:
    """The run directory's prefect.json: which Prefect flow run this is, and where the UI shows it
    (`localcap status` prints it and accepts the flow run's name or id); the flow run's name holds the run id."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if not flow_run.id:
        return
    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    record = {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name,
              "ui_url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui else None}
    ctx.storage.write_bytes(join(ctx.run_dir, PREFECT_RUN), json.dumps(record, indent=1).encode())


def slug(text: str) -> str:
    """Prefect artifact keys: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


def run_config_of(config: str | dict | RunConfig, overrides: dict | None = None, paths_from: str | None = None) -> RunConfig:
    """The run config a flow was given: a parsed one (the CLI's), a YAML file with overrides and the
    folder its relative paths are relative to (a deployment's few parameters), or a mapping."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str):
        return load_config(config, overrides, base=paths_from)
    return parse_config(config)


def config_name(config, overrides: dict | None = None) -> str:
    if isinstance(config, RunConfig):
        return config.run.name
    try:
        data = read_yaml(config, overrides) if isinstance(config, str) else (config or {})
        return str((data.get("run") or {}).get("name") or "localcap")
    except (ValueError, OSError):  # the flow itself reports a bad config
        return "localcap"


def build_run_name() -> str:
    """`<dataset>-<run id>`: what a data engineer reads in the Prefect UI's list of runs; `...-build`
    when it runs inside end_to_end (whose run has the plain name)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = f"{config_name(params.get('config'), params.get('overrides'))}-{run_id_for(params.get('run_id'))}"
    return f"{name}-build" if flow_run.parent_flow_run_id else name


@task(name="stage", cache_policy=NO_CACHE)
def stage_task(stage: Stage, inputs: dict[str, StageResult]) -> StageResult:
    """One coarse task per stage (named after it): the stage's partitions run on Ray underneath; its
    counts go to the task's log, which the run page shows."""
    result = stage.run(inputs)
    r = result.report
    if not result.on:
        get_run_logger().info("%s: off in this config", r.stage)
    else:
        rows = rows_text(r.rows) or "no rows"
        get_run_logger().info("%s: %d partition(s), %d computed, %d skipped, in %.1f s: %s", r.stage, r.partitions, r.computed,
                              r.skipped, r.seconds, rows)
    return result


@task(name="dataset-card", cache_policy=NO_CACHE)
def dataset_card_task(ctx: RunContext, n_inputs: int, reports: list[StageReport]) -> dict:
    """manifest, sizes.json, rejects and dataset.json of the built dataset (pipeline/dataset_card.py)."""
    return write_dataset_card(ctx, n_inputs, reports)


@task(name="report", cache_policy=NO_CACHE)
def report_task(ctx) -> str:
    """The HTML report of the dataset, in the run directory (linked once the publish step is done)."""
    return write_report(ctx.config.shards.output, join(ctx.run_dir, "report"), storage=ctx.storage)


def report_link(ctx: RunContext, page: str, publication: dict) -> dict:
    """Where a person opens the build's report, linked as a Prefect artifact: a published version gets
    its own copy, NAME/vN/report.html (one self-contained page); on S3 the link is a presigned https
    URL valid publish.report_link_hours. Without a version (none published, or a local one) the
    run directory's page, whose file:// link a browser opens only from the machine that holds it."""
    uri, url, expires = page, None, None
    if publication.get("uri"):
        uri = publish_report(ctx.storage, page, publication["uri"])
    if is_s3(uri):
        seconds = int(ctx.config.publish.report_link_hours * 3600)
        url = ctx.storage.presigned_url(uri, seconds)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
    link = url or Path(uri).resolve().as_uri()
    what = f"of {publication['uri']}" if publication.get("uri") else f"of run {ctx.run_id}"
    create_link_artifact(link, link_text=f"localcap report {what}" + (f" (link valid until {expires})" if expires else ""),
                         key=f"localcap-report-{slug(ctx.config.run.name)}",
                         description="Gallery of samples with boxes and captions, and plots"
                         + (f"; a presigned S3 link, valid until {expires} (publish.report_link_hours)" if expires else ""))
    return {"uri": uri, "url": url, "expires_at": expires, "page": page, "dataset": ctx.config.shards.output}


@task(name="publish-version", cache_policy=NO_CACHE)
def version_task(ctx, dataset: dict):
    """The next version NAME/vN, a snapshot of the whole dataset, and its `localcap.dataset.published`
    event; none when the build adds no sample the newest version lacks (no version either)."""
    cfg = ctx.config.publish
    result = asdict(publish_version(ctx.storage, ctx.config.shards.output, cfg.to, cfg.concurrency, cfg.part_size_mb * 2**20, ctx.progress))
    if not result.get("unchanged"):
        events.published(cfg.to, result, dataset)
    return result


def samples_markdown(samples: list[tuple[str, dict]], report: dict | None) -> list[str]:
    """The first samples as a table, and where the HTML report is, for the build's artifact: what the
    build made, readable in the Prefect UI."""
    lines = []
    if samples:
        lines += ["", "| sample | boxes | box captions | global caption |", "|---|---|---|---|"]
        for key, s in samples:
            texts = "; ".join(t.replace("|", "/") for t in s.get("text", []) if t) or "-"
            lines.append(f"| `{key[:12]}` | {len(s.get('box', []))} | {texts[:300]} | {(s.get('global_text') or '-').replace('|', '/')[:200]} |")
    if report and report.get("url"):
        lines += ["", f"[HTML report]({report['url']}) (gallery with the boxes drawn, rejects, duplicates, plots): "
                      f"`{report['uri']}`, this link valid until {report['expires_at']}"]
    elif report:
        lines += ["", f"HTML report (gallery with the boxes drawn, rejects, duplicates, plots): `{report['uri']}`"]
        if not is_s3(report["page"]):  # a browser does not open file:// links from a web page
            serve = f"localcap report {report['dataset']} --out {Path(report['page']).parent} --serve"
            lines += ["", f"To open it from here: `{serve}` on the machine that holds it, then http://127.0.0.1:8765/index.html"]
    return lines


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def report_markdown(run_id: str, dataset: dict, reports: list[StageReport], extra: list[str] = ()) -> str:
    c = dataset["counts"]
    lines = [
        f"# localcap run `{run_id}`",
        "",
        f"**{c['samples']}** samples in **{c['shards']}** shards from **{c['inputs']}** inputs; **{c['rejected']}** rejected.",
        "",
        f"**{_sentence(publication_line(dataset.get('publication')))}**" if dataset.get("publication") else "",
        "",
        "| stage | partitions | computed | skipped | seconds | CPU seconds | rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        rows = ", ".join(f"{k}: {v}" for k, v in sorted(r.rows.items()))
        lines.append(f"| {r.stage} | {r.partitions} | {r.computed} | {r.skipped} | {r.seconds} | {r.cpu_seconds} | {rows} |")
    ingest = next((r for r in reports if r.stage == "ingest"), None)
    if ingest and ingest.computed and ingest.seconds:
        done = ingest.rows.get("images", 0) + ingest.rows.get("rejects", 0)
        lines += ["", f"Ingest throughput: {done / ingest.seconds:.1f} inputs/s over the partitions computed."]
    st = dataset["statistics"]
    if st.get("boxes_per_image"):
        b = st["boxes_per_image"]
        lines += ["", (f"Boxes per image: median {b['median']} (min {b['min']}, max {b['max']}); "
                       f"images without boxes: {st['no_boxes_by_reason'] or 'none'}.")]
    cap = dataset.get("captions")
    if cap:
        lines += ["", (f"Captions by `{cap['model']}` ({cap['backend']}, prompt `{cap['prompt_id']}`): "
                       f"{cap['by_status'].get('ok', 0)} ok of {cap['total']}; {cap['by_status']}.")]
    else:
        lines += ["", f"Captions: skipped (captioner.backend {dataset.get('config', {}).get('captioner', {}).get('backend', 'none')})."]
    if c["rejected_by_reason"]:
        lines += ["", "| rejection reason | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in c["rejected_by_reason"].items()]
    return "\n".join(lines + list(extra))


def run_stages(ctx: RunContext, opts: dict) -> dict[str, StageResult]:
    """The run's stages in dependency order (pipeline.stage.stages_for), each as its own Prefect task."""
    results: dict[str, StageResult] = {}
    for cls in stages_for(ctx.config):
        stage = cls(ctx)
        results[cls.name] = run_stage_task(stage_task, {**opts, "name": cls.name}, stage, {n: results[n] for n in cls.needs})
    return results


@flow(name="build_dataset", log_prints=True, flow_run_name=build_run_name)
def build_dataset(config: str | dict | RunConfig, run_id: str | None = None, overrides: dict | None = None,
                  paths_from: str | None = None, progress: bool = True) -> dict:
    """Ingest, dedupe, propose boxes, caption and shard the configured sources into a dataset (every
    registered stage, pipeline/stage.py); returns dataset.json's content. `config`: a run config file
    (a deployment's parameter, read when the run starts, with `overrides` (KEY.SUB: value) and relative
    paths against `paths_from`), a mapping, or a parsed RunConfig (the CLI's, checked already)."""
    cfg = run_config_of(config, overrides, paths_from)
    run_id = run_id_for(run_id)
    logger = get_run_logger()
    ctx = make_context(cfg, run_id, progress)
    logger.info("run %s: work in %s, dataset to %s", run_id, ctx.run_dir, cfg.shards.output)
    check_run(cfg)  # paths, buckets, weights; a no-op for a config the CLI checked already
    init_ray(cfg.ray, on_demand=True)  # Ray starts when a stage has partitions to compute: a no-op rerun starts none
    check_cluster(cfg)  # GPUs the stages' actors need (Ray starts for it when a stage asks for GPUs): before any work
    link_prefect_run(ctx)  # the run directory's first file: after the checks, which must leave no trace

    opts = {"retries": cfg.prefect.retries, "retry_delay_seconds": cfg.prefect.retry_delay_s, "retry_condition_fn": retryable}
    try:
        results = run_stages(ctx, opts)
        reports = [r.report for r in results.values()]
        n_inputs = results["ingest"].report.rows["inputs"]
        dataset = run_stage_task(dataset_card_task, opts, ctx, n_inputs, reports)
    except StageFailed as exc:
        events.stage_failed(run_id, exc.stage, exc.reason)
        raise
    try:
        dataset["report"] = report_task(ctx)
    except Exception as exc:  # the dataset is whole; a report that fails must not fail the build
        logger.warning("report not written: %s: %s", type(exc).__name__, exc)
    if cfg.publish.to:
        dataset["published"] = run_stage_task(version_task, opts, ctx, dataset)
        p = dataset["published"]
        if p.get("unchanged"):
            logger.info("nothing published to %s: %s (LATEST: %s)", cfg.publish.to, p["reason"], p["latest"])
        else:
            logger.info("published %s: %d samples, %d new (LATEST: %s)", p["uri"], p["samples"], p["added"], p["latest"])
    dataset["publication"] = publication(dataset.get("published"), cfg.publish.to)
    if dataset.get("report"):
        try:
            dataset["publication"]["report"] = report_link(ctx, dataset["report"], dataset["publication"])
        except Exception as exc:  # the version is published; a report that cannot be linked must not fail the build
            logger.warning("report not linked: %s: %s", type(exc).__name__, exc)
    ctx.storage.write_bytes(join(ctx.run_dir, PUBLICATION), json.dumps(dataset["publication"], indent=1).encode())
    try:
        samples = read_text_boxes(ctx.storage, cfg.shards.output, cfg.shards.layout, limit=5)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("samples not read for the artifact: %s: %s", type(exc).__name__, exc)
        samples = []
    create_markdown_artifact(report_markdown(run_id, dataset, reports, samples_markdown(samples, dataset["publication"].get("report"))),
                             key=f"localcap-build-{slug(cfg.run.name)}", description=f"localcap run {run_id}")
    events.build_completed(cfg.shards.output, run_id, dataset)
    c = dataset["counts"]
    published = c["rejected_by_reason"].get("duplicate_published", 0)
    if published:
        logger.info("skipped %d images that the newest published version already holds (or that were blocked)", published)
    logger.info("done: %d samples in %d shards, %d rejected %s", c["samples"], c["shards"], c["rejected"], c["rejected_by_reason"])
    return dataset
