"""Post-hoc quantile recalibration (models/calibration.py): fitted on training's held-out tail only."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from models import calibration
from models.calibration import (SHIFT_GRID, SPREAD_GRID, WIDEN_GRID, _blocks, _choose, _masked, _pinball_sums, apply_calibration, apply_regimes,
                                calibrated, fit_calibration, fit_zero_mass, head_quantiles, regimes, zero_brackets, zero_mass)
from models.features import BUCKET, N_INPUTS, ChunkBatches, dense_demand
from models.module import StackedLSTM, pinball
from models.persist import load_trained, save_trained
from models.train import TrainConfig, predict, prepare_data, train, training_batches
from pipeline.schemas import DEMAND, P_ZERO_HIGH, P_ZERO_LOW
from pipeline.storage import open_location

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
CFG = TrainConfig(hidden=8, epochs=0, global_epochs=0, chunk_steps=96, eval_chunk_steps=48, eval_burn_in=12, val_days=1.0,
                  min_history_days=1.0, checkpoint=False, accelerator="cpu")


def noise_demand(days: float = 3.0, users: int = 4, seed: int = 0) -> pa.Table:
    """``users`` users whose demand is i.i.d. around a per-user level (so every window is alike)."""
    rng = np.random.default_rng(seed)
    steps = int(days * 288)
    ts = T0 + np.arange(steps) * BUCKET
    cols: dict[str, list] = {k: [] for k in DEMAND.names}
    for u in range(users):
        level = 5.0 * (u + 1)
        cpu = np.maximum(level + rng.normal(0, level / 5, steps), 0)
        cols["user_id"] += [f"u{u}"] * steps
        cols["ts"] += list(ts)
        cols["requests"] += list(rng.poisson(level, steps))
        cols["cpu_cores"] += list(cpu)
        cols["memory_gb"] += list(2 * cpu)
        cols["gpus"] += list(np.where(rng.random(steps) < 0.5, 1.0, 0.0))
    return pa.table(cols, schema=DEMAND)


def idle_and_busy() -> tuple:
    """Two busy users (:func:`noise_demand`) and one always idle whose prior quantiles sit a little
    above 0 (3 % of its floored scale): ``(dense, data, index of the idle user, prior)``."""
    demand = noise_demand(users=2)
    idle = pa.table({"user_id": ["idle"] * 864, "ts": pa.array(T0 + np.arange(864) * BUCKET, DEMAND.field("ts").type),
                     "requests": [0] * 864, "cpu_cores": [0.0] * 864, "memory_gb": [0.0] * 864, "gpus": [0.0] * 864}, schema=DEMAND)
    dense = dense_demand(pa.concat_tables([demand, idle]), T0, T0 + timedelta(days=3))
    data = prepare_data(dense, CFG)
    k = dense.user_ids.index("idle")
    prior = data.prior.clone()
    prior[k] += 0.03
    return dense, data, k, prior


def _coverage_and_loss(model: StackedLSTM, batches: ChunkBatches, recalibrate: bool) -> tuple[float, float, float]:
    """(share in [q05, q95], share in [q10, q90]: of the continuous resources cpu_cores and memory_gb,
    mean pinball: of all four) over the scored points of ``batches``."""
    inside90 = inside80 = loss = count = 0.0
    tau = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
    for b, q in head_quantiles(model, batches):
        if recalibrate:
            q = calibrated(model, q, b["last"])
        assert (q.diff(dim=-1) >= 0).all()  # never crossing
        q = q.clamp_min(0)
        y, w = b["target"], b["weight"][..., None]
        c = slice(1, 3)
        inside90 += (((q[..., c, 0] <= y[..., c]) & (y[..., c] <= q[..., c, 6])) * w).sum().item()
        inside80 += (((q[..., c, 1] <= y[..., c]) & (y[..., c] <= q[..., c, 5])) * w).sum().item()
        u = y[..., None] - q
        loss += (torch.maximum(tau * u, (tau - 1) * u).mean(-1) * w).sum().item()
        count += w.expand_as(y).sum().item()
    return 4 * inside90 / (2 * count), 4 * inside80 / (2 * count), loss / count


@pytest.mark.parametrize("widen", [3.0, 0.3])
def test_calibration_moves_coverage_towards_nominal_out_of_sample(widen):
    """A model whose quantiles are 3x too wide (or 0.3x too narrow) is recalibrated on the tail;
    on other (i.i.d., unseen by the fit) origins its coverage and pinball loss improve."""
    dense = dense_demand(noise_demand(), T0, T0 + timedelta(days=3))
    data = prepare_data(dense, CFG)
    mid = data.prior[..., 3:4]
    model = StackedLSTM(dense.n_users, N_INPUTS, 8, prior=mid + widen * (data.prior - mid), seed=0)
    train_b, val_b = training_batches(data, CFG, pooled=False)
    other = ChunkBatches(data.features, data.scaled, data.first_active, origin_lo=288, origin_hi=data.train_end - 7,
                         target_end=data.train_end, chunk_steps=96, segment_steps=48, burn_in=12)
    cov90_0, cov80_0, loss_0 = _coverage_and_loss(model, other, recalibrate=False)
    fit = fit_calibration(model, val_b, prior_points=50.0)
    cov90_1, cov80_1, loss_1 = _coverage_and_loss(model, other, recalibrate=True)
    assert abs(cov90_0 - 0.9) > 0.05 and abs(cov80_0 - 0.8) > 0.05  # miscalibrated to begin with
    assert abs(cov90_1 - 0.9) < 0.04 and abs(cov80_1 - 0.8) < 0.05
    assert loss_1 < 0.97 * loss_0 and fit.loss_after < fit.loss_before
    assert torch.equal(model.cal_shift, fit.shift) and torch.equal(model.cal_spread, fit.spread) and torch.equal(model.cal_floor, fit.floor)
    assert (model.cal_spread[..., 3] == 1).all()


def test_apply_keeps_quantiles_sorted_and_the_identity_exact():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 2, 6, 4, 7, generator=gen).sort(dim=-1).values
    assert apply_calibration(q, torch.zeros(5, 6, 4), torch.ones(5, 6, 4, 7)) is q
    spreads = torch.tensor(SPREAD_GRID)[torch.randint(len(SPREAD_GRID), (5, 6, 4, 7), generator=gen)]
    shifts = torch.tensor(SHIFT_GRID)[torch.randint(len(SHIFT_GRID), (5, 6, 4), generator=gen)]
    out = apply_calibration(q, shifts, spreads)
    assert out.shape == q.shape and (out.diff(dim=-1) >= 0).all() and not torch.equal(out, q)
    # one user's parameters move only that user's forecasts; the median moves by shift · IQR
    spreads[1], shifts[1] = 1.0, 0.25
    out = apply_calibration(q, shifts, spreads)
    torch.testing.assert_close(out[1], q[1] + 0.25 * (q[1, ..., 4:5] - q[1, ..., 2:3]))


def test_users_with_few_tail_points_take_the_pooled_choice():
    # 3 grid values, identity at 1; users 0-2 have many points and prefer value 2, user 3 prefers 0 on 2 points
    sums = torch.tensor([[3.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    count = torch.tensor([100.0, 100.0, 100.0, 2.0])
    assert _choose(sums * count, count, 1, prior_points=50.0).tolist() == [2, 2, 2, 2]
    assert _choose(sums * count, count, 1, prior_points=0.0).tolist() == [2, 2, 2, 0]
    # no tail points at all: the pooled choice; a flat loss keeps the identity
    assert _choose(sums * torch.tensor([100.0, 100, 100, 0]), torch.tensor([100.0, 100, 100, 0]), 1, 50.0)[3] == 2
    assert _choose(torch.ones(3, 2, dtype=torch.float64), torch.ones(2), 1, 10.0).tolist() == [1, 1]
    # a user with no loss at its identity (user 3: 0 forecasts of 0 demand) keeps it against the pooled choice
    perfect = (sums * count).clone()
    perfect[:, 3] = torch.tensor([0.3, 0.0, 0.2])
    assert _choose(perfect, count, 1, prior_points=50.0).tolist() == [2, 2, 2, 1]


def test_train_fits_the_calibration_on_its_window_only_and_it_survives_the_store(tmp_path):
    demand = noise_demand(days=3.5)
    cut = T0 + timedelta(days=3)
    ts_type = demand.schema.field("ts").type
    after = pc.greater_equal(demand["ts"], pa.scalar(cut, ts_type)).to_numpy(zero_copy_only=False)
    in_tail = (pc.greater_equal(demand["ts"], pa.scalar(cut - timedelta(hours=6), ts_type)).to_numpy(zero_copy_only=False)) & ~after

    def spoil(mask: np.ndarray) -> pa.Table:
        cpu = demand["cpu_cores"].to_numpy()
        return demand.set_column(demand.schema.get_field_index("cpu_cores"), "cpu_cores", pa.array(np.where(mask, cpu * 4 + 20, cpu)))

    trained = train(demand, until=cut, config=CFG)
    assert trained.config.calibrate and trained.calibration_loss[1] < trained.calibration_loss[0]
    assert (trained.model.cal_spread != 1).any()  # the prior's spread is not optimal for every user
    g = trained.global_model  # recalibrated too, on the pooled tails: it forecasts the users without a model
    assert (g.cal_spread != 1).any() or (g.cal_shift != 0).any() or (g.cal_floor != 0).any()
    again = train(spoil(after), until=cut, config=CFG)  # data after the training window: no effect
    torch.testing.assert_close(again.model.cal_spread, trained.model.cal_spread, rtol=0, atol=0)
    torch.testing.assert_close(again.model.cal_shift, trained.model.cal_shift, rtol=0, atol=0)
    torch.testing.assert_close(again.global_model.cal_spread, g.cal_spread, rtol=0, atol=0)
    changed = train(spoil(in_tail), until=cut, config=CFG)  # data in the held-out tail: it is fitted there
    assert not torch.equal(changed.model.cal_spread, trained.model.cal_spread)
    off = train(demand, until=cut, config=dataclasses.replace(CFG, calibrate=False))
    for m in (off.model, off.global_model):
        assert (m.cal_spread == 1).all() and (m.cal_shift == 0).all() and (m.cal_floor == 0).all() and (m.cal_zero == 0).all()
        assert (m.cal_widen == 0).all()
    assert off.calibration_loss is None
    assert not np.array_equal(predict(off, demand, cut).quantiles, predict(trained, demand, cut).quantiles)

    lake = open_location(str(tmp_path / "lake"))
    _, loaded = load_trained(lake, save_trained(lake, trained))
    for name in ("cal_shift", "cal_spread", "cal_floor", "cal_zero", "cal_widen"):
        assert torch.equal(getattr(loaded.model, name), getattr(trained.model, name))
        assert torch.equal(getattr(loaded.global_model, name), getattr(g, name))
    assert (trained.model.cal_zero > 0).any()  # gpus are 0 half of the time: somewhere above the knots' own level
    np.testing.assert_array_equal(predict(loaded, demand, cut).quantiles, predict(trained, demand, cut).quantiles)
    np.testing.assert_array_equal(predict(loaded, demand, cut).p_zero, predict(trained, demand, cut).p_zero)
    # a version saved before recalibration existed (no such weights) loads as the identity
    weights = {k: v for k, v in trained.model.get_all().items() if not k.startswith("cal_")}
    old = StackedLSTM.from_weights(weights)
    assert (old.cal_spread == 1).all() and (old.cal_shift == 0).all() and (old.cal_floor == 0).all() and (old.cal_zero == 0).all()
    assert (old.cal_widen == 0).all()  # and one saved before the outward step: no step
    before_widen = StackedLSTM.from_weights({k: v for k, v in trained.model.get_all().items() if k != "cal_widen"})
    assert (before_widen.cal_widen == 0).all() and torch.equal(before_widen.cal_spread, trained.model.cal_spread)


def test_an_idle_users_small_positive_quantiles_snap_to_zero():
    """Demand exactly 0 with quantiles a little above 0: every bucket falls below the interval at
    a tiny pinball cost. The fitted floor sends them to 0 (and leaves the busy users alone)."""
    dense, data, k, prior = idle_and_busy()  # scaled units: 3 % of the idle user's (floored) scale
    model = StackedLSTM(dense.n_users, N_INPUTS, 8, prior=prior, seed=0)
    _, val_b = training_batches(data, CFG, pooled=False)
    fit_calibration(model, val_b, prior_points=1.0)  # the floor is off by default
    assert (model.cal_floor == 0).all()
    fit_calibration(model, val_b, prior_points=1.0, floor=True)  # each user on its own evidence
    assert (model.cal_floor[k, 0] > 0.03).all()  # its idle regime: every one of its points (never active: no point in the other)
    b, q = next(head_quantiles(model, val_b))
    busy = [i for i in range(dense.n_users) if i != k]
    no_floor = apply_regimes(q, regimes(b["last"]), model.cal_shift, model.cal_spread, None, model.cal_widen)
    assert (q[k] > 0).all() and (calibrated(model, q, b["last"])[k] == 0).all()
    moved = calibrated(model, q, b["last"])[busy] != no_floor[busy].clamp_min(0)
    # a busy user's forecasts are (almost) never below the floor; its 0/1 GPU demand's low quantiles
    # lie near 0, where the outward step of a level (cal_widen, fitted after the floor) can cross it
    assert moved.float().mean() < 0.02 and moved[..., 1:3, :].float().mean() < 0.01
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 10, 6, 4, 7, generator=gen).sort(dim=-1).values
    out = apply_calibration(q, torch.zeros(3, 6, 4), torch.ones(3, 6, 4, 7), torch.rand(3, 6, 4, generator=gen))
    assert (out.diff(dim=-1) >= 0).all() and (out == 0).any() and ((out == 0) | (out == q)).all()


def test_zero_mass_by_hand():
    # one horizon/resource cell that matters, bracket 1 (q05 = 0 < q10: P(0) in [0.05, 0.10]) and 3 ([0.25, 0.5])
    zeros, points = torch.zeros(2, 6, 4, 8), torch.zeros(2, 6, 4, 8)
    zeros[0, 0, 0, 1], points[0, 0, 0, 1] = 40, 100  # user 0: 40 % zeros, pooled (40 + 5) / 200 = 22.5 %
    zeros[1, 0, 0, 1], points[1, 0, 0, 1] = 5, 100  # user 1: 5 %
    zeros[0, 0, 0, 3], points[0, 0, 0, 3] = 30, 100  # only user 0 in bracket 3
    frac = fit_zero_mass(zeros, points, prior_points=100.0)
    # user 0: (40 + 100 · 0.225) / 200 = 0.3125 -> above 0.10: the bracket's top; user 1: (5 + 22.5) / 200 = 0.1375 -> top too
    assert frac[0, 0, 0, 1] == 1.0 and frac[1, 0, 0, 1] == 1.0
    # bracket 3: user 0 (30 + 100 · 0.3) / 200 = 0.3 -> (0.3 - 0.25) / 0.25 = 0.2; user 1 has no point there: the pooled 0.3 too
    torch.testing.assert_close(frac[:, 0, 0, 3], torch.tensor([0.2, 0.2]))
    assert (frac[:, 1:] == 0).all() and (frac[:, 0, 1:] == 0).all()  # no tail point: the knots' own level
    assert fit_zero_mass(zeros, points, prior_points=0.0)[1, 0, 0, 1] == 0.0  # 5 % alone: below the bracket, its low end
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]).expand(6, 4, 2, 7).permute(2, 0, 1, 3)
    p = zero_mass(q[:, None], frac)  # [U, 1, 6, 4]
    torch.testing.assert_close(p[:, 0, 0, 0], torch.tensor([0.3, 0.10]))
    assert p[1, 0, 0, 1] == pytest.approx(0.05)  # frac 0: the level of the highest zero quantile


def test_zero_mass_fit_counts_the_tails_zeros_per_bracket():
    """The vectorised fit against a plain count over the recalibrated tail, point by point."""
    demand = noise_demand(users=3)
    dense = dense_demand(demand, T0, T0 + timedelta(days=3))
    data = prepare_data(dense, CFG)
    model = StackedLSTM(dense.n_users, N_INPUTS, 8, prior=data.prior, seed=0)
    _, val_b = training_batches(data, CFG, pooled=False)
    fit = fit_calibration(model, val_b, prior_points=20.0, floor=True, block_points=500)
    assert torch.equal(model.cal_zero, fit.zero)
    zeros, points = torch.zeros(3, 6, 4, 8), torch.zeros(3, 6, 4, 8)
    for b, q in head_quantiles(model, val_b):
        q = calibrated(model, q, b["last"])
        for u in range(3):
            for h in range(6):
                for r in range(4):
                    w, y, qq = b["weight"][u, ..., h].reshape(-1), b["target"][u, ..., h, r].reshape(-1), q[u, ..., h, r, :].reshape(-1, 7)
                    for i in torch.nonzero(w).ravel().tolist():
                        m = int((qq[i] <= 0).sum())
                        points[u, h, r, m] += 1
                        zeros[u, h, r, m] += float(y[i] <= 0)
    assert points[..., 1:7].sum() > 0 and zeros.sum() > 0  # brackets between the ends occur, and zeros
    torch.testing.assert_close(model.cal_zero, fit_zero_mass(zeros, points, 20.0))
    b, q = next(head_quantiles(model, val_b))
    p = zero_mass(calibrated(model, q, b["last"]), model.cal_zero)
    lo, hi = (torch.tensor(v)[zero_brackets(calibrated(model, q, b["last"]))] for v in (P_ZERO_LOW, P_ZERO_HIGH))
    assert ((p >= lo - 1e-6) & (p <= hi + 1e-6)).all()


def test_grid_loss_sums_equal_the_textbook_pinball_and_unscored_points_count_nothing():
    """The fast form of the grid's loss sums (masked points set to 0, ``max(p, y) − τ·max(p, 0)
    − (1 − τ)·y``) gives Σ w · pinball(y, max(q, 0)) of the plain definition."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 40, 6, 4, 7, generator=g).sort(-1).values
    y = torch.where(torch.rand(5, 40, 6, 4, generator=g) < 0.5, 0.0, torch.rand(5, 40, 6, 4, generator=g) * 3)
    w = (torch.rand(5, 40, 6, generator=g) < 0.7).float()
    tau = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
    textbook = (pinball(q.clamp_min(0).double(), y.double()) * w[..., None, None]).sum(1)
    qm, ym = _masked(q, y, w)
    assert torch.allclose(_pinball_sums(qm, ym, tau), textbook, rtol=1e-5, atol=1e-5)
    assert torch.allclose(_pinball_sums(qm.clone(), ym, tau, consume=True), textbook, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="0/1 weights"):
        _masked(q, y, w * 0.5)
    with pytest.raises(ValueError, match="negative"):
        _masked(q, y - 1.0, torch.ones_like(w))


