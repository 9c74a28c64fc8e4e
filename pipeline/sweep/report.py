"""The scaling-sweep report: PNG plots and one static HTML page (no server, no JS) for a sweep.

A sweep trains many small models over a grid of training images N x resolution R, per model preset
and objective, and fits scaling laws (`pipeline.sweep.fit`) to a metric (default probe_acc). The
page exists so that a person can judge, at a glance, whether the fitted laws can be trusted and what
they predict:

- the headline: trials finished / failed, and per (objective, model) group the best law and its
  leave-one-out RMSE (how well it predicts a grid point it did not see);
- plots: the metric against N (one line per R) and against R (one line per N), the observed points
  with the best law's curves through them, and a heatmap of the observed grid with failed and
  missing cells marked, so that a gap or an outlier is visible before any number is believed;
- per group, every law's parameters as value +- std with their 95% intervals, rmse / r2 / loo_rmse,
  the paper-form parameters of log_product, and the 'needed' table (images needed to reach the
  target at each resolution), with extrapolations and unreachable targets flagged in their cells;
- every trial (failed ones with their error) and the sweep's config.

Everything here is pure: `plot_files` returns PNG bytes by file name and `sweep_page` returns the
page's text; the caller writes them through its own storage layer. Plots use matplotlib's
object-oriented API on an Agg canvas, so no pyplot state leaks between calls.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, NullLocator

from pipeline.sweep.fit import LAWS, law_value

DPI = 110
PLOT_NAMES = ("metric_vs_images.png", "metric_vs_resolution.png", "heatmap.png")
STANDARD = ("trial_id", "status", "objective", "model", "images", "resolution", "steps", "params",
            "seconds", "error")
ERROR_SHOWN = 4000  # characters of a trial's error kept on the page (the tail: where a traceback ends)
PANEL = (5.4, 3.9)  # inches per panel
COLS = 3  # panels per figure row at most


# -- formatting --------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, digits: int = 3) -> str:
    """A value for a person: None as a dash, whole numbers exact with thousands separators, other floats
    to 3 significant digits (huge or tiny ones in exponent form)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return str(x)
        if x.is_integer() and abs(x) < 1e7:  # a whole number (a resolution, an image count): exact
            return f"{int(x):,}"
        r = float(f"{x:.{digits}g}")
        if 1000 <= abs(r) < 1e7:
            return f"{r:,.0f}"
        return f"{r:.{digits}g}"
    return str(x)


