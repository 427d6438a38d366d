"""Shared pieces of the scaler tests: a fixed clock, forecast builders, fake AWS credentials."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

import pytest

from pipeline.schemas import HORIZONS_MIN

NOW = datetime(2026, 11, 2, 12, 0, tzinfo=timezone.utc)


def forecast_rows(cpu: float | Sequence[float], memory: float | Sequence[float], gpus: float | Sequence[float] = 0.0,
                  *, issued_at: datetime = NOW, mean_share: float = 0.8) -> list[dict[str, Any]]:
    """SYSTEM_FORECAST rows: one value per resource, or one per horizon (5..30 min), as ``upper``."""

    def per_h(v: float | Sequence[float]) -> list[float]:
        return [float(v)] * len(HORIZONS_MIN) if isinstance(v, (int, float)) else [float(x) for x in v]

    rows = []
    for resource, values in (("cpu_cores", per_h(cpu)), ("memory_gb", per_h(memory)), ("gpus", per_h(gpus))):
        for h, upper in zip(HORIZONS_MIN, values):
            rows.append({"issued_at": issued_at, "horizon_min": h, "resource": resource, "mean": upper * mean_share,
                         "lower": upper * mean_share * 0.5, "upper": upper, "level": 0.9, "n_users": 100,
                         "method": "test"})
    return rows


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region so no test can reach a real account."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def user_forecast_table(demand: dict[str, tuple[float, float] | Sequence[tuple[float, float]]], *,
                        issued_at: datetime = NOW, mean_share: float = 0.8, gpus: float = 0.0):
    """A USER_FORECAST table: per user ``(cores, GB)`` at every horizon, or one pair per horizon, as q90.

    Quantiles are spread around it (q95 = 1.1 × q90, q50 = mean = ``mean_share`` × q90)."""
    from datetime import timedelta

    import pyarrow as pa

    from pipeline.schemas import QUANTILE_COLUMNS, USER_FORECAST

    scale = dict(zip(QUANTILE_COLUMNS, (0.2, 0.3, 0.5, mean_share, 0.9, 1.0, 1.1)))
    rows = []
    for user, values in demand.items():
        per_h = [values] * len(HORIZONS_MIN) if isinstance(values[0], (int, float)) else list(values)
        for h, (cores, gb) in zip(HORIZONS_MIN, per_h):
            for resource, v in (("requests", 10.0), ("cpu_cores", cores), ("memory_gb", gb), ("gpus", gpus)):
                rows.append({"user_id": user, "issued_at": issued_at, "horizon_min": h,
                             "target_start": issued_at + timedelta(minutes=h - 5), "resource": resource,
                             **{q: v * f for q, f in scale.items()}, "mean": v * mean_share, "model_version": "test"})
    return pa.Table.from_pylist(rows, schema=USER_FORECAST)