def test_the_global_models_pooled_tail_is_fitted_in_pieces_with_the_same_result():
    """One "user" with a long pooled tail is cut into blocks of origins: the fit is the one of a
    single block holding everything (up to float32 summation order, which can flip a choice
    between two grid values of equal loss)."""
    demand = noise_demand(days=3.0, users=6)
    dense = dense_demand(demand, T0, T0 + timedelta(days=3))
    data = prepare_data(dense, CFG)
    _, val_b = training_batches(data, CFG, pooled=True)
    model = StackedLSTM(1, N_INPUTS, CFG.hidden, prior=data.prior.median(dim=0).values[None], seed=0)
    whole = fit_calibration(model, val_b, prior_points=10.0, floor=True, block_points=1 << 30)
    pieces = fit_calibration(model, val_b, prior_points=10.0, floor=True, block_points=500)
    for name in ("shift", "spread", "floor"):
        assert (getattr(whole, name) == getattr(pieces, name)).float().mean() >= 0.97, name
    assert pieces.loss_before == pytest.approx(whole.loss_before, rel=1e-6)
    assert pieces.loss_after == pytest.approx(whole.loss_after, rel=1e-6)
    assert pieces.loss_after <= pieces.loss_before
    assert list(_blocks(3, 0, 500)) == []  # an empty tail: no block (and no zero range step)


