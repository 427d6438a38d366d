"""Top-down forecast of a system series: a point plus the empirical quantiles of its own past errors.

The per-user forecasts, aggregated bottom-up (:mod:`pipeline.aggregate`), know each user but not
the system's recent errors: on the ServeGen trace their sampled sum was biased low and too narrow
(its 0.9 quantile covered the next bucket only ~70 % of the time). The sum's own history knows
how far the sum moves in 5-30 minutes, users who have no model yet included. This module is
that forecast, shared by the pipeline (one issue: :func:`topdown_forecast`, the
``topdown_empirical`` band and the ``reconciled_target`` of :func:`pipeline.aggregate.aggregate`)
and the replay simulator (every step: :func:`empirical_quantiles`, behind
:func:`scaler.sim_policies.empirical_forecast`).

Model (all in steps; ``x [T, R]`` the series, ``K`` steps per forecast bucket, ``H`` horizons):
the target of horizon ``j`` issued at origin ``o`` is the highest step of bucket ``j``
(``max x[o + jK .. o + (j+1)K − 1]``; the bucket itself when ``K = 1``). Candidate points: the
last value ``x[o − 1]`` and the peak of the last ``w`` steps, optionally plus seasonal drifts.
Each candidate's errors (target − point), optionally in units of ``sqrt(x[o − 1] + c)``, are
collected at origins on the bucket grid and used once all ``H`` buckets are past; at every refit,
per horizon and resource, the candidate with the lowest mean pinball loss at ``level`` over the
trailing window supplies the point, ``upper = point + q_level(errors)`` and ``mean = point +
mean(errors)``. Before any error is known both are the point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.schemas import HORIZONS_MIN


def lag(a: np.ndarray, k: int = 1) -> np.ndarray:
    """``out[t] = a[t - k]``, 0 before the start."""
    out = np.zeros_like(a)
    out[k:] = a[: len(a) - k]
    return out


def max_ahead(a: np.ndarray, w: int) -> np.ndarray:
    """``out[t] = max(a[t : t + w])`` (truncated at the end), along axis 0."""
    pad = np.concatenate([a, np.full((w - 1,) + a.shape[1:], -np.inf)]) if w > 1 else a
    out = np.lib.stride_tricks.sliding_window_view(pad, w, axis=0).max(axis=-1)
    return np.where(np.isfinite(out), out, 0.0)


def trailing_stats(samples: np.ndarray, known_at: np.ndarray, n_steps: int, refit: int, window: int,
                   level: float, *, with_loss: bool = False):
    """Per step, the ``level`` quantile and the mean of the samples known by the last refit.

    ``samples``: ``[S, ...]``; ``known_at``: ``[S]`` ascending, the step from which each sample is
    known. Step ``t`` uses refit point ``c = t − t % refit`` and the samples with
    ``c − window < known_at <= c``; none: 0. Returns two ``[n_steps, ...]`` arrays; with
    ``with_loss`` a third: the mean pinball loss at ``level`` of those samples about their own
    quantile (``mean(max(level·r, (level − 1)·r))``, ``r`` = sample − quantile; none: 0).
    """
    refits = np.arange(0, n_steps, refit)
    q = np.zeros((len(refits),) + samples.shape[1:])
    m = np.zeros_like(q)
    loss = np.zeros_like(q)
    his = np.searchsorted(known_at, refits, side="right")
    los = np.searchsorted(known_at, refits - window, side="right")
    for j, (lo, hi) in enumerate(zip(los, his)):
        if hi > lo:
            q[j] = np.quantile(samples[lo:hi], level, axis=0)
            m[j] = samples[lo:hi].mean(axis=0)
            if with_loss:
                r = samples[lo:hi] - q[j]
                loss[j] = np.maximum(level * r, (level - 1) * r).mean(axis=0)
    idx = np.arange(n_steps) // refit
    if with_loss:
        return q[idx], m[idx], loss[idx]
    return q[idx], m[idx]


def seasonal_drift(x: np.ndarray, peak: np.ndarray, period: int, count: int, k: int, hz: int) -> np.ndarray:
    """``[T, hz, R]``: at origin ``t``, the mean over ``i = 1 .. count`` with ``t − 1 − i·period >= 0``
    of ``peak[t − i·period + j·k] − x[t − 1 − i·period]`` (0 where no period is past yet)."""
    n = len(x)
    t = np.arange(n)
    total = np.zeros((n, hz) + x.shape[1:])
    seen = np.zeros(n)
    for i in range(1, count + 1):
        ok = t - 1 - i * period >= 0
        prev = np.clip(t - 1 - i * period, 0, n - 1)
        for j in range(hz):
            tgt = np.clip(t - i * period + j * k, 0, n - 1)
            total[:, j] += np.where(ok[:, None], peak[tgt] - x[prev], 0.0)
        seen += ok
    return total / np.maximum(seen, 1.0)[:, None, None]


def empirical_quantiles(x: np.ndarray, level: float, *, k: int = 1, window: int, refit: int,
                        error_scale: str = "none", point_widths: Sequence[int] = (1,),
                        seasonal_periods: Sequence[int] = (), seasonal_count: int = 3,
                        daily_period: int | None = None, hz: int = len(HORIZONS_MIN)) -> tuple[np.ndarray, np.ndarray]:
    """The forecast issued at every step of ``x [T, R]`` (module doc): ``(upper, mean)``, each
    ``[T, hz, R]``; row ``t`` uses ``x[< t]`` only. ``point_widths``: candidate windows in steps
    (1: the last value); ``seasonal_periods``: seasonal candidates (steps, at least ``hz·k``);
    ``daily_period``: add the change over the same span one period ago to every candidate.
    ``error_scale``: ``"none"`` or ``"sqrt"`` (errors in units of ``sqrt(x[o−1] + c)``, ``c`` = 1 %
    of the mean so far, at least 1e-3). Mean is clipped to [0, upper], upper to >= 0."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if error_scale not in ("none", "sqrt"):
        raise ValueError(f"error_scale must be 'none' or 'sqrt', got {error_scale!r}")
    if k < 1 or window < 1 or refit < 1:
        raise ValueError(f"k, window and refit must be >= 1 step, got {k}, {window}, {refit}")
    periods = list(seasonal_periods)
    if any(p < hz * k for p in periods):
        raise ValueError(f"seasonal periods must be at least the longest horizon ({hz * k} steps), got {periods}")
    if seasonal_count < 1:
        raise ValueError(f"seasonal_count must be >= 1, got {seasonal_count}")
    peak = max_ahead(x, k)
    last = lag(x)  # [T, R] x[t-1]
    if error_scale == "sqrt":
        floor = np.maximum(0.01 * np.cumsum(last, axis=0) / np.arange(1, n + 1).reshape((-1,) + (1,) * (x.ndim - 1)), 1e-3)
        scale = np.sqrt(last + floor)[:, None]  # [T, 1, R], known at t
    else:
        scale = np.ones((n, 1) + x.shape[1:])
    o = np.arange(k, n - hz * k + 1, k)  # origins on the bucket grid (t % K == 0)
    target = np.stack([peak[o + j * k] for j in range(hz)], axis=1)  # [S, hz, R]
    widths = sorted({max(1, int(w)) for w in point_widths} or {1})
    drift = seasonal_drift(x, peak, daily_period, 1, k, hz) if daily_period else None
    best = None  # (loss, point, q, m) of the candidate with the lowest trailing loss so far, per cell
    for w in widths + [-p for p in periods]:
        if w < 0:
            point = last[:, None] + seasonal_drift(x, peak, -w, seasonal_count, k, hz)
        else:
            base = last if w == 1 else lag(max_ahead(x[::-1], w)[::-1])  # max(x[t-w .. t-1])
            point = np.repeat(base[:, None], hz, axis=1)  # [T, hz, R] for origin t
        if drift is not None:
            point = point + drift
        err = (target - point[o]) / scale[o]
        q, m, loss = trailing_stats(err, o + hz * k, n, refit, window, level, with_loss=True)
        if best is None:
            best = [loss, point, q, m]
        else:  # strictly lower loss wins: ties keep the shorter window
            win = loss < best[0]
            for i, a in enumerate((loss, point, q, m)):
                best[i] = np.where(win, a, best[i])
    _, point, q, m = best
    upper = np.maximum(point + q * scale, 0.0)
    return upper, np.clip(point + m * scale, 0.0, upper)


