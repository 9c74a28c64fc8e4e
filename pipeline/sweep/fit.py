"""Scaling-law fits for a sweep over (training images N, resolution R).

A sweep trains many small models on a grid of (N, R) per (objective, model) group; every finished trial ends with a
held-out metric y (e.g. a k-NN probe accuracy).  Following arXiv 2308.05092, which models accuracy as a polynomial
in log space, y = (beta_i + alpha_i*log N) * (alpha_ppi*log R + beta_ppi), we fit a few laws to the trials and
extrapolate them to say how many images reach a target metric at each resolution.

Laws (x = ln(N/N0), z = ln(R/R0); N0, R0 = the smallest N and R of the group's trials, stored as ``ref``):

* ``log_product``: y = (b + a*x) * (1 + c*z).  The paper's two-factor form has one redundant degree of freedom (scale
  one factor up and the other down); normalising the resolution factor to 1 at R0 makes it identifiable, and working
  relative to (N0, R0) keeps b = the predicted metric at the smallest grid point, so parameters are well conditioned.
  The paper's own parametrisation is reported too (``paper_form``): beta_i = b - a*ln N0, alpha_i = a,
  alpha_ppi = c, beta_ppi = 1 - c*ln R0.
* ``log_linear``: y = b + a*x + c*z (no interaction).
* ``saturating``: y = y_max - A*(N/N0)^-alpha - B*(R/R0)^-beta, an additive Chinchilla-like power law with a
  ceiling.  alpha, beta are bounded to [0.1, 5] (near 0 the law degenerates into a log-linear one with a meaningless
  ceiling of millions); A and B are left unbounded so that a metric that decreases with N or R
  still gets a sensible fit (forcing A, B >= 0 makes such fits collapse onto the bounds).  predict_needed treats a
  law with A <= 0 as non-increasing in N, so the target is then reported unreachable.

Fits are least squares (scipy.optimize.least_squares) from several starting points; the starting points come from
variable projection (for a fixed c, or fixed alpha/beta, the law is linear in the remaining parameters, which are
solved exactly on a small grid), and the best few are refined.

Uncertainty and model choice:

* bootstrap: resample the trials with replacement, refit (warm-started from the full fit), and report the standard
  deviation and the 2.5/97.5 percentiles of each parameter over the refits that succeeded (``bootstrap_ok``).  With
  ~10-30 trials this is a rough, usually too narrow, picture of how well the grid pins the parameters down.
* leave-one-out (LOO): for every distinct grid point (N, R), fit on the trials at all other grid points and predict
  the left-out one (its mean metric).  ``loo_rmse`` is the RMS of those prediction errors: an honest estimate of how
  well a law interpolates / slightly extrapolates, which penalises laws with too many parameters.  ``best`` is the
  ok law with the lowest loo_rmse.

Everything returned is JSON-serialisable: plain floats/ints/str, lists and dicts, None for anything undefined.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from schemas.sweep import LAWS  # the laws' names, as a sweep config names them

PARAMS: dict[str, tuple[str, ...]] = {
    "log_product": ("b", "a", "c"),
    "log_linear": ("b", "a", "c"),
    "saturating": ("y_max", "A", "alpha", "B", "beta"),
}
# distinct N levels and R levels each law needs to be identifiable
_MIN_LEVELS: dict[str, tuple[int, int]] = {"log_product": (2, 2), "log_linear": (2, 2), "saturating": (3, 3)}
_EXP_MAX = 5.0  # upper bound on the saturating exponents
# Lower bound: an exponent near 0 with a huge A (and y_max) is a log-linear law in disguise, a "ceiling" of
# millions that means nothing; bounded away from 0 the saturating law stays one, and its parameters readable.
_EXP_MIN = 0.1
_EXTRAP_IMAGES = 10.0  # images beyond this multiple of the grid's largest N count as extrapolation
_EXTRAP_RESOLUTION = 2.0  # same for resolution
_LOG_HUGE = 690.0  # ln of ~1e300: larger N is reported as unreachable rather than overflowing


# ----------------------------------------------------------------------------------------------------------- helpers

def _arr(v) -> np.ndarray:
    return np.asarray(v, dtype=float)


def _num(v) -> float | None:
    """A plain float, or None for None / NaN / inf."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _clean(obj):
    """Recursively turn numpy scalars/arrays into plain Python, and NaN/inf into None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _xz(images, resolution, ref: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.log(_arr(images) / float(ref["images"])), np.log(_arr(resolution) / float(ref["resolution"]))


def _model(law: str, p: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    if law == "log_product":
        b, a, c = p
        return (b + a * x) * (1.0 + c * z)
    if law == "log_linear":
        b, a, c = p
        return b + a * x + c * z
    if law == "saturating":
        y_max, A, alpha, B, beta = p
        return y_max - A * np.exp(-alpha * x) - B * np.exp(-beta * z)
    raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")


def _jac(law: str, p: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    if law == "log_product":
        b, a, c = p
        f = 1.0 + c * z
        return np.column_stack([f, x * f, (b + a * x) * z])
    if law == "log_linear":
        return np.column_stack([np.ones_like(x), x, z])
    y_max, A, alpha, B, beta = p
    ex, ez = np.exp(-alpha * x), np.exp(-beta * z)
    return np.column_stack([np.ones_like(x), -ex, A * x * ex, -ez, B * z * ez])


def law_value(law: str, params: dict[str, float], images, resolution, ref: dict) -> np.ndarray:
    """y predicted by `law` at arrays (broadcastable) of images and resolution; ref = {"images": N0, "resolution": R0}."""
    x, z = _xz(images, resolution, ref)
    x, z = np.broadcast_arrays(x, z)
    p = np.array([float(params[k]) for k in PARAMS[law]])
    return _model(law, p, x, z)


# ----------------------------------------------------------------------------------------------------------- fitting

def _lstsq(cols: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    M = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(M, y, rcond=None)
    r = M @ coef - y
    return coef, float(r @ r)


def _starts(law: str, x: np.ndarray, z: np.ndarray, y: np.ndarray, keep: int = 3) -> list[np.ndarray]:
    """Starting points by variable projection: the law is linear in all but one or two parameters, which are gridded."""
    one = np.ones_like(x)
    (b, a, c), _ = _lstsq([one, x, z], y)
    if law == "log_linear":
        return [np.array([b, a, c])]
    cand: list[tuple[float, np.ndarray]] = []
    if law == "log_product":
        cs = list(np.linspace(-2.0, 2.0, 41))
        if abs(b) > 1e-12:
            cs.append(c / b)
        for cc in cs:
            f = 1.0 + cc * z
            (bb, aa), rss = _lstsq([f, x * f], y)
            cand.append((rss, np.array([bb, aa, cc])))
    else:
        grid = np.geomspace(_EXP_MIN, _EXP_MAX, 13)
        for al in grid:
            ex = np.exp(-al * x)
            for be in grid:
                (ym, mA, mB), rss = _lstsq([one, ex, np.exp(-be * z)], y)
                cand.append((rss, np.array([ym, -mA, al, -mB, be])))
    cand.sort(key=lambda t: t[0])
    return [p for _, p in cand[:keep]]


def _bounds(law: str) -> tuple[np.ndarray, np.ndarray]:
    k = len(PARAMS[law])
    lo, hi = np.full(k, -np.inf), np.full(k, np.inf)
    if law == "saturating":
        lo[[2, 4]], hi[[2, 4]] = _EXP_MIN, _EXP_MAX
    return lo, hi


def _sat_linear(theta: np.ndarray, x: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Saturating law at fixed exponents theta = (alpha, beta): full params and residuals, the linear ones solved exactly."""
    M = np.column_stack([np.ones_like(x), np.exp(-theta[0] * x), np.exp(-theta[1] * z)])
    coef, *_ = np.linalg.lstsq(M, y, rcond=None)
    return np.array([coef[0], -coef[1], theta[0], -coef[2], theta[1]]), M @ coef - y


