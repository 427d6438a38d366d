"""The stacked per-user LSTM (models/module.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.module import (MIN_SPREAD, N_OUTPUTS, StackedLSTM, _LSTMRecurrence, head_bias_from_quantiles, pinball,
                           quantiles_from_head, recurrence_no_grad)

U, S, C, F, H = 4, 9, 3, 6, 8


def trained_like(model: StackedLSTM, seed: int = 0) -> StackedLSTM:
    """Give the zero-initialised head random weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.w_out.copy_(torch.randn(model.w_out.shape, generator=gen) * 0.3)
        model.b_out.copy_(torch.randn(model.b_out.shape, generator=gen))
    return model


def inputs(burn_in: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(U, S, C, F, generator=gen), torch.rand(U, S - burn_in, C, 4, generator=gen) * 5


def test_forward_shapes_and_validation():
    model = StackedLSTM(U, F, H, seed=0)
    x, last = inputs()
    q = model(x, last, burn_in=2)
    assert q.shape == (U, S - 2, C, 6, 4, 7)
    h, (h_t, c_t) = model.hidden_states(x, 2)
    assert h.shape == (U, (S - 2) * C, H) and h_t.shape == c_t.shape == (U, C, H)
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(U + 1, S, C, F), last)
    with pytest.raises(ValueError, match="burn_in"):
        model(x, last, burn_in=S)
    assert sum(p.numel() for p in model.parameters()) == U * (F * 4 * H + H * 4 * H + 4 * H + H * N_OUTPUTS + N_OUTPUTS)


def test_untrained_model_is_the_last_value_forecast():
    x, last = inputs()
    q = StackedLSTM(U, F, H, seed=0)(x, last, burn_in=2)
    median = q[..., 3]
    torch.testing.assert_close(median, last[..., None, :].expand_as(median), rtol=0, atol=1e-6)  # the last value
    spread = q - last[..., None, :, None]
    assert spread.abs().max() <= 3 * MIN_SPREAD * 1.01  # and a negligible spread around it
    prior = torch.sort(torch.randn(U, 6, 4, 7), dim=-1).values
    prior[..., 1:] += torch.arange(1, 7) * 0.01  # distinct levels: gaps above MIN_SPREAD
    with_prior = StackedLSTM(U, F, H, prior=prior, seed=0)(x, last, burn_in=2)
    expect = last[..., None, :, None] + prior[:, None, None]
    torch.testing.assert_close(with_prior, expect, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 50.0), seed=st.integers(0, 10_000))
