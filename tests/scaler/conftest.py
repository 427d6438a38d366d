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