def _refine_saturating(x, z, y, starts: list[np.ndarray]) -> tuple[np.ndarray, float] | None:
    """Variable projection: least squares over (alpha, beta) only, (y_max, A, B) solved linearly at every step.

    On data without a visible ceiling the optimum drifts to alpha -> 0 with huge A and y_max (the law degenerates into a
    log-linear one); the full 5-parameter problem crawls along that valley, the projected 2-parameter one does not.
    """
    best: tuple[np.ndarray, float] | None = None
    for p0 in starts:
        t0 = np.clip(np.asarray(p0, dtype=float)[[2, 4]], _EXP_MIN, _EXP_MAX)
        if not np.all(np.isfinite(t0)):
            continue
        try:
            res = least_squares(lambda t: _sat_linear(t, x, z, y)[1], t0, bounds=([_EXP_MIN, _EXP_MIN], [_EXP_MAX, _EXP_MAX]),
                                method="trf", diff_step=1e-6, max_nfev=200)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
        p, r = _sat_linear(res.x, x, z, y)
        rss = float(r @ r)
        if np.all(np.isfinite(p)) and math.isfinite(rss) and (best is None or rss < best[1]):
            best = (p, rss)
    return best


def _refine(law: str, x: np.ndarray, z: np.ndarray, y: np.ndarray, starts: list[np.ndarray]) -> tuple[np.ndarray, float] | None:
    """Least-squares refinement from each start; the best finite result, or None."""
    if law == "saturating":
        return _refine_saturating(x, z, y, starts)
    lo, hi = _bounds(law)
    best: tuple[np.ndarray, float] | None = None
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, dtype=float), lo, hi)
        if not np.all(np.isfinite(p0)):
            continue
        try:
            res = least_squares(lambda p: _model(law, p, x, z) - y, p0, jac=lambda p: _jac(law, p, x, z),
                                bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=200)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
        r = _model(law, res.x, x, z) - y
        rss = float(r @ r)
        if np.all(np.isfinite(res.x)) and math.isfinite(rss) and (best is None or rss < best[1]):
            best = (res.x, rss)
    return best


