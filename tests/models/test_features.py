"""Dense demand grids, per-step features, priors and chunk batches (models/features.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.features import (BUCKET, BUCKETS_PER_DAY, BUCKETS_PER_WEEK, N_INPUTS, SCALE_FLOOR_SHARE, ChunkBatches,
                             Normaliser, WindowedDemand, calendar_features, dense_demand, fit_normaliser, input_features,
                             last_value_error_quantiles, typical_scale)
from models.train import TrainConfig, forecast_windows
from pipeline.demand import build_demand_series
from pipeline.generate import make_request_table
from pipeline.schemas import DEMAND

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)  # a Monday


def demand_table(rows: list[tuple[str, int, float]]) -> pa.Table:
    """DEMAND rows from (user, bucket index, cpu_cores); requests = 1, memory = 2·cpu, gpus 0."""
    return pa.table({
        "user_id": [u for u, _, _ in rows],
        "ts": [T0 + t * BUCKET for _, t, _ in rows],
        "requests": [1] * len(rows),
        "cpu_cores": [float(c) for _, _, c in rows],
        "memory_gb": [2.0 * c for _, _, c in rows],
        "gpus": [0.0] * len(rows),
    }, schema=DEMAND)


def test_dense_demand_fills_the_grid_and_marks_history():
    table = demand_table([("b", 3, 1.0), ("b", 4, 0.0), ("a", 0, 2.0), ("a", 9, 5.0)])
    dense = dense_demand(table, T0, T0 + 10 * BUCKET)
    assert dense.user_ids == ["a", "b"]
    assert dense.values.shape == (2, 10, 4) and dense.values.dtype == np.float32
    assert dense.values[0, 0, 1] == 2.0 and dense.values[0, 9, 1] == 5.0 and dense.values[0, 5].sum() == 0
    assert dense.values[0, 9, 2] == 10.0  # memory_gb column, DEMAND_RESOURCES order
    assert dense.first_active.tolist() == [0, 3]
    assert dense.history_mask()[1].tolist() == [False] * 3 + [True] * 7
    assert dense.end == T0 + 10 * BUCKET


def test_dense_demand_window_users_and_grid():
    table = demand_table([("a", 0, 1.0), ("a", 20, 3.0)])
    dense = dense_demand(table, T0 + 10 * BUCKET, T0 + 30 * BUCKET, users=["z", "a"])
    assert dense.user_ids == ["z", "a"]
    assert dense.values[1, 10, 1] == 3.0 and dense.values.sum() == 3.0 + 1 + 6  # only the row inside
    assert dense.first_active.tolist() == [20, 10]  # no rows: first_active = T
    with pytest.raises(ValueError, match="5-minute grid"):
        dense_demand(table, T0 + timedelta(minutes=1), T0 + BUCKET)
    with pytest.raises(ValueError, match="after start"):
        dense_demand(table, T0, T0)


def test_dense_demand_appends_other_users_and_adds_up_repeated_rows():
    table = demand_table([("c", 1, 1.0), ("a", 2, 4.0), ("b", 0, 2.0), ("b", 0, 0.5)])
    dense = dense_demand(table, T0, T0 + 4 * BUCKET, users=["b", "z"], others=True)
    assert dense.user_ids == ["b", "z", "a", "c"]  # the given users first, then the others sorted
    assert dense.values[0, 0, 1] == 2.5 and dense.values[0, 0, 0] == 2  # two rows of one bucket add up
    assert dense.values[2, 2, 1] == 4.0 and dense.values[3, 1, 2] == 2.0
    assert dense.first_active.tolist() == [0, 4, 2, 1]
    once = dense_demand(table.slice(0, 3), T0, T0 + 4 * BUCKET)  # one row per bucket: the scatter path
    assert once.user_ids == ["a", "b", "c"] and once.values[1, 0, 1] == 2.0 and once.values.sum() == 3 * (1 + 4 + 2) + 1 + 1 + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_values_raise_naming_the_user(bad):
    table = demand_table([("good", 0, 1.0), ("bad-user", 1, bad), ("good", 2, 1.0)])
    with pytest.raises(ValueError, match="'bad-user'.*cpu_cores"):
        dense_demand(table, T0, T0 + 5 * BUCKET)


def test_normaliser_uses_the_training_part_only_and_survives_empty_users():
    rng = np.random.default_rng(0)
    rows = [("busy", t, float(rng.poisson(3))) for t in range(40)] + [("zero", t, 0.0) for t in range(40)]
    dense = dense_demand(demand_table(rows), T0, T0 + 40 * BUCKET, users=["busy", "zero", "absent"])
    norm = fit_normaliser(dense, 30)
    dense.values[:, 30:] *= 100  # the held-out tail must not move the statistics
    again = fit_normaliser(dense, 30)
    for a, b in zip((norm.log_mean, norm.log_std, norm.scale), (again.log_mean, again.log_std, again.scale)):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(norm.scale).all() and (norm.scale > 0).all()
    assert norm.log_std[0, 1] > 0.1 and norm.log_std[1, 1] == pytest.approx(0.1)  # floor for the all-zero user
    feats = input_features(dense, norm)
    assert feats.shape == (3, 40, N_INPUTS) and np.isfinite(feats).all()
    assert not feats[2].any()  # a user without history has no inputs at all
    # the floor of the scale: a share of the grid's typical user, or of the one given
    # (the median of the users' positive scales is the busy user's; no user has GPUs: 1)
    assert norm.scale[2].tolist() == pytest.approx((SCALE_FLOOR_SHARE * np.array([*norm.scale[0, :3], 1.0])).tolist())
    assert typical_scale(np.array([[2.0, 0.0], [4.0, 0.0], [9.0, 0.0]])).tolist() == [4.0, 1.0]
    given = fit_normaliser(dense, 30, rows=np.array([1, 2]), typical=np.array([1000.0, 100.0, 10.0, 1.0]))
    np.testing.assert_allclose(given.scale, np.tile(SCALE_FLOOR_SHARE * np.array([1000.0, 100.0, 10.0, 1.0]), (2, 1)), rtol=1e-6)
    np.testing.assert_array_equal(given.log_mean, norm.log_mean[1:])


def test_lags_and_calendar_columns():
    steps = BUCKETS_PER_WEEK + 10
    rows = [("u", t, float(t % 7)) for t in range(steps)]
    dense = dense_demand(demand_table(rows), T0, T0 + steps * BUCKET)
    feats = input_features(dense, fit_normaliser(dense, steps))
    t = BUCKETS_PER_WEEK + 3
    np.testing.assert_allclose(feats[0, t, 4:8], feats[0, t + 1 - BUCKETS_PER_DAY, 0:4], rtol=1e-6)
    np.testing.assert_allclose(feats[0, t, 8:12], feats[0, t + 1 - BUCKETS_PER_WEEK, 0:4], rtol=1e-6)
    np.testing.assert_allclose(feats[0, t, 18:22], feats[0, t + 6 - BUCKETS_PER_DAY, 0:4], rtol=1e-6)  # the last target's
    assert feats[0, t, 12] == 1 and feats[0, t, 13] == 1
    assert feats[0, 5, 12] == 0 and not feats[0, 5, 4:12].any()  # lag before the history: flagged off
    assert not feats[0, BUCKETS_PER_DAY - 7, 18:22].any() and feats[0, BUCKETS_PER_DAY - 6, 18:22].any()
    cal = calendar_features(T0, 2)
    # bucket t+1 of t=-1+... : the first row describes T0 + 5 min (Monday 00:05 UTC)
    assert cal[0, 0] == pytest.approx(np.sin(2 * np.pi / BUCKETS_PER_DAY), abs=1e-6)
    assert cal[0, 2] == pytest.approx(np.sin(2 * np.pi / BUCKETS_PER_WEEK), abs=1e-6)  # Monday starts the week


def test_one_request_user_and_real_series():
    rows = [{"user_id": "once", "ts": T0 + timedelta(minutes=7), "duration_s": 30.0}]
    rows += [{"user_id": "often", "ts": T0 + timedelta(minutes=3 * i), "duration_s": 60.0} for i in range(200)]
    demand = build_demand_series(make_request_table(rows))
    dense = dense_demand(demand, T0, T0 + 12 * 60 // 5 * BUCKET)
    assert dense.user_ids == ["often", "once"] and dense.first_active[1] == 1
    norm = fit_normaliser(dense, dense.n_steps - 10)
    prior = last_value_error_quantiles(dense, norm, dense.n_steps - 10)
    assert prior.shape == (2, 6, 4, 7) and np.isfinite(prior).all()
    assert (np.diff(prior, axis=-1) >= 0).all()


def test_last_value_error_quantiles_of_known_series():
    steps = 200
    rows = [("flat", t, 4.0) for t in range(steps)] + [("ramp", t, float(t)) for t in range(steps)]
    dense = dense_demand(demand_table(rows), T0, T0 + steps * BUCKET)
    norm = fit_normaliser(dense, steps)
    prior = last_value_error_quantiles(dense, norm, steps)
    assert not prior[0].any()  # a constant series: the last value is exact
    # a ramp: the error at horizon h is exactly h+1 per step, in scaled units
    np.testing.assert_allclose(prior[1, :, 1, 3], (np.arange(6) + 1) / norm.scale[1, 1], rtol=1e-5)


def test_chunk_batches_cover_each_origin_once_and_respect_the_target_end():
    n_users, steps = 2, 100
    feats = torch.randn(n_users, steps, N_INPUTS)
    scaled = torch.arange(n_users * steps * 4, dtype=torch.float32).view(n_users, steps, 4)
    first = torch.tensor([0, 40])
    batches = ChunkBatches(feats, scaled, first, origin_lo=0, origin_hi=79, target_end=80, chunk_steps=25,
                           segment_steps=7, burn_in=5)
    seen = torch.zeros(n_users, steps)
    for j in range(len(batches)):
        b = batches[j]
        assert b["reset"] == (j == 0) and b["burn_in"] == (5 if j == 0 else 0)
        k, c = b["last"].shape[1:3]
        assert b["x"].shape == (n_users, k + b["burn_in"], c, N_INPUTS)
        assert b["target"].shape == (n_users, k, c, 6, 4) and b["weight"].shape == (n_users, k, c, 6)
        scored = b["weight"][..., 0] > 0  # horizon 0 scored = origin counted
        origins = (b["last"][..., 0] - scaled[:, 0, 0][:, None, None]) / 4  # recover the origin index
        for u in range(n_users):
            seen[u, origins[u][scored[u]].long()] += 1
        # a target at or after target_end never counts
        tgt_idx = origins[..., None] + 1 + torch.arange(6)
        assert not (b["weight"].bool() & (tgt_idx >= 80)).any()
        # the target is the scaled demand of the next buckets
        ok = tgt_idx < steps
        expect = scaled[0][tgt_idx[0].clamp(max=steps - 1).long()]
        assert torch.equal(b["target"][0][ok[0]], expect[ok[0]])
    assert seen[0, :79].eq(1).all() and seen[0, 79:].eq(0).all()
    assert seen[1, 40:79].eq(1).all() and seen[1, :40].eq(0).all()  # before its history: not scored
    pooled = ChunkBatches(feats, scaled, first, 0, 79, 80, 25, 7, 5, pooled=True)[1]
    assert pooled["x"].shape[0] == 1 and pooled["x"].shape[2] == n_users * batches[1]["x"].shape[2]


def test_inference_shortcuts_equal_the_full_computations():
    """``input_features(last=)``, ``fit_normaliser(rows=)`` and ``DenseDemand.select`` (what a
    forecast uses) give exactly the values of the full computations."""
    rng = np.random.default_rng(3)
    steps = BUCKETS_PER_WEEK + 300
    rows = [(u, t, float(rng.gamma(1.0, 2.0))) for u in ("a", "b", "c") for t in range(steps) if rng.random() > 0.3 and (u != "c" or t > 2100)]
    dense = dense_demand(demand_table(rows), T0, T0 + steps * BUCKET)
    norm = fit_normaliser(dense, dense.n_steps)
    np.testing.assert_array_equal(input_features(dense, norm, last=97), input_features(dense, norm)[:, -97:])
    part = fit_normaliser(dense, dense.n_steps, rows=np.array([2, 0]), chunk_users=1)
    for name in ("log_mean", "log_std", "scale"):
        np.testing.assert_array_equal(getattr(part, name), getattr(norm, name)[[2, 0]])
    picked = dense.select(["c", "zz", "a"])
    direct = dense_demand(demand_table(rows), T0, T0 + steps * BUCKET, users=["c", "zz", "a"])
    np.testing.assert_array_equal(picked.values, direct.values)
    np.testing.assert_array_equal(picked.first_active, direct.first_active)
    assert picked.first_active[1] == steps and picked.user_ids == ["c", "zz", "a"]
    # the grid of a forecast's windows only (what predict builds): the same inputs, the same history starts
    end = T0 + steps * BUCKET
    windows = forecast_windows(end, TrainConfig(eval_burn_in=96))
    held = dense_demand(demand_table(rows), T0, end, users=["c", "zz", "a", "b"], hold=windows)
    full = dense.select(["c", "zz", "a", "b"])
    assert isinstance(held, WindowedDemand) and held.n_steps == steps and len(held.held) < steps // 5
    np.testing.assert_array_equal(held.first_active, full.first_active)
    np.testing.assert_array_equal(held.values, full.values[:, held.held])
    np.testing.assert_array_equal(input_features(held, norm_of(norm, [2, -1, 0, 1]), last=97),
                                  input_features(full, norm_of(norm, [2, -1, 0, 1]), last=97))
    with pytest.raises(ValueError, match="not held"):
        held.values_at(np.array([held.held[0] - 1]))
    with pytest.raises(ValueError, match="whole grid"):
        input_features(held, norm)


def norm_of(norm: Normaliser, rows: list[int]) -> Normaliser:
    """``norm``'s statistics of ``rows`` (-1: a user without history: mean 0, std 1, scale 1)."""
    pick = np.array(rows)

    def take(a: np.ndarray, fill: float) -> np.ndarray:
        return np.where((pick >= 0)[:, None], a[pick.clip(0)], np.float32(fill))

    return Normaliser(take(norm.log_mean, 0.0), take(norm.log_std, 1.0), take(norm.scale, 1.0))