def test_widen_moves_levels_outwards_by_hand_and_the_identity_is_exact():
    q = torch.tensor([0.1, 0.2, 0.4, 1.0, 1.5, 2.0, 2.5]).expand(1, 6, 4, 7).clone()
    zeros, ones = torch.zeros(1, 6, 4), torch.ones(1, 6, 4, 7)
    assert apply_calibration(q, zeros, ones, None, torch.zeros(1, 6, 4, 7)) is q
    widen = torch.tensor([0.3, 0.05, 0.0, 0.0, 0.0, 0.1, 0.2]).expand(1, 6, 4, 7)
    out = apply_calibration(q, zeros, ones, None, widen)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.15, 0.4, 1.0, 1.5, 2.1, 2.7]))  # q05 clipped at 0
    # a larger step on a higher lower level re-sorts: q10 − 0.5 < q05 − 0
    out = apply_calibration(q, zeros, ones, None, torch.tensor([0.0, 0.5, 0, 0, 0, 0, 0]).expand(1, 6, 4, 7))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.1, 0.4, 1.0, 1.5, 2.0, 2.5]))


def test_widen_fit_is_each_levels_best_grid_step_by_a_plain_sum():
    """With no shrinkage (``prior_points=0``) each user's step per regime, horizon, resource and level
    is the grid value with the lowest plain Σ pinball over the regime's scored tail origins (ties: no
    step); an idle user's 0 forecasts stay 0."""
    dense, data, k, prior = idle_and_busy()
    model = StackedLSTM(dense.n_users, N_INPUTS, 8, prior=prior, seed=0)
    _, val_b = training_batches(data, CFG, pooled=False)
    fit = fit_calibration(model, val_b, prior_points=0.0, floor=True, block_points=100)  # blocks cut through users' tails
    assert torch.equal(model.cal_widen, fit.widen) and (model.cal_widen[..., 3] == 0).all()
    assert (model.cal_widen[k] == 0).all() and (model.cal_widen > 0).any()
    tau = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], dtype=torch.float64)
    sign = torch.sign(tau - 0.5)
    grid = torch.tensor(WIDEN_GRID, dtype=torch.float64)
    loss = torch.zeros(len(grid), dense.n_users, 2, 6, 4, 7, dtype=torch.float64)  # per regime
    for b, q in head_quantiles(model, val_b):
        regime = regimes(b["last"])
        qf = apply_regimes(q, regime, model.cal_shift, model.cal_spread, model.cal_floor).double()
        y = b["target"].double()[..., None]
        for r in range(2):
            w = (b["weight"] * (regime == r)[..., None]).double()[..., None, None]  # [U, K, C, 6, 1, 1]
            for g, a in enumerate(grid):
                u = y - (qf + a * sign).clamp_min(0)
                loss[g, :, r] += (torch.maximum(tau * u, (tau - 1) * u) * w).sum((1, 2))
    best = torch.where(loss.min(0).values < loss[0] * (1 - 1e-6), loss.argmin(0), 0)
    agree = grid.float()[best] == model.cal_widen
    assert agree.float().mean() >= 0.97  # float32 sums can flip a choice between two steps of (almost) equal loss
    assert fit.loss_after < fit.loss_before