def _check(law: str, x: np.ndarray, z: np.ndarray) -> str | None:
    """Why `law` cannot be fitted to these points, or None."""
    need_n, need_r = _MIN_LEVELS[law]
    k = len(PARAMS[law])
    points = len({(round(a, 9), round(b, 9)) for a, b in zip(x.tolist(), z.tolist())})
    n_lv, r_lv = len(np.unique(np.round(x, 9))), len(np.unique(np.round(z, 9)))
    if points < k:
        return f"{points} distinct grid points for {k} parameters"
    if n_lv < need_n:
        return f"{n_lv} distinct image counts; {law} needs {need_n}"
    if r_lv < need_r:
        return f"{r_lv} distinct resolutions; {law} needs {need_r}"
    return None


def _fit_xz(law: str, x: np.ndarray, z: np.ndarray, y: np.ndarray, warm: np.ndarray | None = None) -> tuple[str, Any]:
    """('ok', (params, rss)) | ('too_few_points', reason) | ('failed', reason).  With `warm`, refine from it alone."""
    if law not in PARAMS:
        raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")
    why = _check(law, x, z)
    if why:
        return "too_few_points", why
    try:
        with np.errstate(all="ignore"):
            starts = [warm] if warm is not None else _starts(law, x, z, y)
            best = _refine(law, x, z, y, starts)
    except (ValueError, np.linalg.LinAlgError) as e:
        return "failed", f"{type(e).__name__}: {e}"
    if best is None:
        return "failed", "no starting point converged to a finite fit"
    return "ok", best


