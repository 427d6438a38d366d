"""System forecast with honest bounds: the distribution of Σ users' demand (DESIGN.md "Aggregation").

One issue of the per-user forecast (:data:`USER_FORECAST`) becomes :data:`SYSTEM_FORECAST` rows per
horizon and resource, in the demand's own units (requests per bucket, cores, GB, GPUs), for
three methods, five with the system's own demand history (the store keys rows by method; a reader
picks one):

* ``copula_sample`` / ``independent_sample`` (the band): ``n_paths`` joint sample paths of every
  user's demand, summed; ``lower``/``upper`` are the ``(1 ∓ level)/2`` quantiles of the sums.
  ``mean`` is Σ users' ``mean`` column (exact by linearity) in every row but ``topdown_empirical``'s.
* ``quantile_sum`` (the naive comparison): Σ users' quantiles at the same levels, as if every user
  peaked together; for independent users ~√n_users too wide. Never size from it.
* ``tiered_target`` (the provisioning target below): ``upper`` is the target, and the row is the
  central band of the sampled sum whose upper bound is the target:
  ``level = max(0, 2·P(S <= target) - 1)``, ``lower = min(target, q_{(1-level)/2}(S))``.
* ``topdown_empirical`` (only with the system's own history, ``system=``): the band of
  :func:`pipeline.topdown.topdown_forecast` on the sum of every user's demand over the recent
  buckets (users without a model included): a point (last value or recent peak) plus the
  ``(1 ∓ level)/2`` quantiles of its own past errors; ``mean`` is its mean error added to the point.
* ``reconciled_target`` (with ``topdown_empirical``; what the scaler sizes from), per horizon and
  resource one of four candidates (:data:`pipeline.topdown.RECONCILE_CANDIDATES`), with the
  ``level`` and ``lower`` of the row it comes from: ``max(tiered target, topdown upper)``, the
  top-down upper alone, the tiered target alone, or the average of the two (level and lower
  averaged too). ``config.reconcile = "max"``: always the first.
  ``"score"`` (default), given the earlier issues' ``tiered_target`` and ``topdown_empirical`` rows
  (``past=``, from the forecast store): whichever scored best, by the pinball loss at the band's
  upper level ``(1 + level)/2`` against the system's demand, over the ``reconcile_window`` latest
  issues whose target bucket is over (:func:`pipeline.topdown.reconcile_choice`); the maximum until
  ``reconcile_min_scored`` issues are scored, or without ``past``.
  The bottom-up sum knows each user; the top-down band knows how far the whole system has recently
  moved in 5-30 minutes. On the ServeGen trace the bottom-up sum alone was biased low and too
  narrow (its 0.9 quantile covered the actual bucket ~70 % of the time) and a replay of the scaling
  driven by it had 1.9x the cold demand of reactive target tracking at equal cost; with the
  maximum of the two 0.80x (``warmcast evaluate --forecaster lstm``). On the (4-hour) Azure sample
  the bottom-up sum alone did better (0.66x vs 0.89x for the maximum): hence the choice by score.

Per-user distribution: ``Q(u)`` interpolates linearly between q05 … q95 at τ = 0.05 … 0.95; tails
``Q(u) = q05 - a·(0.05 - u)/0.05`` with ``a = min(q05, q10 - q05)`` (the q05–q10 slope continued,
flattened so ``Q(0) >= 0``) and ``Q(u) = q95 + b·ln(0.05/(1 - u))`` with ``b = (q95 - q90)/ln 2`` (an
exponential tail matching the q90–q95 spacing; ``u <= 1 - 2^-23``, so at most ~12.9·b above q95).
Both are linear in ``params = (q05 … q95, a, b)``: a draw is ``wa(u)·params[i] + wb(u)·params[j]``
(two of the nine), computed for a chunk of users at once (float32 draws, float64 totals). A
forecast row with ``p_zero`` (P(demand = 0), :data:`pipeline.schemas.USER_FORECAST`) above what its
zero quantiles say puts that mass at 0: ``Q(u) = 0`` up to ``p_zero``, then linear to the first
positive quantile (``q05 > 0``: 0 below ``p_zero``, the lower tail above); only the few draws in that
segment are recomputed (:func:`_apply_zero_mass`).

Dependence (empirical copula, a Schaake-shuffle variant): path ``j`` is tied to a date ``t_j`` of
``M`` recent past time points (each used ``n_paths/M`` times, seeded order); user ``u``'s uniform on
it is the randomised PIT of its own history there, ``v = (#{x_u < x_u[t_j]} + V·#{x_u = x_u[t_j]})/M_u``
with ``V ~ U(0, 1)`` per (user, path): users that moved together move together in the samples, and
ties (all-zero users) break independently. History: recent forecast residuals, or one-step demand
changes (the last-value forecast's 5-minute residuals, :func:`residual_history`), ``[n_users, M]``
or ``[n_users, M, 4]`` (per resource). NaN values, users without history, no history or fewer than
``min_history`` points give ``v = V``: *independent* users. A user's uniform is shared by its
horizons (comonotone errors over 5..30 min; a per-horizon band depends only on the dependence
*between* users).

Provisioning target (tier and consumption weighting), per horizon and resource::

    target = max(0, Σ_u m_u + D · Σ_u w_u · (Q_u(τ_tier(u)) - m_u))
    D      = max(0, (q_{τ*}(S) - Σ_u m_u) / Σ_u (Q_u(τ*) - m_u)),   τ* = (1 + level)/2

``m_u``: the user's mean; ``τ_tier``: its tier's service level (default premium 0.95, standard 0.90,
free 0.50); ``w_u``: its consumption weight (``USER_PROFILE.weight``; generated: free 1, standard 2,
premium 4). Expected demand is provisioned 1:1 for everyone; the tier picks which quantile of a
user's uncertainty is covered and the weight scales that buffer (a weight never invents demand).
``D``, the diversification factor, is the sampled system buffer over the naive one at the band's
upper level (1 for users that always peak together, ~1/√n for independent ones, 1 when there is
no spread). All users premium at weight 1: the target is the band's ``upper``. Users without a
profile and tiers not in the map: ``default_tier_level``, weight 1 (logged).

Bad input: no users -> zero rows with ``n_users = 0`` (an empty table if ``issued_at`` is unknown);
a user lacking a (horizon, resource) row others have, duplicates, NaN/inf, several issue times ->
``ValueError`` naming the user; a horizon no user has is left out; crossing quantiles -> sorted
(negatives clipped to 0) with a logged warning. Deterministic for a seed and independent of row
order (users in sorted id order); memory bounded by ``chunk_mb``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RECONCILE_MODES
from pipeline.schemas import BUCKET_SECONDS, DEMAND_RESOURCES, HORIZONS_MIN, QUANTILE_COLUMNS, QUANTILES, SYSTEM_FORECAST, zero_bounds
from pipeline.topdown import RECONCILE_CANDIDATES, RECONCILE_MIN_SCORED, reconcile_candidates, reconcile_choice, topdown_forecast

log = logging.getLogger(__name__)

METHOD_COPULA = "copula_sample"
METHOD_INDEPENDENT = "independent_sample"
METHOD_NAIVE = "quantile_sum"
METHOD_TIERED = "tiered_target"
METHOD_TOPDOWN = "topdown_empirical"
METHOD_RECONCILED = "reconciled_target"
DEFAULT_TIER_LEVELS = {"premium": 0.95, "standard": 0.90, "free": 0.50}

TAU = np.asarray(QUANTILES, dtype=np.float64)
_N_PARAMS = len(QUANTILES) + 2  # q05..q95, lower-tail drop a, upper-tail scale b
_U_MAX = 1.0 - 2.0**-23  # keeps the exponential tail finite (<= ln(0.05·2^23) ≈ 12.9 scales); exact in float32


@dataclass(frozen=True)
class AggregateConfig:
    """How the system forecast is computed (levels are probabilities in (0, 1))."""

    n_paths: int = 1000  #: joint sample paths
    level: float = 0.9  #: central band: lower/upper at (1 -/+ level)/2
    seed: int = 0
    tier_levels: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_LEVELS))
    default_tier_level: float = 0.9  #: users without a profile, tiers not in the map
    min_history: int = 20  #: fewer past time points than this -> independent users
    min_topdown_errors: int = 12  #: fewer past errors of the system series than this -> no top-down band
    reconcile: str = "score"  #: ``reconciled_target``: ``"score"`` (the best-scoring candidate) or ``"max"``
    reconcile_window: int = 288  #: issues scored per horizon for the choice (288: one day)
    reconcile_min_scored: int = RECONCILE_MIN_SCORED  #: fewer scored issues than this -> the maximum of the two
    chunk_mb: float = 24.0  #: memory for one chunk of sampling coefficients, MiB

    def __post_init__(self) -> None:
        if int(self.n_paths) < 2:
            raise ValueError(f"n_paths must be >= 2, got {self.n_paths}")
        for name, v in [("level", self.level), ("default_tier_level", self.default_tier_level), *self.tier_levels.items()]:
            if not 0.0 < float(v) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {v}")
        if self.chunk_mb <= 0:
            raise ValueError(f"chunk_mb must be > 0, got {self.chunk_mb}")
        if self.reconcile not in RECONCILE_MODES:
            raise ValueError(f"reconcile must be one of {', '.join(RECONCILE_MODES)}, got {self.reconcile!r}")
        if int(self.reconcile_window) < 1 or int(self.reconcile_min_scored) < 1:
            raise ValueError(f"reconcile_window and reconcile_min_scored must be >= 1, got {self.reconcile_window} "
                             f"and {self.reconcile_min_scored}")


@dataclass(frozen=True)
class ResidualHistory:
    """Recent residuals per user: ``values [n_users, M]`` or ``[n_users, M, 4]`` (DEMAND_RESOURCES order)."""

    user_ids: Sequence[str]
    values: np.ndarray


@dataclass
class ForecastCube:
    """One issue of the per-user forecast as arrays: ``quantiles [U, H, R, 7]``, ``mean [U, H, R]``,
    ``p_zero [U, H, R]`` (P(demand = 0); NaN or None where the forecast does not give it)."""

    issued_at: datetime
    user_ids: list[str]  # sorted
    horizons: tuple[int, ...]
    resources: tuple[str, ...]
    quantiles: np.ndarray
    mean: np.ndarray
    p_zero: np.ndarray | None = None


@dataclass
class SystemAggregate:
    """The system forecast of one issue; arrays are ``[H, R]`` (``totals``: ``[n_paths, H, R]``)."""

    issued_at: datetime | None
    horizons: tuple[int, ...]
    resources: tuple[str, ...]
    n_users: int
    method: str
    level: float
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    naive_lower: np.ndarray
    naive_upper: np.ndarray
    target: np.ndarray
    target_level: np.ndarray
    target_lower: np.ndarray
    diversification: np.ndarray
    totals: np.ndarray
    #: ``topdown_empirical`` band and ``reconciled_target`` (None: no system history given, or too little)
    topdown_lower: np.ndarray | None = None
    topdown_upper: np.ndarray | None = None
    topdown_mean: np.ndarray | None = None
    reconciled: np.ndarray | None = None
    reconciled_level: np.ndarray | None = None
    reconciled_lower: np.ndarray | None = None
    #: ``[H, R]`` which candidate the reconciled target is (:data:`pipeline.topdown.RECONCILE_CANDIDATES`)
    reconciled_from: np.ndarray | None = None

    def table(self, methods: Sequence[str] | None = None) -> pa.Table:
        """:data:`SYSTEM_FORECAST` rows, ordered by method, horizon, resource (default: every method
        this aggregate has: three, five with the top-down band)."""
        band = np.full_like(self.mean, self.level)
        rows = {self.method: (self.lower, self.upper, band, self.mean),
                METHOD_NAIVE: (self.naive_lower, self.naive_upper, band, self.mean),
                METHOD_TIERED: (self.target_lower, self.target, self.target_level, self.mean)}
        if self.topdown_upper is not None:
            rows[METHOD_TOPDOWN] = (self.topdown_lower, self.topdown_upper, band, self.topdown_mean)
            rows[METHOD_RECONCILED] = (self.reconciled_lower, self.reconciled, self.reconciled_level, self.mean)
        chosen = list(rows) if methods is None else list(methods)
        unknown = [m for m in chosen if m not in rows]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; this aggregate has {list(rows)}")
        if self.issued_at is None or not chosen:
            return SYSTEM_FORECAST.empty_table()
        h, r = len(self.horizons), len(self.resources)
        k = len(chosen) * h * r
        cols = {
            "issued_at": pa.array([self.issued_at] * k, SYSTEM_FORECAST.field("issued_at").type),
            "horizon_min": pa.array(np.tile(np.repeat(self.horizons, r), len(chosen)).astype(np.int16)),
            "resource": pa.array(list(self.resources) * (h * len(chosen)), pa.string()),
            "mean": pa.array(np.concatenate([rows[m][3].ravel() for m in chosen])),
            "lower": pa.array(np.concatenate([rows[m][0].ravel() for m in chosen])),
            "upper": pa.array(np.concatenate([rows[m][1].ravel() for m in chosen])),
            "level": pa.array(np.concatenate([rows[m][2].ravel() for m in chosen])),
            "n_users": pa.array(np.full(k, self.n_users, dtype=np.int64)),
            "method": pa.array(np.repeat(chosen, h * r).tolist(), pa.string()),
        }
        return pa.table(cols, schema=SYSTEM_FORECAST)


def _tail_params(q: np.ndarray) -> np.ndarray:
    """``[..., 9]`` parameters ``(q05 … q95, a, b)`` of the inverse CDF (see the module docstring)."""
    a = np.minimum(q[..., 0], q[..., 1] - q[..., 0])
    b = (q[..., 6] - q[..., 5]) / np.log(2.0)
    return np.concatenate([q, a[..., None], b[..., None]], axis=-1)


# c(u) by k = #{levels <= u} (0: lower tail, 1..6: between levels k-1 and k, 7: upper tail): non-zeros
# at _IA[k] and _IB[k]; wb = (u - _LOW[k])·_INV[k] (the lower tail's -(0.05-u)/0.05 has the same form;
# the upper tail's is a log), wa = 1 - wb between levels and 1 in the tails.
_IA = np.array([0, 0, 1, 2, 3, 4, 5, 6])
_IB = np.array([7, 1, 2, 3, 4, 5, 6, 8])
_LOW = np.concatenate([[TAU[0]], TAU[:-1], [0.0]])
_INV = np.concatenate([[1.0 / TAU[0]], 1.0 / np.diff(TAU), [0.0]])
_BETWEEN = np.array([0.0, 1, 1, 1, 1, 1, 1, 0])


def _coefficients(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, wa, wb)`` for levels ``u`` in [0, 1] (a 1-d or 2-d array): ``Q(u) = wa·params[_IA[k]] + wb·params[_IB[k]]``."""
    u = np.minimum(u, _U_MAX)
    k = np.zeros(u.shape, dtype=np.intp)
    for t in TAU:
        k += u >= t
    wb = (u - _LOW.astype(u.dtype)[k]) * _INV.astype(u.dtype)[k]
    wa = 1.0 - wb * _BETWEEN.astype(u.dtype)[k]
    high = k == len(TAU)
    wb[high] = np.log((1.0 - TAU[-1]) / (1.0 - u[high]))
    return k, wa, wb


