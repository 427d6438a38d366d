"""``warmcast status``: each stage's check from the lake's validation documents, the model store and
the forecast store, with the states an operator's probe would act on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.contract import to_forecast_table
from models.persist import USERS
from models.store import ModelStore
from pipeline.cli import main
from pipeline.config import load_settings
from pipeline.forecast_store import ForecastStore
from pipeline.generate import make_request_table
from pipeline.ingest import ValidationGateError, ingest_interval
from pipeline.landing import write_landing
from pipeline.schemas import SCALING_DECISION, SYSTEM_FORECAST
from pipeline.status import FAIL, OK, WARN, pipeline_status
from pipeline.storage import open_location

UTC = timezone.utc
H10 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
FIVE = timedelta(minutes=5)


@pytest.fixture
def env(tmp_path: Path):
    class Env:
        landing, lake, db = tmp_path / "landing", tmp_path / "lake", f"sqlite:///{tmp_path}/store/warmcast.db"

        def settings(self, **ingest):
            ingest.setdefault("share_gate_min_rows", 10**9)
            return load_settings(overrides={"lake": str(self.lake), "landing": str(self.landing), "store_url": self.db,
                                            "ingest": ingest}, environ={})

        def land(self, n: int, start: datetime = H10, prefix: str = "r", name: str = "a") -> None:
            rows = make_request_table([{"request_id": f"{prefix}{i}", "user_id": "u1", "ts": start + timedelta(seconds=30 * i)}
                                       for i in range(n)])
            write_landing(open_location(str(self.landing)), rows, name, "parquet")

        def ingest_slots(self, start: datetime, end: datetime, **ingest) -> None:
            t = start
            while t < end:
                ingest_interval(self.settings(**ingest), t, t + FIVE)
                t += FIVE

        def status(self, at: datetime, store=None, **ingest):
            s = pipeline_status(self.settings(**ingest), at, store=store)
            return s, {c.name: c for c in s.checks}

    env = Env()
    env.landing.mkdir()
    return env


def test_ingest_lag_sets_the_state(env):
    env.land(120)  # one request every 30 s from 10:00 to 11:00
    env.ingest_slots(H10, H10 + timedelta(minutes=30))
    _, checks = env.status(H10 + timedelta(minutes=31))
    assert checks["ingest"].state == OK and checks["ingest"].facts["lag_s"] == 60
    assert checks["ingest"].facts["newest_run_end"] == "2026-03-02T10:30:00+00:00"
    assert checks["quarantine"].facts == {"rows_in": 60, "rows_quarantined": 0, "share": 0.0, "reasons": {}}
    _, checks = env.status(H10 + timedelta(minutes=50))  # 20 min behind
    assert checks["ingest"].state == WARN
    _, checks = env.status(H10 + timedelta(minutes=95))
    assert checks["ingest"].state == FAIL and "65 min before" in checks["ingest"].detail
    # as of a time inside the history, runs that ended later do not count
    _, checks = env.status(H10 + timedelta(minutes=12))
    assert checks["ingest"].facts["newest_run_end"] == "2026-03-02T10:10:00+00:00"
    assert checks["quarantine"].facts["rows_in"] == 20


def test_ingest_lag_is_found_however_far_behind(env):
    env.land(10)
    env.ingest_slots(H10, H10 + FIVE)
    _, checks = env.status(H10 + timedelta(days=3))
    assert checks["ingest"].state == FAIL and checks["ingest"].facts["lag_s"] == 3 * 86400 - 300
    assert checks["quarantine"].facts["rows_in"] == 0 and "nothing ingested" in checks["quarantine"].detail


def test_an_empty_lake_fails_ingest(env):
    status, checks = env.status(H10)
    assert checks["ingest"].state == FAIL and "no ingest run" in checks["ingest"].detail
    assert status.state == FAIL


def test_a_failed_gate_fails_ingest_until_the_interval_is_re_run(env):
    env.land(20)  # 10:00-10:10
    env.ingest_slots(H10, H10 + FIVE)
    bad = "request_id,user_id,program_id,software_config,ts,duration_s,cpu_cores,memory_mb,gpus\n" + "".join(
        f"b{i},u1,p,c,2026-03-02T10:06:00Z,-1,1,1,0\n" for i in range(30))
    bad_file = env.landing / "date=2026-03-02" / "hour=10" / "bad.csv"
    bad_file.write_text(bad)
    with pytest.raises(ValidationGateError):
        env.ingest_slots(H10 + FIVE, H10 + 2 * FIVE, share_gate_min_rows=1, max_quarantine_share=0.2)
    _, checks = env.status(H10 + timedelta(minutes=11))
    ingest = checks["ingest"]
    assert ingest.state == FAIL and ingest.facts["newest_run_end"] == "2026-03-02T10:10:00+00:00"
    [(start, end, why)] = ingest.facts["failed_intervals"]
    assert (start, end) == ("2026-03-02T10:05:00+00:00", "2026-03-02T10:10:00+00:00") and "quarantine_share" in why
    assert "not published" in ingest.detail
    bad_file.unlink()  # the landing is fixed: the re-run replaces the failed run's document
    env.ingest_slots(H10 + FIVE, H10 + 2 * FIVE, share_gate_min_rows=1, max_quarantine_share=0.2)
    _, checks = env.status(H10 + timedelta(minutes=11))
    assert checks["ingest"].state == OK and checks["ingest"].facts["failed_intervals"] == []


def test_quarantine_share_against_the_gate(env):
    env.land(10)
    (env.landing / "date=2026-03-02" / "hour=10" / "b.csv").write_text(
        "request_id,user_id,program_id,software_config,ts,duration_s,cpu_cores,memory_mb,gpus\n"
        "x1,u1,p,c,2026-03-02T10:01:00Z,-1,1,1,0\n")
    env.ingest_slots(H10, H10 + FIVE)
    _, checks = env.status(H10 + FIVE, max_quarantine_share=0.5)
    q = checks["quarantine"]
    assert q.facts["rows_in"] == 11 and q.facts["rows_quarantined"] == 1 and sum(q.facts["reasons"].values()) == 1
    assert q.state == OK  # 9 % against a 50 % gate
    _, checks = env.status(H10 + FIVE, max_quarantine_share=0.1)
    assert checks["quarantine"].state == WARN  # above half the gate's share
    _, checks = env.status(H10 + FIVE, max_quarantine_share=0.05)
    assert checks["quarantine"].state == FAIL


def test_models_check_reads_the_version_a_forecast_would_use(env):
    lake = open_location(str(env.lake))
    _, checks = env.status(H10)
    assert checks["models"].state == WARN and "fallback" in checks["models"].detail
    store = ModelStore(lake, USERS)
    w = {"w": torch.zeros(2, 3)}
    old = store.save(["u1", "u2"], w, training_window=(H10 - timedelta(days=3), H10 - timedelta(hours=6)),
                     extra={"uses_global": ["u2"]})
    new = store.save(["u1", "u2"], w, training_window=(H10 - timedelta(days=2), H10 + timedelta(hours=18)))
    _, checks = env.status(H10)
    m = checks["models"]
    assert m.state == OK and m.facts["served"] == old and m.facts["latest"] == new
    assert m.facts["age_s"] == 6 * 3600 and m.facts["users_on_global"] == 1 and f"latest is {new}" in m.detail
    _, checks = env.status(H10 + timedelta(days=2))  # new's data ends 30 h before: still within a daily cycle + slack
    assert checks["models"].state == OK and checks["models"].facts["served"] == new
    _, checks = env.status(H10 + timedelta(days=3))  # 54 h
    assert checks["models"].state == WARN
    _, checks = env.status(H10 + timedelta(days=5))
    assert checks["models"].state == FAIL


def _system(issued_at: datetime) -> pa.Table:
    return pa.Table.from_pylist([{"issued_at": issued_at, "horizon_min": h, "resource": "cpu_cores", "method": "reconciled_target",
                                  "mean": 1.0, "lower": 0.5, "upper": 2.0, "level": 0.9, "n_users": 3} for h in (5, 15, 30)],
                                schema=SYSTEM_FORECAST)


def _decisions(at: datetime, reasons: dict[str, str], dry_run: bool = False) -> pa.Table:
    return pa.Table.from_pylist([{"decided_at": at, "pool": pool, "pool_kind": "active", "current": 1, "target": 2,
                                  "applied": reason.startswith("applied"), "dry_run": dry_run, "reason": reason}
                                 for pool, reason in reasons.items()], schema=SCALING_DECISION)


def test_forecast_and_scaler_checks_read_the_store(env, db_store):
    store = db_store
    at = H10 + timedelta(minutes=3)
    _, checks = env.status(at, store)
    assert checks["forecasts"].state == FAIL and "no system forecast" in checks["forecasts"].detail
    assert checks["scaler"].state == WARN and "no scaling decision" in checks["scaler"].detail

    q = np.sort(np.random.default_rng(0).gamma(2.0, 1.0, (3, 6, 4, 7)), axis=-1)
    store.write_user_forecasts(to_forecast_table(["u0", "u1"], H10, q[:2], None, "20260301T000000Z-abc"))
    store.write_user_forecasts(to_forecast_table(["u2"], H10, q[2:], None, "fallback:baseline:last_value"))
    store.write_system_forecast(_system(H10))
    store.write_decisions(_decisions(H10, {"general": "applied; mode=scale", "gpu": "unchanged; mode=scale"}))
    _, checks = env.status(at, store)
    f, s = checks["forecasts"], checks["scaler"]
    assert f.state == OK and f.facts["users"] == 3 and f.facts["users_on_fallback"] == 1 and f.facts["age_s"] == 180
    assert s.state == OK and s.facts["applied"] == 1 and s.facts["decisions"] == 2 and not s.facts["dry_run"]

    _, checks = env.status(H10 + timedelta(minutes=11), store)  # past scaler.max_forecast_age_s (600 s)
    assert checks["forecasts"].state == FAIL and "reactively" in checks["forecasts"].detail
    _, checks = env.status(H10 + timedelta(minutes=20), store)
    assert checks["scaler"].state == WARN  # the newest cycle is 20 min old

    later = H10 + FIVE
    store.write_decisions(_decisions(later, {"general": "failed: update_auto_scaling_group: Throttling; mode=scale",
                                             "gpu": "applied; mode=scale"}))
    status, checks = env.status(later + timedelta(seconds=30), store)
    assert checks["scaler"].state == FAIL and "general active: failed: update_auto_scaling_group" in checks["scaler"].detail
    assert status.state == FAIL


def test_cli_exit_status_and_json(env, capsys, monkeypatch):
    env.land(20)
    env.ingest_slots(H10, H10 + 2 * FIVE)
    store = ForecastStore(env.db)
    store.create_schema()
    store.write_system_forecast(_system(H10 + 2 * FIVE))
    store.write_decisions(_decisions(H10 + 2 * FIVE, {"general": "applied; mode=scale"}))
    ModelStore(open_location(str(env.lake)), USERS).save(["u1"], {"w": torch.zeros(1, 2)},
                                                         training_window=(H10 - timedelta(days=1), H10))
    monkeypatch.setenv("WARMCAST_STORE_URL", env.db)
    monkeypatch.setenv("WARMCAST_LANDING", str(env.landing))
    args = ["status", "--lake", str(env.lake), "--at", "2026-03-02T10:11:00Z"]
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == OK and [c["name"] for c in doc["checks"]] == ["ingest", "quarantine", "models", "forecasts", "bands", "scaler"]
    prom = env.lake.parent / "textfile" / "warmcast.prom"
    prom.parent.mkdir()
    assert main(args[:-1] + ["2026-03-02T12:00:00Z", "--prometheus", str(prom)]) == 1  # ingest and forecasts stale by then
    out = capsys.readouterr().out
    assert out.startswith("warmcast status as of 2026-03-02 12:00:00 UTC: FAIL")
    gauges = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in prom.read_text().splitlines()
              if not line.startswith("#")}
    assert gauges['warmcast_check_state{check="ingest"}'] == 2 and gauges['warmcast_check_state{check="models"}'] == 0
    assert gauges["warmcast_ingest_lag_seconds"] == 110 * 60 and gauges["warmcast_forecast_age_seconds"] == 110 * 60
    assert gauges["warmcast_model_age_seconds"] == 2 * 3600 and gauges["warmcast_quarantine_share"] == 0
    assert gauges["warmcast_status_time_seconds"] == datetime(2026, 3, 2, 12, tzinfo=UTC).timestamp()
    assert "# TYPE warmcast_check_state gauge" in prom.read_text() and list(prom.parent.iterdir()) == [prom]


def test_bands_scores_the_last_days_forecasts_against_the_lakes_demand(env, db_store):
    from pipeline.aggregate import system_history
    from pipeline.demand import demand_from_lake

    env.land(240)  # 10:00-12:00
    env.ingest_slots(H10, H10 + timedelta(hours=2))
    end = H10 + timedelta(hours=2)
    actual = system_history(demand_from_lake(open_location(str(env.lake)), H10, end), end, window=24)[:, 1]  # cpu_cores
    assert actual.min() > 0
    rows, expected = [], []
    for k in range(24):  # issues every 5 minutes from 10:00 to 11:55
        issued = H10 + k * FIVE
        for h in (5, 15, 30):
            b = k + h // 5 - 1  # the bucket the forecast is for
            short = k % 3 == 0  # every third issue sizes for half the demand
            a = actual[b] if b < 24 else 1.0
            rows += [{"issued_at": issued, "horizon_min": h, "resource": "cpu_cores", "method": "reconciled_target",
                      "mean": a, "lower": 0.0, "upper": a * (0.5 if short else 1.5), "level": 1.0, "n_users": 1},
                     {"issued_at": issued, "horizon_min": h, "resource": "cpu_cores", "method": "copula_sample",
                      "mean": a, "lower": a * 0.9, "upper": a * (1.1 if k % 8 else 0.95), "level": 0.9, "n_users": 1}]
            if b < 24:
                expected.append((short, k % 8 != 0))
    db_store.write_system_forecast(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST))
    _, checks = env.status(end, db_store)
    bands = checks["bands"]
    assert bands.facts["issues"] == 24
    assert bands.facts["sized_exceeded"] == {"cpu_cores": pytest.approx(sum(s for s, _ in expected) / len(expected))}
    assert bands.facts["band_coverage"] == {"cpu_cores": pytest.approx(sum(c for _, c in expected) / len(expected))}
    assert bands.state == WARN and "sized short of demand" in bands.detail  # a third of the buckets short
    assert "band held" in bands.detail and "too narrow" not in bands.detail  # 7 in 8 held: above the 80 % floor
    narrow = [dict(r, upper=r["mean"] * 0.95) for r in rows if r["method"] == "copula_sample"]
    db_store.write_system_forecast(pa.Table.from_pylist(narrow, schema=SYSTEM_FORECAST))  # upserts: every band short
    _, checks = env.status(end, db_store)
    assert checks["bands"].facts["band_coverage"] == {"cpu_cores": 0.0} and checks["bands"].facts["band_above"] == {"cpu_cores": 1.0}
    assert "too narrow, mostly short of demand" in checks["bands"].detail
    _, checks = env.status(end + timedelta(minutes=4, seconds=59), db_store)  # off the grid: the same buckets
    assert checks["bands"].facts["sized_exceeded"] == bands.facts["sized_exceeded"]
    _, checks = env.status(H10 + timedelta(minutes=40), db_store)  # only the issues before then, fewer than 24
    assert checks["bands"].state == OK and "not judged" in checks["bands"].detail
    assert checks["bands"].facts["issues"] == 8  # 10:00-10:35: their 5-minute forecasts are over by 10:40


def test_status_reads_an_s3_lake(s3_endpoint, tmp_path):
    settings = load_settings(overrides={"lake": "s3://warmcast-test/lake-status", "landing": "s3://warmcast-test/landing-status",
                                        "store_url": f"sqlite:///{tmp_path}/warmcast.db", "aws": {"s3_endpoint_url": s3_endpoint},
                                        "ingest": {"share_gate_min_rows": 10**9}}, environ={})
    landing = open_location("s3://warmcast-test/landing-status", s3_endpoint_url=s3_endpoint)
    rows = make_request_table([{"request_id": f"r{i}", "user_id": "u1", "ts": H10 + timedelta(minutes=i)} for i in range(10)])
    write_landing(landing, rows, "a", "parquet")
    for k in range(2):
        ingest_interval(settings, H10 + k * FIVE, H10 + (k + 1) * FIVE)
    status = pipeline_status(settings, H10 + timedelta(minutes=11))
    checks = {c.name: c for c in status.checks}
    assert checks["ingest"].state == OK and checks["ingest"].facts["lag_s"] == 60
    assert checks["quarantine"].facts["rows_in"] == 10
    assert checks["models"].state == WARN  # no model version in that lake


def test_status_never_writes_to_the_store(env, tmp_path):
    db = tmp_path / "store" / "warmcast.db"
    db.parent.mkdir()
    env.db = f"sqlite:///{db}"
    status, checks = env.status(H10)
    assert checks["forecasts"].state == FAIL and "cannot read the forecast store" in checks["forecasts"].detail
    assert checks["scaler"].state == FAIL and status.state == FAIL
    import sqlite3

    assert sqlite3.connect(db).execute("select name from sqlite_master").fetchall() == []  # no table was created
