"""`localcap status` and the build's report, on a run of the real flow."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipeline.status import run_status
from pipeline.storage import Storage
from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg


def test_status_and_report_of_a_finished_run(build, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(scene_jpeg(1100 + i, 1300, 1100))
    (src / "broken.jpg").write_bytes(b"not an image")
    work = tmp_path / "work"
    cfg = run_config(tmp_path, src, work=work, ingest={"partition_size": 2})
    dataset = build(cfg, run_id="20261122-status")

    status = run_status(Storage(), str(work))  # the newest run
    assert status["run_id"] == "20261122-status" and status["finished"]
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["ingest"]["state"] == "done" and stages["ingest"]["done"] == stages["ingest"]["partitions"] == 2
    assert stages["ingest"]["rows"] == {"images": 3, "rejects": 1} and stages["ingest"]["nodes"] == 1
    assert stages["caption"]["partitions"] == 0  # captioner none: nothing to do, and said so

    from flows.cli import app

    out = CliRunner().invoke(app, ["status", "--work-dir", str(work)])
    assert out.exit_code == 0 and "ingest   done" in out.output and "3 samples in 1 shards from 4 inputs" in out.output
    assert "not published: publish.to is not set" in out.output  # what the run made, and why no version
    out = CliRunner().invoke(app, ["status", "nope", "--work-dir", str(work)])
    assert out.exit_code == 2 and "no run nope" in out.output
    # The Prefect flow run and the localcap run name each other: its name holds the run id, the run
    # directory holds its id, and status takes either.
    prefect = status["prefect"]
    assert prefect["flow_run_name"] == "localcap-20261122-status" and prefect["ui_url"].endswith(f"/runs/flow-run/{prefect['flow_run_id']}")
    for ref in (prefect["flow_run_name"], prefect["flow_run_id"]):
        assert run_status(Storage(), str(work), ref)["run_id"] == "20261122-status"
    out = CliRunner().invoke(app, ["status", prefect["flow_run_id"], "--work-dir", str(work)])
    assert out.exit_code == 0 and f"Prefect flow run localcap-20261122-status ({prefect['flow_run_id']})" in out.output

    page = Path(dataset["report"])  # the build wrote the HTML report into the run directory
    assert page.is_file() and page.parent == work / "20261122-status" / "report"
    assert page.read_text().count('class="card"') == 3