def quantile_at(quantiles: np.ndarray, u: np.ndarray | float) -> np.ndarray:
    """The piecewise-linear inverse CDF: ``quantiles [..., 7]`` evaluated at levels ``u`` (broadcast to ``[...]``)."""
    p = _tail_params(np.asarray(quantiles, dtype=np.float64))
    shape = p.shape[:-1]
    u = np.clip(np.broadcast_to(np.asarray(u, dtype=np.float64), shape).ravel(), 0.0, 1.0)
    k, wa, wb = (a.reshape(shape) for a in _coefficients(u))
    return wa * np.take_along_axis(p, _IA[k][..., None], -1)[..., 0] + wb * np.take_along_axis(p, _IB[k][..., None], -1)[..., 0]


def read_user_forecast(table: pa.Table, issued_at: datetime | None = None) -> ForecastCube:
    """Parse one issue of a :data:`USER_FORECAST` table into a :class:`ForecastCube` (see "Bad input")."""
    need = ["user_id", "issued_at", "horizon_min", "resource", *QUANTILE_COLUMNS, "mean"]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ValueError(f"user forecast lacks columns {missing}")
    if issued_at is not None and table.num_rows:
        t = pa.scalar(issued_at, pa.timestamp("us", tz="UTC")).cast(table.schema.field("issued_at").type)
        table = table.filter(pc.equal(table["issued_at"], t))
    stamps = pc.unique(table["issued_at"]).to_pylist()
    if len(stamps) > 1:
        raise ValueError(f"user forecast holds {len(stamps)} issue times; pass issued_at= to choose one")
    when = stamps[0] if stamps else issued_at
    when = when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when
    if table.num_rows == 0:  # no users at all: every horizon and resource is zero demand
        shape = (0, len(HORIZONS_MIN), len(DEMAND_RESOURCES))
        return ForecastCube(when, [], HORIZONS_MIN, DEMAND_RESOURCES, np.zeros(shape + (len(QUANTILES),)), np.zeros(shape))
    if table["user_id"].null_count or table["horizon_min"].null_count or table["resource"].null_count:
        raise ValueError("user forecast has null user_id, horizon_min or resource")
    users = pc.unique(table["user_id"])
    users = users.take(pc.sort_indices(users))
    hs = sorted(set(table["horizon_min"].to_pylist()))
    rs = [r for r in DEMAND_RESOURCES if r in set(table["resource"].to_pylist())]
    if set(hs) - set(HORIZONS_MIN) or set(table["resource"].to_pylist()) - set(rs):
        raise ValueError(f"horizon_min must be in {HORIZONS_MIN} and resource in {DEMAND_RESOURCES}; got {hs}, "
                         f"{sorted(set(table['resource'].to_pylist()))}")
    n, nh, nr = len(users), len(hs), len(rs)
    u = pc.index_in(table["user_id"], value_set=users).to_numpy()
    h = np.searchsorted(np.asarray(hs), table["horizon_min"].to_numpy())
    r = pc.index_in(table["resource"], value_set=pa.array(rs)).to_numpy()
    flat = (u * nh + h) * nr + r

    def where(cell: int) -> str:
        return f"user {users[cell // (nh * nr)].as_py()!r} at horizon {hs[cell // nr % nh]} min, {rs[cell % nr]}"

    count = np.bincount(flat, minlength=n * nh * nr)
    if (count != 1).any():
        cell = int(np.argmax(count != 1))
        short = int((count.reshape(n, -1) == 0).any(axis=1).sum())
        raise ValueError(f"{'duplicate rows' if count[cell] > 1 else 'no row'} for {where(cell)} ({short} of {n} users "
                         f"lack some of the {nh} horizons x {nr} resources present)")
    q = np.empty((n * nh * nr, len(QUANTILES)))
    q[flat] = np.stack([table[c].to_numpy(zero_copy_only=False) for c in QUANTILE_COLUMNS], axis=1)
    m = np.empty(n * nh * nr)
    m[flat] = table["mean"].to_numpy(zero_copy_only=False)
    p0 = None
    if "p_zero" in table.column_names and table["p_zero"].null_count < table.num_rows:
        p0 = np.full(n * nh * nr, np.nan)
        p0[flat] = table["p_zero"].to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~(np.isfinite(q).all(axis=1) & np.isfinite(m))
    if bad.any():
        raise ValueError(f"non-finite quantile or mean for {where(int(np.argmax(bad)))} ({int(bad.sum())} rows)")
    crossing, negative = (np.diff(q, axis=1) < 0).any(axis=1), (q < 0).any(axis=1) | (m < 0)
    if crossing.any() or negative.any():
        log.warning("user forecast %s: repaired %d crossing and %d negative rows of %d (sorted, clipped at 0), e.g. %s",
                    when, int(crossing.sum()), int(negative.sum()), len(q), where(int(np.argmax(crossing | negative))))
        q = np.maximum(np.sort(q, axis=1), 0.0)
        m = np.maximum(m, 0.0)
    if p0 is not None:  # inside the bracket of the (possibly repaired) zero quantiles
        p0 = np.clip(p0, *zero_bounds(q)).reshape(n, nh, nr)
    return ForecastCube(when, users.to_pylist(), tuple(hs), tuple(rs), q.reshape(n, nh, nr, -1), m.reshape(n, nh, nr), p0)