def test_quantiles_never_cross(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(5, 6, 4, 7, generator=gen) * scale
    last = torch.randn(5, 4, generator=gen) * scale
    q = quantiles_from_head(raw, last)
    assert (q.diff(dim=-1) >= 0).all()
    assert torch.isfinite(q).all()


def test_head_bias_round_trip():
    prior = torch.sort(torch.randn(2, 6, 4, 7), dim=-1).values + torch.arange(7) * 0.1
    q = quantiles_from_head(head_bias_from_quantiles(prior).view(2, 6, 4, 7), torch.zeros(2, 4))
    torch.testing.assert_close(q, prior, rtol=1e-5, atol=1e-5)


def test_users_are_separable():
    model = trained_like(StackedLSTM(U, F, H, seed=0))
    x, last = inputs()
    before = model(x, last, 2).detach()
    k = 2
    with torch.no_grad():
        for p in model.parameters():
            p[k] += 0.5
    after = model(x, last, 2).detach()
    changed = (after - before).abs().flatten(1).amax(1) > 1e-6
    assert changed.tolist() == [u == k for u in range(U)]
    # gradients are separable too: user k's loss moves only user k's rows
    model.zero_grad()
    model(x, last, 2)[k].sum().backward()
    for p in model.parameters():
        norms = p.grad.flatten(1).abs().sum(1)
        assert norms[k] > 0 and (norms[torch.arange(U) != k] == 0).all()


def test_export_and_import_one_user():
    src = trained_like(StackedLSTM(U, F, H, seed=0), seed=3)
    src.scale.fill_(2.0)
    dst = StackedLSTM(3, F, H, seed=9)
    x, last = inputs()
    dst.set_user(1, src.get_user(2))
    torch.testing.assert_close(dst(x[[0, 2, 1]], last[[0, 2, 1]], 2)[1], src(x, last, 2)[2])
    assert dst.scale[1].tolist() == [2.0] * 4 and dst.scale[0].tolist() == [1.0] * 4
    assert set(src.get_user(0)) == {"w_in", "w_rec", "b", "w_out", "b_out", "b_prior", "log_mean", "log_std", "scale",
                                       "cal_shift", "cal_spread", "cal_floor", "cal_zero", "cal_widen"}
    bad = src.get_user(0)
    bad["w_rec"] = bad["w_rec"][:-1]
    with pytest.raises(ValueError, match="w_rec"):
        dst.set_user(0, bad)
    with pytest.raises(KeyError):
        dst.set_user(0, {"w_in": bad["w_in"]})
    copy = StackedLSTM.from_weights({k: v.clone() for k, v in src.get_all().items()})
    assert (copy.n_users, copy.n_inputs, copy.hidden) == (U, F, H)
    torch.testing.assert_close(copy(x, last, 2), src(x, last, 2))


def test_recurrence_gradients_match_finite_differences():
    xp = torch.randn(2, 4, 2, 12, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 3, 12, dtype=torch.double, requires_grad=True)
    h0, c0 = torch.randn(2, 2, 3, dtype=torch.double), torch.randn(2, 2, 3, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda a, b: _LSTMRecurrence.apply(a, b, h0, c0)[0], (xp, w))


def test_recurrence_matches_a_plain_lstm_cell():
    cell = torch.nn.LSTMCell(F, H)
    model = StackedLSTM(1, F, H)
    with torch.no_grad():  # torch's gate order is (i, f, g, o); ours is (i, f, o, g)
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        model.w_in.copy_(cell.weight_ih[order].t()[None])
        model.w_rec.copy_(cell.weight_hh[order].t()[None])
        model.b.copy_((cell.bias_ih + cell.bias_hh)[order][None])
    x = torch.randn(1, S, C, F)
    h = c = torch.zeros(C, H)
    outs = []
    for t in range(S):
        h, c = cell(x[0, t], (h, c))
        outs.append(h)
    ours, _ = model.hidden_states(x)
    torch.testing.assert_close(ours.view(S, C, H), torch.stack(outs).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers,block", [(1, 16), (2, 3), (3, 1)])
def test_inference_recurrence_equals_the_training_recurrence(workers, block):
    """The no-grad path (blocks of users, threads) gives the training path's values exactly,
    whatever the blocking, from zeros or from a carried state."""
    gen = torch.Generator().manual_seed(3)
    xp, w = torch.randn(7, S, C, 4 * H, generator=gen), torch.randn(7, H, 4 * H, generator=gen) * 0.3
    h0, c0 = torch.randn(7, C, H, generator=gen), torch.randn(7, C, H, generator=gen)
    want_h, want_c = _LSTMRecurrence.apply(xp, w, h0, c0)
    got_h, got_c = recurrence_no_grad(xp, w, h0, c0, workers=workers, block_users=block)
    assert torch.equal(got_h, want_h) and torch.equal(got_c, want_c)
    model = trained_like(StackedLSTM(U, F, H, seed=0))
    model.inference_workers = workers
    x, last = inputs()
    with torch.no_grad():  # forward() takes the no-grad path here, the training one below
        fast = model(x, last, burn_in=2)
    torch.testing.assert_close(fast, model(x, last, burn_in=2).detach(), rtol=0, atol=0)


def test_state_carry_equals_one_long_pass():
    model = StackedLSTM(U, F, H, seed=0)
    x = torch.randn(U, 2 * S, C, F)
    whole, _ = model.hidden_states(x)
    first, state = model.hidden_states(x[:, :S])
    second, _ = model.hidden_states(x[:, S:], state=state)
    torch.testing.assert_close(torch.cat([first.view(U, S, C, H), second.view(U, S, C, H)], 1).view(U, -1, H), whole)


def test_fused_pinball_equals_the_reference_loss_and_gradient():
    model = trained_like(StackedLSTM(U, F, H, seed=0)).double()
    x, last = (t.double() for t in inputs())
    target = torch.rand(U, S - 2, C, 6, 4, dtype=torch.double) * 5
    weight = (torch.rand(U, S - 2, C, 6) > 0.3).double()
    ref = (weight[..., None, None] * pinball(model(x, last, 2), target)).sum(dim=(1, 2, 3, 5))
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused, _ = model.pinball_sums(x, last, target, weight, 2)
    fused.sum().backward()
    torch.testing.assert_close(fused, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_pinball_definition():
    q = torch.tensor([[1.0] * 7])
    loss = pinball(q, torch.tensor([3.0]))  # under-forecast by 2: tau * 2
    torch.testing.assert_close(loss[0], 2 * torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]))
    loss = pinball(q, torch.tensor([0.0]))  # over-forecast by 1: (1 - tau)
    torch.testing.assert_close(loss[0], 1 - torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]))


