"""Baseline forecasters: last value, seasonal naive (daily, weekly), moving average.

Each baseline gives a point forecast and quantiles from the empirical distribution of its *own*
past errors, so the LSTM is judged against honest probabilistic baselines (DESIGN.md,
"Forecasting"). Everything is vectorised numpy over users and origins; no torch.

Conventions (shared with ``models/features.py``):

* ``values``: float ``[n_users, T, 4]`` on the 5-minute grid, resources in
  :data:`pipeline.schemas.DEMAND_RESOURCES` order, in the demand's own units. NaN / ±inf mark a
  missing bucket.
* origin ``o`` (``0 <= o <= T``) is "issued at the start of bucket ``o``": only buckets
  ``< o`` are known; horizon ``h`` (1..6, i.e. ``5*h`` minutes) targets bucket ``o + h - 1``.
* quantile arrays are ``[n_users, n_origins, 6, 4, 7]`` (levels :data:`QUANTILES`).

Point forecasts, for origin ``o`` and target bucket ``t = o + h - 1``:

* ``last_value``: ``x[o - 1]``;
* ``seasonal_daily`` / ``seasonal_weekly``: ``x[t - 288]`` / ``x[t - 2016]`` (same bucket
  yesterday / last week; always ``< o`` because ``h <= 6``);
* ``moving_average``: mean of ``x[o - window : o]`` (``window`` buckets, default 12 = 1 hour).

``x`` is ``values`` with missing buckets forward-filled (0 before a user's first known bucket).
Where a method's inputs do not exist yet (the first day for the daily seasonal naive, the first
``window`` buckets for the moving average) it forecasts the last value instead; those forecasts
are *not* the method's own and their errors are not used for its quantiles.

Error window (the calibration): the quantiles are ``point + empirical quantile of past errors``
(``error = actual - point``), per user, horizon and resource. They are recalibrated every
``refit_every`` origins (default 288: daily, at grid indices that are multiples of 288). An
origin ``o`` uses the refit point ``c = o - o % refit_every <= o`` and the errors of the
trailing ``error_window`` origins (default 2016: 7 days) whose *target* bucket lies before
``c``: origins ``o'`` in ``[c - h - error_window + 1, c - h]``. Nothing at or after the origin is
ever read, so changing the future cannot change a past forecast. Missing targets are skipped.

Fallback: with fewer than ``min_errors`` (default 72, i.e. 6 hours) usable errors, the error
distribution is taken as a random walk's: ``N(0, s² h)`` with ``s`` the RMS of one-step changes
of the user's demand in the ``error_window`` buckets before ``c`` (zero width when there are
none). :attr:`BaselineForecast.n_errors` says how many errors calibrated each quantile set
(``< min_errors`` means the fallback).

Quantiles are clipped at 0 (demand is non-negative) and non-crossing: offsets are order
statistics of one sample (or ``z``-scores in increasing order), and clipping keeps the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from pipeline.schemas import HORIZONS_MIN, QUANTILES

DAY = 288  #: buckets of 5 minutes in a day
WEEK = 7 * DAY
N_HORIZONS = len(HORIZONS_MIN)
METHODS = ("last_value", "seasonal_daily", "seasonal_weekly", "moving_average")
_LEVELS = np.asarray(QUANTILES, dtype=np.float64)
_Z = np.asarray([NormalDist().inv_cdf(q) for q in QUANTILES], dtype=np.float32)


@dataclass(frozen=True)
class BaselineConfig:
    """Tuning of the baselines; units are 5-minute buckets (origins)."""

    window: int = 12  #: moving-average length, buckets
    error_window: int = WEEK  #: past origins whose errors calibrate the quantiles
    refit_every: int = DAY  #: recalibrate the error quantiles every this many origins
    min_errors: int = 72  #: fewer usable errors than this -> random-walk fallback
    chunk_users: int = 256  #: users processed at once (bounds memory)

    def __post_init__(self) -> None:
        for name in ("window", "error_window", "refit_every", "min_errors", "chunk_users"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BaselineConfig.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class BaselineForecast:
    """Forecasts of one baseline at ``origins``.

    ``point``: ``[n_users, n_origins, 6, 4]`` (demand units), also the forecast's ``mean``;
    ``quantiles``: ``[n_users, n_origins, 6, 4, 7]``; ``n_errors``: ``[n_users, n_origins, 6, 4]``
    past errors that calibrated each quantile set (``< min_errors``: random-walk fallback);
    ``defined``: ``[n_origins, 6]``, false where the method's inputs did not exist yet and the
    point forecast is the last value instead.
    """

    method: str
    model_version: str
    origins: np.ndarray
    point: np.ndarray
    quantiles: np.ndarray
    n_errors: np.ndarray
    min_errors: int
    defined: np.ndarray

    @property
    def fallback(self) -> np.ndarray:
        """``[n_users, n_origins, 6, 4]`` bool: quantiles from the random-walk fallback."""
        return self.n_errors < self.min_errors


def model_version(method: str, config: BaselineConfig = BaselineConfig()) -> str:
    """The ``model_version`` a baseline writes in the forecast contract, e.g. ``baseline:moving_average:12``."""
    return f"baseline:{method}:{config.window}" if method == "moving_average" else f"baseline:{method}"


def _clean(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)``: ``y`` with non-finite -> NaN (float32), ``x`` forward-filled (leading -> 0)."""
    y = np.asarray(values, dtype=np.float32)
    if y.ndim != 3:
        raise ValueError(f"values must be [n_users, T, n_resources], got shape {y.shape}")
    finite = np.isfinite(y)
    y = np.where(finite, y, np.float32(np.nan))
    if finite.all():
        return y, y
    t = np.arange(y.shape[1])[None, :, None]
    last = np.maximum.accumulate(np.where(finite, t, -1), axis=1)
    x = np.take_along_axis(np.nan_to_num(y, nan=0.0), np.maximum(last, 0), axis=1)
    return y, np.where(last >= 0, x, np.float32(0.0))


