"""Render an :class:`~scaler.evaluate.Evaluation`: ``summary.json``, ``report.md``, ``report.html``
and PNG plots (matplotlib, Agg backend, imported only here and only when rendering, so
``scaler`` stays light for the scaling container).

Plots (each titled, axes labelled with units, legends):

* ``tradeoff.png``: every policy's cold demand (core-hours and requests, log scale) against its
  cost in equivalent instance-hours, with the reference cost marked.
* ``pools.png``: per policy, at the reference cost, the in-service capacity (cores) over the
  demand, cold moments marked; warmcast's warm pool too.
* ``forecast.png``: the warmcast policies' forecasts (mean and upper bound at the active horizon,
  and the 30-minute upper bound) against the demand they had to cover: one panel for the baseline
  forecaster (``warmcast``) and, with ``--forecaster lstm``, one for the per-user LSTMs aggregated
  (``warmcast_lstm``).
"""

from __future__ import annotations

import html
import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np

from pipeline.schemas import HORIZONS_MIN
from scaler.evaluate import LSTM_BOTTOM_UP_POLICY, LSTM_MAX_POLICY, LSTM_POLICIES, LSTM_POLICY, Evaluation
from scaler.sim_policies import Warmcast

COLORS = {"reactive": "#d62728", "knative": "#ff7f0e", "aws_predictive": "#8c564b", "naive_predictive": "#7f7f7f",
          "warmcast": "#1f77b4", "warmcast_1min": "#17becf", LSTM_POLICY: "#9467bd", LSTM_MAX_POLICY: "#393b79",
          LSTM_BOTTOM_UP_POLICY: "#e377c2",
          "oracle": "#2ca02c"}
#: The policies whose forecast ``forecast.png`` shows, and what each forecast's target is.
FORECAST_PANELS = {"warmcast": ("baseline forecaster (last value of the system sum + past error quantiles)",
                                "the 5-min bucket's peak step"),
                   LSTM_POLICY: ("per-user LSTMs aggregated, or the top-down band, by recent score",
                                 "the 5-min bucket's average")}
PLOT_WINDOW_S = 2 * 86_400.0  # the time-series plots show at most the last two days


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _times(ev: Evaluation, lo: int, hi: int):
    t = ev.trace
    return [t.start + timedelta(seconds=i * t.step_s) for i in range(lo, hi)]


def _window(ev: Evaluation) -> tuple[int, int]:
    n = ev.trace.steps
    lo = max(ev.eval_start, n - round(PLOT_WINDOW_S / ev.trace.step_s))
    return lo, n


def _fmt(x: float | None, pattern: str = "{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else pattern.format(x)


def _date_axis(ax) -> None:
    import matplotlib.dates as mdates

    loc = mdates.AutoDateLocator(minticks=4, maxticks=9)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))


