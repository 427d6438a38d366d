"""The native kernels (models/native.c, models/native.py) against the torch path and float64 references."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from models import native
from models.module import StackedLSTM, pinball

U, S, C, F, H = 37, 9, 3, 6, 8

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here: models/native.py falls back to torch")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt from scratch into an empty cache (and the cached one restored after)."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    native.library.cache_clear()
    yield tmp_path / "cache"
    native.library.cache_clear()


def _model_and_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = StackedLSTM(U, F, H, seed=seed)
    with torch.no_grad():
        model.w_out.copy_(torch.randn(model.w_out.shape, generator=gen) * 0.5)
        model.b_out.copy_(torch.randn(model.b_out.shape, generator=gen) * 3)  # gaps from softplus(-9) to softplus(9)
    x = torch.randn(U, S, C, F, generator=gen)
    last = torch.rand(U, S - 2, C, 4, generator=gen) * 5
    target = torch.rand(U, S - 2, C, 6, 4, generator=gen) * 5
    weight = (torch.rand(U, S - 2, C, 6, generator=gen) > 0.3).float()
    return model, (x, last, target, weight)


def _loss_and_grads(model: StackedLSTM, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    sums, _ = model.pinball_sums(*batch, burn_in=2)
    sums.sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_native
def test_native_head_equals_the_reference_loss_and_gradient(monkeypatch):
    model, batch = _model_and_batch()
    calls = []
    real = native.head_pinball
    monkeypatch.setattr(native, "head_pinball", lambda *a: calls.append(1) or real(*a))
    sums, grads = _loss_and_grads(model, batch)
    assert calls, "the float32 CPU path did not take the native kernel"
    # the reference: autograd through the quantiles and the textbook pinball loss, in float64
    ref_model = model.double()
    x, last, target, weight = (t.double() for t in batch)
    ref_model.zero_grad()
    ref = (weight[..., None, None] * pinball(ref_model(x, last, 2), target)).sum(dim=(1, 2, 3, 5))
    ref.sum().backward()
    torch.testing.assert_close(sums.double(), ref.detach(), rtol=2e-5, atol=1e-4)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(grads[n].double(), p.grad, rtol=1e-4, atol=1e-4, msg=n)


@needs_native
def test_native_and_torch_paths_agree_and_the_switch_turns_it_off(monkeypatch):
    model, batch = _model_and_batch(seed=3)
    on_sums, on_grads = _loss_and_grads(model, batch)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    monkeypatch.setattr(native, "head_pinball", lambda *a: pytest.fail("the native kernel ran although switched off"))
    off_sums, off_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(on_sums, off_sums, rtol=1e-5, atol=1e-4)
    for n in on_grads:
        torch.testing.assert_close(on_grads[n], off_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    # inference (no gradient) takes the same kernel's loss-only pass
    monkeypatch.undo()
    with torch.no_grad():
        no_grad, _ = model.pinball_sums(*batch, burn_in=2)
    torch.testing.assert_close(no_grad, on_sums)


@needs_native
def test_native_kernel_splits_users_over_threads_with_the_same_values():
    gen = torch.Generator().manual_seed(5)
    n_users, n = 64, 11
    raw = torch.randn(n_users, n, 168, generator=gen) * 4
    y = torch.rand(n_users, n, 24, generator=gen) * 3
    w = (torch.rand(n_users, n, 6, generator=gen) > 0.5).float()
    tau = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            r = raw.clone()
            results.append((native.head_pinball(r, y, w, tau, True), r))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])  # per user: no reordering
    with pytest.raises(ValueError, match="raw: expected a contiguous float32"):
        native.head_pinball(raw.double(), y, w, tau, False)
    with pytest.raises(ValueError, match="weight"):
        native.head_pinball(raw, y, w[:, :, :5].contiguous(), tau, False)
    empty = native.head_pinball(torch.empty(3, 0, 168), torch.empty(3, 0, 24), torch.empty(3, 0, 6), tau, True)
    assert torch.equal(empty, torch.zeros(3, 4, dtype=torch.float64))


def _head_in_two_threads(queue) -> None:
    torch.set_num_threads(2)
    raw = torch.randn(64, 3, 168)
    sums = native.head_pinball(raw, torch.rand(64, 3, 24), torch.ones(64, 3, 6), torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]), True)
    queue.put(bool(torch.isfinite(sums).all()))


@needs_native
def test_a_forked_child_gets_its_own_threads():
    """A child forked after the parent used its worker threads must not hand work to them (they do
    not exist in the child: it would wait forever)."""
    import multiprocessing

    threads = torch.get_num_threads()
    try:
        _head_in_two_threads(type("Q", (), {"put": staticmethod(lambda v: None)})())  # the parent's pool exists now
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_head_in_two_threads, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the native kernel's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) is True


@needs_native
def test_loading_the_library_leaves_denormals_alone(fresh_library):
    """Linked with -ffast-math, GCC would add start-up code that flushes denormals to zero for the
    whole process (torch's numerics included); the library is compiled with it, linked without."""
    assert native.library() is not None
    tiny = torch.tensor([1e-40])
    assert (tiny * 1.0).item() != 0.0 and 5e-324 * 1.0 != 0.0


@needs_native
def test_build_is_cached_and_an_untrusted_cached_file_is_rebuilt(fresh_library, caplog):
    with caplog.at_level(logging.INFO, logger="models.native"):
        lib = native.library()
    built = list(fresh_library.glob("warmcast-native-*.so"))
    assert len(built) == 1 and lib._name == str(built[0])
    assert f"built into {built[0]}" in caplog.text
    assert not list(fresh_library.glob(".build-*"))  # the temporary build folder is gone
    mtime = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    with caplog.at_level(logging.INFO, logger="models.native"):
        native.library()
    assert built[0].stat().st_mtime_ns == mtime and f"loaded from {built[0]}" in caplog.text  # reused, not rebuilt
    os.chmod(built[0], 0o666)  # writable by others: not loaded, rebuilt
    native.library.cache_clear()
    native.library()
    assert built[0].stat().st_mode & 0o022 == 0


def test_a_cache_folder_others_may_write_is_refused(fresh_library, caplog):
    fresh_library.mkdir(parents=True)
    os.chmod(fresh_library, 0o777)
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert native.library() is None
    assert "is not this user's alone" in caplog.text and not list(fresh_library.glob("*.so"))


def test_without_a_compiler_training_falls_back_to_torch(fresh_library, monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.INFO, logger="models.native"):
        assert native.library() is None
    assert "no C compiler" in caplog.text and "run in torch" in caplog.text
    model, batch = _model_and_batch()
    assert not native.usable(batch[0])
    sums, grads = _loss_and_grads(model, batch)  # the torch path
    assert torch.isfinite(sums).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_a_failing_compiler_is_reported_and_falls_back(fresh_library, monkeypatch, caplog, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert native.library() is None
    assert "native kernel unavailable" in caplog.text and "broken compiler" in caplog.text
    assert not list(fresh_library.glob("*.so"))


def _grid_reference(base, delta, y, tau, grid, user, n_users):
    """The recalibration grid's sums the textbook way, in float64."""
    out = torch.zeros(len(grid), n_users, y.shape[1], dtype=torch.float64)
    for g, v in enumerate(grid.double()):
        b = base.double()
        pred = (b + v * delta.double()).clamp_min(0) if delta is not None else torch.where(b < v, 0.0, b.clamp_min(0))
        out[g].index_add_(0, user, _pin(pred, y.double(), tau.double()))
    return out


def _pin(pred, y, tau):
    e = y - pred
    return torch.maximum(tau * e, (tau - 1) * e)


@needs_native
@pytest.mark.parametrize("floor", [False, True])
def test_native_grid_sums_equal_the_reference(floor):
    gen = torch.Generator().manual_seed(11)
    n_points, m, n_users = 9000, 24 * 6, 40
    user = torch.sort(torch.randint(3, n_users - 2, (n_points,), generator=gen)).values  # users 0-2 and the last two: no points
    base = torch.randn(n_points, m, generator=gen)
    delta = None if floor else torch.randn(n_points, m, generator=gen)
    y = (torch.rand(n_points, m, generator=gen) * 2 - 0.5).clamp_min(0)
    tau = torch.rand(m, generator=gen)
    grid = torch.tensor([0.0, 0.01, 0.3, 1.0, 1.5])
    ref = _grid_reference(base, delta, y, tau, grid, user, n_users)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(native.grid_pinball(base, delta, y, tau, grid, user, n_users))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(outs[0], outs[1])  # threads split at user boundaries: each user's sum in one order
    assert outs[0][:, :3].abs().sum() == 0 and outs[0][:, -2:].abs().sum() == 0
    added = native.grid_pinball(base[:100], delta if delta is None else delta[:100], y[:100], tau, grid, user[:100], n_users, out=outs[0].clone())
    torch.testing.assert_close(added - outs[0], native.grid_pinball(base[:100], delta if delta is None else delta[:100], y[:100], tau, grid,
                                                                     user[:100], n_users))
    with pytest.raises(ValueError, match="non-decreasing"):
        native.grid_pinball(base, delta, y, tau, grid, user.flip(0).contiguous(), n_users)
    with pytest.raises(ValueError, match="tau"):
        native.grid_pinball(base, delta, y, tau[:-1].contiguous(), grid, user, n_users)
    with pytest.raises(ValueError, match="exceed"):
        native.grid_pinball(base, delta, y, tau, torch.zeros(native.MAX_GRID_VALUES // m + 1), user, n_users)


@needs_native
def test_native_and_torch_recalibration_fits_agree(monkeypatch):
    from models.calibration import _fit_regime

    gen = torch.Generator().manual_seed(2)
    n_users, n = 50, 200
    q = torch.sort(torch.randn(n_users, n, 6, 4, 7, generator=gen) * 0.5 + 0.5, dim=-1).values.clamp_min(0)
    q = q * torch.rand(n_users, 1, 1, 1, 1, generator=gen) * 3
    y = (torch.rand(n_users, n, 6, 4, generator=gen) * 2 - 0.6).clamp_min(0)
    w = (torch.rand(n_users, n, 6, generator=gen) > 0.2).float()
    fast = _fit_regime(q, y, w, 288.0, 1 << 12, True)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    monkeypatch.setattr(native, "grid_pinball", lambda *a, **k: pytest.fail("the native kernel ran although switched off"))
    slow = _fit_regime(q, y, w, 288.0, 1 << 12, True)
    for name, a, b in zip(("shift", "spread", "floor", "widen"), fast, slow):
        # float64 sums against float32 ones: a near-tie may fall the other way, rarely
        assert (a != b).float().mean() <= 0.002, name


@needs_native
def test_native_lstm_steps_equal_the_torch_recurrence(monkeypatch):
    from models.module import _LSTMRecurrence, recurrence_no_grad

    gen = torch.Generator().manual_seed(4)
    n_users, steps, chunks, hidden = 5, 7, 3, 8
    xp = (torch.randn(n_users, steps, chunks, 4 * hidden, generator=gen) * 2).requires_grad_()
    w_rec = (torch.randn(n_users, hidden, 4 * hidden, generator=gen) * 0.5).requires_grad_()
    h0, c0 = torch.randn(n_users, chunks, hidden, generator=gen), torch.randn(n_users, chunks, hidden, generator=gen)
    grad_out = torch.randn(n_users, steps, chunks, hidden, generator=gen)

    def run():
        xp.grad = w_rec.grad = None
        h, c = _LSTMRecurrence.apply(xp, w_rec, h0, c0)
        (h * grad_out).sum().backward()
        with torch.no_grad():
            h_inf, c_inf = recurrence_no_grad(xp.detach(), w_rec.detach(), h0, c0, workers=2, block_users=2)  # h written into a strided [U, S, C, H]
        return h.detach(), c, xp.grad.clone(), w_rec.grad.clone(), h_inf, c_inf

    calls = []
    real = native.lstm_backward_step
    monkeypatch.setattr(native, "lstm_backward_step", lambda *a: calls.append(1) or real(*a))
    fast = run()
    assert len(calls) == steps
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    slow = run()
    assert len(calls) == steps  # switched off: the torch path
    for name, a, b in zip(("h", "c_S", "grad xp", "grad w_rec", "h (inference)", "c_S (inference)"), fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(fast[4], fast[0], rtol=0, atol=0)  # inference = training forward, bit for bit



@needs_native
def test_native_lstm_steps_refuse_inconsistent_tensors():
    acts = torch.rand(2, 3, 32)
    with pytest.raises(ValueError, match="4x the elements"):
        native.lstm_forward_step(acts, torch.zeros(2, 3, 7), torch.zeros(2, 3, 7), torch.zeros(2, 3, 7), torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="h_out: expected a contiguous float32"):
        native.lstm_forward_step(acts, torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), torch.zeros(3, 2, 8).transpose(0, 1))
    grad_h = torch.zeros(2, 5, 3, 8)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        native.lstm_backward_step(acts, torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), grad_h, 5, torch.zeros(2, 3, 8),
                                  torch.zeros(2, 3, 8), torch.zeros(2, 3, 32))