def test_reset_head_restores_the_prior_for_one_resource():
    prior = torch.sort(torch.randn(U, 6, 4, 7), dim=-1).values
    model = trained_like(StackedLSTM(U, F, H, prior=prior, seed=0))
    x, last = inputs()
    before = model(x, last, 2).detach()
    mask = torch.zeros(U, 4, dtype=torch.bool)
    mask[1, 2] = True
    model.reset_head(mask)
    after = model(x, last, 2).detach()
    diff = (after - before).abs().amax(dim=(1, 2, 3, 5))  # [U, 4]
    assert (diff > 0).tolist() == mask.tolist()
    fresh = StackedLSTM(U, F, H, prior=prior, seed=0)(x, last, 2)
    torch.testing.assert_close(after[1, ..., 2, :], fresh[1, ..., 2, :].detach())


def _random_batch(seed: int, n: int, n_in: int, hidden: int, steps: int = 5, chunks: int = 3) -> tuple[dict, tuple]:
    """A random training item (burn-in 2, no reset) of ``n`` users and an LSTM state to carry in."""
    gen = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(n, steps, chunks, n_in, generator=gen), "last": torch.rand(n, steps - 2, chunks, 4, generator=gen),
             "target": torch.rand(n, steps - 2, chunks, 6, 4, generator=gen), "weight": (torch.rand(n, steps - 2, chunks, 6, generator=gen) > 0.2).float(),
             "burn_in": 2, "reset": False}
    return batch, (torch.randn(n, chunks, hidden, generator=gen), torch.randn(n, chunks, hidden, generator=gen))


def test_training_in_user_blocks_gives_the_whole_batchs_gradients():
    """train_backward in blocks of users (CPU training: one block's activations in cache) gives
    the loss, gradients and carried state of the whole batch at once; a block's state rows and
    parameters are its own users'."""
    from models.lightning_module import train_backward

    n, n_in = 7, 6
    batch, state = _random_batch(4, n, n_in, 8)
    results = []
    for block in (None, 3, 1):
        model = StackedLSTM(n, n_in, 8, seed=1)
        with torch.no_grad():
            model.w_out.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
        loss, (h, c) = train_backward(model, batch, state, block, lambda value: value.backward())
        results.append((loss, h, c, {k: p.grad.clone() for k, p in model.named_parameters()}))
    loss0, h0, c0, g0 = results[0]
    assert g0["w_rec"].abs().sum() > 0 and g0["w_out"].abs().sum() > 0
    for loss, h, c, grads in results[1:]:
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h, h0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, c0, rtol=1e-5, atol=1e-6)
        for k in g0:
            torch.testing.assert_close(grads[k], g0[k], rtol=1e-4, atol=1e-6)
    model = StackedLSTM(n, n_in, 8)
    with pytest.raises(ValueError, match="expected"):  # x holds 7 users, the parameters 3
        model.hidden_states(batch["x"], 2, params={k: p.detach()[:3] for k, p in model.named_parameters()})