def test_each_origin_takes_its_regimes_parameters_by_its_last_requests():
    q = torch.tensor([0.0, 0.1, 0.3, 1.0, 1.5, 2.0, 2.5]).expand(2, 3, 6, 4, 7).clone()  # [U, N, 6, 4, 7]
    last = torch.zeros(2, 3, 4)
    last[0, 1, 0] = 2.0  # user 0, origin 1: requests above 0 -> active
    last[1, 2, 1] = 5.0  # user 1, origin 2: cpu but no requests -> idle
    regime = regimes(last)
    assert regime.tolist() == [[0, 1, 0], [0, 0, 0]]
    shift, spread, floor, widen = torch.zeros(2, 2, 6, 4), torch.ones(2, 2, 6, 4, 7), torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 6, 4, 7)
    widen[:, 1, ..., 6] = 0.5  # active: q95 up by 0.5
    floor[:, 0] = 0.2  # idle: quantiles below 0.2 to 0
    out = apply_regimes(q, regime, shift, spread, floor, widen)
    torch.testing.assert_close(out[0, 1, 0, 0], torch.tensor([0.0, 0.1, 0.3, 1.0, 1.5, 2.0, 3.0]))
    for u, n in ((0, 0), (0, 2), (1, 0), (1, 1), (1, 2)):
        torch.testing.assert_close(out[u, n, 0, 0], torch.tensor([0.0, 0.0, 0.3, 1.0, 1.5, 2.0, 2.5]))


