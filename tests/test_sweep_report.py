"""The sweep report (pipeline/sweep/report.py): plots are valid PNGs, the page shows every trial,
escapes what it shows, and both render for degenerate sweeps (nothing finished, no usable law)."""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
from PIL import Image

from pipeline.sweep import report
from pipeline.sweep.report import PLOT_NAMES, plot_files, sweep_page

METRIC = "probe_acc"
IMAGES = (1000, 4000, 16000)
RESOLUTIONS = (64, 128, 256)
REF = {"images": 1000, "resolution": 64}
TRUE = {"small": {"a": 0.05, "b": 0.40, "c": 0.10}, "base": {"a": 0.06, "b": 0.45, "c": 0.12}}
ERROR = "CUDA out of memory: tried to allocate 2.00 GiB"


def law(p: dict, n: float, r: float) -> float:
    return (p["b"] + p["a"] * math.log(n / REF["images"])) * (1 + p["c"] * math.log(r / REF["resolution"]))


def make_rows() -> list[dict]:
    rows = []
    for model, p in TRUE.items():
        for i, n in enumerate(IMAGES):
            for j, r in enumerate(RESOLUTIONS):
                noise = 0.004 * math.sin(7 * i + 3 * j + len(model))  # deterministic, so fits are not exact
                rows.append({"trial_id": f"mae-{model}-n{n}-r{r}", "objective": "mae", "model": model,
                             "images": n, "resolution": r, "steps": 500, "status": "finished",
                             "seconds": 12.5 + n / 1000, "params": 1_234_567 if model == "small" else 5_600_000,
                             "error": None, METRIC: law(p, n, r) + noise, "probe_chance": 0.1})
    rows.append({"trial_id": "mae-base-n64000-r256", "objective": "mae", "model": "base", "images": 64000,
                 "resolution": 256, "steps": 500, "status": "error", "seconds": 3.0, "params": 5_600_000,
                 "error": ERROR, METRIC: None, "probe_chance": None})
    return rows


def hand_fit() -> dict:
    """The structure fit_sweep returns, written out (used until / unless pipeline.sweep.fit exists)."""
    groups = []
    for model, p in TRUE.items():
        groups.append({
            "objective": "mae", "model": model, "n_trials": 9, "ref": dict(REF),
            "grid": {"images": [min(IMAGES), max(IMAGES)], "resolution": [min(RESOLUTIONS), max(RESOLUTIONS)]},
            "laws": {
                "log_product": {"status": "ok", "params": dict(p), "std": {k: 0.001 for k in p},
                                "ci95": {k: [v - 0.002, v + 0.002] for k, v in p.items()},
                                "rmse": 1e-4, "r2": 0.9999, "loo_rmse": 2e-4, "loo": [],
                                "paper_form": {"alpha": p["a"], "beta": p["b"], "gamma": p["c"]}},
                "log_linear": {"status": "ok", "params": dict(p), "std": {k: 0.01 for k in p},
                               "ci95": {k: [v - 0.02, v + 0.02] for k, v in p.items()},
                               "rmse": 0.01, "r2": 0.98, "loo_rmse": 0.015, "loo": []},
                "saturating": {"status": "too_few_points", "params": {}, "std": {}, "ci95": {}},
            },
            "best": "log_product",
            "needed": {"target": 0.7, "law": "log_product",
                       "rows": [{"resolution": 64, "images": None, "reachable": False, "extrapolation": True,
                                 "warning": "target above the law's ceiling at this resolution"},
                                {"resolution": 256, "images": 52000.0, "reachable": True, "extrapolation": True,
                                 "warning": "beyond the largest images in the sweep"}],
                       "cheapest": {"resolution": 256, "images": 52000.0, "reachable": True,
                                    "extrapolation": True, "warning": None},
                       "warning": None},
        })
    return {"metric": METRIC, "target": 0.7, "laws": ["log_product", "log_linear", "saturating"], "groups": groups}


def get_fit(rows: list[dict]) -> dict:
    try:
        from pipeline.sweep.fit import fit_sweep
    except ImportError:
        return hand_fit()
    return fit_sweep(rows, METRIC, target=0.7)


def check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    assert 300 <= w <= 4000 and 250 <= h <= 4000, (w, h)
    return w, h


@pytest.fixture(scope="module")
def sweep():
    rows = make_rows()
    return rows, get_fit(rows)


def test_plot_files_are_three_valid_pngs(sweep):
    rows, fit = sweep
    plots = plot_files(rows, fit, METRIC)
    assert set(plots) == set(PLOT_NAMES)
    for data in plots.values():
        w, h = check_png(data)
        assert w > h  # two panels side by side