def test_training_a_subset_of_users_gives_their_rows_of_the_whole_batchs_gradients():
    """train_backward with ``users`` (the users early stopping has not frozen) runs those rows only:
    their loss, gradients and carried state are the whole batch's rows, in blocks or not; the other
    rows get a zero gradient and keep their state (zeros after a reset); no user at all runs nothing."""
    from models.lightning_module import train_backward

    n, n_in, hidden = 7, 6, 8
    batch, state = _random_batch(5, n, n_in, hidden)
    users = torch.tensor([1, 2, 5])
    others = torch.tensor([0, 3, 4, 6])

    def run(block, subset, reset=False):
        model = StackedLSTM(n, n_in, hidden, seed=1)
        with torch.no_grad():
            model.w_out.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
        b = dict(batch, reset=reset)
        loss, (h, c) = train_backward(model, b, state, block, lambda value: value.backward(), users=subset)
        return loss, h, c, {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}

    loss0, h0, c0, g0 = run(None, None)
    per_user = []  # each user's own loss: the subset's loss is the sum of its users'
    for u in range(n):
        per_user.append(run(None, torch.tensor([u]))[0])
    for block in (None, 2, 1):
        loss, h, c, g = run(block, users)
        torch.testing.assert_close(loss, sum(per_user[u] for u in users.tolist()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[users], h0[users], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[users], c0[users], rtol=1e-5, atol=1e-6)
        assert torch.equal(h[others], state[0][others]) and torch.equal(c[others], state[1][others])
        for k in g0:
            torch.testing.assert_close(g[k][users], g0[k][users], rtol=1e-4, atol=1e-6)
            assert (g[k][others] == 0).all(), k
    assert g0["w_rec"][others].abs().sum() > 0  # the whole batch does train those rows
    _, h, c, _ = run(2, users, reset=True)  # after a reset the rows not run start (and stay) at zero
    assert (h[others] == 0).all() and (c[others] == 0).all() and (h[users] != 0).any()
    loss, h, c, g = run(2, users[:0])
    assert loss == 0 and torch.equal(h, state[0]) and all((v == 0).all() for v in g.values())


def test_validating_a_subset_of_users_gives_their_rows_of_the_whole_batchs_loss():
    """per_user_loss with ``users`` (validation skips the users early stopping has frozen): their
    sums, counts and carried state are the whole batch's rows; the other rows get zero sums and
    counts and keep their state (zeros after a reset); no user at all runs nothing."""
    from models.lightning_module import per_user_loss

    n, n_in, hidden = 7, 6, 8
    batch, state = _random_batch(6, n, n_in, hidden)
    model = StackedLSTM(n, n_in, hidden, seed=1)
    with torch.no_grad():
        model.w_out.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    users, others = torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4, 6])
    with torch.no_grad():
        sums0, count0, (h0, c0) = per_user_loss(model, batch, state)
        sums, count, (h, c) = per_user_loss(model, batch, state, users)
        assert sums0[others].abs().sum() > 0
        torch.testing.assert_close(sums[users], sums0[users], rtol=1e-5, atol=1e-6)
        assert torch.equal(count[users], count0[users]) and (count[others] == 0).all() and (sums[others] == 0).all()
        torch.testing.assert_close(h[users], h0[users], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[users], c0[users], rtol=1e-5, atol=1e-6)
        assert torch.equal(h[others], state[0][others]) and torch.equal(c[others], state[1][others])
        _, _, (h, c) = per_user_loss(model, dict(batch, reset=True), state, users)
        assert (h[others] == 0).all() and (c[others] == 0).all() and (h[users] != 0).any()
        sums, count, (h, c) = per_user_loss(model, batch, state, users[:0])
        assert (sums == 0).all() and (count == 0).all() and torch.equal(h, state[0])
        assert torch.equal(per_user_loss(model, batch, state, torch.arange(n))[0], sums0)  # every user: the plain path
