"""`localcap status`: where a run stands, stage by stage, read from its run directory.

Every stage folder holds `_plan.json` (partitions to do, written when the stage starts) and, once it
ends, `_report.json` (the StageReport); finished partitions are counted from their marker files, so
a stage that is running (or died) shows how far it got.
"""

from __future__ import annotations

import json
import time

from pipeline.executor import PLAN, REPORT
from pipeline.partitions import partition_index
from pipeline.stage import registered
from pipeline.storage import Storage, join


def latest_run(storage: Storage, work_dir: str) -> str | None:
    """The run whose id sorts last (ids start with a UTC timestamp), among folders with any stage."""
    names = {cls.name for cls in registered()}
    runs = [r for r in storage.list_dirs(work_dir) if names.intersection(storage.list_dirs(join(work_dir, r)))]
    return runs[-1] if runs else None


PREFECT_RUN = "prefect.json"  # the Prefect flow run of a run: {"flow_run_id", "flow_run_name", "ui_url"}


def read_prefect_run(storage: Storage, run_dir: str) -> dict | None:
    """The run's prefect.json, or None when it has none or it is not a JSON object."""
    uri = join(run_dir, PREFECT_RUN)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def find_run(storage: Storage, work_dir: str, ref: str) -> str:
    """The run id `ref` names: a localcap run id, a Prefect flow run name (`<dataset>-<run id>`) or a
    Prefect flow run id (from the run's prefect.json)."""
    runs = storage.list_dirs(work_dir)
    if ref in runs:
        return ref
    named = [r for r in runs if ref.endswith("-" + r)]
    if named:
        return max(named, key=len)
    for r in runs:
        if (read_prefect_run(storage, join(work_dir, r)) or {}).get("flow_run_id") == ref:
            return r
    raise FileNotFoundError(f"no run {ref} in {work_dir} (a run id, a Prefect flow run name or id)")


def stage_status(storage: Storage, run_dir: str, stage: str) -> dict:
    folder = join(run_dir, stage)
    names = storage.list_prefix(folder)
    plan = json.loads(storage.read_bytes(join(folder, PLAN))) if PLAN in names else None
    report = json.loads(storage.read_bytes(join(folder, REPORT))) if REPORT in names else None
    done = sum(1 for n in names if n.startswith("part-") and partition_index(n) is not None)
    if plan is None:
        state = "pending"
    elif report is not None and report.get("finished_at", 0) >= plan["started_at"]:
        state = "done"
    else:
        state = "running"
    out = {"stage": stage, "state": state, "partitions": plan["partitions"] if plan else None, "done": done}
    if report and state == "done":
        rows = report["rows"]
        out.update(rows=rows, seconds=report["seconds"], computed=report["computed"], skipped=report["skipped"],
                   nodes=len(report.get("nodes", [])))
        main = rows.get(report.get("marker", "rows"), 0)
        out["per_second"] = round(main / report["seconds"], 1) if report["seconds"] and report["computed"] else None
    elif plan:
        out["elapsed_s"] = round(time.time() - plan["started_at"], 1)
    return out


PUBLICATION = "publication.json"  # in the run directory: what the run's publish step made, or why it made nothing


def publication(published: dict | None, publish_to: str | None) -> dict:
    """The record of a build's publish step: the version it published, or why none ("unchanged" when
    the build adds no sample the newest version lacks, "publish.to is not set")."""
    if not publish_to:
        return {"version": None, "uri": None, "reason": "publish.to is not set", "latest": None}
    p = published or {}
    if p.get("unchanged"):
        return {"version": None, "uri": None, "reason": p.get("reason"), "latest": p.get("latest")}
    return {"version": p.get("version"), "uri": p.get("uri"), "reason": None, "latest": p.get("latest"),
            "samples": p.get("samples"), "added": p.get("added"), "removed": p.get("removed")}


