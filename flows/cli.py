"""The `localcap` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
import yaml

from flows import environment
from pipeline import VERBOSE_ENV, verbose
from schemas.config import ConfigError, absolute_path, check_run_id, load_config, train_with_absolute_paths

environment.apply()  # before Prefect and Ray are imported: they read these at import

app = typer.Typer(
    help="localcap: build local-caption datasets (PS3 paired WebDataset shards) from high-resolution images.\n\n"
    "Runs locally with no server (Prefect's temporary server, a local Ray); set RAY_ADDRESS or ray.address "
    "to use a Ray cluster and PREFECT_API_URL to report to a Prefect server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_DIR = Path("demo-output")


def _parse_sets(values: list[str]) -> dict:
    out = {}
    for item in values:
        if "=" not in item:
            raise typer.BadParameter(f"--set wants KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _run(config_path: Path, run_id: str | None, sets: list[str], progress: bool, train: bool = False) -> dict:
    """build_dataset on a config (or end_to_end with `train`); the build's dataset.json content, with
    the training result under "trained" when it ran."""
    try:
        cfg = load_config(config_path, _parse_sets(sets))
        run_id = run_id and check_run_id(run_id)
        from pipeline.preflight import check_run

        check_run(cfg, train=train)  # before Ray and Prefect start: what a retry cannot fix
    except ValueError as exc:  # ConfigError, PreflightError, a bad run id: each names its field
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    from flows.build import StageFailed, build_dataset, error_line  # Prefect imports slowly: only after the checks pass

    try:
        if not train:
            return build_dataset(cfg, run_id=run_id, progress=progress)  # parsed and checked once, here
        from flows.train import end_to_end

        both = end_to_end(cfg, run_id=run_id, progress=progress)
    except StageFailed as exc:
        _fail(str(exc))
    except Exception as exc:  # Ray or Prefect failed around the stages: still one line at the end
        _fail(f"run failed: {error_line(exc)}")
    return both["dataset"] | {"trained": both["train"]}  # train None: no new version to train on


def _fail(message: str) -> None:
    """End a failed run with one line: Prefect's temporary server would otherwise log its stop after it, at exit."""
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)  # the run is over; its temporary server logs here
    typer.echo(f"localcap: {message}", err=True)
    raise typer.Exit(1)


def _echo_trained(result: dict) -> None:
    from pipeline.train.evaluate import recall_keys

    m = result["metrics"]
    typer.echo(f"trained {result['name']} ({m.get('objective')}): step {m.get('step')}, checkpoint {result['checkpoint']}")
    recalls = recall_keys(m)
    if recalls:
        typer.echo("  held-out recall: " + ", ".join(f"{k} {m[k]:.2f} (chance {m[k + '_chance']:.2f})" for k in recalls))
    if m.get("eval_loss") is not None:
        typer.echo(f"  held-out MAE loss {m['eval_loss']:.4f}")
    typer.echo(f"  metrics: {result['output']}/metrics.json")


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)."),
    run_id: str | None = typer.Option(None, "--run-id", help="Reuse a run id to resume it: finished partitions are skipped."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set ingest.min_side=512 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    train: bool = typer.Option(False, "--train", help="Then train on the new version (the config's `train:` section), "
                               "as the Prefect flow `end_to_end`."),
):
    """Build a dataset: ingest -> dedupe -> regions -> caption -> shard -> publish, as the Prefect flow
    `build_dataset`; with --train, then train on it."""
    dataset = _run(config, run_id, set_, progress, train)
    c = dataset["counts"]
    typer.echo(f"run {dataset['run_id']}: {c['samples']} samples in {c['shards']} shards -> {dataset['config']['shards']['output']}"
               f" ({c['rejected']} rejected)")
    if dataset.get("publication"):
        from pipeline.status import publication_line, report_line

        typer.echo(f"  {publication_line(dataset['publication'])}")
        if report := report_line(dataset["publication"]):
            typer.echo(f"  {report}")
    if dataset.get("trained"):
        _echo_trained(dataset["trained"])


