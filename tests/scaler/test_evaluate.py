"""The evaluation: equal-cost interpolation, summary.json, and `warmcast evaluate` on a tiny lake."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_settings
from pipeline.generate import generate_landing
from pipeline.ingest import ingest_interval
from pipeline.storage import open_location
from scaler.evaluate import POLICY_SPECS, evaluate, knob_at_cost, value_at_cost
from scaler.policy import InstanceShape
from scaler.simulate import FleetModel, SimMetrics, SystemTrace

START = datetime(2026, 3, 2, tzinfo=timezone.utc)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def point(hours: float, cold: float, knob: float = 0.0, requests: float | None = 10.0) -> SimMetrics:
    return SimMetrics(policy="p", knob="k", knob_value=knob, steps=1, step_s=60.0, demand_core_seconds=1.0,
                      cold_core_seconds=cold, cold_requests=requests, cold_share=0.0, wait_p50_s=0.0, wait_p99_s=0.0,
                      instance_hours=hours, warm_stopped_hours=0.0, equivalent_instance_hours=hours, cost_usd=hours,
                      utilisation=0.5, memory_utilisation=0.5, launches=0)


def test_value_at_cost_interpolates_linearly_between_the_surrounding_points():
    curve = [point(30.0, 10.0, 0.9), point(10.0, 100.0, 0.5), point(20.0, 40.0, 0.7)]  # any order
    assert value_at_cost(curve, 15.0, "cold_core_seconds") == pytest.approx(70.0)  # halfway 100 → 40
    assert value_at_cost(curve, 27.5, "cold_core_seconds") == pytest.approx(40 - 0.75 * 30)
    assert value_at_cost(curve, 20.0, "cold_core_seconds") == 40.0  # on a point: its value
    assert value_at_cost(curve, 9.0, "cold_core_seconds") is None  # no extrapolation
    assert value_at_cost(curve, 31.0, "cold_core_seconds") is None
    assert value_at_cost([point(10, 2.0), point(10, 4.0), point(20, 0.0)], 10, "cold_core_seconds") == 3.0  # ties averaged
    assert value_at_cost([point(10, 1.0, requests=None)], 10, "cold_requests") is None
    assert knob_at_cost(curve, 15.0) == pytest.approx(0.6)
    assert knob_at_cost(curve, 5.0) == 0.5 and knob_at_cost(curve, 50.0) == 0.9  # clamped


def daily(days: float, step_s: float = 300.0, seed: int = 0) -> SystemTrace:
    n = int(days * 86_400 / step_s)
    t = np.arange(n) * step_s / 86_400
    rng = np.random.default_rng(seed)
    x = np.maximum(0, 60 + 40 * np.sin(2 * np.pi * t) + rng.gamma(2.0, 4.0, n))
    return SystemTrace(x, x / 2, step_s, np.round(x * 3), START)


def test_evaluate_summary_schema_and_ratios():
    trace = daily(3)
    fleet = FleetModel(InstanceShape(4, 16, hourly_price_usd=0.2))
    ev = evaluate(trace, fleet, policies=("reactive", "naive_predictive", "warmcast", "oracle"))
    s = json.loads(json.dumps(ev.summary()))  # plain JSON
    assert ev.eval_start == trace.steps // 2
    ref = s["reference"]
    assert ref["policy"] == "reactive" and ref["target_utilisation"] == 0.7
    assert set(s["policies"]) == {"reactive", "naive_predictive", "warmcast", "oracle"}
    assert set(s["also_at"]) == {"reactive_0.8", "reactive_0.9"}
    for name, p in s["policies"].items():
        assert len(p["curve"]) >= len(POLICY_SPECS[name].grid)
        for c in p["curve"]:
            assert {"knob", "instance_hours", "cold_requests", "cold_core_seconds", "wait_p99_s"} <= set(c)
        pe = ev.policies[name]
        want = value_at_cost(pe.curve, ev.reference.equivalent_instance_hours, "cold_core_seconds")
        if want is None:
            assert p["ratio_to_reactive_at_equal_cost"] is None
        else:
            assert p["ratio_to_reactive_at_equal_cost"] == pytest.approx(want / ev.reference.cold_core_seconds, abs=1e-4)
    assert s["policies"]["reactive"]["ratio_to_reactive_at_equal_cost"] == 1.0
    assert s["policies"]["naive_predictive"]["ratio_to_naive_at_equal_cost"] in (1.0, None)
    assert ref["cold_core_seconds"] > 0  # the comparison is not vacuous
    assert s["policies"]["oracle"]["ratio_to_reactive_at_equal_cost"] < 0.5  # foresight must win clearly
    # the pool-size replay sits at (about) the reference cost
    assert ev.policies["warmcast"].at_cost.metrics.equivalent_instance_hours == pytest.approx(
        ev.reference.equivalent_instance_hours, rel=0.15)


def test_evaluate_rejects_a_run_without_the_reference_or_with_unknown_policies():
    with pytest.raises(ValueError, match="reactive"):
        evaluate(daily(1), FleetModel(InstanceShape(4, 16)), policies=("warmcast",))
    with pytest.raises(ValueError, match="unknown policies"):
        evaluate(daily(1), FleetModel(InstanceShape(4, 16)), policies=("reactive", "magic"))


@pytest.fixture(scope="module")
def tiny_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    landing = open_location(str(root / "landing"))
    generate_landing(landing, users=12, days=1.0, start=START, seed=3)
    settings = load_settings(overrides={"lake": str(root / "lake"), "landing": str(root / "landing")}, environ={})
    ingest_interval(settings, START, START + timedelta(days=1))
    return root


def _check_report(out, policies):
    import matplotlib.image as mpimg

    for name in ("report.md", "report.html", "summary.json", "tradeoff.png", "pools.png", "forecast.png"):
        assert (out / name).is_file(), name
    for png in ("tradeoff.png", "pools.png", "forecast.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # not a blank canvas
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == set(policies)
    md = (out / "report.md").read_text()
    assert "![" in md and "tradeoff.png" in md and "| warmcast |" in md
    assert '<img src="pools.png"' in (out / "report.html").read_text()
    return summary


def test_cli_evaluate_on_a_tiny_lake_writes_the_report(tiny_lake, capsys):
    out = tiny_lake / "report"
    policies = ("reactive", "naive_predictive", "warmcast")
    rc = main(["evaluate", "--lake", str(tiny_lake / "lake"), "--out", str(out), "--step", "5min",
               "--policies", ",".join(policies)])
    assert rc == 0, capsys.readouterr().err
    summary = _check_report(out, policies)
    assert summary["meta"]["step_s"] == 300.0 and summary["meta"]["since"].startswith("2026-03-02T00:00")
    # the same data read straight from the landing files (no ingest) gives the same reference
    out2 = tiny_lake / "report-trace"
    rc = main(["evaluate", "--source", "trace", "--trace", str(tiny_lake / "landing"), "--out", str(out2),
               "--step", "5min", "--policies", ",".join(policies), "--since", "2026-03-02T00:00:00Z",
               "--until", "2026-03-03T00:00:00Z"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out2 / "summary.json").read_text())["reference"] == summary["reference"]


def test_cli_evaluate_names_the_problem(tmp_path, capsys):
    rc = main(["evaluate", "--lake", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "no date=YYYY-MM-DD/hour=HH partitions" in capsys.readouterr().err
    rc = main(["evaluate", "--source", "trace", "--out", str(tmp_path / "out")])
    assert rc == 2 and "--trace" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