#: Candidate points of the pipeline's top-down forecast, in 5-minute buckets: the last value and
#: the peak of the last 10 .. 30 minutes.
TOPDOWN_WIDTHS = (1, 2, 3, 4, 5, 6)


def topdown_forecast(history: np.ndarray, level: float, *, widths: Sequence[int] = TOPDOWN_WIDTHS,
                     error_scale: str = "sqrt", min_errors: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    """The forecast issued right after the last bucket of ``history [T, R]`` (one system series
    per resource, 5-minute buckets, oldest first): ``(upper, mean)`` ``[H, R]`` at ``level`` (1: the
    largest past error), its errors from every origin of the history whose six buckets are all inside it. None when fewer
    than ``min_errors`` such origins exist (too little history to know the errors)."""
    history = np.asarray(history, dtype=np.float64)
    if history.ndim != 2:
        raise ValueError(f"history must be [buckets, resources], got shape {history.shape}")
    if not np.isfinite(history).all() or (history < 0).any():
        raise ValueError("history must be finite and >= 0")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must lie in (0, 1], got {level}")
    hz = len(HORIZONS_MIN)
    n = len(history)
    if n - hz < min_errors:  # origins 1 .. n - hz have all six buckets inside the history
        return None
    x = np.concatenate([history, np.zeros((1, history.shape[1]))])  # step n: the issue (never a target)
    upper, mean = empirical_quantiles(x, level, k=1, window=n + 1, refit=n, error_scale=error_scale,
                                      point_widths=widths, hz=hz)
    return upper[n], mean[n]


#: The reconciled upper bound's candidates (:func:`reconcile_candidates`), in the order a tie is
#: broken (the first wins): the larger of the bottom-up and top-down bounds (the safe choice, used
#: until enough is scored), the top-down band alone, the bottom-up target alone, their average.
RECONCILE_CANDIDATES = ("max", "topdown", "bottom_up", "average")
#: Scored issues the choice needs before it leaves the maximum (two hours of 5-minute issues).
RECONCILE_MIN_SCORED = 24


def reconcile_candidates(bottom_up: np.ndarray, topdown: np.ndarray) -> np.ndarray:
    """``[4, ...]``: the :data:`RECONCILE_CANDIDATES` of two upper bounds of the same shape (NaN in
    either gives NaN in every candidate but the other's own)."""
    bottom_up, topdown = np.asarray(bottom_up, dtype=np.float64), np.asarray(topdown, dtype=np.float64)
    return np.stack([np.maximum(bottom_up, topdown), topdown, bottom_up, 0.5 * (bottom_up + topdown)])


def reconcile_choice(uppers: np.ndarray, actual: np.ndarray, level: float, *, window: int,
                     min_scored: int) -> np.ndarray:
    """Per issue, horizon and resource, which candidate upper bound scored best recently.

    ``uppers [C, N, H, R]``: the candidates' upper bounds issued at ``N`` consecutive 5-minute
    issues (NaN: that candidate had none at that issue); ``actual [N, H, R]``: the demand each of
    them forecast (bucket ``n + j`` of the series for issue ``n``, horizon ``j``; NaN where not
    known). Issue ``n`` scores, for horizon ``j``, the ``window`` latest issues whose target is
    past by then (``m`` in ``[n − j − window, n − j − 1]``) at which every candidate had a bound
    and the actual is known; the candidate with the lowest mean pinball loss at ``level`` wins,
    ties going to the lower index. Fewer than ``min_scored`` scored issues: candidate 0. Returns
    ``[N, H, R]`` int indices; row ``n`` uses nothing issued at or after ``n`` nor any demand at or
    after bucket ``n`` (for the scaler, which sizes from issue ``n`` before bucket ``n`` is over)."""
    uppers = np.asarray(uppers, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if uppers.ndim != 4 or actual.shape != uppers.shape[1:]:
        raise ValueError(f"uppers must be [candidates, issues, horizons, resources] and actual match its last three, "
                         f"got {uppers.shape} and {actual.shape}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must lie in (0, 1], got {level}")
    if window < 1 or min_scored < 1:
        raise ValueError(f"window and min_scored must be >= 1, got {window} and {min_scored}")
    c, n, hz, r = uppers.shape
    ok = np.isfinite(actual) & np.isfinite(uppers).all(axis=0)  # [N, H, R]
    d = np.where(ok, actual, 0.0)[None] - np.where(ok[None], uppers, 0.0)
    loss = np.maximum(level * d, (level - 1.0) * d)  # 0 where not scored
    csum = np.concatenate([np.zeros((c, 1, hz, r)), np.cumsum(loss, axis=1)], axis=1)  # [C, N+1, H, R]
    ccount = np.concatenate([np.zeros((1, hz, r)), np.cumsum(ok, axis=0)], axis=0)  # [N+1, H, R]
    issue = np.arange(n)[:, None]
    hi = np.clip(issue - np.arange(hz)[None, :], 0, n)  # [N, H]: scored issues m < n - j
    lo = np.clip(hi - window, 0, n)
    hj = np.broadcast_to(np.arange(hz), (n, hz))
    total = csum[:, hi, hj] - csum[:, lo, hj]  # [C, N, H, R]
    count = ccount[hi, hj] - ccount[lo, hj]  # [N, H, R]
    # the first of equal totals; "equal" up to the rounding of the running sums, so a candidate whose
    # losses matched another's over the window does not win on the sums' rounding
    low = total.min(axis=0)
    best = np.argmax(total <= low + 1e-9 * (np.abs(low) + 1e-12), axis=0)
    return np.where(count >= min_scored, best, 0)