def plot_tradeoff(ev: Evaluation, path: Path) -> None:
    plt = _plt()
    has_req = ev.reference.cold_requests is not None
    fig, axes = plt.subplots(1, 2 if has_req else 1, figsize=(13 if has_req else 7.5, 5.2), squeeze=False)
    metrics = [("cold_core_seconds", 1 / 3600, "cold demand (core-hours, log scale)")]
    if has_req:
        metrics.append(("cold_requests", 1.0, "cold requests (log scale)"))
    for ax, (metric, scale, ylabel) in zip(axes[0], metrics):
        vals = [getattr(m, metric) * scale for pe in ev.policies.values() for m in pe.curve]
        pos = [v for v in vals if v > 0]
        floor = (min(pos) / 3) if pos else 1.0
        for name, pe in ev.policies.items():
            pts = sorted((m.equivalent_instance_hours, getattr(m, metric) * scale) for m in pe.curve)
            x = [p[0] for p in pts]
            y = [max(p[1], floor) for p in pts]
            ax.plot(x, y, "--o" if name.endswith("_1min") else "-o", color=COLORS.get(name),
                    label=f"{pe.spec.label} ({pe.spec.knob})", ms=4, lw=1.6)
            zero = [(a, floor) for a, b in pts if b <= 0]
            if zero:
                ax.plot(*zip(*zero), "o", mfc="white", color=COLORS.get(name), ms=7)
        ax.axvline(ev.reference.equivalent_instance_hours, color="black", ls="--", lw=1)
        ax.annotate(f"reference cost:\nreactive at {ev.reference_utilisation:.0%}", xy=(ev.reference.equivalent_instance_hours, 1),
                    xycoords=("data", "axes fraction"), xytext=(4, -28), textcoords="offset points", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("cost (equivalent instance-hours over the scored period)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_title("Cold core-hours vs cost (lower-left is better)")
    if has_req:
        axes[0][1].set_title("Cold requests vs cost (lower-left is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 4 if len(labels) <= 4 or not has_req else 3
    if has_req and max(map(len, labels), default=0) > 60:
        ncol = 2  # three columns of long labels run off the figure
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("Cold starts vs instance-hours, each policy's knob swept (hollow: zero cold demand)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(labels) // ncol), 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_pools(ev: Evaluation, path: Path) -> None:
    plt = _plt()
    lo, hi = _window(ev)
    t = _times(ev, lo, hi)
    per = ev.fleet.shape.vcpu * ev.fleet.capacity_utilisation
    cores = ev.trace.cores[lo:hi]
    names = list(ev.policies)
    fig, axes = plt.subplots(len(names), 1, figsize=(13, 2.3 * len(names) + 0.8), sharex=True, sharey=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        pe, r = ev.policies[name], ev.policies[name].at_cost
        ax.fill_between(t, 0, cores, color="#bbbbbb", step="post", label="demand (cores)", lw=0)
        ax.step(t, r.ready[lo:hi] * per, where="post", color=COLORS.get(name, "C0"), lw=1.2, label="in-service capacity (cores)")
        if (r.warm[lo:hi] > 0).any():
            ax.step(t, (r.ready[lo:hi] + r.warm[lo:hi]) * per, where="post", color=COLORS.get(name, "C0"), lw=0.8,
                    ls=":", label="+ warm pool (cores)")
        cold = r.cold_share[lo:hi] > 0
        if cold.any():
            ax.plot(np.array(t)[cold], cores[cold], "|", color="red", ms=6, label="cold (demand not served)")
        m = r.metrics
        ax.set_title(f"{pe.spec.label}: {pe.spec.knob} = {pe.knob_at_cost:.3g}; {m.equivalent_instance_hours:,.0f} "
                     f"instance-h, cold {m.cold_share:.2%} of core-s, p99 wait {m.wait_p99_s:.0f} s",
                     fontsize=9, loc="left")
        ax.set_ylabel("cores")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=4)
    _date_axis(axes[-1, 0])
    axes[-1, 0].set_xlabel("time (UTC)")
    fig.suptitle(f"Pool size over time at the reference cost ({ev.reference.equivalent_instance_hours:,.0f} equivalent "
                 f"instance-hours), {ev.fleet.shape.vcpu:g}-vCPU instances", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def warmcast_forecast(ev: Evaluation, name: str = "warmcast") -> Warmcast:
    """The policy ``name`` at its reference-cost level, prepared: its forecast is ``.issued``."""
    pe = ev.policies[name]
    pol = pe.spec.make(pe.knob_at_cost)
    pol.prepare(ev.trace, ev.fleet)
    return pol


def forecast_at_steps(issued_step: np.ndarray, steps: np.ndarray, j: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each step, the issue whose horizon ``j`` (0-based) targets it: the latest issue ``i``
    with ``issued_step[i] + j·k <= step``, valid when the step lies in that bucket
    (``< issued_step[i] + (j+1)·k``). Returns ``(index clipped to >= 0, valid)``."""
    i = np.searchsorted(issued_step, steps - j * k, side="right") - 1
    ic = np.clip(i, 0, max(len(issued_step) - 1, 0))
    ok = (i >= 0) & (steps < issued_step[ic] + (j + 1) * k) if len(issued_step) else np.zeros(len(steps), bool)
    return ic, ok


def plot_forecast(ev: Evaluation, path: Path) -> None:
    from scaler.forecast_view import horizon_covering

    plt = _plt()
    names = [n for n in FORECAST_PANELS if n in ev.policies]
    tr = ev.trace
    lo, hi = _window(ev)
    k = max(1, round(300 / tr.step_s))
    t = _times(ev, lo, hi)
    steps = np.arange(lo, hi)
    fig, axes = plt.subplots(len(names), 1, figsize=(13, 4.2 * len(names) + 0.6), sharex=True, sharey=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        pol: Warmcast = warmcast_forecast(ev, name)
        fc = pol.issued
        what, target = FORECAST_PANELS[name]
        h = horizon_covering(ev.fleet.shape.boot_s + pol.decide_every_s)
        ax.plot(t, tr.cores[lo:hi], color="black", lw=0.7, label="actual demand (cores, per step)")
        for hz, color, alpha in ((h, COLORS[name], 0.35), (HORIZONS_MIN[-1], "#bcbd22", 0.2)):
            j = HORIZONS_MIN.index(hz)
            i, ok = forecast_at_steps(fc.issued_step, steps, j, k)
            up = np.where(ok, fc.upper[i, j, 0], np.nan)
            mean = np.where(ok, fc.mean[i, j, 0], np.nan)
            ax.fill_between(t, mean, up, color=color, alpha=alpha, lw=0,
                            label=f"{hz}-min-ahead forecast of {target}: mean to q{pol.level:.3g} upper bound")
            if hz == h:
                ax.plot(t, mean, color=color, lw=0.8)
        ax.set_title(f"{name}: {what}; issued from past data only, level {pol.level:.3g} (its reference-cost setting), "
                     f"drawn at the time it forecasts", fontsize=9.5, loc="left")
        ax.set_ylabel("cores (average concurrent)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    _date_axis(axes[-1, 0])
    axes[-1, 0].set_xlabel("time (UTC)")
    fig.suptitle("warmcast system forecasts vs actual demand", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def result_rows(ev: Evaluation) -> list[dict]:
    rows = []
    for name, pe in ev.policies.items():
        near = pe.nearest(ev.reference.equivalent_instance_hours)
        rows.append({"policy": name, "label": pe.spec.label, "knob": f"{pe.spec.knob} = {pe.knob_at_cost:.3g}",
                     "forecast": _short_forecaster(ev, name),
                     "cold_core_h": None if pe.cold_core_seconds_at_cost is None else pe.cold_core_seconds_at_cost / 3600,
                     "ratio_reactive": pe.ratio_to_reactive, "ratio_reactive_req": pe.ratio_to_reactive_requests,
                     "ratio_naive": pe.ratio_to_naive, "wait_p99_s": pe.at_cost.metrics.wait_p99_s if pe.at_cost else None,
                     "nearest": f"{near.equivalent_instance_hours:,.0f} h / {near.cold_core_seconds / 3600:,.2f} core-h"})
    return rows


def _short_forecaster(ev: Evaluation, name: str) -> str:
    if name == LSTM_POLICY:
        return "per-user LSTMs, aggregated + top-down, chosen by score"
    if name == LSTM_MAX_POLICY:
        return "per-user LSTMs, aggregated, never below top-down"
    if name == LSTM_BOTTOM_UP_POLICY:
        return "per-user LSTMs, aggregated"
    return "baseline (last value of the sum)" if name in ("warmcast", "warmcast_1min") else "–"


_COLS = [("policy", "policy"), ("forecast", "forecast driving it"), ("knob", "knob at reference cost"), ("cold_core_h", "cold core-h at reference cost"),
         ("ratio_reactive", "ratio to reactive (core-s)"), ("ratio_reactive_req", "ratio to reactive (requests)"),
         ("ratio_naive", "ratio to naive heuristic (core-s)"), ("wait_p99_s", "p99 wait of cold demand (s)"),
         ("nearest", "nearest swept point (cost / cold)")]


def _cell(key: str, v) -> str:
    if key in ("cold_core_h",):
        return _fmt(v, "{:,.2f}")
    if key.startswith("ratio"):
        return _fmt(v, "{:.3f}")
    if key == "wait_p99_s":
        return _fmt(v, "{:.0f}")
    return str(v)


def also_rows(ev: Evaluation) -> list[list[str]]:
    """Header + one row per policy: ratios to reactive and to the naive heuristic (cold core-seconds)
    at the cost of reactive at each other utilisation."""
    if not ev.also:
        return []
    keys = list(ev.also)
    head = ["policy"] + [f"{k}: {ev.also[k]['equivalent_instance_hours']:,.0f} h, to reactive / to naive" for k in keys]
    rows = [head]
    for name in ev.policies:
        cells = [name]
        for k in keys:
            v = ev.also[k]["policies"][name]
            cells.append(f"{_fmt(v['ratio_to_reactive'])} / {_fmt(v['ratio_to_naive'])}")
        rows.append(cells)
    return rows


def _context_lines(ev: Evaluation, meta: dict) -> list[str]:
    tr, s = ev.trace, ev.fleet.shape
    end = tr.start + timedelta(seconds=tr.steps * tr.step_s)
    scored = tr.start + timedelta(seconds=ev.eval_start * tr.step_s)
    return [
        f"Data: {meta.get('source', '?')}; {tr.steps:,} steps of {tr.step_s:g} s, {tr.start:%Y-%m-%d %H:%M} – "
        f"{end:%Y-%m-%d %H:%M} UTC; scored from {scored:%Y-%m-%d %H:%M} (the steps before warm up forecasts).",
        f"Demand: mean {tr.cores.mean():,.1f} cores, peak {tr.cores.max():,.1f} cores; "
        f"{(tr.requests.sum() if tr.requests is not None else 0):,.0f} requests.",
        f"Fleet: one pool of {s.vcpu:g} vCPU / {s.memory_gb:g} GB instances at ${s.hourly_price_usd:g}/h, boot {s.boot_s:g} s, "
        f"resume {s.resume_s:g} s from a stopped warm pool (billed at {ev.fleet.stopped_cost_fraction:.0%}).",
        f"Reference: reactive target tracking at {ev.reference_utilisation:.0%} utilisation = "
        f"{ev.reference.equivalent_instance_hours:,.1f} equivalent instance-hours, "
        f"{ev.reference.cold_core_seconds / 3600:,.2f} cold core-hours"
        + (f", {ev.reference.cold_requests:,.0f} cold requests." if ev.reference.cold_requests is not None else "."),
    ] + [f"{'/'.join(ps)} forecast: {text}" for text, ps in _forecast_texts(ev).items()]


def _forecast_texts(ev: Evaluation) -> dict[str, list[str]]:
    """Which forecast drove which warmcast policy: text → policy names (the baseline's text is
    ``ev.forecast_note``)."""
    out: dict[str, list[str]] = {}
    for name in ev.policies:
        if name in ev.forecasters or name in ("warmcast", "warmcast_1min"):
            text = ev.forecasters.get(name, "") if name in LSTM_POLICIES else ev.forecast_note
            out.setdefault(text, []).append(name)
    return out


HOW = ("Each policy's main knob is swept; every setting replays the whole trace (a policy decides at the start of "
       "a step from earlier steps only; instances boot before serving) and is scored on cold demand (the share of "
       "a step's demand the in-service capacity cannot hold) and cost. A policy's cold demand at the reference "
       "cost is interpolated linearly in equivalent instance-hours between its two swept settings around that "
       "cost (cold demand falls convexly with cost, so this slightly overstates it); outside its swept range it "
       "has no value ('–'). Ratios below 1 beat reactive / the naive heuristic at equal cost.")


EPISODE_COLS = ["policy", "knob at reference cost", "cold core-h (this replay)", "episodes", "largest episode's share",
                 "cold while booting", "cold never asked for", "ratio to reactive (this replay)",
                 "robustness: ratio to reactive excluding reactive's largest episode"]
TOP_COLS = ["policy", "#", "start (UTC)", "duration (min)", "cold core-h", "share of the policy's cold",
            "demand before → peak (cores)", "jump"]


def _pct(x: float | None) -> str:
    return _fmt(x, "{:.1%}")


def _minute(iso: str) -> str:
    return iso[:16].replace("T", " ")


def episode_tables(ev: Evaluation) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The "Where the cold demand is" section from ``ev.episodes``: lead sentences (computed),
    the per-policy table and the top-episodes table (header + rows each); empty without episodes."""
    ep = ev.episodes
    if not ep or not ep.get("policies"):
        return [], [], []
    pols, ref_name = ep["policies"], ep["reference"]
    lead = [f"Each policy's cold demand at its reference-cost replay (the pool-plot replay), scored period only, "
            f"split into episodes: maximal runs of cold steps, runs less than {ep['gap_s'] / 60:g} min apart merged. "
            f"Level before = mean demand over the {ep['lookback_s'] / 60:g} min before an episode's first cold step; "
            f"jump = peak / level before. 'Cold while booting': the share that capacity the policy had already asked "
            f"for (booting or resuming into service) would have held; 'never asked for': the rest."]
    ref, win = pols.get(ref_name), ep.get("excluded_window")
    if ref and win and ref["top_episodes"]:
        e = ref["top_episodes"][0]
        lead.append(f"{ref_name}'s largest episode starts {_minute(e['start'])} UTC and lasts {e['duration_s'] / 60:,.0f} "
                    f"min: {_pct(e['share'])} of its cold core-seconds ({e['cold_core_hours']:,.2f} of "
                    f"{ref['cold_core_seconds'] / 3600:,.2f} core-h) in one of {ref['episodes']} episodes; demand went "
                    f"{e['level_before_cores']:,.1f} → {e['peak_cores']:,.1f} cores (×{_fmt(e['jump'], '{:.2f}')}).")
        if win.get("at_scored_start"):
            lstm = (" (the LSTM policies: no forecast before the scored period, only the safety net)"
                    if any(n.startswith("warmcast_lstm") for n in pols) else "")
            lead.append(f"**It starts {win['after_scored_start_s'] / 60:,.0f} min after the scored period does**: every "
                        f"policy meets it with the capacity its warm-up left{lstm}, so the ratios, which it dominates, "
                        f"say more about that state than about forecasting.")
        prior = win.get("largest_earlier_rise")
        if prior:
            lead.append(f"The largest rise before it in the trace, by the same measure: {prior['rise_cores']:+,.1f} cores "
                        f"(×{_fmt(prior['jump'], '{:.2f}')}) from {_minute(prior['start'])} UTC, against this episode's "
                        f"{win['episode_rise_cores']:+,.1f}: a forecast learnt from the past has "
                        f"{'seen no rise this large' if prior['rise_cores'] < win['episode_rise_cores'] else 'seen as large a rise'}.")
        lead.append(f"Robustness figure only (not the result; the headline ratio to reactive above is unchanged): the last "
                    f"column removes that window ({_minute(win['start'])} – {_minute(win['end'])} UTC) for every policy "
                    f"and divides each policy's remaining cold core-seconds by {ref_name}'s remaining. 'Ratio to reactive "
                    f"(this replay)' is the same quotient without the removal, on these replays (at the knob interpolated "
                    f"to the reference cost), so it can differ slightly from the interpolated headline.")
    elif ref:
        lead.append(f"{ref_name} has no cold demand at the reference cost: there is no episode to exclude.")
    table = [EPISODE_COLS]
    tops = [TOP_COLS]
    for name, p in pols.items():
        table.append([name, f"{p['knob']} = {_fmt(p['knob_value'], '{:.3g}')}", _fmt(
            None if p["cold_core_seconds"] is None else p["cold_core_seconds"] / 3600, "{:,.2f}"), str(p["episodes"]),
            _pct(p["largest_episode_share"]), _pct(p["cold_while_booting_share"]), _pct(p["cold_never_requested_share"]),
            _fmt(p["ratio_to_reactive_replay"]), _fmt(p["robustness_ratio_to_reactive_excluding_its_largest_episode"])])
        for i, e in enumerate(p["top_episodes"], 1):
            tops.append([name, str(i), _minute(e["start"]), f"{e['duration_s'] / 60:,.0f}", _fmt(e["cold_core_hours"], "{:,.2f}"),
                         _pct(e["share"]), f"{e['level_before_cores']:,.1f} → {e['peak_cores']:,.1f}",
                         _fmt(e["jump"], "×{:.2f}")])
    return lead, table, tops


def _md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _html_table(rows: list[list[str]]) -> list[str]:
    e = html.escape
    return (["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in rows[0]) + "</tr>"]
            + ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]] + ["</table>"])


def write_report(ev: Evaluation, out: Path, meta: dict | None = None) -> dict[str, Path]:
    """Write summary.json, report.md, report.html and the PNGs into ``out``; returns their paths."""
    meta = meta or {}
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tradeoff": out / "tradeoff.png", "pools": out / "pools.png"}
    plot_tradeoff(ev, paths["tradeoff"])
    plot_pools(ev, paths["pools"])
    if any(n in ev.policies for n in FORECAST_PANELS):
        paths["forecast"] = out / "forecast.png"
        plot_forecast(ev, paths["forecast"])
    summary = {"meta": meta, **ev.summary()}
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str))
    rows = result_rows(ev)
    ctx = _context_lines(ev, meta)
    captions = {"tradeoff": "Cold starts vs cost for every policy setting",
                "pools": "Pool size over time at the reference cost (last two days at most)",
                "forecast": "warmcast's forecast bands vs the actual demand"}
    md = ["# warmcast evaluation: predictive vs reactive scaling", ""] + [f"- {c}" for c in ctx] + [
        "", "## Result at the reference cost", "",
        "| " + " | ".join(h for _, h in _COLS) + " |", "|" + "---|" * len(_COLS)]
    md += ["| " + " | ".join(_cell(k, r[k]) for k, _ in _COLS) + " |" for r in rows]
    md += ["", HOW, ""]
    lead, ep_table, ep_top = episode_tables(ev)
    if ep_table:
        md += ["## Where the cold demand is", ""] + [x for line in lead for x in (line, "")]
        md += _md_table(ep_table) + ["", "Top episodes per policy (by cold core-hours):", ""]
        md += (_md_table(ep_top) if len(ep_top) > 1 else ["No policy has cold demand at the reference cost."]) + [""]
    also = also_rows(ev)
    if also:
        md += ["## Ratios at other reference costs", "", "| " + " | ".join(also[0]) + " |", "|" + "---|" * len(also[0])]
        md += ["| " + " | ".join(r) + " |" for r in also[1:]] + [""]
    for key in ("tradeoff", "pools", "forecast"):
        if key in paths:
            md += [f"## {captions[key]}", "", f"![{captions[key]}]({paths[key].name})", ""]
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md))
    e = html.escape
    body = ["<h1>warmcast evaluation: predictive vs reactive scaling</h1>", "<ul>"]
    body += [f"<li>{e(c)}</li>" for c in ctx] + ["</ul>", "<h2>Result at the reference cost</h2>", "<table>",
                                                 "<tr>" + "".join(f"<th>{e(h)}</th>" for _, h in _COLS) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{e(_cell(k, r[k]))}</td>" for k, _ in _COLS) + "</tr>" for r in rows]
    body += ["</table>", f"<p>{e(HOW)}</p>"]
    if ep_table:
        body += ["<h2>Where the cold demand is</h2>"] + [f"<p>{e(line)}</p>" for line in lead] + _html_table(ep_table)
        body += ["<p>Top episodes per policy (by cold core-hours):</p>"]
        body += _html_table(ep_top) if len(ep_top) > 1 else ["<p>No policy has cold demand at the reference cost.</p>"]
    if also:
        body += ["<h2>Ratios at other reference costs</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in also[0]) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in also[1:]] + ["</table>"]
    for key in ("tradeoff", "pools", "forecast"):
        if key in paths:
            body += [f"<h2>{e(captions[key])}</h2>", f'<img src="{e(paths[key].name)}" alt="{e(captions[key])}">']
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    paths["html"] = out / "report.html"
    paths["html"].write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>warmcast evaluation</title>"
                             f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    return paths