def publication_line(record: dict | None) -> str:
    """One line for people: `published URI (+A -R, N samples; LATEST vN)` or `not published: why`."""
    if not record:
        return "not published: the run has not reached its publish step"
    if record.get("uri"):
        return (f"published {record['uri']} (+{record.get('added') or 0} -{record.get('removed') or 0}, "
                f"{record.get('samples')} samples; LATEST {record.get('latest')})")
    latest = f" (LATEST {record['latest']})" if record.get("latest") else ""
    return f"not published: {record.get('reason')}{latest}"


def rows_text(rows: dict[str, int]) -> str:
    """A stage's row counts on one line: `boxes 59, status 16`."""
    return ", ".join(f"{k} {v}" for k, v in sorted(rows.items()))


def report_line(record: dict | None) -> str | None:
    """Where the build's report is, for people: the version's page (its presigned link is in the
    Prefect artifact and publication.json), or the run directory's."""
    report = (record or {}).get("report")
    if not report:
        return None
    if report.get("url"):
        return f"report {report['uri']} (presigned link, valid until {report['expires_at']}: in the build's Prefect artifact)"
    return f"report {report['uri']}"


def run_status(storage: Storage, work_dir: str, run_id: str | None = None) -> dict:
    run_id = find_run(storage, work_dir, run_id) if run_id else latest_run(storage, work_dir)
    if run_id is None:
        raise FileNotFoundError(f"no run in {work_dir}")
    run_dir = join(work_dir, run_id)
    if not storage.list_dirs(run_dir):
        raise FileNotFoundError(f"no run {run_id} in {work_dir}")
    finished = json.loads(storage.read_bytes(join(run_dir, "run.json"))) if storage.exists(join(run_dir, "run.json")) else None
    present = set(storage.list_dirs(run_dir))
    # Built-in stages always (pending until they start); an added stage when the run has its folder.
    names = [cls.name for cls in registered() if cls.section is None or cls.name in present]
    stages = [stage_status(storage, run_dir, s) for s in names]
    prefect = read_prefect_run(storage, run_dir)
    record = None
    if storage.exists(join(run_dir, PUBLICATION)):
        try:
            record = json.loads(storage.read_bytes(join(run_dir, PUBLICATION)))
        except ValueError:
            record = None
    return {"run_id": run_id, "run_dir": run_dir, "finished": bool(finished) and all(s["state"] == "done" for s in stages),
            "counts": finished["counts"] if finished else None, "stages": stages, "prefect": prefect,
            "publication": record if isinstance(record, dict) else None}


def format_status(status: dict) -> str:
    lines = [f"run {status['run_id']}  ({status['run_dir']})  {'finished' if status['finished'] else 'not finished'}"]
    prefect = status.get("prefect") or {}
    if prefect.get("flow_run_id"):
        where = f"  {prefect['ui_url']}" if prefect.get("ui_url") else ""
        lines.append(f"  Prefect flow run {prefect.get('flow_run_name')} ({prefect['flow_run_id']}){where}")
    if status["counts"]:
        c = status["counts"]
        lines.append(f"  {c['samples']} samples in {c['shards']} shards from {c['inputs']} inputs, {c['rejected']} rejected")
        lines.append(f"  {publication_line(status.get('publication'))}")
        if report := report_line(status.get("publication")):
            lines.append(f"  {report}")
    lines.append(f"  {'stage':<8} {'state':<8} {'partitions':>10}  {'seconds':>8} {'per s':>7}  rows")
    for s in status["stages"]:
        parts = f"{s['done']}/{s['partitions']}" if s["partitions"] is not None else "-"
        seconds = f"{s['seconds']:.1f}" if "seconds" in s else (f"{s['elapsed_s']:.0f}+" if "elapsed_s" in s else "")
        rate = f"{s['per_second']}" if s.get("per_second") else ""
        rows = rows_text(s.get("rows", {}))
        lines.append(f"  {s['stage']:<8} {s['state']:<8} {parts:>10}  {seconds:>8} {rate:>7}  {rows}")
    return "\n".join(lines)