def on_off_demand(days: float = 3.0, users: int = 3, seed: int = 0) -> pa.Table:
    """Users idle (all demand 0) for about 4 hours at a time and active for about one; while active
    their demand jumps around a level with a long upper tail, so the next bucket's spread differs by
    far between an idle and an active origin (and idle origins are the most)."""
    rng = np.random.default_rng(seed)
    steps = int(days * 288)
    ts = T0 + np.arange(steps) * BUCKET
    cols: dict[str, list] = {k: [] for k in DEMAND.names}
    for u in range(users):
        on = np.zeros(steps, bool)
        t, state = 0, False
        while t < steps:
            n = int(rng.geometric(1 / (12 if state else 48)))
            on[t : t + n] = state
            t, state = t + n, not state
        level = 10.0 * (u + 1)
        req = np.where(on, np.round(level * rng.lognormal(0.0, 1.0, steps)), 0.0)
        cols["user_id"] += [f"u{u}"] * steps
        cols["ts"] += list(ts)
        cols["requests"] += req.astype(int).tolist()
        cols["cpu_cores"] += list(req / 4)
        cols["memory_gb"] += list(req / 2)
        cols["gpus"] += [0.0] * steps
    return pa.table(cols, schema=DEMAND)


def test_each_regime_is_fitted_on_its_own_origins_and_beats_one_fit_for_both(monkeypatch):
    """Idle and active origins want different recalibrations: fitted per regime, the pinball loss
    on unseen origins is lower than with one fit for both (regimes() forced to one regime), and the
    active origins' q90 is exceeded closer to 10 % of the time."""
    dense = dense_demand(on_off_demand(), T0, T0 + timedelta(days=3))
    data = prepare_data(dense, CFG)
    model = StackedLSTM(dense.n_users, N_INPUTS, 8, prior=data.prior, seed=0)
    _, val_b = training_batches(data, CFG, pooled=False)
    other = ChunkBatches(data.features, data.scaled, data.first_active, origin_lo=288, origin_hi=data.train_end - 7,
                         target_end=data.train_end, chunk_steps=96, segment_steps=48, burn_in=12)

    def score() -> tuple[float, float]:
        """(mean pinball, share of active scored points above q90) on ``other``."""
        tau = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
        loss = count = above = active = 0.0
        for b, q in head_quantiles(model, other):
            q = calibrated(model, q, b["last"]).clamp_min(0)
            y, w = b["target"], b["weight"][..., None]
            u = y[..., None] - q
            loss += (torch.maximum(tau * u, (tau - 1) * u).mean(-1) * w).sum().item()
            count += w.expand_as(y).sum().item()
            on = (w * (b["last"][..., None, :1] > 0)).expand_as(y)[..., :3]  # requests, cpu, memory
            above += ((y[..., :3] > q[..., :3, 5]) * on).sum().item()
            active += on.sum().item()
        return loss / count, above / active

    fit_calibration(model, val_b, prior_points=20.0, floor=True)
    split_loss, split_above = score()
    assert not torch.equal(model.cal_spread[:, 0], model.cal_spread[:, 1])  # the regimes were fitted apart
    with monkeypatch.context() as m:
        m.setattr(calibration, "regimes", lambda last: torch.zeros(last.shape[:-1], dtype=torch.long))
        fit_calibration(model, val_b, prior_points=20.0, floor=True)
        one_loss, one_above = score()
    assert split_loss < 0.98 * one_loss
    assert abs(split_above - 0.1) < abs(one_above - 0.1)


