"""The `sweep` flow: a scaling study on Ray Tune, tracked by Prefect (pipeline/sweep/run.py does the work).

One flow run per sweep: Ray Tune schedules the trials (each the ordinary training), every
finished trial is logged to the flow run as it ends, and the fit is kept as a Prefect artifact that
links the sweep's HTML page. Rerunning the flow on the same config resumes: finished trials are skipped.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.build import slug
from pipeline.executor import init_ray
from pipeline.storage import Storage
from schemas.sweep import SweepConfig, load_sweep_config


def sweep_config_of(config: str | dict | SweepConfig, overrides: dict | None = None, paths_from: str | None = None) -> SweepConfig:
    """A parsed sweep config (the CLI's), a YAML path with overrides and the folder its relative paths
    are relative to (a deployment's parameters), or a mapping."""
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, str):
        return load_sweep_config(config, overrides, base=paths_from)
    return SweepConfig.model_validate(config)


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def fit_markdown(name: str, folder: str, page: str, rows: list[dict], fit: dict) -> str:
    """The artifact: trials done, each group's best law with its parameters, and where the page is."""
    finished = sum(r["status"] == "finished" for r in rows)
    lines = [f"# localcap sweep `{name}`", "", f"{finished} of {len(rows)} trials finished; metric `{fit['metric']}`.",
             f"Folder `{folder}`; the page with the plots: `{page}`.", ""]
    from pipeline.sweep.report import best_law

    for group in fit["groups"]:
        lines.append(f"## {group['objective']} / {group['model']} ({group['n_trials']} trials)")
        if not (found := best_law(group)):
            lines += ["No law could be fitted.", ""]
            continue
        best, law = found
        params = ", ".join(f"{k} = {_number(v)} ± {_number((law.get('std') or {}).get(k))}" for k, v in law["params"].items())
        lines += [f"Best law `{best}` (leave-one-out RMSE {_number(law.get('loo_rmse'))}): {params}.", ""]
        needed = group.get("needed")
        if needed:
            cheapest = needed.get("cheapest")
            lines.append(f"To reach {needed['target']}: " + (f"{_number(cheapest['images'])} images at {cheapest['resolution']} px"
                                                           if cheapest else "not reachable by this law") + ".")
            if needed.get("warning"):
                lines.append(f"**{needed['warning']}**")
            lines.append("")
    return "\n".join(lines)


@flow(name="sweep", log_prints=True)
def sweep(config: str | dict | SweepConfig, overrides: dict | None = None, paths_from: str | None = None) -> dict:
    """Run a scaling sweep (`config`: as for sweep_config_of) to its end; returns the folder, the
    index.html page, the trials run this time, the rows and the fit."""
    from prefect.artifacts import create_markdown_artifact

    from pipeline.sweep.run import run_sweep

    cfg = sweep_config_of(config, overrides, paths_from)
    logger = get_run_logger()
    init_ray(cfg.ray)
    result = run_sweep(cfg, Storage(cfg.storage.endpoint_url, cfg.storage.region), log_line=logger.info)
    create_markdown_artifact(fit_markdown(cfg.name, result.folder, result.page, result.rows, result.fit),
                             key=f"localcap-sweep-{slug(cfg.name)}", description=f"localcap sweep {cfg.name}")
    logger.info("sweep %s: %d trials run, fit and plots in %s", cfg.name, result.ran, result.folder)
    return {"folder": result.folder, "page": result.page, "ran": result.ran, "rows": result.rows, "fit": result.fit}
