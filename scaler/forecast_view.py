"""Read the system forecast the policy sizes from, and say exactly why when it cannot be used.

Pure: values in, values out. The policy holds every pool when :func:`demand_by_horizon` returns
a reason instead of demand (DESIGN.md "Scaling"; issue 5 "Bad input and faults").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import HORIZONS_MIN
from scaler.placement import RESOURCES

#: Values this far below zero are float noise and read as 0; anything lower is a bad forecast.
NEGATIVE_TOLERANCE = 1e-9
#: A forecast issued this far in the future (clock skew) is still accepted, seconds.
FUTURE_SKEW_S = 60.0


@dataclass(frozen=True)
class ForecastDemand:
    """Demand to size for, per horizon: the running max over buckets ``5..h`` min.

    ``by_horizon[h]`` is ``(cpu_cores, memory_gb, gpus)``, each
    ``upper - shading × (upper - mean)`` of the system forecast, maximised over every bucket up to
    ``h`` (capacity started now must not fall short of an earlier bucket either).
    """

    issued_at: datetime
    by_horizon: dict[int, tuple[float, float, float]]


#: A system forecast issue carries one row per method (see :mod:`pipeline.aggregate`); the scaler
#: sizes for the first of these present: the reconciled target (the tier-weighted one, never below
#: the top-down band of the system's own recent errors), else the tier-weighted provisioning target,
#: else the sampled band.
METHOD_PREFERENCE = ("reconciled_target", "tiered_target", "copula_sample", "independent_sample")


def _one_method(table: pa.Table) -> pa.Table:
    """Keep the rows of one aggregation method (the naive quantile sum is never acted on)."""
    if "method" not in table.column_names:
        return table
    methods = set(pc.unique(table["method"]).to_pylist())
    if len(methods) <= 1:
        return table
    for method in METHOD_PREFERENCE:
        if method in methods:
            return table.filter(pc.equal(table["method"], method))
    return table  # several unknown methods: read as duplicates, and held


def _as_rows(forecast: pa.Table | Iterable[Mapping[str, Any]] | None, now: datetime) -> list[Mapping[str, Any]]:
    if forecast is None:
        return []
    if isinstance(forecast, pa.Table):
        forecast = _one_method(forecast)
        if forecast.num_rows == 0:
            return []
        # A forecast table may hold many issues (and, in a back-fill, later ones): only the newest
        # issued by ``now`` is read, so filter in Arrow before converting rows.
        cutoff = pa.scalar(now + timedelta(seconds=FUTURE_SKEW_S), forecast.schema.field("issued_at").type)
        table = forecast.filter(pc.less_equal(forecast["issued_at"], cutoff))
        if table.num_rows == 0:
            return forecast.slice(0, 1).select(["issued_at"]).to_pylist()  # only later issues: "missing"
        table = table.filter(pc.equal(table["issued_at"], pc.max(table["issued_at"])))
        cols = [c for c in ("issued_at", "horizon_min", "resource", "mean", "upper") if c in table.column_names]
        return table.select(cols).to_pylist()
    return list(forecast)


def demand_by_horizon(
    forecast: pa.Table | Iterable[Mapping[str, Any]] | None,
    now: datetime,
    *,
    max_age_s: float,
    shading: float,
    required: Sequence[str] = ("cpu_cores", "memory_gb"),
) -> ForecastDemand | str:
    """The newest forecast issued at or before ``now`` as :class:`ForecastDemand`, or why not.

    ``forecast`` is a ``SYSTEM_FORECAST`` table or its rows as mappings. ``max_age_s``: a forecast
    older than this (seconds) is stale. ``shading`` in ``[0, 1]``: 0 sizes for the upper bound,
    1 for the mean. ``required``: resources that must be present for every horizon; other
    resources of :data:`RESOURCES` that are absent count as 0 demand.

    Returns a string (the hold reason) when the forecast is missing, stale, from the future,
    incomplete, duplicated, or holds NaN, infinite or negative values.
    """
    rows = _as_rows(forecast, now)
    issued = [r.get("issued_at") for r in rows if isinstance(r.get("issued_at"), datetime)]
    issued = [t for t in issued if (t - now).total_seconds() <= FUTURE_SKEW_S]
    if not issued:
        if rows:
            return f"forecast missing: no forecast issued at or before {now.isoformat()}"
        return "forecast missing: no system forecast rows"
    issued_at = max(issued)
    age = (now - issued_at).total_seconds()
    if age > max_age_s:
        return f"forecast stale: newest issued {issued_at.isoformat()} is {age:.0f} s old (max {max_age_s:.0f} s)"

    values: dict[tuple[int, str], float] = {}
    for r in rows:
        if r.get("issued_at") != issued_at or r.get("resource") not in RESOURCES:
            continue
        h, res = int(r["horizon_min"]), str(r["resource"])
        if h not in HORIZONS_MIN:
            continue
        if (h, res) in values:
            return f"forecast invalid: duplicate rows for horizon {h} min, {res}"
        upper, mean = r.get("upper"), r.get("mean")
        for name, v in (("upper", upper), ("mean", mean)):
            if name == "mean" and shading == 0:
                continue
            if v is None or not math.isfinite(v):
                return f"forecast invalid: {name}={v} for {res} at {h} min"
            if v < -NEGATIVE_TOLERANCE:
                return f"forecast invalid: negative {name}={v:g} for {res} at {h} min"
        v = upper if shading == 0 else upper - shading * (upper - mean)
        values[(h, res)] = max(0.0, float(v))

    for res in required:
        for h in HORIZONS_MIN:
            if (h, res) not in values:
                return f"forecast incomplete: issued {issued_at.isoformat()} lacks {res} at {h} min"

    by_horizon: dict[int, tuple[float, float, float]] = {}
    running = [0.0, 0.0, 0.0]
    for h in HORIZONS_MIN:
        running = [max(running[i], values.get((h, res), 0.0)) for i, res in enumerate(RESOURCES)]
        by_horizon[h] = (running[0], running[1], running[2])
    return ForecastDemand(issued_at=issued_at, by_horizon=by_horizon)


def horizon_covering(seconds: float) -> int:
    """The shortest forecast horizon (minutes) whose bucket ends at or after ``seconds`` from now.

    Longer than the longest horizon: the longest (30 min) — the plan says so in its reason.
    """
    for h in HORIZONS_MIN:
        if h * 60 >= seconds:
            return h
    return HORIZONS_MIN[-1]