def _prep(images, resolution, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, r, v = np.broadcast_arrays(_arr(images).ravel(), _arr(resolution).ravel(), _arr(y).ravel())
    keep = np.isfinite(n) & np.isfinite(r) & np.isfinite(v) & (n > 0) & (r > 0)
    return n[keep], r[keep], v[keep]


def fit_law(law: str, images, resolution, y, ref: dict) -> dict:
    """{"law", "status": "ok"|"too_few_points"|"failed", "params": {...}, "rss", "rmse", "r2"}

    Trials with a non-finite metric or non-positive images/resolution are ignored.  When status is not ok, params,
    rss, rmse and r2 are None and "reason" says why.
    """
    n, r, v = _prep(images, resolution, y)
    x, z = _xz(n, r, ref)
    status, out = _fit_xz(law, x, z, v)
    return _report(law, status, out, v)


def _report(law: str, status: str, out, y: np.ndarray) -> dict:
    if status != "ok":
        return {"law": law, "status": status, "reason": out, "params": None, "rss": None, "rmse": None, "r2": None}
    p, rss = out
    tss = float(np.sum((y - y.mean()) ** 2))
    return _clean({
        "law": law, "status": "ok", "params": dict(zip(PARAMS[law], p)), "rss": rss,
        "rmse": math.sqrt(rss / len(y)), "r2": (1.0 - rss / tss) if tss > 1e-300 else None,
    })


def _paper_form(params: dict, ref: dict) -> dict:
    b, a, c = params["b"], params["a"], params["c"]
    ln0, lr0 = math.log(ref["images"]), math.log(ref["resolution"])
    return _clean({"beta_i": b - a * ln0, "alpha_i": a, "alpha_ppi": c, "beta_ppi": 1.0 - c * lr0})


# ----------------------------------------------------------------------------------------------------------- groups

def _bootstrap(law: str, x, z, y, p_full: np.ndarray, count: int, rng_idx: list[np.ndarray]) -> dict:
    samples = []
    for idx in rng_idx[:count]:
        status, out = _fit_xz(law, x[idx], z[idx], y[idx], warm=p_full)
        if status == "ok":
            samples.append(out[0])
    names = PARAMS[law]
    if len(samples) < 2:
        return {"std": {k: None for k in names}, "ci95": {k: None for k in names}, "bootstrap_ok": len(samples)}
    s = np.array(samples)
    lo, hi = np.percentile(s, [2.5, 97.5], axis=0)
    sd = s.std(axis=0, ddof=1)
    return _clean({"std": dict(zip(names, sd)), "ci95": {k: [lo[i], hi[i]] for i, k in enumerate(names)},
                   "bootstrap_ok": len(samples)})


def _loo(law: str, n, r, x, z, y) -> dict:
    keys = list(zip(n.tolist(), r.tolist()))
    points = sorted(set(keys))
    rows, errs = [], []
    for pn, pr in points:
        held = np.array([k == (pn, pr) for k in keys])
        status, out = _fit_xz(law, x[~held], z[~held], y[~held])
        truth = float(y[held].mean())
        pred = None
        if status == "ok":
            pred = _num(_model(law, out[0], x[held][:1], z[held][:1])[0])
        if pred is not None:
            errs.append(pred - truth)
        rows.append({"images": pn, "resolution": pr, "y": truth, "predicted": pred})
    rmse = math.sqrt(float(np.mean(np.square(errs)))) if errs else None
    return _clean({"loo_rmse": rmse, "loo": rows, "loo_ok": len(errs)})


def fit_group(images, resolution, y, laws=LAWS, bootstrap: int = 200, seed: int = 0, target: float | None = None,
              predict_resolutions=None) -> dict:
    """Fit every law in `laws` to one (objective, model) group's trials, with bootstrap spreads and leave-one-out
    errors; pick the best law by loo_rmse and, when `target` is given, predict the images needed to reach it.

    Returns {"n_trials", "ref", "grid", "laws": {law: {...fit_law, std, ci95, bootstrap_ok, loo_rmse, loo, loo_ok,
    paper_form (log_product)}}, "best", "needed"}.
    """
    n, r, v = _prep(images, resolution, y)
    out: dict[str, Any] = {"n_trials": int(len(v))}
    if len(v) == 0:
        return {**out, "ref": None, "grid": None, "laws": {law: {"law": law, "status": "too_few_points", "reason": "no trials",
                "params": None, "rss": None, "rmse": None, "r2": None} for law in laws}, "best": None, "needed": None}
    ref = {"images": float(n.min()), "resolution": float(r.min())}
    grid = {"images": [float(n.min()), float(n.max())], "resolution": [float(r.min()), float(r.max())]}
    x, z = _xz(n, r, ref)
    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, len(v), len(v)) for _ in range(max(0, int(bootstrap)))]
    fits: dict[str, dict] = {}
    for law in laws:
        status, res = _fit_xz(law, x, z, v)
        fit = _report(law, status, res, v)
        if status == "ok":
            fit.update(_bootstrap(law, x, z, v, res[0], len(resamples), resamples))
            fit.update(_loo(law, n, r, x, z, v))
            if law == "log_product":
                fit["paper_form"] = _paper_form(fit["params"], ref)
        else:
            names = PARAMS[law]
            fit.update({"std": {k: None for k in names}, "ci95": {k: None for k in names}, "bootstrap_ok": 0,
                        "loo_rmse": None, "loo": [], "loo_ok": 0})
            if law == "log_product":
                fit["paper_form"] = None
        fits[law] = fit
    ok = [law for law in laws if fits[law]["status"] == "ok"]
    with_loo = [law for law in ok if fits[law]["loo_rmse"] is not None]
    best = (min(with_loo, key=lambda k: fits[k]["loo_rmse"]) if with_loo
            else min(ok, key=lambda k: fits[k]["rmse"]) if ok else None)
    needed = None
    if target is not None:
        if best is None:
            needed = {"target": float(target), "law": None, "rows": [], "cheapest": None, "warning": "no law could be fitted"}
        else:
            res_list = predict_resolutions
            if res_list is None:
                res_list = sorted(set(r.tolist())) + [2 * grid["resolution"][1], 4 * grid["resolution"][1]]
            needed = predict_needed(best, fits[best]["params"], ref, grid, target, res_list)
    return _clean({**out, "ref": ref, "grid": grid, "laws": fits, "best": best, "needed": needed})


