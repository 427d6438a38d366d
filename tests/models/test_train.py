"""Training, per-user clipping and early stopping, prediction (models/lightning_module.py, models/train.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from models.features import BUCKET, N_INPUTS
from models.lightning_module import StackedForecaster
from models.module import StackedLSTM
from models.train import TrainConfig, global_sample, holdout_pinball, predict, prior_model, train
from pipeline.schemas import DEMAND

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
DAYS = 4
FAST = TrainConfig(epochs=12, global_epochs=4, patience=4, chunk_steps=96, segment_steps=12, eval_chunk_steps=48,
                   eval_burn_in=48, val_days=0.5, min_history_days=1.0, progress_bar=False, checkpoint=False, accelerator="cpu")


def seasonal_demand(days: float = DAYS, extra: list[dict] | None = None) -> pa.Table:
    """Three users on the 5-minute grid:

    * ``pulse``: strongly seasonal: 8 cores for 30 minutes every 2 hours, else 0.5 (noise 5 %):
      the last value is wrong at every edge, the phase is predictable;
    * ``noisy``: Poisson requests around a daily sine;
    * ``late``: starts on the last day (too little history: the global model serves it).
    """
    rng = np.random.default_rng(0)
    steps = int(days * 288)
    t = np.arange(steps)
    pulse = np.where(t % 24 < 6, 8.0, 0.5) * rng.lognormal(0, 0.05, steps)
    noisy = rng.poisson(3 + 2 * np.sin(2 * np.pi * t / 288)).astype(float)
    rows = [{"user_id": "pulse", "ts": T0 + i * BUCKET, "requests": 2, "cpu_cores": pulse[i], "memory_gb": 2 * pulse[i], "gpus": 0.0}
            for i in range(steps)]
    rows += [{"user_id": "noisy", "ts": T0 + i * BUCKET, "requests": int(noisy[i]), "cpu_cores": noisy[i] / 2,
              "memory_gb": noisy[i], "gpus": 0.0} for i in range(steps)]
    rows += [{"user_id": "late", "ts": T0 + i * BUCKET, "requests": 1, "cpu_cores": 1.0, "memory_gb": 1.0, "gpus": 1.0}
             for i in range(steps - 200, steps)]
    return pa.Table.from_pylist(rows + (extra or []), schema=DEMAND)


@pytest.fixture(scope="module")
def trained():
    demand = seasonal_demand()
    cut = T0 + timedelta(days=DAYS - 0.5)  # the last half day is a test window train never sees
    before = demand.filter(pc.less(demand["ts"], pa.scalar(cut, demand.schema.field("ts").type)))
    return demand, cut, train(before, until=cut, config=FAST)


def test_training_beats_last_value_on_a_seasonal_user(trained):
    demand, cut, models = trained
    k = models.user_ids.index("pulse")
    m = models.metrics
    assert m.best_epoch[k] >= 0  # training improved on its start
    assert m.pinball[k, :3].sum() < 0.6 * m.last_value_pinball[k, :3].sum()
    test = holdout_pinball(models, demand, cut, T0 + timedelta(days=DAYS))
    last = holdout_pinball(models, demand, cut, T0 + timedelta(days=DAYS), prior_model(models.model))
    assert test[k, :3].sum() < 0.6 * last[k, :3].sum()  # on unseen data too
    assert np.nansum(test) < np.nansum(last)
    assert models.epochs_run[1] >= 1


def test_users_never_end_worse_than_their_prior_on_the_held_out_tail(trained):
    _, _, models = trained
    m = models.metrics
    ok = ~np.isnan(m.last_value_pinball)
    assert (m.pinball[ok] <= m.last_value_pinball[ok] + 1e-6).all()


def test_short_history_users_use_the_global_model(trained):
    _, _, models = trained
    k = models.user_ids.index("late")
    assert models.uses_global.tolist() == [u == "late" for u in models.user_ids]
    assert models.metrics.history_days[k] < FAST.min_history_days
    assert models.metrics.best_epoch[k] == -1
    # it is never run in the per-user stage: at most the two others, in every epoch run
    assert 1 <= models.user_epochs_run <= (len(models.user_ids) - 1) * models.epochs_run[1]


def test_predict_latest_origin(trained):
    demand, cut, models = trained
    fc = predict(models, demand, at=cut)
    assert fc.user_ids == models.user_ids and fc.issued_at == cut
    assert fc.quantiles.shape == (3, 6, 4, 7) and fc.quantiles.dtype == np.float32
    assert (fc.quantiles >= 0).all() and (np.diff(fc.quantiles, axis=-1) >= 0).all()
    # only data before `at` counts: spoil everything after it
    later = seasonal_demand(extra=[{"user_id": "pulse", "ts": cut + 10 * BUCKET, "requests": 0, "cpu_cores": 1e6,
                                    "memory_gb": 0.0, "gpus": 0.0}])
    np.testing.assert_array_equal(predict(models, later, at=cut).quantiles, fc.quantiles)
    # a user the models never saw gets the global model, flagged
    extra = [{"user_id": "new", "ts": cut - i * BUCKET, "requests": 1, "cpu_cores": 2.0, "memory_gb": 1.0, "gpus": 0.0}
             for i in range(1, 30)]
    fc2 = predict(models, seasonal_demand(extra=extra), at=cut)
    assert fc2.user_ids == models.user_ids + ["new"]
    assert fc2.uses_global.tolist() == [u in ("late", "new") for u in fc2.user_ids]
    assert np.isfinite(fc2.quantiles).all() and fc2.quantiles[-1, 0, 1, 3] > 0


def test_fine_tuning_from_a_previous_version(trained):
    demand, cut, models = trained
    before = demand.filter(pc.less(demand["ts"], pa.scalar(cut, demand.schema.field("ts").type)))
    again = train(before, until=cut, config=FAST.__class__(**{**FAST.__dict__, "epochs": 1, "global_epochs": 1}), previous=models)
    k = again.user_ids.index("pulse")
    # starting from the previous version, one epoch is already far better than the last value
    assert again.metrics.pinball[k, :3].sum() < 0.6 * again.metrics.last_value_pinball[k, :3].sum()


def test_a_previous_version_of_another_size_is_not_fine_tuned_from(trained, caplog):
    demand, cut, models = trained
    before = demand.filter(pc.less(demand["ts"], pa.scalar(cut, demand.schema.field("ts").type)))
    other = FAST.__class__(**{**FAST.__dict__, "epochs": 1, "global_epochs": 1, "hidden": FAST.hidden // 2})
    with caplog.at_level("WARNING", logger="models.train"):
        again = train(before, until=cut, config=other, previous=models)
    assert again.model.hidden == FAST.hidden // 2 and "training from the global model" in caplog.text


def test_cli_and_replay_defaults_follow_the_trainer():
    from pipeline.cli import TRAIN_EPOCHS, TRAIN_HIDDEN
    from scaler.evaluate import LstmForecastConfig

    assert (TRAIN_HIDDEN, TRAIN_EPOCHS) == (TrainConfig.hidden, TrainConfig.epochs)
    assert (LstmForecastConfig.hidden, LstmForecastConfig.epochs) == (TrainConfig.hidden, TrainConfig.epochs)


def test_edge_cases_all_zero_and_one_request_users_and_bad_values():
    zero = [{"user_id": "zero", "ts": T0 + i * BUCKET, "requests": 0, "cpu_cores": 0.0, "memory_gb": 0.0, "gpus": 0.0}
            for i in range(2 * 288)]
    once = [{"user_id": "once", "ts": T0 + 300 * BUCKET, "requests": 1, "cpu_cores": 0.5, "memory_gb": 0.25, "gpus": 0.0}]
    demand = seasonal_demand(days=2, extra=zero + once)
    cfg = FAST.__class__(**{**FAST.__dict__, "epochs": 2, "global_epochs": 1})
    models = train(demand, config=cfg)
    for k, u in enumerate(models.user_ids):
        assert np.isfinite(models.metrics.pinball[k]).all(), u
    fc = predict(models, demand)
    assert np.isfinite(fc.quantiles).all() and (fc.quantiles >= 0).all()
    z = fc.user_ids.index("zero")
    assert fc.quantiles[z].max() < 1e-3  # all zeros in, (almost) zero out
    bad = seasonal_demand(days=2, extra=[{"user_id": "broken", "ts": T0, "requests": 1, "cpu_cores": float("nan"),
                                          "memory_gb": 0.0, "gpus": 0.0}])
    with pytest.raises(ValueError, match="'broken'"):
        train(bad, config=cfg)
    with pytest.raises(ValueError, match="empty"):
        train(DEMAND.empty_table(), config=cfg)


def _task(n_users: int = 3, patience: int = 1) -> StackedForecaster:
    model = StackedLSTM(n_users, N_INPUTS, 8, seed=0)
    return StackedForecaster(model, lr=1e-2, weight_decay=0.0, clip_norm=1.0, patience=patience)


def test_per_user_gradient_clipping():
    task = _task()
    scales = [0.01, 10.0, 100.0]
    for p in task.model.parameters():
        p.grad = torch.ones_like(p) * torch.tensor(scales).view(-1, *[1] * (p.dim() - 1))
    before = [p.grad.clone() for p in task.model.parameters()]
    task.configure_gradient_clipping(None)
    norms = torch.sqrt(sum(p.grad.pow(2).flatten(1).sum(1) for p in task.model.parameters()))
    assert norms[1] == pytest.approx(1.0, rel=1e-4) and norms[2] == pytest.approx(1.0, rel=1e-4)
    for b, p in zip(before, task.model.parameters()):
        assert torch.equal(b[0], p.grad[0])  # a small gradient is left alone, whatever the others do


def test_early_stopping_masks_freeze_users_at_their_best():
    task = _task(patience=1)
    task.set_initial(torch.tensor([1.0, 1.0, 1.0]))
    best = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(1.0)
    task.update_best(torch.tensor([0.5, 2.0, 0.9]), epoch=0)  # users 0 and 2 improve; user 1 does not
    assert task.active.tolist() == [True, False, True]
    assert task.best_epoch.tolist() == [0, -1, 0]
    for n, p in task.model.named_parameters():
        torch.testing.assert_close(p[1], best[n][1])  # frozen user 1 is back at its best (initial) point
        torch.testing.assert_close(p[0], best[n][0] + 1.0)
    # a frozen user gets no gradient and stays put through optimiser steps
    opt = task.configure_optimizers()
    for _ in range(3):
        for p in task.model.parameters():
            p.grad = torch.ones_like(p)
        task.configure_gradient_clipping(opt)
        opt.step()
        task.on_train_batch_end(None, None, 0)
    for n, p in task.model.named_parameters():
        torch.testing.assert_close(p[1], best[n][1])
    # a training epoch counts the users it runs: the two still active
    task.on_train_epoch_start()
    assert task.user_epochs == 2
    task.update_best(torch.tensor([0.6, 0.1, 0.95]), epoch=1)  # no improvement for 0 and 2 -> all frozen
    assert not task.active.any()
    task.on_train_end()
    assert task.best_loss.tolist() == pytest.approx([0.5, 1.0, 0.9])


def test_predict_results_do_not_depend_on_user_blocks_or_threads(trained):
    demand, cut, models = trained
    ref = predict(models, demand, at=cut, users=["late", "pulse", "nobody", "noisy"])
    for block_users, threads in ((1, 1), (3, 2), (256, None)):
        fc = predict(models, demand, at=cut, users=["late", "pulse", "nobody", "noisy"], block_users=block_users, threads=threads)
        # equal up to float32 rounding: a different thread count may sum a matrix product in another
        # order (seen on some CPUs: differences of 1e-7 relative); a wrong user row differs by far more
        np.testing.assert_allclose(fc.quantiles, ref.quantiles, rtol=1e-5, atol=1e-6)
        assert fc.user_ids == ref.user_ids and fc.uses_global.tolist() == ref.uses_global.tolist()
    assert ref.uses_global.tolist() == [True, False, True, False]


def test_global_sample_caps_the_users_the_global_model_trains_on():
    assert global_sample(5, TrainConfig(global_max_users=None)).tolist() == [0, 1, 2, 3, 4]
    assert global_sample(5, TrainConfig(global_max_users=5)).tolist() == [0, 1, 2, 3, 4]
    rows = global_sample(5000, TrainConfig(global_max_users=100, seed=3))
    assert len(rows) == len(set(rows.tolist())) == 100 and (np.diff(rows) > 0).all() and rows.max() < 5000
    assert rows.max() - rows.min() > 2500  # spread over the population, not its first rows
    assert global_sample(5000, TrainConfig(global_max_users=100, seed=3)).tolist() == rows.tolist()  # seeded
    with pytest.raises(ValueError, match="global_max_users"):
        global_sample(5, TrainConfig(global_max_users=0))


def test_global_model_trains_on_the_sample_only(monkeypatch):
    import models.train as mt

    seen = []
    real = mt.training_batches

    def spy(data, config, pooled):
        if pooled:
            seen.append(data.features.shape[0])
        return real(data, config, pooled)

    monkeypatch.setattr(mt, "training_batches", spy)
    demand = seasonal_demand(days=2)
    cfg = FAST.__class__(**{**FAST.__dict__, "epochs": 1, "global_epochs": 1, "global_max_users": 2})
    models = train(demand, config=cfg)
    assert seen == [2] and len(models.user_ids) == 3  # the global model saw 2 users; every user still has a row
    assert np.isfinite(models.metrics.global_pinball).any()


def test_gpu_benchmark_runs_small_on_any_machine():
    """benchmarks/train_gpu.py (the prepared H200 check) at a smoke size: shards, the
    prefetched data, the figures it prints; ``meets_target`` only at the issue's full size."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_train_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--users", "40", "--days", "3", "--epochs", "1", "--global-epochs", "1", "--shard-users", "24",
                      "--hidden", "8", "--accelerator", "cpu"])
    assert [s["users"] for s in out["sizes"]["shards"]] == [24, 16]
    assert out["meets_target"] is None and out["value"] > 0 and out["us_per_user_step"] > 0
    assert 0 < out["heldout_pinball_over_last_value"] < 2 and out["data_on_device"] is False
    dense = bench.synthetic_dense(0, 50, 3, seed=0)
    assert dense.values.shape == (50, 3 * 288, 4) and (dense.values >= 0).all()
    before = np.arange(3 * 288)[None, :] < dense.first_active[:, None]  # [50, T]: no demand before a user starts
    assert before.any() and (dense.values[before] == 0).all()