def fmt_si(x) -> str:
    """A count such as a parameter count: 1.23M, 456k."""
    if not _finite(x):
        return fmt(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return fmt(x)


# -- the rows and the fit ------------------------------------------------------------------------

def metric_value(row: dict, metric: str) -> float | None:
    """The row's metric when the trial finished and the value is a finite number, else None."""
    v = row.get(metric)
    if row.get("status") != "finished" or not _finite(v):
        return None
    return float(v)


def chance_key(metric: str) -> str | None:
    """probe_acc -> probe_chance: the column holding the metric's chance level, by convention."""
    return metric[: -len("_acc")] + "_chance" if metric.endswith("_acc") else None


def groups_of(rows: list[dict], fit: dict | None) -> list[dict]:
    """One entry per (objective, model): {"objective", "model", "rows", "fit" (the fit's group or
    None)}; the fit's groups first, in its order, then groups that only the rows have."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(str(r.get("objective")), str(r.get("model")))].append(r)
    out, seen = [], set()
    for g in (fit or {}).get("groups") or []:
        key = (str(g.get("objective")), str(g.get("model")))
        if key in seen:
            continue
        seen.add(key)
        out.append({"objective": key[0], "model": key[1], "rows": by_key.get(key, []), "fit": g})
    for key, rs in by_key.items():
        if key not in seen:
            out.append({"objective": key[0], "model": key[1], "rows": rs, "fit": None})
    return out


def best_law(group_fit: dict | None) -> tuple[str, dict] | None:
    """(name, entry) of the group's best law when it is usable for a curve (status ok, params and
    ref present), else None."""
    if not group_fit:
        return None
    name = group_fit.get("best")
    entry = (group_fit.get("laws") or {}).get(name) if name else None
    if not entry or entry.get("status") != "ok" or not entry.get("params") or not group_fit.get("ref"):
        return None
    return name, entry


def _curve(group: dict, xs: np.ndarray, images=None, resolution=None) -> np.ndarray | None:
    """The best law's values along xs with the other axis fixed; None when there is no usable law or
    it cannot be evaluated (the panel then shows points only)."""
    best = best_law(group["fit"])
    if best is None:
        return None
    name, entry = best
    n = xs if images is None else np.full_like(xs, float(images))
    r = xs if resolution is None else np.full_like(xs, float(resolution))
    try:
        y = law_value(name, entry["params"], n, r, group["fit"]["ref"])
    except Exception:  # a malformed fit must not break the report: the points still show
        return None
    return y if y.shape == xs.shape and np.isfinite(y).any() else None


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if lo == hi:
        return lo / 1.5, hi * 1.5
    return lo, hi


# -- plots ---------------------------------------------------------------------------------------

def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _panels(n: int, title: str, heat: bool = False):
    n = max(1, n)
    cols = min(COLS, n)
    nrows = math.ceil(n / cols)
    w, h = PANEL
    fig = Figure(figsize=(w * cols + (0.6 if heat else 0), h * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    return fig, list(axes[:n])


def _panel_title(group: dict) -> str:
    best = best_law(group["fit"])
    head = f"{group['objective']} · {group['model']}"
    if best is None:
        why = "no law fitted"
        g = group["fit"]
        if g and g.get("best"):
            status = ((g.get("laws") or {}).get(g["best"]) or {}).get("status", "missing")
            why = f"best law {g['best']}: {status}"
        return f"{head}\n{why} (points only)"
    name, entry = best
    loo = entry.get("loo_rmse")
    return f"{head}\nbest law: {name}" + (f", LOO RMSE {fmt(loo)}" if _finite(loo) else "")


def _log_axis(ax, axis: str, ticks: list[float]) -> None:
    """A log axis labelled at the grid's own values, in plain numbers."""
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    set_scale("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(sorted(set(ticks))))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(lambda v, _pos: fmt(int(round(v))) if v >= 1 else fmt(v))


def _reference_lines(ax, rows: list[dict], metric: str, target) -> None:
    key = chance_key(metric)
    chance = [float(r[key]) for r in rows if key and _finite(r.get(key))]
    if chance:
        ax.axhline(float(np.median(chance)), color="0.5", ls="--", lw=1, label="chance")
    if _finite(target):
        ax.axhline(float(target), color="#d62728", ls=":", lw=1.2, label=f"target {fmt(target)}")


def _line_plot(groups: list[dict], fit: dict, metric: str, along: str) -> bytes:
    """metric against `along` ("images" or "resolution"), one colour per value of the other axis."""
    other = "resolution" if along == "images" else "images"
    finished = [r for g in groups for r in g["rows"] if metric_value(r, metric) is not None]
    others = sorted({r[other] for r in finished if _finite(r.get(other))})
    colour = {v: f"C{i % 10}" for i, v in enumerate(others)}
    what = "training images N" if along == "images" else "resolution R (pixels per side)"
    fig, axes = _panels(len(groups), f"{metric} vs {what}: points = finished trials, "
                                     f"lines = each group's best-fit law, one colour per {other}")
    if not groups:
        axes[0].text(0.5, 0.5, "no trials", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return _png(fig)
    target = (fit or {}).get("target")
    for ax, group in zip(axes, groups):
        pts = [r for r in group["rows"] if metric_value(r, metric) is not None
               and _finite(r.get(along)) and _finite(r.get(other))]
        ax.set_title(_panel_title(group), fontsize=10)
        ax.set_xlabel(what, fontsize=9)
        ax.set_ylabel(metric, fontsize=9)
        ax.grid(True, alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        xs_all = [float(r[along]) for r in pts if r[along] > 0]
        lo, hi = _span(xs_all or [float(r[along]) for r in pts])  # the curves span the finished points
        grid = np.geomspace(lo, hi, 120) if lo > 0 else np.linspace(lo, hi, 120)
        drawn_init = False
        for v in sorted({r[other] for r in pts}):
            mine = sorted((r for r in pts if r[other] == v), key=lambda r: r[along])
            c = colour.get(v, "k")
            ax.plot([r[along] for r in mine], [metric_value(r, metric) for r in mine], "o", color=c,
                    ms=5, label=f"{other} {fmt(v)}")
            untrained = [r for r in mine if _finite(r.get(metric + "_init"))]  # the same trial before training
            if untrained:
                ax.plot([r[along] for r in untrained], [float(r[metric + "_init"]) for r in untrained], "o", mfc="none",
                        color="0.3", ms=7, label="untrained (same init)" if not drawn_init else None)
                drawn_init = True
            y = _curve(group, grid, **{other: v})
            if y is not None:
                ax.plot(grid, y, "-", color=c, lw=1.5, alpha=0.85)
        _reference_lines(ax, group["rows"], metric, target)
        if lo > 0:
            _log_axis(ax, "x", xs_all)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  title=("lines: " + best_law(group["fit"])[0]) if best_law(group["fit"]) else None,
                  title_fontsize=8)
    return _png(fig)


def _heatmap(groups: list[dict], metric: str) -> bytes:
    fig, axes = _panels(len(groups), f"observed {metric} over the images x resolution grid "
                                     "(mean of finished trials per cell; failed / missing cells marked)",
                        heat=True)
    values = [v for g in groups for r in g["rows"] if (v := metric_value(r, metric)) is not None]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    if not groups:
        axes[0].text(0.5, 0.5, "no trials", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return _png(fig)
    image = None
    for ax, group in zip(axes, groups):
        rs = [r for r in group["rows"] if _finite(r.get("images")) and _finite(r.get("resolution"))]
        ax.set_title(f"{group['objective']} · {group['model']}", fontsize=10)
        if not rs:
            ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ns = sorted({r["images"] for r in rs})
        res = sorted({r["resolution"] for r in rs})
        cells: dict[tuple, list] = defaultdict(list)
        for r in rs:
            cells[(r["images"], r["resolution"])].append(r)
        grid = np.full((len(ns), len(res)), np.nan)
        for i, n in enumerate(ns):
            for j, rr in enumerate(res):
                vals = [v for r in cells.get((n, rr), []) if (v := metric_value(r, metric)) is not None]
                if vals:
                    grid[i, j] = float(np.mean(vals))
        ax.set_facecolor("#e6e6e6")
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis",
                          vmin=vmin, vmax=vmax)
        cmap_norm = image.norm
        for i, n in enumerate(ns):
            for j, rr in enumerate(res):
                trials = cells.get((n, rr), [])
                if np.isfinite(grid[i, j]):
                    k = sum(metric_value(r, metric) is not None for r in trials)
                    lum = float(np.dot(image.cmap(cmap_norm(grid[i, j]))[:3], [0.299, 0.587, 0.114]))
                    text = fmt(grid[i, j]) + (f"\n(n={k})" if k > 1 else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=9,
                            color="black" if lum > 0.5 else "white")
                else:
                    failed = sum(r.get("status") not in ("finished", None) for r in trials)
                    label = "failed" if failed else ("no metric" if trials else "not run")
                    ax.add_patch(_hatch(j, i))
                    ax.text(j, i, label, ha="center", va="center", fontsize=8,
                            color="#b00000" if failed else "0.35", fontweight="bold" if failed else None)
        ax.set_xticks(range(len(res)), [fmt(v) for v in res], fontsize=8)
        ax.set_yticks(range(len(ns)), [fmt(v) for v in ns], fontsize=8)
        ax.set_xlabel("resolution R (pixels per side)", fontsize=9)
        ax.set_ylabel("training images N", fontsize=9)
    if image is not None and values:  # no colour scale for a grid without a single value
        bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
        bar.set_label(metric, fontsize=9)
    return _png(fig)


def _hatch(j: int, i: int) -> Rectangle:
    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.7", lw=0)


def plot_files(rows: list[dict], fit: dict, metric: str) -> dict[str, bytes]:
    """PNG plots by file name (PLOT_NAMES), one panel per (objective, model) group:
    metric_vs_images.png (x = images, log axis, one colour per resolution; points = finished trials,
    lines = the group's best law at that resolution), metric_vs_resolution.png (the same with
    x = resolution, one colour per images) and heatmap.png (the observed grid, values in the cells,
    failed / missing cells marked). A group without a usable law shows its points only."""
    groups = groups_of(rows or [], fit)
    return {
        PLOT_NAMES[0]: _line_plot(groups, fit, metric, "images"),
        PLOT_NAMES[1]: _line_plot(groups, fit, metric, "resolution"),
        PLOT_NAMES[2]: _heatmap(groups, metric),
    }


# -- the page ------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
.plots{display:flex;flex-direction:column;gap:16px;align-items:flex-start}
.plot{margin:0;background:#fff;padding:8px;border:1px solid #ddd}.plot img{max-width:100%;height:auto;display:block}
.plot figcaption{font-size:13px;color:#555;margin-bottom:4px}
section.group{background:#fff;border:1px solid #ddd;padding:8px 12px;margin:16px 0}
table{border-collapse:collapse;background:#fff;font-size:12px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#eef7ee}tr.failed td{background:#fff1f1}tr.cheapest td{background:#eef4ff}
td.warn{background:#fff3cd;color:#7a4b00;font-weight:600}td.bad{background:#ffe0e0;color:#b00;font-weight:600}
.error{white-space:pre-wrap;overflow-wrap:anywhere;max-width:640px;font-family:ui-monospace,monospace;font-size:11px;color:#b00}
pre.config{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow:auto}
.summary{font-size:15px}.note,.more{font-size:12px;color:#555}small{color:#777;font-weight:normal}
ul.headline{font-size:14px}"""


def _td(value, cls: str = "num") -> str:
    return f'<td class="{cls}">{esc(value)}</td>'


def _interval(ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"[{fmt(ci[0])}, {fmt(ci[1])}]"
    return ""


def _params_cell(entry: dict) -> str:
    params = entry.get("params") or {}
    if not params:
        return "<td>—</td>"
    std = entry.get("std") or {}
    ci = entry.get("ci95") or {}
    lines = []
    for name, value in params.items():
        text = f"{name} = {fmt(value)}"
        if _finite(std.get(name)):
            text += f" ± {fmt(std[name])}"
        if name in ci and _interval(ci[name]):
            text += f"  (95% CI {_interval(ci[name])})"
        lines.append(esc(text))
    return '<td class="params">' + "<br>".join(lines) + "</td>"


def _paper_form(pf) -> str:
    if not isinstance(pf, dict) or not pf:
        return ""
    items = "".join(f"<tr><th>{esc(k)}</th>{_td(fmt(v) if not isinstance(v, (dict, list)) else v)}</tr>"
                    for k, v in pf.items())
    return f'<p class="note">log_product in the paper\'s form:</p><table class="paper">{items}</table>'


def laws_table(group_fit: dict) -> str:
    laws = group_fit.get("laws") or {}
    if not laws:
        return "<p class=\"note\">No laws were fitted for this group.</p>"
    best = group_fit.get("best")
    head = ("<tr><th>law</th><th>status</th><th>parameters (value ± std, 95% CI)</th><th>rmse</th><th>r2</th>"
            "<th>loo_rmse</th></tr>")
    body = []
    for name, entry in laws.items():
        entry = entry or {}
        status = entry.get("status", "missing")
        cls = ' class="best"' if name == best else ""
        label = esc(name) + (" <small>(best)</small>" if name == best else "")
        if status != "ok" and entry.get("reason"):
            status_cell = f'<td class="bad">{esc(status)}<br><small>{esc(entry["reason"])}</small></td>'
        elif _finite(entry.get("bootstrap_ok")):
            status_cell = f'<td>{esc(status)}<br><small>{esc(fmt(entry["bootstrap_ok"]))} bootstrap refits</small></td>'
        else:
            status_cell = _td(status, "" if status == "ok" else "bad")
        body.append(f"<tr{cls}><td>{label}</td>" + status_cell
                    + _params_cell(entry) + _td(fmt(entry.get("rmse"))) + _td(fmt(entry.get("r2")))
                    + _td(fmt(entry.get("loo_rmse"))) + "</tr>")
    paper = _paper_form((laws.get("log_product") or {}).get("paper_form"))
    return f'<table class="laws">{head}{"".join(body)}</table>{paper}'


def needed_table(needed) -> str:
    if not needed:
        return '<p class="note">No target was set: no "images needed" predictions.</p>'
    rows = needed.get("rows") or []
    cheapest = needed.get("cheapest") or {}
    intro = (f'<p>Images needed to reach {esc(fmt(needed.get("target")))} by the '
             f'{esc(needed.get("law") or "—")} law, per resolution'
             + (f' (cheapest: {esc(fmt(cheapest.get("images")))} images at resolution '
                f'{esc(fmt(cheapest.get("resolution")))})' if cheapest else " (none reachable)") + ".</p>")
    warn = f'<p class="note"><b>Warning:</b> {esc(needed["warning"])}</p>' if needed.get("warning") else ""
    body = []
    for r in rows:
        reachable = r.get("reachable")
        extra = r.get("extrapolation")
        note = r.get("warning") or ("unreachable by this law" if reachable is False else
                                    "extrapolation beyond the sweep's grid" if extra else "")
        note_cls = "bad" if reachable is False else "warn" if (extra or r.get("warning")) else ""
        is_cheapest = cheapest and r.get("resolution") == cheapest.get("resolution") and \
            r.get("images") == cheapest.get("images")
        body.append(f'<tr{" class=cheapest" if is_cheapest else ""}>' + _td(fmt(r.get("resolution")))
                    + _td(fmt(r.get("images")) if reachable is not False else "unreachable",
                          "num" if reachable is not False else "bad")
                    + _td(fmt(reachable), "num" if reachable is not False else "bad")
                    + _td(fmt(extra), "warn" if extra else "num")
                    + _td(note or "—", note_cls) + "</tr>")
    table = ('<table class="needed"><tr><th>resolution</th><th>images needed</th><th>reachable</th>'
             f'<th>extrapolation</th><th>warning</th></tr>{"".join(body)}</table>') if body else \
        '<p class="note">No predictions.</p>'
    return intro + warn + table


def _range(v) -> str:
    return f"{fmt(v[0])}–{fmt(v[1])}" if isinstance(v, (list, tuple)) and len(v) == 2 else fmt(v)


def group_section(group: dict, metric: str) -> str:
    g = group["fit"]
    n_rows = len(group["rows"])
    n_done = sum(metric_value(r, metric) is not None for r in group["rows"])
    head = (f'<section class="group"><h3>{esc(group["objective"])} · {esc(group["model"])} '
            f'<small>{n_done} of {n_rows} trials with a {esc(metric)}</small></h3>')
    if not g:
        return head + '<p class="note">Not in the fit: no laws for this group.</p></section>'
    grid = g.get("grid") or {}
    ref = g.get("ref") or {}
    info = (f'<p class="note">fitted on {esc(fmt(g.get("n_trials")))} trials; grid: images '
            f'{esc(_range(grid.get("images")))}, resolution {esc(_range(grid.get("resolution")))}; '
            f'reference point N0 = {esc(fmt(ref.get("images")))}, R0 = {esc(fmt(ref.get("resolution")))}</p>')
    return head + info + laws_table(g) + "<h4>Images needed</h4>" + needed_table(g.get("needed")) + "</section>"


def _error_text(err) -> str:
    text = str(err)
    if len(text) > ERROR_SHOWN:
        text = "…" + text[-ERROR_SHOWN:]
    return text


def trials_table(rows: list[dict], metric: str) -> str:
    if not rows:
        return '<p class="note">No trials.</p>'
    chance = chance_key(metric)
    firsts = ["trial_id", "status", "objective", "model", "images", "resolution", "steps", "params", "seconds",
              metric] + ([chance] if chance and any(chance in r for r in rows) else [])
    extra = sorted({k for r in rows for k in r if k not in firsts and k not in STANDARD})
    cols = firsts + extra + ["error"]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        ok = r.get("status") == "finished"
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "error":
                cells.append(f'<td class="error">{esc(_error_text(v))}</td>' if v else "<td></td>")
            elif c == "trial_id":
                cells.append(f"<td>{esc(v)}</td>")
            elif c == "status":
                cells.append(_td(v, "" if ok else "bad"))
            elif c == "params":
                cells.append(_td(fmt_si(v)))
            elif v is not None and not isinstance(v, (int, float)):
                cells.append(f"<td>{esc(v)}</td>")
            else:
                cells.append(_td(fmt(v)))
        body.append(f'<tr{"" if ok else " class=failed"}>{"".join(cells)}</tr>')
    return f'<table class="trials"><tr>{head}</tr>{"".join(body)}</table>'


def headline(rows: list[dict], groups: list[dict], metric: str) -> str:
    statuses = [r.get("status") for r in rows]
    done = statuses.count("finished")
    failed = statuses.count("error")
    other = len(rows) - done - failed
    summary = (f'<p class="summary">{len(rows)} trials: <b>{done} finished</b>, <b>{failed} failed</b>'
               + (f", {other} other (not finished)" if other else "")
               + f"; metric studied: <b>{esc(metric)}</b>.</p>")
    if not done:
        summary += '<p class="note">No trial finished: nothing to fit or predict.</p>'
    items = []
    for g in groups:
        best = best_law(g["fit"])
        name = f"{esc(g['objective'])} · {esc(g['model'])}"
        if best:
            law, entry = best
            items.append(f"<li>{name}: best law <b>{esc(law)}</b>, LOO RMSE {esc(fmt(entry.get('loo_rmse')))}, "
                         f"r2 {esc(fmt(entry.get('r2')))}</li>")
        else:
            items.append(f"<li>{name}: no usable law (points only)</li>")
    return summary + (f'<ul class="headline">{"".join(items)}</ul>' if items else "")


def sweep_page(title: str, rows: list[dict], fit: dict, metric: str, plots: list[str],
               config_yaml: str | None = None) -> str:
    """The sweep's static HTML page: headline, plots (relative <img> links to the files in `plots`),
    per group the laws' parameters and the 'needed' predictions, the trials table and the config."""
    rows = rows or []
    fit = fit or {}
    groups = groups_of(rows, fit)
    captions = {PLOT_NAMES[0]: f"{metric} vs training images",
                PLOT_NAMES[1]: f"{metric} vs resolution",
                PLOT_NAMES[2]: f"observed {metric} over the grid"}
    figures = "".join(f'<figure class="plot"><figcaption>{esc(captions.get(p, p))}</figcaption>'
                      f'<a href="{esc(p)}"><img src="{esc(p)}" alt="{esc(captions.get(p, p))}"></a></figure>'
                      for p in plots or [])
    target = fit.get("target")
    fit_note = (f'<p class="note">Laws fitted: {esc(", ".join(fit.get("laws") or LAWS))}; target '
                f'{esc(fmt(target))}. LOO RMSE: the error predicting each trial from a fit without it.</p>')
    config = (f'<h2>Config</h2><pre class="config">{esc(config_yaml)}</pre>' if config_yaml else "")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)} - localcap sweep</title>'
            f'<style>{CSS}</style></head><body><h1>{esc(title)}</h1>'
            f'{headline(rows, groups, metric)}{fit_note}'
            f'<h2>Plots</h2><section class="plots">{figures or "<p class=note>No plots.</p>"}</section>'
            f'<h2>Fits per group</h2>{"".join(group_section(g, metric) for g in groups) or "<p class=note>No groups.</p>"}'
            f'<h2>Trials</h2><section>{trials_table(rows, metric)}</section>{config}</body></html>')