# ----------------------------------------------------------------------------------------------------------- prediction

def _ratio(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 0.1 else f"{v:.2g}"


def _log_images_needed(law: str, p: dict, ref: dict, resolution: float, target: float) -> tuple[float | None, str | None]:
    """ln(N) reaching `target` at `resolution`, or (None, why not)."""
    z = math.log(resolution / ref["resolution"])
    ln0 = math.log(ref["images"])
    if law in ("log_product", "log_linear"):
        if law == "log_product":
            f = 1.0 + p["c"] * z
            slope, need = p["a"] * f, (target - p["b"] * f)
        else:
            slope, need = p["a"], target - p["b"] - p["c"] * z
        if not slope > 0:
            return None, f"{law} is not increasing in images at resolution {resolution:g} (slope {slope:.3g} per ln N)"
        return ln0 + need / slope, None
    if law == "saturating":
        if not (p["A"] > 0 and p["alpha"] > 0):
            return None, f"saturating law is not increasing in images (A={p['A']:.3g}, alpha={p['alpha']:.3g})"
        ceiling = p["y_max"] - p["B"] * math.exp(-p["beta"] * z)
        gap = ceiling - target
        if not gap > 0:
            return None, f"target {target:g} is at or above the law's ceiling {ceiling:.4g} at resolution {resolution:g}"
        return ln0 + (math.log(p["A"]) - math.log(gap)) / p["alpha"], None
    raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")


def predict_needed(law: str, params: dict, ref: dict, grid: dict, target: float, resolutions=None) -> dict:
    """The training images needed to reach `target` at each resolution (default: the grid's resolutions, i.e.
    grid["resolutions"] when present else its min and max, plus 2x and 4x the largest).

    Returns {"target", "law", "rows": [{"resolution", "images", "reachable", "extrapolation", "warning"}],
    "cheapest": the reachable row with the fewest pixels seen per pass (images * resolution**2) or None, "warning"}.
    A row is an extrapolation when images > 10x the grid's largest N (or below its smallest) or the resolution is
    > 2x the grid's largest R (or below its smallest).
    """
    n_min, n_max = (float(v) for v in grid["images"])
    r_min, r_max = (float(v) for v in grid["resolution"])
    if resolutions is None:
        base = grid.get("resolutions") or [r_min, r_max]
        resolutions = sorted(set(float(v) for v in base)) + [2 * r_max, 4 * r_max]
    target = float(target)
    rows = []
    for res in resolutions:
        res = float(res)
        row: dict[str, Any] = {"resolution": res, "images": None, "reachable": False, "extrapolation": False, "warning": None}
        if not (math.isfinite(res) and res > 0):
            row["warning"] = "resolution must be positive"
            rows.append(row)
            continue
        log_n, why = _log_images_needed(law, params, ref, res, target)
        if log_n is not None and not math.isfinite(log_n):
            log_n, why = None, "no finite number of images reaches the target"
        if log_n is not None and log_n > _LOG_HUGE:
            log_n, why = None, f"needs an astronomically large number of images (about e^{log_n:.0f})"
        note = None
        if log_n is None:  # more images do not help: is the target met with the fewest the grid tried?
            at_smallest = float(law_value(law, params, n_min, res, ref))
            if math.isfinite(at_smallest) and at_smallest >= target:
                log_n, note = math.log(n_min), (f"reached with the smallest trial's images ({n_min:g}) already; "
                                                f"more images do not raise it under {law}")
        if log_n is None:
            row["warning"] = why
            rows.append(row)
            continue
        images = math.exp(log_n)
        row.update(images=images, reachable=True, warning=note)
        far_n = images > _EXTRAP_IMAGES * n_max or images < n_min
        far_r = res > _EXTRAP_RESOLUTION * r_max or res < r_min
        if far_n or far_r:
            row["extrapolation"] = True
            parts = []
            if images > _EXTRAP_IMAGES * n_max:
                parts.append(f"{_ratio(images / n_max)}x the largest trial's images ({n_max:g})")
            if res > _EXTRAP_RESOLUTION * r_max:
                parts.append(f"{_ratio(res / r_max)}x the largest trial's resolution ({r_max:g})")
            if images < n_min:
                parts.append(f"below the smallest trial's images ({n_min:g})")
            if res < r_min:
                parts.append(f"below the smallest trial's resolution ({r_min:g})")
            row["warning"] = "; ".join(filter(None, ["extrapolation: " + ", ".join(parts), note]))
        rows.append(row)
    reach = [row for row in rows if row["reachable"]]
    cheapest = min(reach, key=lambda row: row["images"] * row["resolution"] ** 2) if reach else None
    warning = None
    if cheapest is None:
        warning = f"target {target:g} is not reachable at any of the resolutions under {law}"
    elif cheapest["extrapolation"]:
        warning = f"the cheapest option is an {cheapest['warning']}"
    return _clean({"target": target, "law": law, "rows": rows, "cheapest": cheapest, "warning": warning})


# ----------------------------------------------------------------------------------------------------------- sweep

def fit_sweep(rows: list[dict], metric: str, target: float | None = None, laws=LAWS, bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit every (objective, model) group of a sweep's trial rows.

    Only rows with status 'finished', a finite metric and positive images/resolution count.  Returns
    {"metric", "target", "laws", "groups": [{"objective", "model", **fit_group(...)}]}, groups sorted by objective, model.
    """
    groups: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for row in rows:
        if row.get("status") != "finished":
            continue
        try:
            val, n, r = float(row[metric]), float(row["images"]), float(row["resolution"])
        except (KeyError, TypeError, ValueError):
            continue
        if not (math.isfinite(val) and math.isfinite(n) and math.isfinite(r) and n > 0 and r > 0):
            continue
        groups[(row.get("objective"), row.get("model"))].append((n, r, val))
    out = []
    for (objective, model) in sorted(groups, key=lambda k: (str(k[0]), str(k[1]))):
        t = np.array(groups[(objective, model)])
        out.append({"objective": objective, "model": model,
                    **fit_group(t[:, 0], t[:, 1], t[:, 2], laws=laws, bootstrap=bootstrap, seed=seed, target=target)})
    return _clean({"metric": metric, "target": None if target is None else float(target), "laws": list(laws), "groups": out})