@app.command("train")
def train_command(
    dataset: str = typer.Argument(..., help="Dataset to train on: a built folder, NAME/vN, NAME/LATEST or NAME (path or s3://)."),
    config: Path | None = typer.Option(None, "--config", help="Train config YAML (the `train:` section's fields), or a run "
                                       "config whose train/storage/ray sections are used."),
    set_: list[str] = typer.Option([], "--set", help="Override a train field, e.g. --set steps=2000 --set num_workers=4 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A progress bar over the steps on stderr."),
):
    """Train a vision encoder on a dataset on Ray (PS3-style local contrastive, or MAE): checkpoints
    to OUTPUT/NAME, held-out retrieval metrics at the end. Rerunning the same name resumes from its last checkpoint."""
    from schemas.config import apply_overrides, parse_train_config, read_yaml

    try:
        data = read_yaml(config) if config else {}
        run_config = "sources" in data or "shards" in data
        train_data = apply_overrides(dict(data.get("train", {})) if run_config else data, _parse_sets(set_))
        cfg = train_with_absolute_paths(parse_train_config(train_data, str(config or "--set")), os.getcwd())
        from pipeline.preflight import check_train

        dataset = absolute_path(dataset, os.getcwd())
        check_train(dataset, cfg, data.get("storage") if run_config else None, data.get("ray") if run_config else None)
    except ValueError as exc:  # ConfigError, PreflightError: each names its field, before Ray and Prefect start
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    from flows.train import train

    try:
        result = train(dataset, cfg.model_dump(mode="json"), data.get("storage") if run_config else None,
                       data.get("ray") if run_config else None, progress=progress)
    except FileNotFoundError as exc:
        typer.echo(f"not a localcap dataset (no dataset.json?): {exc}", err=True)
        raise typer.Exit(2) from None
    _echo_trained(result)


@app.command()
def inspect(
    dataset: str = typer.Argument(..., help="Dataset directory holding dataset.json, NAME/vN, NAME/LATEST or NAME (path or s3://)."),
    samples: int = typer.Option(1, "--samples", "-n", help="How many samples to print."),
):
    """Show a dataset: counts, rejection reasons, shards, and a sample's JSON."""
    from pipeline.inspection import describe_dataset
    from pipeline.versions import resolve

    try:
        storage = _storage(dataset)
        typer.echo(describe_dataset(resolve(storage, dataset), storage, n_samples=samples))
    except (ValueError, FileNotFoundError) as exc:  # also BadMetadata: a dataset's files are untrusted
        typer.echo(f"not a localcap dataset (no dataset.json?): {exc}", err=True)
        raise typer.Exit(2) from None


def _storage(*uris: str):
    """The storage the operator commands use (endpoint AWS_ENDPOINT_URL, the standard AWS credential
    chain), after one quick look at the bucket of each s3:// URI (one HEAD, no retries): an endpoint
    that does not answer, refused credentials, a missing bucket or a denied access ends the command
    in one line, exit 1, before any work."""
    from pipeline.preflight import BucketProbe, PreflightError
    from pipeline.storage import Storage, is_s3

    storage = Storage()
    probe = BucketProbe(storage.endpoint_url, storage.region)
    try:
        for uri in uris:
            if uri and is_s3(uri):
                probe.check(uri, uri)
    except PreflightError as exc:
        _fail(str(exc))
    return storage


