"""Tests for pipeline.sweep.fit: scaling-law fits over a (images, resolution) sweep grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.sweep.fit import LAWS, PARAMS, fit_group, fit_law, fit_sweep, law_value, predict_needed

REF = {"images": 8.0, "resolution": 64.0}
GRID = {"images": [8.0, 64.0], "resolution": [64.0, 256.0]}
TRUTH = {
    "log_product": {"b": 0.3, "a": 0.08, "c": 0.4},  # strong interaction: c*a*x*z term is large
    "log_linear": {"b": 0.3, "a": 0.05, "c": 0.06},
    "saturating": {"y_max": 0.8, "A": 0.3, "alpha": 0.7, "B": 0.2, "beta": 1.2},
}
TOL = {  # absolute tolerance per recovered parameter (noise sd 0.005 on 12 grid points)
    "log_product": {"b": 0.01, "a": 0.006, "c": 0.03},
    "log_linear": {"b": 0.01, "a": 0.006, "c": 0.01},
    "saturating": {"y_max": 0.05, "A": 0.05, "alpha": 0.25, "B": 0.04, "beta": 0.35},
}


def grid_points():
    n, r = np.meshgrid([8.0, 16.0, 32.0, 64.0], [64.0, 128.0, 256.0])
    return n.ravel(), r.ravel()


def synthetic(law, sd=0.005, seed=1):
    n, r = grid_points()
    y = law_value(law, TRUTH[law], n, r, REF) + np.random.default_rng(seed).normal(0.0, sd, n.size)
    return n, r, y


def test_law_value_formulas_and_broadcasting():
    n = np.array([[8.0], [16.0], [64.0]])
    r = np.array([64.0, 128.0])
    v = law_value("log_product", {"b": 0.3, "a": 0.1, "c": 0.5}, n, r, REF)
    assert v.shape == (3, 2)
    assert v[0, 0] == pytest.approx(0.3)
    assert v[1, 1] == pytest.approx((0.3 + 0.1 * math.log(2)) * (1 + 0.5 * math.log(2)))
    assert law_value("log_linear", {"b": 0.3, "a": 0.1, "c": 0.5}, 16, 128, REF) == pytest.approx(0.3 + 0.6 * math.log(2))
    sat = law_value("saturating", TRUTH["saturating"], 16, 128, REF)
    assert sat == pytest.approx(0.8 - 0.3 * 2 ** -0.7 - 0.2 * 2 ** -1.2)
    assert set(PARAMS) == set(LAWS)


@pytest.mark.parametrize("law", LAWS)
def test_fit_recovers_generating_parameters(law):
    n, r, y = synthetic(law)
    g = fit_group(n, r, y, bootstrap=100, seed=0)
    assert g["n_trials"] == 12
    assert g["ref"] == REF
    assert g["grid"] == GRID
    fit = g["laws"][law]
    assert fit["status"] == "ok"
    assert fit["r2"] > 0.98
    inside = 0
    for k, true in TRUTH[law].items():
        assert fit["params"][k] == pytest.approx(true, abs=TOL[law][k]), (k, fit["params"])
        lo, hi = fit["ci95"][k]
        assert lo <= fit["params"][k] <= hi
        assert fit["std"][k] > 0
        inside += lo <= true <= hi
    assert inside >= len(TRUTH[law]) - 1, fit["ci95"]
    assert fit["bootstrap_ok"] >= 90
    assert len(fit["loo"]) == 12 and fit["loo_ok"] == 12
    # the generating law predicts held-out grid points (nearly) best
    loos = {k: f["loo_rmse"] for k, f in g["laws"].items() if f["loo_rmse"] is not None}
    assert loos[law] <= 1.25 * min(loos.values()), loos
    if law in ("log_product", "saturating"):
        assert g["best"] == law, loos
    if law == "log_product":  # strong interaction: the additive laws clearly lose
        assert loos["log_linear"] > 3 * loos["log_product"]
        assert loos["saturating"] > 3 * loos["log_product"]


def test_paper_form_is_the_same_function():
    n, r, y = synthetic("log_product")
    fit = fit_group(n, r, y, bootstrap=0)["laws"]["log_product"]
    pf = fit["paper_form"]
    assert pf["alpha_i"] == fit["params"]["a"] and pf["alpha_ppi"] == fit["params"]["c"]
    paper = (pf["beta_i"] + pf["alpha_i"] * np.log(n)) * (pf["alpha_ppi"] * np.log(r) + pf["beta_ppi"])
    np.testing.assert_allclose(paper, law_value("log_product", fit["params"], n, r, fit_group(n, r, y, bootstrap=0)["ref"]))
    assert fit["std"] == {"b": None, "a": None, "c": None} and fit["bootstrap_ok"] == 0


def test_fit_law_noiseless_is_exact():
    n, r = grid_points()
    for law in LAWS:
        y = law_value(law, TRUTH[law], n, r, REF)
        fit = fit_law(law, n, r, y, REF)
        assert fit["status"] == "ok" and fit["rmse"] < 1e-6, fit
        for k, true in TRUTH[law].items():
            assert fit["params"][k] == pytest.approx(true, rel=1e-3, abs=1e-4)


def test_predict_needed_round_trip_log_product():
    p = TRUTH["log_product"]
    out = predict_needed("log_product", p, REF, GRID, 0.7, [64, 128, 256])
    assert out["law"] == "log_product" and out["target"] == 0.7
    assert [row["resolution"] for row in out["rows"]] == [64.0, 128.0, 256.0]
    for row in out["rows"]:
        assert row["reachable"] and row["images"] > 0
        assert law_value("log_product", p, row["images"], row["resolution"], REF) == pytest.approx(0.7, abs=1e-9)
    cost = [row["images"] * row["resolution"] ** 2 for row in out["rows"]]
    assert out["cheapest"] == out["rows"][int(np.argmin(cost))]


def test_predict_needed_default_resolutions_and_saturating_round_trip():
    p = TRUTH["saturating"]
    out = predict_needed("saturating", p, REF, GRID, 0.6)
    assert [row["resolution"] for row in out["rows"]] == [64.0, 256.0, 512.0, 1024.0]
    for row in out["rows"]:
        assert row["reachable"], row
        assert law_value("saturating", p, row["images"], row["resolution"], REF) == pytest.approx(0.6, abs=1e-9)
    out = predict_needed("saturating", p, {**REF}, {**GRID, "resolutions": [64, 128, 256]}, 0.6)
    assert [row["resolution"] for row in out["rows"]] == [64.0, 128.0, 256.0, 512.0, 1024.0]


def test_predict_needed_extrapolation_warning():
    # y = ln(N/8): N = 1280 = 40x the largest trial's 32 images reaches ln(160); 512 is 2.0x the largest resolution
    grid = {"images": [8.0, 32.0], "resolution": [64.0, 256.0]}
    out = predict_needed("log_linear", {"b": 0.0, "a": 1.0, "c": 0.0}, REF, grid, math.log(160), [128, 512])
    row = out["rows"][1]
    assert row["images"] == pytest.approx(1280)
    assert row["reachable"] and row["extrapolation"]
    assert row["warning"] == "extrapolation: 40x the largest trial's images (32)"  # 512 px is within 2x: not named
    # inside the grid, nothing to warn about
    inside = predict_needed("log_linear", {"b": 0.0, "a": 1.0, "c": 0.0}, REF, grid, math.log(3), [128])["rows"][0]
    assert inside["reachable"] and not inside["extrapolation"] and inside["warning"] is None
    # resolution far beyond the grid is an extrapolation even when the images are not
    far = predict_needed("log_linear", {"b": 0.0, "a": 1.0, "c": 0.0}, REF, grid, math.log(3), [1024])
    assert far["rows"][0]["extrapolation"] and far["rows"][0]["warning"] == "extrapolation: 4.0x the largest trial's resolution (256)"
    assert far["warning"] and far["warning"].startswith("the cheapest option is an extrapolation")


def test_predict_needed_unreachable():
    p = TRUTH["saturating"]
    out = predict_needed("saturating", p, REF, GRID, 0.85, [64, 256])  # above y_max = 0.8
    for row in out["rows"]:
        assert row["reachable"] is False and row["images"] is None
        assert "ceiling" in row["warning"]
    assert out["cheapest"] is None and "not reachable" in out["warning"]
    # between the ceilings: reachable at high resolution only (ceiling at 64 is 0.6, at 256 about 0.76)
    mixed = predict_needed("saturating", p, REF, GRID, 0.7, [64, 256])
    assert [row["reachable"] for row in mixed["rows"]] == [False, True]
    assert mixed["cheapest"]["resolution"] == 256.0
    dec = predict_needed("log_linear", {"b": 0.5, "a": -0.02, "c": 0.01}, REF, GRID, 0.6, [64])
    assert dec["rows"][0]["reachable"] is False and "not increasing" in dec["rows"][0]["warning"]
    huge = predict_needed("log_linear", {"b": 0.5, "a": 1e-6, "c": 0.0}, REF, GRID, 0.9, [64])
    assert huge["rows"][0]["reachable"] is False and huge["rows"][0]["images"] is None
    json.dumps(huge, allow_nan=False)


@pytest.mark.parametrize("n,r,y", [
    ([16, 16, 16], [64, 128, 256], [0.3, 0.4, 0.5]),  # one N value
    ([8, 16], [64, 128], [0.3, 0.4]),  # two points
    ([8], [64], [0.3]),  # one point
    ([8, 8, 16, 16], [64, 64, 64, 64], [0.3, 0.31, 0.4, 0.41]),  # one resolution, replicates
])
def test_degenerate_input_reports_too_few_points(n, r, y):
    g = fit_group(n, r, y, bootstrap=20, target=0.6)
    for law in LAWS:
        fit = g["laws"][law]
        assert fit["status"] == "too_few_points", fit
        assert fit["params"] is None and fit["reason"]
        assert fit_law(law, n, r, y, g["ref"])["status"] == "too_few_points"
    assert g["best"] is None
    assert g["needed"]["rows"] == [] and g["needed"]["warning"]
    json.dumps(g, allow_nan=False)


def test_degenerate_but_fittable_inputs_do_not_raise():
    n, r = grid_points()
    const = fit_group(n, r, np.full(n.size, 0.42), bootstrap=20, target=0.5)
    assert const["laws"]["log_linear"]["status"] == "ok"
    assert const["laws"]["log_linear"]["params"]["b"] == pytest.approx(0.42)
    assert const["laws"]["log_linear"]["r2"] is None  # no variance to explain
    json.dumps(const, allow_nan=False)
    # 2x2 grid: the log laws fit, the saturating law needs three levels of each
    small = fit_group([8, 8, 16, 16], [64, 128, 64, 128], [0.3, 0.35, 0.36, 0.42], bootstrap=20)
    assert small["laws"]["log_product"]["status"] == "ok"
    assert small["laws"]["saturating"]["status"] == "too_few_points"
    # decreasing data: the saturating law still fits (A, B are not forced >= 0)
    y = 0.9 - law_value("saturating", TRUTH["saturating"], n, r, REF) + 0.3
    dec = fit_group(n, r, y, bootstrap=0, target=0.9)
    assert dec["laws"]["saturating"]["status"] == "ok" and dec["laws"]["saturating"]["rmse"] < 1e-6
    assert dec["laws"]["saturating"]["params"]["A"] < 0
    assert all(not row["reachable"] for row in dec["needed"]["rows"])
    assert fit_group([], [], [])["n_trials"] == 0


def test_fit_sweep_groups_filters_and_serialises():
    n, r, y = synthetic("log_product")
    rows = [{"objective": "mae", "model": "vit-s", "images": int(a), "resolution": int(b), "status": "finished", "knn": float(c)}
            for a, b, c in zip(n, r, y)]
    n2, r2, y2 = synthetic("saturating", seed=3)
    rows += [{"objective": "clip", "model": "vit-s", "images": a, "resolution": b, "status": "finished", "knn": c}
             for a, b, c in zip(n2, r2, y2)]
    rows += [
        {"objective": "mae", "model": "vit-s", "images": 128, "resolution": 64, "status": "failed", "knn": 0.99},
        {"objective": "mae", "model": "vit-s", "images": 128, "resolution": 64, "status": "finished", "knn": float("nan")},
        {"objective": "mae", "model": "vit-s", "images": 128, "resolution": 64, "status": "finished"},
        {"objective": "mae", "model": "vit-s", "images": 128, "resolution": 64, "status": "finished", "knn": None},
        {"objective": "clip", "model": "vit-b", "images": 8, "resolution": 64, "status": "finished", "knn": 0.2},
    ]
    out = fit_sweep(rows, "knn", target=0.7, bootstrap=30)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert out["metric"] == "knn" and out["target"] == 0.7 and out["laws"] == list(LAWS)
    assert [(g["objective"], g["model"]) for g in out["groups"]] == [("clip", "vit-b"), ("clip", "vit-s"), ("mae", "vit-s")]
    by = {(g["objective"], g["model"]): g for g in out["groups"]}
    assert by[("mae", "vit-s")]["n_trials"] == 12
    assert by[("mae", "vit-s")]["best"] == "log_product"
    assert by[("clip", "vit-s")]["best"] == "saturating"
    assert by[("clip", "vit-b")]["best"] is None
    needed = by[("mae", "vit-s")]["needed"]
    assert needed["law"] == "log_product" and needed["cheapest"]["reachable"]
    assert [row["resolution"] for row in needed["rows"]] == [64.0, 128.0, 256.0, 512.0, 1024.0]
    assert fit_sweep([], "knn")["groups"] == []


def test_a_target_met_with_the_fewest_images_is_reached_there():
    # Flat in images, rising with resolution: more images never help, but at 128 px the target is already met.
    ref = {"images": 8, "resolution": 32}
    grid = {"images": [8, 32], "resolution": [32, 128]}
    out = predict_needed("log_linear", {"b": 0.3, "a": 0.0, "c": 0.2}, ref, grid, 0.5, [32, 128])
    low, high = out["rows"]
    assert not low["reachable"] and "not increasing in images" in low["warning"]
    assert high["reachable"] and high["images"] == pytest.approx(8) and "smallest trial's images (8) already" in high["warning"]
    assert out["cheapest"]["resolution"] == 128