def _points(x: np.ndarray, method: str, n_origins: int, config: BaselineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Point forecasts for origins ``0..n_origins-1``: ``([B, O, 6, R] values, [6, O] own-method mask)``."""
    b, t_len, r = x.shape
    o = np.arange(n_origins)
    # last value: x[o-1]; origin 0 has nothing before it (0, and not an own forecast). Where the
    # moving average lacks `window` buckets it stays the last value.
    lv = np.zeros((b, n_origins, r), dtype=np.float32)
    lv[:, 1:] = x[:, : n_origins - 1]
    out = np.empty((b, n_origins, N_HORIZONS, r), dtype=np.float32)
    own = np.zeros((N_HORIZONS, n_origins), dtype=bool)
    if method == "moving_average":  # the same for every horizon
        w = config.window
        cs = np.zeros((b, t_len + 1, r), dtype=np.float64)
        np.cumsum(x, axis=1, dtype=np.float64, out=cs[:, 1:])
        ok = o >= w
        lv[:, ok] = ((cs[:, o[ok]] - cs[:, o[ok] - w]) / w).astype(np.float32)
        out[...] = lv[:, :, None]
        own[:] = ok
        return out, own
    for hi in range(N_HORIZONS):
        h = hi + 1
        if method == "last_value":
            out[:, :, hi] = lv
            own[hi] = o >= 1
        elif method in ("seasonal_daily", "seasonal_weekly"):
            period = DAY if method == "seasonal_daily" else WEEK
            src = o + h - 1 - period
            ok = src >= 0
            out[:, :, hi] = lv
            out[:, ok, hi] = x[:, src[ok]]
            own[hi] = ok
        else:
            raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    return out, own


def _errors(y: np.ndarray, point: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``[B, 6, R, O]`` errors ``actual - point``; NaN where the target is unknown or not own."""
    b, t_len, r = y.shape
    n_origins = point.shape[1]
    err = np.full((b, N_HORIZONS, r, n_origins), np.nan, dtype=np.float32)
    yt = y.transpose(0, 2, 1)  # [B, R, T]
    for hi in range(N_HORIZONS):
        n = max(0, min(n_origins, t_len - hi))  # origins whose target o+hi < T
        if n == 0:
            continue
        e = yt[:, :, hi : hi + n] - point[:, :n, hi].transpose(0, 2, 1)
        err[:, hi, :, :n] = np.where(own[hi, :n], e, np.float32(np.nan))
    return err


def _sample_quantiles(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles ``[..., 7]`` (linear interpolation) of the finite entries along the last axis, and their count."""
    s = np.sort(window, axis=-1)  # NaN sort last
    n = np.isfinite(s).sum(axis=-1)
    pos = _LEVELS * np.maximum(n - 1, 0)[..., None]
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[..., None])
    frac = (pos - lo).astype(np.float32)
    q = np.take_along_axis(s, lo, axis=-1) * (1 - frac) + np.take_along_axis(s, hi, axis=-1) * frac
    return q, n


def _offsets(y: np.ndarray, err: np.ndarray, c: int, config: BaselineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Error quantile offsets ``[B, 6, R, 7]`` and counts ``[B, 6, R]`` for refit point ``c``."""
    b, _, r, _ = err.shape
    off = np.zeros((b, N_HORIZONS, r, len(QUANTILES)), dtype=np.float32)
    cnt = np.zeros((b, N_HORIZONS, r), dtype=np.int32)
    for hi in range(N_HORIZONS):
        h = hi + 1
        top = min(c - h + 1, err.shape[3])  # origins o' <= c - h: target o'+h-1 < c
        if top <= 0:
            continue
        q, n = _sample_quantiles(err[:, hi, :, max(0, top - config.error_window) : top])
        off[:, hi], cnt[:, hi] = np.nan_to_num(q, nan=0.0), n
    weak = cnt < config.min_errors
    if weak.any():
        # Random-walk fallback: N(0, s^2 h), s = RMS one-step change before c.
        d = np.diff(y[:, max(0, c - config.error_window) : c], axis=1)  # [B, <W, R]
        ok = np.isfinite(d)
        m = ok.sum(axis=1)
        ss = (np.where(ok, d, 0.0).astype(np.float64) ** 2).sum(axis=1)
        scale = np.where(m > 0, np.sqrt(ss / np.maximum(m, 1)), 0.0).astype(np.float32)  # [B, R]
        rw = scale[:, None, :, None] * np.sqrt(np.arange(1, N_HORIZONS + 1, dtype=np.float32))[None, :, None, None] * _Z
        off = np.where(weak[..., None], rw, off)
    return np.maximum.accumulate(off, axis=-1), cnt


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """``idx`` as a slice when it is a run of consecutive integers (so indexing gives a view)."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and (np.diff(idx) == 1).all():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def forecast_baseline(
    values: np.ndarray,
    method: str,
    origins: np.ndarray | None = None,
    config: BaselineConfig = BaselineConfig(),
) -> BaselineForecast:
    """Forecast ``values`` (``[n_users, T, 4]``) with baseline ``method`` at ``origins``.

    ``origins``: int array of origin indices in ``[0, T]`` (``T`` = "now", after the last bucket);
    default all of ``1..T``. Returns a :class:`BaselineForecast` (shapes in its docstring).
    Only buckets ``< o`` influence the forecast at origin ``o``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"values must be [n_users, T, n_resources], got shape {values.shape}")
    n_users, t_len, r = values.shape
    origins = np.arange(1, t_len + 1) if origins is None else np.asarray(origins, dtype=np.int64).reshape(-1)
    if origins.size and (origins.min() < 0 or origins.max() > t_len):
        raise ValueError(f"origins must lie in [0, {t_len}], got [{origins.min()}, {origins.max()}]")
    n_o, n_q, cells = len(origins), len(QUANTILES), N_HORIZONS * r
    point = np.empty((n_users, n_o, N_HORIZONS, r), dtype=np.float32)
    quant = np.empty((n_users, n_o, N_HORIZONS, r, n_q), dtype=np.float32)
    n_err = np.zeros((n_users, n_o, N_HORIZONS, r), dtype=np.int16)
    flat = quant.reshape(n_users, n_o, cells * n_q)  # a view: long inner loops below
    span = int(origins.max()) + 1 if n_o else 0
    defined = np.zeros((n_o, N_HORIZONS), dtype=bool)
    refit = origins - origins % config.refit_every
    for u0 in range(0, n_users if n_o else 0, config.chunk_users):
        u1 = min(n_users, u0 + config.chunk_users)
        # Only buckets < max origin are ever read: later data cannot leak in.
        y, x = _clean(values[u0:u1, : max(span - 1, 0)])
        pts, own = _points(x, method, span, config)  # [B, span, 6, R]
        err = _errors(y, pts, own)  # [B, 6, R, span]
        p = pts[:, _as_slice(origins)]  # [B, O, 6, R]
        point[u0:u1] = p
        defined = own[:, origins].T
        for c in np.unique(refit):
            sel = _as_slice(np.flatnonzero(refit == c))
            off, cnt = _offsets(y, err, int(c), config)  # [B, 6, R, 7] increasing in the level, [B, 6, R]
            blk = flat[u0:u1, sel]  # a view when sel is a slice (sorted origins)
            blk.reshape(u1 - u0, -1, cells, n_q)[...] = p[:, sel].reshape(u1 - u0, -1, cells, 1)
            # p + off is increasing in the level (rounding is monotone), and so is max(., 0).
            blk += off.reshape(u1 - u0, 1, cells * n_q)
            np.maximum(blk, 0.0, out=blk)
            if not isinstance(sel, slice):
                flat[u0:u1, sel] = blk
            n_err[u0:u1, sel] = cnt[:, None]
    return BaselineForecast(method, model_version(method, config), origins, point, quant, n_err, config.min_errors, defined)


def forecast_baselines(
    values: np.ndarray,
    origins: np.ndarray | None = None,
    methods: tuple[str, ...] = METHODS,
    config: BaselineConfig = BaselineConfig(),
) -> dict[str, BaselineForecast]:
    """:func:`forecast_baseline` for each of ``methods``, keyed by method name."""
    return {m: forecast_baseline(values, m, origins, config) for m in methods}