def test_page_shows_trials_errors_plots_and_laws(sweep):
    rows, fit = sweep
    page = sweep_page("scaling <sweep>", rows, fit, METRIC, list(PLOT_NAMES), config_yaml="grid:\n  images: [1, 2]\n")
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    for r in rows:
        assert r["trial_id"] in page
    assert ERROR in page
    for name in PLOT_NAMES:
        assert f'<img src="{name}"' in page
    assert "scaling &lt;sweep&gt;" in page
    assert "<script" not in page
    assert "log_product" in page and "loo_rmse" in page
    assert "±" in page and "95% CI" in page
    assert '<pre class="config">grid:' in page
    assert "18 finished" in page and "1 failed" in page


def test_needed_table_flags_unreachable_and_extrapolation(sweep):
    rows, _ = sweep
    page = sweep_page("t", rows, hand_fit(), METRIC, [])
    assert '<td class="bad">unreachable</td>' in page
    assert "target above the law&#x27;s ceiling" in page
    assert '<td class="warn">beyond the largest images in the sweep</td>' in page
    assert "52,000" in page  # images needed, 3 significant digits


def test_page_escapes_hostile_values(sweep):
    rows, fit = sweep
    rows = copy.deepcopy(rows)
    rows[0]["trial_id"] = "<script>alert(1)</script>"
    rows[-1]["error"] = "<img src=x onerror=alert(2)>"
    page = sweep_page("t", rows, fit, METRIC, ['x"><script>.png'], config_yaml="a: <script>")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<img src=x" not in page


def test_zero_finished_trials_render():
    rows = [dict(r, status="error", error="boom", **{METRIC: None}) for r in make_rows()]
    fit = {"metric": METRIC, "target": None, "laws": ["log_product"], "groups": []}
    plots = plot_files(rows, fit, METRIC)
    assert set(plots) == set(PLOT_NAMES)
    for data in plots.values():
        check_png(data)
    page = sweep_page("nothing", rows, fit, METRIC, list(plots))
    assert "0 finished" in page and "No trial finished" in page
    for r in rows:
        assert r["trial_id"] in page
    for data in plot_files([], {}, METRIC).values():
        check_png(data)
    assert "No trials" in sweep_page("empty", [], {}, METRIC, [])


def test_failed_or_missing_best_law_and_single_axis_values(sweep):
    rows, fit = sweep
    fit = copy.deepcopy(hand_fit())
    fit["groups"][0]["laws"]["log_product"]["status"] = "failed"
    fit["groups"][1]["best"] = None
    fit["groups"][1]["needed"] = None
    one_res = [r for r in rows if r["resolution"] == 128] + [dict(rows[0], trial_id="none-metric", **{METRIC: None})]
    for rs in (rows, one_res, [r for r in rows if r["images"] == 4000]):
        plots = plot_files(rs, fit, METRIC)
        for data in plots.values():
            check_png(data)
        page = sweep_page("degenerate", rs, fit, METRIC, list(plots))
        assert "points only" in page
    # a fit without its groups' ref, or with params the law cannot use, still plots the points
    broken = copy.deepcopy(hand_fit())
    broken["groups"][0]["ref"] = None
    broken["groups"][1]["laws"]["log_product"]["params"] = {"zzz": 1.0}
    for data in plot_files(rows, broken, METRIC).values():
        check_png(data)


def test_formatting():
    assert report.fmt(None) == "—"
    assert report.fmt(0.123456) == "0.123"
    assert report.fmt(52345.6) == "52,300"
    assert report.fmt(16000) == "16,000"
    assert report.fmt(1024.0) == "1,024"
    assert report.fmt(float("nan")) == "nan"
    assert report.fmt_si(1_234_567) == "1.23M"


def test_the_plotted_curves_follow_the_documented_formulas():
    ref = {"images": 100, "resolution": 32}
    y = report.law_value("saturating", {"y_max": 1.0, "A": 0.5, "alpha": 0.5, "B": 0.2, "beta": 1.0},
                         [400], [64], ref)
    assert y[0] == pytest.approx(1.0 - 0.5 * 4 ** -0.5 - 0.2 * 2 ** -1.0)
    y = report.law_value("log_linear", {"a": 0.1, "b": 0.5, "c": 0.2}, [100 * math.e], [32], ref)
    assert y[0] == pytest.approx(0.6)


def test_render_sample(sweep):
    """Writes a sample page and its plots to /tmp/sweep_report_sample/ (to look at by eye)."""
    rows, fit = sweep
    out = "/tmp/sweep_report_sample"
    os.makedirs(out, exist_ok=True)
    plots = plot_files(rows, fit, METRIC)
    for name, data in plots.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(sweep_page("sample sweep", rows, fit, METRIC, list(plots), config_yaml="metric: probe_acc\n"))
    assert os.path.getsize(os.path.join(out, "index.html")) > 1000