def test_a_version_saved_before_the_regimes_loads_with_one_fit_for_both():
    model = StackedLSTM(3, N_INPUTS, 8, seed=0)
    gen = torch.Generator().manual_seed(0)
    for name in ("cal_shift", "cal_spread", "cal_floor", "cal_widen"):
        getattr(model, name).copy_(torch.rand(getattr(model, name).shape, generator=gen))
    old = {k: (v[:, 0] if k in ("cal_shift", "cal_spread", "cal_floor", "cal_widen") else v) for k, v in model.get_all().items()}
    loaded = StackedLSTM.from_weights(old)
    for name in ("cal_shift", "cal_spread", "cal_floor", "cal_widen"):
        assert getattr(loaded, name).shape == getattr(model, name).shape
        assert torch.equal(getattr(loaded, name)[:, 0], old[name]) and torch.equal(getattr(loaded, name)[:, 1], old[name])
    row = {k: v[1] for k, v in old.items()}  # one user's export of that time
    fresh = StackedLSTM(3, N_INPUTS, 8, seed=1)
    fresh.set_user(2, row)
    assert torch.equal(fresh.cal_widen[2, 1], old["cal_widen"][1]) and torch.equal(fresh.cal_shift[2, 0], old["cal_shift"][1])
    with pytest.raises(ValueError, match="cal_spread"):
        fresh.set_user(0, row | {"cal_spread": torch.ones(5, 4, 7)})