@app.command()
def publish(
    dataset: Path = typer.Argument(..., help="A built dataset folder (shards.output of a run)."),
    name: str = typer.Argument(..., help="Dataset name to publish to: s3://bucket/prefix/NAME or a local folder."),
    concurrency: int = typer.Option(8, "--concurrency", help="Files (and parts) uploaded at once."),
    part_size_mb: int = typer.Option(64, "--part-size-mb", help="Multipart part size."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    force: bool = typer.Option(False, "--force", help="Publish a new version even when the files are identical to the newest one's."),
):
    """Publish a built dataset as the next version NAME/vN: a snapshot of the whole dataset (the
    newest version's samples plus the build's new ones), uploading only the new shards. Rerunning
    an interrupted publish finishes the version it claimed. A build that adds no sample the newest
    version lacks publishes nothing, unless --force."""
    from pipeline.versions import publish_version

    if not (dataset / "dataset.json").is_file():
        typer.echo(f"{dataset}: no dataset.json, not a finished build", err=True)
        raise typer.Exit(2)
    name = absolute_path(name, os.getcwd())  # a relative local NAME: its event names the same dataset as the config's publish.to
    r = publish_version(_storage(name), dataset, name, concurrency, part_size_mb * 2**20, progress, force=force)
    if r.unchanged:
        typer.echo(f"unchanged: {r.reason}; no new version (LATEST -> {r.latest})")
        return
    _echo_version(name, r)


def _echo_version(name: str, r) -> None:
    """The one line a new version gets, and its event for a server's automations."""
    typer.echo(f"published {r.uri}: {r.samples} samples in {r.shards} shards (+{r.added} -{r.removed}; "
               f"{r.uploaded} shard files uploaded, {r.skipped} already there{', resumed' if r.resumed else ''}); LATEST -> {r.latest}")
    if os.environ.get("PREFECT_API_URL"):  # a server to tell: its automations may retrain on the new version
        from dataclasses import asdict

        from flows import events

        events.published(name, asdict(r))
        events.flush()


@app.command()
def remove(
    name: str = typer.Argument(..., help="Dataset name: s3://bucket/prefix/NAME or a local folder."),
    uid: list[str] = typer.Option([], "--uid", help="A sample's uid (manifest.parquet); repeatable."),
    source: list[str] = typer.Option([], "--source", help="A sample's source URI as ingested (a local path may be relative); repeatable."),
    from_file: Path | None = typer.Option(None, "--from-file", help="A file of uids or source URIs, one per line."),
    block: bool = typer.Option(False, "--block", help="Keep their hashes so that no later build ingests them again."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Publish the next version without some samples (a takedown), rewriting only the shards that
    held them. Older versions still hold them until `localcap gc` drops those versions."""
    from pipeline.versions import remove_samples

    uids, sources = set(uid), {absolute_path(s, os.getcwd()) for s in source}  # a local source was ingested as an absolute path
    if from_file is not None:
        try:
            lines = [ln.strip() for ln in from_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        except OSError as exc:
            _fail(f"--from-file: {exc}")
        uids |= {ln for ln in lines if "://" not in ln and "/" not in ln}
        sources |= {ln for ln in lines if "://" in ln or "/" in ln}
    if not uids and not sources:
        _fail("give --uid, --source or --from-file: what to remove")
    name = absolute_path(name, os.getcwd())
    try:
        r = remove_samples(_storage(name), name, uids, sources, block=block, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    _echo_version(name, r)
    if block:
        typer.echo(f"blocked: {r.removed} sample(s)' hashes are in {name}/_blocked/; later builds reject them")


@app.command()
def gc(
    name: str = typer.Argument(..., help="Dataset name: s3://bucket/prefix/NAME or a local folder."),
    keep: int = typer.Option(..., "--keep", help="How many of the newest versions to keep (at least 1)."),
    delete: bool = typer.Option(False, "--delete", help="Delete; without it, only say what would go (a dry run)."),
):
    """Delete the shard files that none of the newest KEEP versions references, the incomplete uploads
    killed publishers left, and the older versions' metadata. A dry run unless --delete; a file a kept
    version needs is never deleted, nor anything of a publish begun in the last 24 hours."""
    from pipeline.versions import collect_garbage

    try:
        plan = collect_garbage(_storage(name), absolute_path(name, os.getcwd()), keep, delete)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    verb = "deleted" if plan.deleted else "would delete"
    typer.echo(f"keeping {', '.join(plan.kept) or 'nothing'}; {verb} {len(plan.shards)} shard file(s) "
               f"({plan.bytes / 2**20:.1f} MiB), {len(plan.uploads)} incomplete upload(s) and the metadata of "
               f"{', '.join(plan.dropped) or 'no version'}")
    if not plan.deleted and (plan.shards or plan.dropped or plan.uploads):
        typer.echo("(a dry run: add --delete to delete)")


@app.command()
def versions(name: str = typer.Argument(..., help="Dataset name: s3://bucket/prefix/NAME or a local folder.")):
    """List the published versions of a dataset with their counts and dates."""
    from pipeline.versions import list_versions

    rows = list_versions(_storage(name), name)
    if not rows:
        typer.echo(f"{name}: no published version", err=True)
        raise typer.Exit(1)
    for v in rows:
        if v.broken:
            typer.echo(f"{v.version:<6}{'*' if v.latest else ' '} BROKEN: {v.broken}  {v.uri}")
            continue
        change = f"+{v.added or 0} -{v.removed or 0}" if v.added is not None else ""
        typer.echo(f"{v.version:<6}{'*' if v.latest else ' '} {v.samples:>8} samples {v.shards:>6} shards {change:>10}  "
                   f"built {v.created_at}  published {v.published_at or '?'}  {v.uri}")


@app.command()
def pull(
    uri: str = typer.Argument(..., help="NAME/vN, NAME/LATEST or NAME (its LATEST), s3:// or local."),
    dest: Path = typer.Argument(..., help="Local folder to fill."),
    shards: str | None = typer.Option(None, "--shards", help="Only shards START:STOP (e.g. 0:10), or one index."),
    workers: int = typer.Option(8, "--workers", help="Parallel downloads."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Download a published version (or some shards): parallel, resumable, sha256-verified."""
    from pipeline.shards.pull import parse_shards, pull as pull_version

    try:
        selection = parse_shards(shards)
        r = pull_version(_storage(uri), uri, dest, selection, workers, progress)
    except (ValueError, FileNotFoundError) as exc:  # also BadMetadata: a refused version
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # a download that failed its checks or the network: rerun to resume
        typer.echo(f"pull failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"pulled {r.version_uri} -> {dest}: {r.downloaded} files downloaded, {r.skipped} already there "
               f"({r.bytes / 2**20:.1f} MiB)")


def _configs(paths: list[Path]):
    try:
        return [load_config(p) for p in paths]
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def deploy(
    configs: list[Path] = typer.Argument(..., help="Run configs; each becomes deployments build_dataset/, end_to_end/ and train/<run.name>."),
    pool: str | None = typer.Option(None, "--pool", help="Work pool (default: deploy.work_pool of each config)."),
):
    """Register the build_dataset, end_to_end (build, publish, train) and train deployments of each config
    with the Prefect server at PREFECT_API_URL: parameters the config file (read when a run starts), its
    overrides and the folder relative paths are taken against; deploy.cron on the flow deploy.flow names;
    with deploy.retrain: on_publish, a trigger that trains train/NAME on each new version of publish.to;
    one run of each at a time. Run them with `prefect worker start --pool localcap`."""
    from flows.deploy import check_deployable, deploy as register, schedule_text, trigger_text
    from pipeline.preflight import untrainable

    loaded = _configs(configs)
    try:
        for cfg in loaded:
            check_deployable(cfg)
    except ValueError as exc:
        typer.echo(f"localcap deploy: {exc}", err=True)
        raise typer.Exit(2) from None
    for cfg in loaded:
        if reason := untrainable(cfg):
            typer.echo(f"note: train/{cfg.run.name} and end_to_end/{cfg.run.name} will fail if run: {reason}", err=True)
    rows = [("deployment", "schedule", "trigger", "work pool")]
    for cfg, deployments in zip(loaded, register(loaded, pool)):
        rows += [(f"{flow_name}/{cfg.run.name}", schedule_text(flow_name, cfg), trigger_text(flow_name, cfg), pool or cfg.deploy.work_pool)
                 for flow_name in deployments]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    typer.echo(f"start a worker to run them: prefect worker start --pool {pool or loaded[0].deploy.work_pool}")


@app.command()
def serve(configs: list[Path] = typer.Argument(..., help="Run configs to serve as deployments.")):
    """Serve build_dataset deployments of these configs from this one long-lived process (small set-ups:
    no work pool or worker needed); schedules from deploy.cron or deploy.interval_s. Stop with Ctrl-C."""
    from flows.deploy import serve as serve_deployments

    serve_deployments(_configs(configs))


@app.command()
def status(
    run_id: str | None = typer.Argument(None, help="Run id, or its Prefect flow run name or id (default: the newest run in the work dir)."),
    work_dir: str = typer.Option("./localcap-work", "--work-dir", help="run.work_dir of the runs (path or s3://)."),
    config: Path | None = typer.Option(None, "--config", help="Take the work dir from this run config."),
):
    """Where a run stands, stage by stage: partitions done, rows, seconds and throughput."""
    from pipeline.status import format_status, run_status

    if config is not None:
        work_dir = load_config(config).run.work_dir
    try:
        typer.echo(format_status(run_status(_storage(work_dir), work_dir, run_id)))
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def report(
    dataset: str = typer.Argument(..., help="Dataset directory, NAME/vN, NAME/LATEST or NAME (path or s3://)."),
    out: str = typer.Option("./localcap-report", "--out", help="Folder for index.html and thumbs/ (path or s3://)."),
    samples: int = typer.Option(24, "--samples", "-n", help="Images in the gallery (evenly spread over the manifest)."),
    serve: bool = typer.Option(False, "--serve", help="Then serve it over HTTP on 127.0.0.1 (a browser, or the Prefect "
                               "UI's link, cannot open a file:// page); Ctrl-C stops."),
    port: int = typer.Option(8765, "--port", help="--serve: the port (0: any free one)."),
):
    """Write a static HTML report: a gallery with boxes drawn and captions beside, and plots."""
    from pipeline.report import write_report
    from pipeline.storage import is_s3

    if serve and is_s3(out):
        raise typer.BadParameter("--serve serves a local --out folder; an s3:// report is read from the bucket")
    try:
        page = write_report(dataset, out, samples, _storage(dataset, out))
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {page}")
    if serve:
        _serve_folder(Path(page).parent, port)


def _serve_folder(folder: Path, port: int) -> None:
    """Serve `folder` read-only on 127.0.0.1 until interrupted (only this machine can reach it)."""
    import functools
    import signal
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no line per request in the terminal
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads, block_on_close = True, False  # Ctrl-C stops at once, whatever a browser holds open

    try:
        httpd = Server(("127.0.0.1", port), functools.partial(Quiet, directory=str(folder)))
    except OSError as exc:
        _fail(f"--serve: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); pick another --port")
    typer.echo(f"serving http://127.0.0.1:{httpd.server_address[1]}/index.html (Ctrl-C stops)")

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a supervisor's stop, and Ctrl-C's where SIGINT is ignored (a background job)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def _demo_inputs(out: Path, images: int) -> list[str]:
    """Write `images` demo scenes (and the two inputs meant to be rejected) to OUT/images; the --set
    overrides that point the demo's run config at them, OUT/work and OUT/dataset."""
    from pipeline.synthetic import write_demo_images

    paths = write_demo_images(out / "images", n=images)
    typer.echo(f"wrote {len(paths)} demo inputs to {out / 'images'} (two are meant to be rejected at ingest)")
    return [f"sources=[{{uri: '{out / 'images'}'}}]", f"run.work_dir={out / 'work'}", f"shards.output={out / 'dataset'}"]


@app.command()
def demo(
    out: Path = typer.Option(DEMO_DIR, "--out", help="Folder for the demo images, work files and dataset."),
    images: int = typer.Option(16, "--images", help="How many 2K-4K demo scenes to generate."),
    config: Path = typer.Option(DEMO_CONFIG, "--config", help="Run config of the demo."),
    train: bool = typer.Option(False, "--train", help="Then train the tiny model on the demo dataset (images to checkpoint)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field of the demo's run config, e.g. --set train.steps=50 "
                                   "(repeatable; applied after the demo's own paths)."),
):
    """Generate demo images, build a dataset from them with the real flow, and inspect it."""
    from pipeline.inspection import describe_dataset

    sets = _demo_inputs(out, images)
    if config.resolve() == DEMO_CONFIG.resolve():
        from captioners.tiny import SCENES_MODEL

        sets.append(f"captioner.model={SCENES_MODEL}")  # the shipped model, wherever the demo runs from
    sets.append(f"train.output={out / 'train'}")
    dataset = _run(config, "demo", sets + list(set_), progress=True, train=train)
    typer.echo("")
    typer.echo(describe_dataset(dataset["config"]["shards"]["output"]))
    if dataset.get("trained"):
        _echo_trained(dataset["trained"])


SWEEP_DEMO_CONFIG = Path(__file__).with_name("sweep-demo.yaml")
SWEEP_DEMO_DIR = Path("sweep-demo")


def _sweep_demo_dataset(out: Path, images: int) -> None:
    """Generate demo scenes and build the sweep demo's dataset from them (no captioner: MAE needs none)."""
    sets = _demo_inputs(out, images) + ["run.name=localcap-sweep-demo", "captioner.backend=none", "captioner.model=null",
                                        "shards.max_samples=4"]
    _run(DEMO_CONFIG, "sweep-demo", sets, progress=True)


@app.command()
def sweep(
    config: Path | None = typer.Argument(None, help="Sweep config YAML (see configs/sweep.yaml); not with --demo."),
    set_: list[str] = typer.Option([], "--set", help="Override a sweep field, e.g. --set grid.images=[100,1000] "
                                   "--set train.steps=2000 (repeatable)."),
    demo: bool = typer.Option(False, "--demo", help="Build a dataset from generated scenes, then run the built-in CI-sized "
                              "grid on it (3 data sizes x 3 resolutions x 2 model sizes of MAE, a few minutes on 2 CPUs)."),
    out: Path = typer.Option(SWEEP_DEMO_DIR, "--out", help="--demo: the folder for its images, dataset and sweep."),
    images: int = typer.Option(30, "--images", help="--demo: how many scenes to generate (the largest data size plus the held-out shard)."),
):
    """A scaling study: train one model per grid point (training images x resolution x model size x objective)
    as Ray Tune trials on one dataset, each ending with a held-out metric (a k-NN probe on frozen features by
    default), then fit scaling laws to the results: the paper's two-factor form in log space and
    alternatives, with bootstrap uncertainties, leave-one-out error and the data x resolution predicted for
    a target. Writes OUTPUT/NAME/: results.parquet, fit.json, plots and index.html. Rerun the same command
    to resume: finished trials are not rerun."""
    from schemas.sweep import load_sweep_config

    if demo == (config is not None):
        raise typer.BadParameter("give a sweep CONFIG, or --demo (not both)")
    try:
        overrides = _parse_sets(set_)
        if demo:
            overrides = {"dataset": str(out / "dataset"), "output": str(out / "sweeps")} | overrides
        cfg = load_sweep_config(config or SWEEP_DEMO_CONFIG, overrides)
    except ValueError as exc:  # ConfigError names the field
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if demo:
        _sweep_demo_dataset(out, images)
    from pipeline.storage import Storage
    from pipeline.sweep.run import preflight

    try:
        preflight(cfg, Storage(cfg.storage.endpoint_url, cfg.storage.region))  # before Ray and Prefect start
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    from flows.sweep import sweep as sweep_flow

    try:
        result = sweep_flow(cfg)
    except Exception as exc:
        _fail(f"sweep failed: {type(exc).__name__}: {exc}")
    finished = sum(r["status"] == "finished" for r in result["rows"])
    typer.echo(f"sweep {cfg.name}: {finished} of {len(result['rows'])} trials finished ({result['ran']} run now)")
    from pipeline.sweep.report import best_law

    for group in result["fit"]["groups"]:
        if found := best_law(group):
            best, law = found
            params = ", ".join(f"{k}={v:.3g}" for k, v in law["params"].items())
            loo = law.get("loo_rmse")
            typer.echo(f"  {group['objective']}/{group['model']}: best law {best} ({params}), leave-one-out RMSE "
                       + (f"{loo:.3g}" if loo is not None else "n/a"))
        else:
            typer.echo(f"  {group['objective']}/{group['model']}: no law fitted")
    typer.echo(f"  page: {result['page']}")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Tracebacks for remote failures, and the lines "
                                          "of Ray's own processes, which are otherwise kept out of the terminal.")):
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # the stages, Ray and the flow runs read it too


def main() -> None:
    """The console entry point: a remote failure (S3 unreachable, credentials, bucket, access) ends
    in one line and exit 1 instead of a botocore traceback, unless --verbose."""
    from pipeline.storage import remote_failure

    try:
        app()
    except Exception as exc:
        chain, seen = [], exc
        while seen is not None and len(chain) < 8:  # also when a library wrapped it (raise ... from exc)
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        line = next((text for e in chain if (text := remote_failure(e))), None)
        if line is None or verbose():
            raise
        typer.echo(f"localcap: {line}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
