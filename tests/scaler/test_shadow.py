"""Shadow-mode report: recorded capacity and warmcast's proposals scored on the demand that came,
on hand-computed cycles, and end to end through ``warmcast shadow`` on a real lake and store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline.schemas import SCALING_DECISION
from scaler.fleet import fleet_from_dict
from scaler.shadow import shadow_report

UTC = timezone.utc
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
FIVE = timedelta(minutes=5)
FLEET = fleet_from_dict({
    "defaults": {"mode": "forecast_only"},
    "pools": [{"name": "general", "vcpu": 4, "memory_gb": 16, "hourly_price_usd": 0.2, "boot_s": 240, "max_size": 40}],
    "subpools": {"vcpu": 8, "memory_gb": 32, "hourly_price_usd": 0.4, "boot_s": 0},
})


def _decisions(rows: list[tuple[int, str, str, int, int]]) -> pa.Table:
    """``(cycle, pool, kind, current, target)`` -> a ``SCALING_DECISION`` table (cycle k at T0 + 5k min)."""
    return pa.Table.from_pylist([{"decided_at": T0 + k * FIVE, "pool": pool, "pool_kind": kind, "current": c, "target": t,
                                  "applied": False, "dry_run": False, "reason": "shadow (forecast_only), not applied; mode=forecast_only"}
                                 for k, pool, kind, c, t in rows], schema=SCALING_DECISION)


def _demand(cpu: list[float], mem: list[float]) -> np.ndarray:
    d = np.zeros((len(cpu), 4))
    d[:, 1], d[:, 2] = cpu, mem
    return d


def test_hand_computed_cycles():
    # four cycles; the groups had 2 instances throughout, warmcast proposed 1, 3, 3, 1 (warm rows do not count)
    rows = [(k, "general", "active", 2, t) for k, t in enumerate((1, 3, 3, 1))] + [(k, "general", "warm", 0, 9) for k in range(4)]
    report = shadow_report(_decisions(rows), _demand([99, 5, 10, 3], [99, 10, 40, 10]), T0, T0 + 4 * FIVE, FLEET)
    # bucket 0 starts before the first decision's boot time has passed: scored are buckets 1-3
    assert report.buckets == 3 and report.cycles == 4 and report.modes == {"forecast_only": 4}
    rec, prop = report.recorded, report.proposed
    # recorded: 2 instances = 8 cores, 32 GB ready in each bucket; proposed (an instance is ready once its pool asked
    # for it a whole boot time, 240 s, before): 1 (asked for 1 until the decision at +5), 3, then 1 (scale-in is at once)
    assert rec["short_bucket_share"] == {"cpu_cores": pytest.approx(1 / 3), "memory_gb": pytest.approx(1 / 3), "gpus": 0.0}
    assert prop["short_bucket_share"] == {"cpu_cores": pytest.approx(1 / 3), "memory_gb": 0.0, "gpus": 0.0}
    assert rec["shortfall_hours"]["cpu_cores"] == pytest.approx(2 * 5 / 60)  # 10 cores against 8
    assert prop["shortfall_hours"]["cpu_cores"] == pytest.approx(1 * 5 / 60)  # 5 against 4
    assert rec["shortfall_hours"]["memory_gb"] == pytest.approx(8 * 5 / 60) and prop["shortfall_hours"]["memory_gb"] == 0
    assert rec["instance_hours"] == {"general": pytest.approx(6 * 5 / 60)}  # 2 + 2 + 2 instances x 5 minutes
    assert prop["instance_hours"] == {"general": pytest.approx(7 * 5 / 60)}  # 3 + 3 + 1
    assert rec["cost_usd"] == pytest.approx(0.2 * 0.5) and prop["cost_usd"] == pytest.approx(0.2 * 7 / 12)
    assert rec["utilisation"]["cpu_cores"] == pytest.approx(18 / 24) and prop["utilisation"]["cpu_cores"] == pytest.approx(18 / 20)
    assert rec["utilisation"]["gpus"] is None  # no GPU capacity at all
    text = report.render()
    assert "buckets short of cpu_cores" in text and "33.3%" in text


def test_subpools_count_with_their_shape_and_unknown_pools_are_left_out():
    rows = [(k, "general", "active", 1, 1) for k in range(3)] + [(k, "warmcast-sub-0123456789abcdef", "subpool", 0, 1) for k in range(3)]
    rows += [(k, "legacy", "active", 5, 5) for k in range(3)]
    report = shadow_report(_decisions(rows), _demand([9, 9, 9], [1, 1, 1]), T0, T0 + 3 * FIVE, FLEET)
    assert report.skipped_pools == ["legacy"] and report.pools == ["general", "warmcast-sub-0123456789abcdef"]
    # recorded: 1 general (4 cores) short of 9; proposed: + a sub-pool instance (8 cores, boot 0) -> 12
    assert report.recorded["short_bucket_share"]["cpu_cores"] == 1.0
    assert report.proposed["short_bucket_share"]["cpu_cores"] == 0.0
    assert report.proposed["instance_hours"]["warmcast-sub-0123456789abcdef"] == pytest.approx(2 * 5 / 60)


def test_bad_input_is_named():
    rows = [(0, "general", "active", 1, 1)]
    with pytest.raises(ValueError, match="demand has 2 buckets"):
        shadow_report(_decisions(rows), _demand([1, 1], [1, 1]), T0, T0 + 3 * FIVE, FLEET)
    with pytest.raises(ValueError, match="no active or sub-pool decision"):
        shadow_report(_decisions([(0, "legacy", "active", 1, 1)]), _demand([1], [1]), T0, T0 + FIVE, FLEET)


def test_a_gap_in_the_cycles_is_left_out_and_an_absent_sub_pool_counts_zero():
    # cycles 0-2, none for 25 minutes, then 8-9; the sub-pool is planned in cycle 1 only
    rows = [(k, "general", "active", 2, 2) for k in (0, 1, 2, 8, 9)] + [(1, "warmcast-sub-0123456789abcdef", "subpool", 0, 1)]
    report = shadow_report(_decisions(rows), _demand([1] * 10, [1] * 10), T0, T0 + 10 * FIVE, FLEET)
    # scored: buckets 1-5 (from a boot time, 240 s, after cycle 0 until 15 min after cycle 2) and 8-9; 6-7 are
    # 20 and 25 min after cycle 2: left out
    assert report.buckets == 7 and report.gap_buckets == 2 and "left out: 2 buckets" in report.render()
    assert report.proposed["instance_hours"]["warmcast-sub-0123456789abcdef"] == pytest.approx(5 / 60)  # bucket 1 only


def test_cli_reads_the_decisions_and_the_lakes_demand(tmp_path, capsys, monkeypatch):
    import json

    from pipeline.cli import main
    from pipeline.config import load_settings
    from pipeline.forecast_store import ForecastStore
    from pipeline.generate import make_request_table
    from pipeline.ingest import ingest_interval
    from pipeline.landing import write_landing
    from pipeline.storage import open_location
    from pipeline.demand import system_demand_from_lake
    from scaler.shadow import demand_array

    landing, lake, db = tmp_path / "landing", tmp_path / "lake", f"sqlite:///{tmp_path}/warmcast.db"
    rows = make_request_table([{"request_id": f"r{i}", "user_id": "u1", "ts": T0 + timedelta(seconds=20 * i)} for i in range(90)])
    write_landing(open_location(str(landing)), rows, "a", "parquet")
    settings = load_settings(overrides={"lake": str(lake), "landing": str(landing), "ingest": {"share_gate_min_rows": 10**9}}, environ={})
    ingest_interval(settings, T0, T0 + 6 * FIVE)
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[pools]]\nname = "general"\nvcpu = 4\nmemory_gb = 16\nhourly_price_usd = 0.2\nboot_s = 240\n')
    decisions = _decisions([(k, "general", "active", 1, 2) for k in range(6)])
    store = ForecastStore(db)
    store.create_schema()
    store.write_decisions(decisions)
    monkeypatch.setenv("WARMCAST_STORE_URL", db)
    args = ["shadow", "--lake", str(lake), "--since", "2026-11-02T12:00:00Z", "--until", "2026-11-02T12:30:00Z",
            "--fleet", str(fleet_file)]
    assert main(args + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    demand = demand_array(system_demand_from_lake(open_location(str(lake)), T0, T0 + 6 * FIVE))
    assert demand[:, 1].sum() > 0  # the requests' cores reached the demand series
    from scaler.fleet import load_fleet

    want = shadow_report(decisions, demand, T0, T0 + 6 * FIVE, load_fleet(fleet_file)).to_dict()
    assert got == json.loads(json.dumps(want)) and got["buckets"] == 5
    assert main(args) == 0 and "warmcast proposed" in capsys.readouterr().out
    assert main(args[:4] + ["2026-11-02T12:01:00Z"] + args[5:]) == 2
    assert "not on the 5-minute grid" in capsys.readouterr().err
    assert main(args[:3] + ["--since", "2026-11-02T11:00:00Z", "--until", "2026-11-02T11:30:00Z", "--fleet", str(fleet_file)]) == 2
    assert "no scaling decisions recorded" in capsys.readouterr().err