def _pit_bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``x [U, M, R]``: ``(#smaller, #equal)`` among the finite values of each value's row, ``[U, R, M]``,
    and ``#finite [U, R]`` (at least 1), as float32.

    Non-finite values (and all-NaN rows) get ``(0, #finite)``: a uniform draw over the row.
    """
    u, m, r = x.shape
    rows = np.where(np.isfinite(x), x, np.nan).transpose(0, 2, 1).reshape(-1, m)  # [(user, resource), M]
    order = np.argsort(rows, axis=1)  # NaN last
    s = np.take_along_axis(rows, order, axis=1).ravel()
    nv = np.maximum(np.isfinite(rows).sum(axis=1), 1)
    # Blocks of equal values in the flattened sorted rows; every row starts a new block.
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    new[::m] = True
    starts = np.flatnonzero(new)
    block = np.cumsum(new) - 1
    size = np.diff(np.append(starts, s.size))[block]
    first = starts[block] - np.repeat(np.arange(len(rows)) * m, m)
    valid = np.tile(np.arange(m), len(rows)) < np.repeat(nv, m)
    lo, cnt = np.empty(s.size, np.float32), np.empty(s.size, np.float32)
    at = (order + np.arange(len(rows))[:, None] * m).ravel()  # where each sorted value came from
    lo[at] = np.where(valid, first, 0)
    cnt[at] = np.where(valid, size, np.repeat(nv, m))
    return lo.reshape(u, r, m), cnt.reshape(u, r, m), nv.reshape(u, r).astype(np.float32)


def _history_for(cube: ForecastCube, history: ResidualHistory | None, min_history: int):
    """``(history [n_users_with_history, M, Rh], row per forecast user or -1, column per cube resource)`` or None."""
    if history is None:
        return None
    x = np.asarray(history.values)
    x = x[:, :, None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[0] != len(history.user_ids) or x.shape[2] not in (1, len(DEMAND_RESOURCES)):
        raise ValueError(f"history values must be [n_users={len(history.user_ids)}, M] or [.., M, {len(DEMAND_RESOURCES)}], "
                         f"got {x.shape}")
    if x.shape[1] < min_history:
        log.warning("residual history has %d time points (< %d): users taken as independent", x.shape[1], min_history)
        return None
    rows = pc.index_in(pa.array(cube.user_ids, pa.string()), value_set=pa.array(list(history.user_ids), pa.string()))
    rows = rows.fill_null(-1).to_numpy()
    if (rows < 0).all():
        log.warning("no forecast user has a residual history: users taken as independent")
        return None
    per_resource = [DEMAND_RESOURCES.index(r) for r in cube.resources]
    rcol = np.zeros(len(cube.resources), np.intp) if x.shape[2] == 1 else np.asarray(per_resource)
    return x, rows, rcol


def _uniforms(x: np.ndarray, rows: np.ndarray, dates: np.ndarray, v0: np.ndarray) -> np.ndarray:
    """``[Rh, Uc, N]`` uniforms: randomised PIT of each user's history at each path's date (``v0`` where none)."""
    out = np.repeat(v0[None], x.shape[2], axis=0)
    have = np.flatnonzero(rows >= 0)
    if have.size:
        lo, cnt, nv = _pit_bounds(x[rows[have]].astype(np.float64))
        lo, cnt = np.take(lo, dates, axis=2), np.take(cnt, dates, axis=2)  # [Uh, Rh, N]
        out[:, have] = ((lo + v0[have][:, None, :] * cnt) / nv[:, :, None]).transpose(1, 0, 2)
    return out


def _zero_segments(cube: ForecastCube) -> tuple[np.ndarray, ...] | None:
    """Where the forecast's P(demand = 0) moves its quantile function: ``(moved, p_zero, low, top,
    first)``, each ``[U, R, H]`` (float32; ``moved`` bool): ``low``/``top`` the levels of the last
    zero / first positive quantile, ``first`` that quantile's value. None when nothing moves."""
    if cube.p_zero is None:
        return None
    q = cube.quantiles
    k = (q <= 0).sum(axis=-1)  # zero quantiles
    low = zero_bounds(q)[0]
    moved = np.isfinite(cube.p_zero) & (cube.p_zero > low + 1e-9) & (k < len(QUANTILES))
    if not moved.any():
        return None
    top = TAU[np.minimum(k, len(QUANTILES) - 1)]
    first = np.take_along_axis(q, np.minimum(k, len(QUANTILES) - 1)[..., None], -1)[..., 0]
    p0 = np.where(moved, cube.p_zero, low)
    return tuple(np.ascontiguousarray(a.transpose(0, 2, 1), dtype=np.bool_ if a is moved else np.float32)
                 for a in (moved, p0, low, top, first))


def _apply_zero_mass(draw: np.ndarray, u: np.ndarray, moved: np.ndarray, p0: np.ndarray, low: np.ndarray, top: np.ndarray,
                     first: np.ndarray) -> None:
    """The quantile function with P(demand = 0) = ``p0`` (:data:`pipeline.schemas.USER_FORECAST`'s
    ``p_zero``): 0 up to ``p0``, then linear to the first positive quantile ``first`` at level ``top``
    (with ``q05 > 0``: 0 below ``p0``, the tail model above). ``draw [Uc, N, H]`` in place, for the
    users' uniforms ``u [Uc, N]``; the other arguments ``[Uc, H]``; only where ``moved``. Only draws
    whose level lies between ``low`` and ``top`` change (a few % of them): the (user, path) pairs
    inside a user's widest such range are gathered first, then their horizons."""
    lo_u = np.where(moved, low, np.inf).min(axis=1)  # [Uc]
    hi_u = np.where(moved, top, -np.inf).max(axis=1)
    iu, ip = np.nonzero((u >= lo_u[:, None]) & (u < hi_u[:, None]))
    v = u[iu, ip][:, None]  # [K, 1]
    p, hi, lo, f, mv = p0[iu], top[iu], low[iu], first[iu], moved[iu]  # [K, H]
    old = draw[iu, ip]  # [K, H]
    with np.errstate(divide="ignore", invalid="ignore"):
        ramp = f * np.clip((v - p) / (hi - p), 0.0, 1.0)
    # no zero quantile (low = 0): only the atom below p0 is new; else the ramp from (p0, 0) to (top, first)
    new = np.where(lo == 0.0, np.where(v < p, 0.0, old), ramp)
    draw[iu, ip] = np.where(mv & (v >= lo) & (v < hi), new, old)


def sample_totals(cube: ForecastCube, history: ResidualHistory | None = None,
                  config: AggregateConfig = AggregateConfig()) -> tuple[np.ndarray, bool]:
    """Joint sample paths of Σ users' demand: ``([n_paths, H, R] totals, dependence used)``.

    Draws and per-chunk sums are float32 (a relative error of ~1e-6, far below the Monte Carlo
    error); the sums over chunks are float64.
    """
    n, nh, nr = cube.mean.shape
    n_paths = int(config.n_paths)
    totals = np.zeros((n_paths, nh, nr))
    if n == 0:
        return totals, False
    rng = np.random.default_rng(config.seed)
    hist = _history_for(cube, history, config.min_history)
    if hist is not None:
        x, rows, rcol = hist
        m = x.shape[1]  # each past date used n_paths // m or one more times, in random order
        dates = rng.permutation(np.concatenate([np.arange(m)] * (n_paths // m) + [rng.choice(m, n_paths % m, replace=False)]))
    per_resource = hist is not None and x.shape[2] > 1  # one uniform per resource, else shared
    # [U, R, 9, H]: a user's parameters per resource; a draw gathers two of the 9 rows.
    params = np.ascontiguousarray(_tail_params(cube.quantiles).transpose(0, 2, 3, 1), dtype=np.float32)
    zero = _zero_segments(cube)
    chunk = max(1, int(config.chunk_mb * 2**20 // (n_paths * nh * 4 * 3)))
    for u0 in range(0, n, chunk):
        u1 = min(n, u0 + chunk)
        v0 = rng.random((u1 - u0, n_paths), dtype=np.float32)  # V per (user, path); user-major: chunking keeps the stream
        vs = [v0] if hist is None else _uniforms(x, rows[u0:u1], dates, v0)
        rows9 = (np.arange(u1 - u0) * _N_PARAMS)[:, None]
        coef = None
        for ri in range(nr):
            if coef is None or per_resource:
                k, wa, wb = coef = _coefficients(vs[rcol[ri]] if per_resource else vs[0])
                at_a, at_b = rows9 + _IA[k], rows9 + _IB[k]
            p = params[u0:u1, ri].reshape(-1, nh)  # [(user, parameter), H]
            draw = np.take(p, at_a, axis=0)  # [Uc, N, H]
            draw *= wa[..., None]
            draw += np.take(p, at_b, axis=0) * wb[..., None]
            if zero is not None and zero[0][u0:u1, ri].any():
                _apply_zero_mass(draw, vs[rcol[ri]] if per_resource else vs[0], *(z[u0:u1, ri] for z in zero))
            totals[:, :, ri] += draw.sum(axis=0)
    return totals, hist is not None


def user_service_levels(user_ids: Sequence[str], profiles: pa.Table | None,
                        config: AggregateConfig = AggregateConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Per user: ``(tier service level τ, consumption weight w)`` from a :data:`USER_PROFILE` table."""
    n = len(user_ids)
    levels, weights = np.full(n, float(config.default_tier_level)), np.ones(n)
    if profiles is None or n == 0:
        if n:
            log.info("no user profiles: %d users covered at the default level %.2f, weight 1", n, config.default_tier_level)
        return levels, weights
    if {"user_id", "tier", "weight"} - set(profiles.column_names):
        raise ValueError(f"user profiles need user_id, tier and weight columns, got {profiles.column_names}")
    ids = profiles["user_id"]
    if pc.count_distinct(ids).as_py() != profiles.num_rows:
        raise ValueError("user profiles hold duplicate user_id rows")
    w = profiles["weight"].to_numpy(zero_copy_only=False).astype(np.float64)
    if not (np.isfinite(w) & (w >= 0)).all():
        bad = int(np.argmax(~(np.isfinite(w) & (w >= 0))))
        raise ValueError(f"user {ids[bad].as_py()!r} has weight {w[bad]}; weights must be finite and >= 0")
    rows = pc.index_in(pa.array(list(user_ids), pa.string()), value_set=ids).fill_null(-1).to_numpy()
    known = rows >= 0
    tiers = np.asarray(profiles["tier"].to_pylist(), dtype=object)
    tier_level = np.asarray([config.tier_levels.get(t, np.nan) for t in tiers], dtype=np.float64)
    unknown = sorted({t for t in tiers[rows[known]] if t not in config.tier_levels})
    if (~known).any() or unknown:
        log.warning("%d users without a profile and tiers %s not in %s: covered at %.2f", int((~known).sum()), unknown,
                    dict(config.tier_levels), config.default_tier_level)
    levels[known] = np.nan_to_num(tier_level[rows[known]], nan=config.default_tier_level)
    weights[known] = w[rows[known]]
    return levels, weights


def provisioning_target(quantiles: np.ndarray, mean: np.ndarray, levels: np.ndarray, weights: np.ndarray,
                        diversification: np.ndarray | float = 1.0) -> np.ndarray:
    """``max(0, Σ m + D·Σ w·(Q(τ) - m))`` over users: ``quantiles [U, H, R, 7]``, ``mean [U, H, R]``, ``levels, weights [U]``."""
    levels = np.asarray(levels, dtype=np.float64)[:, None, None]
    buffer = quantile_at(quantiles, np.broadcast_to(levels, np.shape(mean))) - mean
    weighted = np.einsum("u,uhr->hr", np.asarray(weights, dtype=np.float64), buffer)
    return np.maximum(0.0, mean.sum(axis=0) + np.asarray(diversification) * weighted)


def aggregate(table: pa.Table, *, profiles: pa.Table | None = None, history: ResidualHistory | None = None,
              config: AggregateConfig = AggregateConfig(), issued_at: datetime | None = None,
              system: np.ndarray | None = None, past: pa.Table | None = None) -> SystemAggregate:
    """The system forecast of one issue of the per-user forecast ``table`` (see the module docstring).

    ``system``: the system's demand per bucket before the issue, ``[buckets, 4]`` in
    :data:`DEMAND_RESOURCES` order, oldest first (:func:`system_history`): adds the
    ``topdown_empirical`` band and the ``reconciled_target``; too short a history (fewer than
    ``config.min_topdown_errors`` + 6 buckets) leaves them out (logged). ``past``: earlier issues'
    :data:`SYSTEM_FORECAST` rows (any methods; the ``tiered_target`` and ``topdown_empirical`` ones
    are read), scored against ``system`` for the reconciled target's choice (``config.reconcile``)."""
    cube = read_user_forecast(table, issued_at)
    totals, dependent = sample_totals(cube, history, config)
    lo_level, hi_level = (1.0 - config.level) / 2.0, (1.0 + config.level) / 2.0
    mean = cube.mean.sum(axis=0)
    lower, upper = np.quantile(totals, [lo_level, hi_level], axis=0)
    naive_lower, naive_upper = quantile_at(cube.quantiles, lo_level).sum(axis=0), quantile_at(cube.quantiles, hi_level).sum(axis=0)
    naive_buffer = naive_upper - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        div = np.where(naive_buffer > 1e-12 * (1.0 + np.abs(mean)), np.maximum(0.0, upper - mean) / naive_buffer, 1.0)
    levels, weights = user_service_levels(cube.user_ids, profiles, config)
    target = provisioning_target(cube.quantiles, cube.mean, levels, weights, div)
    covered = (totals <= target[None] * (1 + 1e-12) + 1e-12).mean(axis=0)
    target_level = np.maximum(0.0, 2.0 * covered - 1.0)
    below = [np.quantile(totals[:, i, j], (1.0 - target_level[i, j]) / 2.0) for i, j in np.ndindex(target.shape)]
    target_lower = np.minimum(target, np.reshape(below, target.shape))
    topdown = _topdown(cube, system, config, target, target_level, target_lower, past)
    return SystemAggregate(
        issued_at=cube.issued_at, horizons=cube.horizons, resources=cube.resources, n_users=len(cube.user_ids),
        method=METHOD_COPULA if dependent else METHOD_INDEPENDENT, level=float(config.level), mean=mean,
        lower=np.minimum(lower, upper), upper=upper, naive_lower=naive_lower, naive_upper=naive_upper, target=target,
        target_level=target_level, target_lower=target_lower, diversification=div, totals=totals, **topdown)


def _topdown(cube: ForecastCube, system: np.ndarray | None, config: AggregateConfig, target: np.ndarray,
             target_level: np.ndarray, target_lower: np.ndarray, past: pa.Table | None = None) -> dict[str, np.ndarray]:
    """The ``topdown_*`` and ``reconciled*`` fields of :class:`SystemAggregate` (empty without history)."""
    if system is None or not cube.user_ids:
        return {}
    system = np.asarray(system, dtype=np.float64)
    if system.ndim != 2 or system.shape[1] != len(DEMAND_RESOURCES):
        raise ValueError(f"system history must be [buckets, {len(DEMAND_RESOURCES)}] ({', '.join(DEMAND_RESOURCES)}), "
                         f"got shape {system.shape}")
    cols = [DEMAND_RESOURCES.index(r) for r in cube.resources]
    rows = [HORIZONS_MIN.index(h) for h in cube.horizons]
    lo_level, hi_level = (1.0 - config.level) / 2.0, (1.0 + config.level) / 2.0
    hi = topdown_forecast(system[:, cols], hi_level, min_errors=config.min_topdown_errors)
    if hi is None:
        log.info("aggregate at %s: %d buckets of system history are too few for the top-down band (at least %d); "
                 "sizing from the tiered target alone", cube.issued_at, len(system), config.min_topdown_errors + len(HORIZONS_MIN))
        return {}
    lo = topdown_forecast(system[:, cols], lo_level, min_errors=config.min_topdown_errors)
    upper, mean = hi[0][rows], hi[1][rows]
    lower = np.minimum(lo[0][rows], upper)
    wins = upper > target
    cands = reconcile_candidates(target, upper)  # RECONCILE_CANDIDATES order; their rows' level and lower:
    levels = np.stack([np.where(wins, config.level, target_level), np.full_like(target, config.level), target_level,
                       0.5 * (config.level + target_level)])
    lowers = np.stack([np.where(wins, lower, target_lower), lower, target_lower, 0.5 * (lower + target_lower)])
    pick = np.zeros(target.shape, dtype=np.int64)
    if config.reconcile == "score" and past is not None and past.num_rows and cube.issued_at is not None:
        pick = _reconcile_pick(cube, rows, system[:, cols], past, cands, config, hi_level)
    chosen = np.take_along_axis(cands, pick[None], axis=0)[0]
    return {"topdown_lower": lower, "topdown_upper": upper, "topdown_mean": mean, "reconciled": chosen,
            "reconciled_level": np.take_along_axis(levels, pick[None], axis=0)[0],
            "reconciled_lower": np.minimum(chosen, np.take_along_axis(lowers, pick[None], axis=0)[0]),
            "reconciled_from": np.asarray(RECONCILE_CANDIDATES, dtype=object)[pick]}


def _reconcile_pick(cube: ForecastCube, rows: list[int], system: np.ndarray, past: pa.Table, cands: np.ndarray,
                    config: AggregateConfig, level: float) -> np.ndarray:
    """``[H, R]`` candidate indices for this issue: :func:`pipeline.topdown.reconcile_choice` over the
    earlier issues in ``past`` (rows off the 5-minute grid of this issue, or older than the window
    needs, are ignored) against ``system [buckets, R]`` (the buckets right before this issue);
    ``rows``: the cube's horizons as indices into :data:`HORIZONS_MIN`."""
    hz, step = len(HORIZONS_MIN), timedelta(seconds=BUCKET_SECONDS)
    n = int(config.reconcile_window) + hz  # issues that can be scored for every horizon
    res_index = {r: i for i, r in enumerate(cube.resources)}
    bounds = {m: np.full((n, hz, len(cube.resources)), np.nan) for m in (METHOD_TIERED, METHOD_TOPDOWN)}
    issued = past["issued_at"].to_pylist()
    method, horizon = past["method"].to_pylist(), past["horizon_min"].to_pylist()
    resource, upper = past["resource"].to_pylist(), past["upper"].to_numpy(zero_copy_only=False)
    at = _as_utc(cube.issued_at)
    for t, m, h, r, u in zip(issued, method, horizon, resource, upper):
        if m not in bounds or r not in res_index or h not in HORIZONS_MIN or t is None:
            continue
        k, rem = divmod(at - _as_utc(t), step)  # issued k buckets before this issue
        if rem or not 1 <= k <= n:
            continue
        bounds[m][n - k, HORIZONS_MIN.index(h), res_index[r]] = u
    full = np.full((len(cands), 1, hz, len(cube.resources)), np.nan)
    full[:, 0, rows] = cands
    uppers = np.concatenate([reconcile_candidates(bounds[METHOD_TIERED], bounds[METHOD_TOPDOWN]), full], axis=1)  # [C, n + 1, H, R]
    # past issue n - k, horizon j targets the bucket k - j before this issue: system[-(k - j)] when known
    k = n - np.arange(n + 1)[:, None]  # row n (this issue): k = 0
    back = k - np.arange(hz)[None, :]
    known = (back >= 1) & (back <= len(system))
    actual = np.where(known[..., None], system[np.clip(len(system) - back, 0, len(system) - 1)], np.nan)
    pick = reconcile_choice(uppers, actual, level, window=int(config.reconcile_window),
                            min_scored=int(config.reconcile_min_scored))[-1]
    return pick[rows]


def _as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


def residual_history(demand: pa.Table, issued_at: datetime, window: int = 288) -> ResidualHistory:
    """One-step demand changes of the ``window`` buckets before ``issued_at``: ``[n_users, window, 4]``.

    ``demand``: a :data:`pipeline.schemas.DEMAND` table. These are the residuals of the last-value
    forecast at 5 minutes; buckets without a row count as zero demand. Only buckets before
    ``issued_at`` are read, so later data cannot change an earlier forecast.
    """
    step = timedelta(seconds=BUCKET_SECONDS)
    users, grid = _dense_grid(demand, issued_at - (window + 1) * step, issued_at)
    return ResidualHistory(users, np.diff(grid, axis=1))


def _bucket_index(ts: pa.ChunkedArray, start: datetime) -> np.ndarray:
    """The 5-minute bucket of each timestamp, counted from ``start``."""
    start_us = int(pa.scalar(start, pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py())
    return (pc.cast(ts.cast(pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy() - start_us) // (BUCKET_SECONDS * 1_000_000)


def _dense_grid(demand: pa.Table, start: datetime, end: datetime) -> tuple[list[str], np.ndarray]:
    """The users of ``demand`` in ``[start, end)`` (sorted) and their demand per bucket there,
    ``[n_users, buckets, 4]`` (no row: zero demand)."""
    n = round((end - start).total_seconds() / BUCKET_SECONDS)
    ts_type = demand.schema.field("ts").type
    keep = pc.and_(pc.greater_equal(demand["ts"], pa.scalar(start, ts_type)), pc.less(demand["ts"], pa.scalar(end, ts_type)))
    part = demand.filter(keep)
    users = pc.unique(part["user_id"])
    users = users.take(pc.sort_indices(users))
    grid = np.zeros((len(users), n, len(DEMAND_RESOURCES)))
    if part.num_rows:
        u = pc.index_in(part["user_id"], value_set=users).to_numpy()
        b = _bucket_index(part["ts"], start)
        for k, r in enumerate(DEMAND_RESOURCES):
            grid[u, b, k] = part[r].to_numpy(zero_copy_only=False).astype(np.float64)
    return users.to_pylist(), grid


def system_history(demand: pa.Table, issued_at: datetime, window: int = 288) -> np.ndarray:
    """The system's demand (every user's, summed) in each of the ``window`` buckets before
    ``issued_at``: ``[window, 4]`` in :data:`DEMAND_RESOURCES` order, oldest first; buckets without
    a row count as zero demand. The ``system`` input of :func:`aggregate`."""
    start = issued_at - window * timedelta(seconds=BUCKET_SECONDS)
    ts_type = demand.schema.field("ts").type
    keep = pc.and_(pc.greater_equal(demand["ts"], pa.scalar(start, ts_type)), pc.less(demand["ts"], pa.scalar(issued_at, ts_type)))
    sums = demand.filter(keep).group_by("ts").aggregate([(r, "sum") for r in DEMAND_RESOURCES])
    out = np.zeros((window, len(DEMAND_RESOURCES)))
    if sums.num_rows:
        b = _bucket_index(sums["ts"], start)
        for k, r in enumerate(DEMAND_RESOURCES):
            out[b, k] = sums[f"{r}_sum"].to_numpy(zero_copy_only=False).astype(np.float64)
    return out
