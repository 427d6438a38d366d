"""N users' LSTMs as one ``torch.nn.Module``: stacked per-user weights, one batched pass.

Shapes (U users, S steps, C parallel chunks of a user's history, F inputs, H hidden units,
G = 4·H gates, O = 6 horizons · 4 resources · 7 quantiles = 168 head outputs):

* every parameter has the user as its leading dimension, so user ``k``'s LSTM is row ``k`` of
  each tensor and nothing else (:meth:`StackedLSTM.get_user` / :meth:`StackedLSTM.set_user`);
* a user's history is cut into C sub-sequences that run side by side, so each recurrent
  step is one batched matrix-matrix product ``[U, C, H] @ [U, H, G]`` (``torch.baddbmm``);
* the recurrence is a hand-written LSTM cell with a hand-written backward pass
  (:class:`_LSTMRecurrence`): no autograd graph per step, a few fused tensor ops per step;
* on a CPU, each step's element-wise part (gates, cell state) and the quantile head's pinball
  loss with its gradient run in a C kernel (:mod:`models.native`, compiled on first use), the
  matrix products stay in torch; where it is unavailable, the torch code below computes the same.

Units: inputs are the standardised features of :mod:`models.features`; ``last`` and the
returned quantiles are demand divided by the user's ``scale`` (per resource), i.e. the real
units up to one constant per user and resource. Gate order is (input, forget, output, cell).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torch.nn import functional as fn

from models import native
from pipeline.schemas import DEMAND_RESOURCES, HORIZONS_MIN, QUANTILES

N_HORIZONS = len(HORIZONS_MIN)
N_RESOURCES = len(DEMAND_RESOURCES)
N_QUANTILES = len(QUANTILES)
N_OUTPUTS = N_HORIZONS * N_RESOURCES * N_QUANTILES
MID = N_QUANTILES // 2  # index of the median (0.5) in QUANTILES
#: Recalibration buffers (models/calibration.py) and their identity value.
CALIBRATION = {"cal_shift": 0.0, "cal_spread": 1.0, "cal_floor": 0.0, "cal_zero": 0.0, "cal_widen": 0.0}
#: The recalibration's regimes: 0 while the user's last observed requests are 0 (idle now), 1 while
#: they are above 0 (active now); each has its own parameters (``cal_shift``, ``cal_spread``,
#: ``cal_floor``, ``cal_widen`` carry the regime after the user: ``[U, 2, ...]``).
N_REGIMES = 2
REGIME_CALIBRATION = ("cal_shift", "cal_spread", "cal_floor", "cal_widen")
#: Brackets of the zero-mass estimate: 0 … 7 quantile levels forecast as exactly 0 (``cal_zero``).
N_ZERO_BRACKETS = N_QUANTILES + 1
#: Smallest gap between neighbouring quantiles a prior sets (scaled units); keeps softplus⁻¹ finite.
MIN_SPREAD = 1e-4


def _inv_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def head_bias_from_quantiles(prior: Tensor) -> Tensor:
    """Head bias that makes the head emit ``prior`` on top of the last value.

    ``prior``: ``[..., 6, 4, 7]`` non-decreasing offsets from the last value (scaled units),
    e.g. the empirical quantiles of the last-value forecast's errors. Returns ``[..., 168]``.
    Gaps below :data:`MIN_SPREAD` are widened to it, around the prior's median.
    """
    gaps = (prior[..., 1:] - prior[..., :-1]).clamp_min(MIN_SPREAD)
    raw = torch.empty_like(prior)
    raw[..., 0] = prior[..., MID]
    raw[..., 1:] = _inv_softplus(gaps)
    return raw.flatten(-3)


def _increments(raw: Tensor) -> Tensor:
    """Quantile increments ``d`` with ``q = last + cumsum(d)``: d[1:] = softplus(raw[1:]) are the
    gaps between neighbouring levels; d[0] = raw[0] − the gaps below the median, so raw[0] is
    the median's offset from the last value."""
    d = fn.softplus(raw)
    d[..., 0] = raw[..., 0] - d[..., 1 : MID + 1].sum(-1)
    return d


def quantiles_from_head(raw: Tensor, last: Tensor) -> Tensor:
    """Non-crossing quantiles from head outputs: last value + median offset ± softplus gaps.

    ``raw``: ``[..., 6, 4, 7]`` (entry 0: the median's offset from the last value; entries 1-6:
    softplus⁻¹ of the 6 gaps between neighbouring levels); ``last``: ``[..., 4]`` (the latest
    observed demand, scaled). Returns ``[..., 6, 4, 7]``, increasing along the last axis by
    construction (each gap is a softplus, > 0).
    """
    return _increments(raw).cumsum(-1) + last[..., None, :, None]


def pinball(q: Tensor, y: Tensor) -> Tensor:
    """Pinball (quantile) loss per element: ``q`` ``[..., 7]`` quantiles at :data:`QUANTILES`,
    ``y`` ``[...]`` observations (same units). Returns ``[..., 7]``, in the units of ``y``."""
    u = y[..., None] - q
    tau = torch.tensor(QUANTILES, dtype=q.dtype, device=q.device)
    return torch.maximum(tau * u, (tau - 1) * u)


class _HeadPinball(torch.autograd.Function):
    """Head + quantiles + weighted pinball loss, fused: the gradient w.r.t. the head output is
    formed in the forward pass, block by cache-sized block, so the 168 values per user-step
    are touched a few times instead of through a dozen autograd nodes.

    forward(h ``[U, N, H]``, w_out ``[U, H, O]``, b_out ``[U, O]``, last ``[U, N, 4]``,
    target ``[U, N, 6, 4]``, weight ``[U, N, 6]``) -> ``[U, 4]``: per user and resource,
    Σ over steps, horizons and quantiles of weight · pinball(quantiles, target).

    Inside, the head's 168 columns are taken level-major (7 planes of the 24 horizon x resource
    values; the parameters keep their (horizon, resource, level) order): the per-level steps
    (softplus, running sum, the pinball's sign) then run over rows of 24 values rather than 7,
    and the sums over levels and horizons in float32 before the float64 sum over steps (a float64
    reduction over those strided axes cost a quarter of the forward pass). On a CPU in float32
    the steps after the head's matrix product run in one C pass instead
    (:func:`models.native.head_pinball`: the sums per user in float64).
    """

    #: head values per block: 1 MB of float32 on a CPU (one training segment's forward + backward,
    #: 256 users, hidden 32, on the 2-core VM, four alternating runs: 2.70-2.89 us per user-step,
    #: mean 2.78, against 2.75-3.13, mean 2.91, with 4 MB blocks), 4 MB elsewhere (a GPU wants
    #: few, large kernels)
    BLOCK_VALUES = {"cpu": 1 << 18}
    BLOCK_VALUES_DEFAULT = 1 << 20

    @staticmethod
    def forward(ctx, h, w_out, b_out, last, target, weight, with_grad):  # type: ignore[override]
        n_users, n, hidden = h.shape
        k, cells = N_QUANTILES, N_HORIZONS * N_RESOURCES
        w_lv = w_out.view(n_users, hidden, cells, k).transpose(2, 3).reshape(n_users, hidden, k * cells)
        b_lv = b_out.view(n_users, cells, k).transpose(1, 2).reshape(n_users, k * cells)
        raw = torch.baddbmm(b_lv.unsqueeze(1), h, w_lv)  # [U, N, 168] level-major
        if native.usable(h):  # one fused C pass (models/native.c); the same values as the torch path below
            y = (target - last[:, :, None, :]).reshape(n_users, n, cells)
            tau = torch.tensor(QUANTILES, dtype=h.dtype)
            sums = native.head_pinball(raw, y, weight.contiguous(), tau, with_grad)
            if with_grad:
                ctx.save_for_backward(h, w_lv)
                ctx.graw = raw
            return sums.to(h.dtype)
        raw = raw.view(n_users, n, k, cells)
        tau = torch.tensor(QUANTILES, dtype=h.dtype, device=h.device).view(k, 1)
        y = (target - last[:, :, None, :]).reshape(n_users, n, 1, cells)  # demand - last, per (horizon, resource)
        w = weight[..., None].expand(n_users, n, N_HORIZONS, N_RESOURCES).reshape(n_users, n, 1, cells)
        sums = h.new_zeros(n_users, N_RESOURCES, dtype=torch.float64)
        block = _HeadPinball.BLOCK_VALUES.get(h.device.type, _HeadPinball.BLOCK_VALUES_DEFAULT)
        step = max(1, block // (n_users * N_OUTPUTS))
        for a in range(0, n, step):
            r = raw[:, a : a + step]
            d = fn.softplus(r)  # the gaps; level 0: the median's offset minus the gaps below it
            d[:, :, 0] = r[:, :, 0] - d[:, :, 1 : MID + 1].sum(2)
            for j in range(1, k):  # the running sum over the 7 levels, in place (cumsum over a
                d[:, :, j] += d[:, :, j - 1]  # strided axis of 7 cost a tenth of the head)
            u = torch.sub(y[:, a : a + step], d)  # y - q
            # weight · d pinball / d q: 1 - tau where y < q, -tau where y > q (a where() between
            # two broadcast [7, 1] tensors cost more than these three passes)
            g = torch.lt(u, 0).to(u.dtype).sub_(tau).mul_(w[:, a : a + step])
            part = u.mul_(g).view(n_users, -1, k * N_HORIZONS, N_RESOURCES).sum(2)
            sums -= part.sum(1, dtype=torch.float64)
            if not with_grad:
                continue
            g_d = g  # increment j moves every level >= j: the sum of g from level j up, in place
            for j in range(k - 2, -1, -1):
                g_d[:, :, j] += g_d[:, :, j + 1]
            g_d[:, :, 1 : MID + 1] -= g_d[:, :, :1]  # a gap below the median also lowers increment 0
            r.sigmoid_()  # d softplus / d raw; the median's offset enters as is
            r[:, :, 0] = 1.0
            r.mul_(g_d)
        if with_grad:
            ctx.save_for_backward(h, w_lv)
            ctx.graw = raw.view(n_users, n, k * cells)
        return sums.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_sums):  # type: ignore[override]
        h, w_lv = ctx.saved_tensors
        graw = getattr(ctx, "graw", None)
        if graw is None:
            raise RuntimeError("the fused pinball loss supports one backward pass (and none under no_grad)")
        ctx.graw = None
        n_users, n, _ = graw.shape
        hidden, k, cells = h.shape[2], N_QUANTILES, N_HORIZONS * N_RESOURCES
        graw.view(n_users, n, k * N_HORIZONS, N_RESOURCES).mul_(grad_sums[:, None, None, :])
        grad_h = torch.bmm(graw, w_lv.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(h.transpose(1, 2), graw).view(n_users, hidden, k, cells).transpose(2, 3).reshape(n_users, hidden, N_OUTPUTS)
        grad_b = graw.sum(1).view(n_users, k, cells).transpose(1, 2).reshape(n_users, N_OUTPUTS)
        return grad_h, grad_w, grad_b, None, None, None, None


def _cell_step(xp_t: Tensor, h: Tensor, c: Tensor, w_rec: Tensor, gates: Tensor, c_out: Tensor | None, h_out: Tensor,
               tanh_out: Tensor | None = None) -> Tensor:
    """One LSTM step for ``[U, C]`` cells: the gate activations into ``gates`` ``[U, C, G]``,
    the new cell state into ``c_out`` (a new tensor when None, which is returned), its tanh into
    ``tanh_out`` (if given: the backward pass needs it) and the new h into ``h_out``. Gate order
    (input, forget, output, cell)."""
    hidden = w_rec.shape[1]
    torch.baddbmm(xp_t, h, w_rec, out=gates)
    if native.usable(gates):  # the element-wise rest in one fused C pass (models/native.c)
        c_new = torch.empty_like(c) if c_out is None else c_out
        h_new = h_out if h_out.is_contiguous() else torch.empty_like(c)
        native.lstm_forward_step(gates, c.contiguous(), c_new, torch.empty_like(c) if tanh_out is None else tanh_out, h_new)
        if h_new is not h_out:
            h_out.copy_(h_new)
        return c_new
    gates[..., : 3 * hidden].sigmoid_()
    gates[..., 3 * hidden :].tanh_()
    i, f, o, g = gates.split(hidden, dim=-1)
    c_new = torch.addcmul(f * c, i, g) if c_out is None else torch.addcmul(f * c, i, g, out=c_out)
    torch.mul(o, torch.tanh(c_new) if tanh_out is None else torch.tanh(c_new, out=tanh_out), out=h_out)
    return c_new


class _LSTMRecurrence(torch.autograd.Function):
    """h_t for every step of ``U·C`` LSTMs given their input projections and initial state.

    forward(xp ``[U, S, C, G]`` (x·W_in + b), w_rec ``[U, H, G]``, h0, c0 ``[U, C, H]``) ->
    (h ``[U, S, C, H]``, c_S ``[U, C, H]``). Back-propagation runs through the S steps only
    (truncated BPTT: the initial state is a constant). Gate order (input, forget, output, cell).
    """

    @staticmethod
    def forward(ctx, xp: Tensor, w_rec: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        n_users, steps, chunks, gates = xp.shape
        hidden = gates // 4
        acts = xp.new_empty(steps, n_users, chunks, gates)  # gate activations, time-major
        cells = xp.new_empty(steps + 1, n_users, chunks, hidden)
        tanh_c = xp.new_empty(steps, n_users, chunks, hidden)  # kept: recomputing it cost the backward a pass
        hs = xp.new_empty(steps + 1, n_users, chunks, hidden)
        hs[0], cells[0] = h0, c0
        for t in range(steps):
            _cell_step(xp[:, t], hs[t], cells[t], w_rec, acts[t], cells[t + 1], hs[t + 1], tanh_c[t])
        ctx.save_for_backward(acts, cells, tanh_c, hs, w_rec)
        c_last = cells[steps].clone()
        ctx.mark_non_differentiable(c_last)
        return hs[1:].permute(1, 0, 2, 3), c_last

    @staticmethod
    def backward(ctx, grad_h: Tensor, _grad_c: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        acts, cells, tc, hs, w_rec = ctx.saved_tensors
        steps, n_users, chunks, gates = acts.shape
        hidden = gates // 4
        if native.usable(acts):  # each step's element-wise part in one fused C pass (models/native.c)
            dgates = torch.empty_like(acts)
            dh = acts.new_zeros(n_users, chunks, hidden)
            dc = acts.new_zeros(n_users, chunks, hidden)
            grad_h = grad_h.contiguous()
            w_t = w_rec.transpose(1, 2)
            for t in range(steps - 1, -1, -1):
                native.lstm_backward_step(acts[t], cells[t], tc[t], grad_h, t, dh, dc, dgates[t])
                if t:
                    torch.bmm(dgates[t], w_t, out=dh)
            return _LSTMRecurrence._weight_grads(dgates, hs, w_rec)
        i, f, o, g = acts.split(hidden, dim=-1)
        # Every factor that does not depend on the recurrence, for all steps at once:
        # d pre-activation of (i, f, o, g) = (dc·A_i, dc·A_f, dh·A_o, dc·A_g);  dc += dh·K, with
        # A_i = g·i(1 − i), A_f = c_prev·f(1 − f), A_o = tanh(c)·o(1 − o), A_g = i(1 − g²) and
        # K = o(1 − tanh²(c)), written in place (x(1 − x) = x − x·x: one pass, no temporaries)
        fac = torch.empty_like(acts)
        a_i, a_f, a_o, a_g = fac.split(hidden, dim=-1)
        one = acts.new_ones(())
        torch.addcmul(i, i, i, value=-1, out=a_i).mul_(g)
        torch.addcmul(f, f, f, value=-1, out=a_f).mul_(cells[:-1])
        torch.addcmul(o, o, o, value=-1, out=a_o).mul_(tc)
        torch.addcmul(one, g, g, value=-1, out=a_g).mul_(i)
        k = torch.addcmul(one, tc, tc, value=-1).mul_(o)
        grad_h = grad_h.permute(1, 0, 2, 3)
        dgates = torch.empty_like(acts)
        dh = acts.new_zeros(n_users, chunks, hidden)
        dc = acts.new_zeros(n_users, chunks, hidden)
        w_t = w_rec.transpose(1, 2)
        for t in range(steps - 1, -1, -1):
            dh += grad_h[t]
            dc.addcmul_(dh, k[t])
            d = dgates[t].view(n_users, chunks, 4, hidden)
            torch.mul(fac[t].view(n_users, chunks, 4, hidden), dc.unsqueeze(-2), out=d)
            torch.mul(a_o[t], dh, out=d[..., 2, :])  # the output gate's is dh's, not dc's
            dc.mul_(f[t])
            if t:
                dh = torch.bmm(dgates[t], w_t)
        return _LSTMRecurrence._weight_grads(dgates, hs, w_rec)

    @staticmethod
    def _weight_grads(dgates: Tensor, hs: Tensor, w_rec: Tensor) -> tuple[Tensor, Tensor, None, None]:
        """The gradients of ``xp`` and ``w_rec`` from the pre-activation gradients ``[S, U, C, G]``."""
        steps, n_users, chunks, gates = dgates.shape
        dgates = dgates.permute(1, 0, 2, 3).contiguous()  # [U, S, C, G]
        h_prev = hs[:-1].permute(1, 0, 2, 3)
        grad_w = torch.bmm(h_prev.reshape(n_users, -1, w_rec.shape[1]).transpose(1, 2), dgates.view(n_users, -1, gates))
        return dgates, grad_w, None, None


#: Users per block of the no-grad recurrence. Small blocks keep their recurrent weights in
#: cache through every step (128 x H x 4H floats: 8 MB at H = 64, in the 2-core VM's 48 MB
#: L3); large ones spread the per-step operation overhead over more users. 10k users x 97
#: steps, H = 64, 2 threads, on that VM: 2.8 s at 128, 3.2 s at 64, 3.4 s at 256, 3.7 s at
#: 512; one thread at 128: 4.1 s (the training recurrence in blocks of 256: 5.4 s).
INFERENCE_BLOCK_USERS = 128


def _recurrence_block(xp: Tensor, w_rec: Tensor, h: Tensor, c: Tensor, out: Tensor) -> Tensor:
    """The LSTM steps of :class:`_LSTMRecurrence`'s forward for one block of users, without
    keeping the gate activations: writes h of every step into ``out`` ``[U, S, C, H]``,
    returns the final cell state. The same :func:`_cell_step`, so the same values."""
    gates = xp.new_empty(xp.shape[0], xp.shape[2], xp.shape[3])
    for t in range(xp.shape[1]):
        c = _cell_step(xp[:, t], h, c, w_rec, gates, None, out[:, t])
        h = out[:, t]
    return c


def recurrence_no_grad(xp: Tensor, w_rec: Tensor, h0: Tensor, c0: Tensor, workers: int = 1,
                       block_users: int = INFERENCE_BLOCK_USERS) -> tuple[Tensor, Tensor]:
    """:class:`_LSTMRecurrence`'s forward for inference: h ``[U, S, C, H]`` and c_S ``[U, C, H]``.

    Runs ``block_users`` users at a time through every step (their weights stay in cache),
    the blocks spread over ``workers`` threads (torch releases the GIL inside each operation;
    each user's values are computed by the same operations whatever the blocking)."""
    n_users, steps, chunks, _ = xp.shape
    hs = xp.new_empty(n_users, steps, chunks, w_rec.shape[1])
    c_last = torch.empty_like(c0)

    def run(lo: int) -> None:
        sl = slice(lo, lo + block_users)
        c_last[sl] = _recurrence_block(xp[sl], w_rec[sl], h0[sl], c0[sl], hs[sl])

    starts = range(0, n_users, block_users)
    if workers <= 1 or len(starts) < 2:
        for lo in starts:
            run(lo)
    else:
        with ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(run, starts))
    return hs, c_last


def _one_fit_per_regime(name: str, value: Tensor, shape: torch.Size) -> Tensor:
    """``value`` of a recalibration buffer saved before the regimes existed (no regime axis after
    the user: one fit for every regime) as ``shape``, the same parameters in each regime; any
    other value as it is."""
    if name in REGIME_CALIBRATION and len(shape) == value.dim() + 1 and value.shape == shape[:1] + shape[2:]:
        return value.unsqueeze(1).expand(shape).clone()
    return value


class StackedLSTM(nn.Module):
    """One single-layer LSTM with a quantile head per user, all users stacked.

    Parameters (row ``k`` of each is user ``k``'s model)::

        w_in  [U, F, G]   input weights            b     [U, G]   gate bias
        w_rec [U, H, G]   recurrent weights
        w_out [U, H, O]   head weights (zero at init: an untrained model returns its prior)
        b_out [U, O]      head bias (the prior: lowest level and softplus⁻¹ of the gaps)

    Buffers (they travel with the user's row): ``b_prior`` ``[U, O]``, the head bias of the
    prior (see :meth:`reset_head`); per resource in ``DEMAND_RESOURCES`` order, ``[U, 4]``:
    ``log_mean`` and ``log_std`` standardise ``log1p(demand)`` inputs, ``scale`` (real units)
    divides demand into the model's target units; ``cal_shift``, ``cal_floor`` ``[U, 2, 6, 4]``,
    ``cal_spread`` and ``cal_widen`` ``[U, 2, 6, 4, 7]``, the post-hoc recalibration applied at inference, one set per
    regime (:data:`N_REGIMES`; :mod:`models.calibration`;
    identity until fitted, and never applied by :meth:`forward` or the training loss); ``cal_zero``
    ``[U, 6, 4, 8]``, where P(demand = 0) lies between the levels the zero quantiles bound
    (:func:`models.calibration.zero_mass`; 0: at the lower end, what the quantiles alone say).

    The head predicts *corrections to the last-value forecast*: every quantile is the last
    observed value plus a learnt offset, so an untrained model is the last-value forecast
    (with the prior's spread), and weight decay pulls every user back towards it.
    """

    def __init__(self, n_users: int, n_inputs: int, hidden: int = 32, prior: Tensor | None = None, seed: int | None = None) -> None:
        """``prior``: ``[U, 6, 4, 7]`` (or broadcastable) quantile offsets from the last value,
        scaled units; default a median of 0 with gaps of :data:`MIN_SPREAD`."""
        super().__init__()
        if n_users < 1 or n_inputs < 1 or hidden < 1:
            raise ValueError(f"n_users, n_inputs, hidden must be >= 1, got {n_users}, {n_inputs}, {hidden}")
        self.n_users, self.n_inputs, self.hidden = n_users, n_inputs, hidden
        self.inference_workers = 1  # threads of the no-grad recurrence (see recurrence_no_grad)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(hidden)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=gen))

        gates = 4 * hidden
        self.w_in = uniform(n_users, n_inputs, gates)
        self.w_rec = uniform(n_users, hidden, gates)
        bias = torch.zeros(n_users, gates)
        bias[:, hidden : 2 * hidden] = 1.0  # forget-gate bias 1: remember by default (gates i, f, o, g)
        self.b = nn.Parameter(bias)
        self.w_out = nn.Parameter(torch.zeros(n_users, hidden, N_OUTPUTS))
        self.b_out = nn.Parameter(torch.zeros(n_users, N_OUTPUTS))
        self.register_buffer("b_prior", torch.zeros(n_users, N_OUTPUTS))
        self.set_prior(torch.zeros(N_HORIZONS, N_RESOURCES, N_QUANTILES) if prior is None else prior)
        self.register_buffer("log_mean", torch.zeros(n_users, N_RESOURCES))
        self.register_buffer("log_std", torch.ones(n_users, N_RESOURCES))
        self.register_buffer("scale", torch.ones(n_users, N_RESOURCES))
        # post-hoc recalibration of the quantiles (models/calibration.py); identity until fitted
        self.register_buffer("cal_shift", torch.zeros(n_users, N_REGIMES, N_HORIZONS, N_RESOURCES))
        self.register_buffer("cal_spread", torch.ones(n_users, N_REGIMES, N_HORIZONS, N_RESOURCES, N_QUANTILES))
        self.register_buffer("cal_floor", torch.zeros(n_users, N_REGIMES, N_HORIZONS, N_RESOURCES))
        self.register_buffer("cal_zero", torch.zeros(n_users, N_HORIZONS, N_RESOURCES, N_ZERO_BRACKETS))
        self.register_buffer("cal_widen", torch.zeros(n_users, N_REGIMES, N_HORIZONS, N_RESOURCES, N_QUANTILES))

    @torch.no_grad()
    def set_prior(self, prior: Tensor, users: Tensor | None = None) -> None:
        """Set the prior (``b_prior``) and head bias of ``users`` (all by default) from
        ``prior`` ``[U|1, 6, 4, 7]``; the head weights are left alone."""
        bias = head_bias_from_quantiles(torch.as_tensor(prior, dtype=torch.float32))
        rows = slice(None) if users is None else users
        self.b_prior[rows] = bias.expand_as(self.b_prior[rows])
        self.b_out[rows] = self.b_prior[rows]

    @torch.no_grad()
    def reset_head(self, mask: Tensor) -> None:
        """Where ``mask`` (bool ``[U, 4]``, user x resource) is true, make the user's forecast of
        that resource its prior again (last value + prior quantiles): zero head weights, prior bias."""
        cols = mask[:, None, None, :, None].expand(-1, N_HORIZONS, 1, -1, N_QUANTILES).reshape(self.n_users, 1, N_OUTPUTS)
        self.w_out.masked_fill_(cols, 0.0)
        self.b_out.copy_(torch.where(cols[:, 0], self.b_prior, self.b_out))

    def hidden_states(self, x: Tensor, burn_in: int = 0, state: tuple[Tensor, Tensor] | None = None,
                      params: dict[str, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """LSTM outputs after the first ``burn_in`` steps, and the final state.

        ``x``: ``[U, S, C, F]``; ``state``: (h, c) ``[U, C, H]`` to start from (default zeros).
        Returns h ``[U, (S - burn_in)·C, H]`` (step-major) and the detached (h, c) after step S.
        ``params``: the parameters to use instead of the model's (by name, e.g. one block of
        users' rows, with ``x`` and ``state`` holding that block; see
        :func:`models.lightning_module.train_backward`).
        """
        n_users, steps, chunks, n_in = x.shape
        w_in, b, w_rec = (self.w_in, self.b, self.w_rec) if params is None else (params["w_in"], params["b"], params["w_rec"])
        if n_users != w_in.shape[0] or n_in != self.n_inputs:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [{w_in.shape[0]}, S, C, {self.n_inputs}]")
        if not 0 <= burn_in < steps:
            raise ValueError(f"burn_in={burn_in} must lie in [0, {steps})")
        if state is None:
            state = (x.new_zeros(n_users, chunks, self.hidden), x.new_zeros(n_users, chunks, self.hidden))
        xp = torch.baddbmm(b.unsqueeze(1), x.reshape(n_users, -1, n_in), w_in).view(n_users, steps, chunks, -1)
        if torch.is_grad_enabled() and (xp.requires_grad or w_rec.requires_grad):
            h, c_last = _LSTMRecurrence.apply(xp, w_rec, state[0].detach(), state[1].detach())
        else:  # inference: nothing kept for a backward pass, users in cache-sized blocks (a GPU: all at once)
            block = INFERENCE_BLOCK_USERS if xp.device.type == "cpu" else n_users
            h, c_last = recurrence_no_grad(xp, w_rec.detach(), state[0].detach(), state[1].detach(), self.inference_workers, block)
        final = (h[:, -1].detach(), c_last.detach())
        return h[:, burn_in:].reshape(n_users, -1, self.hidden), final

    def forward(self, x: Tensor, last: Tensor, burn_in: int = 0, state: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Quantile forecasts at every step after the first ``burn_in`` steps.

        ``x``: ``[U, S, C, F]`` inputs; ``last``: ``[U, S - burn_in, C, 4]`` the demand at each
        forecast origin (scaled units). Returns ``[U, S - burn_in, C, 6, 4, 7]``: for each origin,
        horizon (5…30 min), resource and quantile (0.05…0.95), non-decreasing in the quantile.
        The first ``burn_in`` steps only warm up the state (zeros, or ``state``).
        """
        h, _ = self.hidden_states(x, burn_in, state)
        raw = torch.baddbmm(self.b_out.unsqueeze(1), h, self.w_out)
        raw = raw.view(*last.shape[:3], N_HORIZONS, N_RESOURCES, N_QUANTILES)
        return quantiles_from_head(raw, last)

    def pinball_sums(self, x: Tensor, last: Tensor, target: Tensor, weight: Tensor, burn_in: int = 0,
                     state: tuple[Tensor, Tensor] | None = None, params: dict[str, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Weighted pinball loss of :meth:`forward`'s quantiles per user and resource ``[U, 4]``,
        and the final LSTM state (to carry into the next segment).

        ``target``: ``[U, S - burn_in, C, 6, 4]`` observed demand (scaled units) of the 6 buckets
        after each origin; ``weight``: ``[U, S - burn_in, C, 6]`` (0 where a target is missing).
        Equals ``(weight[..., None, None] * pinball(forward(x, last), target)).sum(...)`` over
        steps, chunks, horizons and quantiles, computed by a fused kernel (far less memory).
        ``params``: as in :meth:`hidden_states`.
        """
        h, final = self.hidden_states(x, burn_in, state, params)
        n_users, n = h.shape[:2]
        w_out, b_out = (self.w_out, self.b_out) if params is None else (params["w_out"], params["b_out"])
        with_grad = torch.is_grad_enabled() and (h.requires_grad or w_out.requires_grad)
        sums = _HeadPinball.apply(h, w_out, b_out, last.reshape(n_users, n, N_RESOURCES),
                                  target.reshape(n_users, n, N_HORIZONS, N_RESOURCES), weight.reshape(n_users, n, N_HORIZONS), with_grad)
        return sums, final

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], copy: bool = True) -> "StackedLSTM":
        """A model holding ``weights`` (as :meth:`get_all` returns them, e.g. a model-store shard);
        the sizes are read from the shapes. ``copy=False``: the model holds the given float32
        CPU tensors themselves (for tensors the caller made for it and will not touch again)."""
        n_users, n_inputs, gates = weights["w_in"].shape
        with torch.device("meta"):  # no random initialisation of weights that are replaced at once
            model = cls(n_users, n_inputs, gates // 4)
        state = {}
        for name, t in model.get_all().items():
            if name in CALIBRATION and name not in weights:  # saved before recalibration existed: identity
                state[name] = torch.full(t.shape, CALIBRATION[name])
                continue
            value = _one_fit_per_regime(name, torch.as_tensor(weights[name], dtype=t.dtype, device="cpu"), t.shape)
            if value.shape != t.shape:
                raise ValueError(f"{name}: expected shape {tuple(t.shape)}, got {tuple(value.shape)}")
            state[name] = value.clone() if copy else value
        model.load_state_dict(state, assign=True)
        return model

    def get_all(self) -> dict[str, Tensor]:
        """Every per-user tensor by name (parameters and buffers, ``[U, ...]``; not copies)."""
        return dict(self.named_parameters()) | dict(self.named_buffers())

    def get_user(self, k: int) -> dict[str, Tensor]:
        """User ``k``'s model: row ``k`` of every parameter and buffer (detached copies)."""
        return {name: t[k].detach().clone() for name, t in self.get_all().items()}

    @torch.no_grad()
    def set_user(self, k: int, user_state: dict[str, Tensor]) -> None:
        """Load one user's model (as returned by :meth:`get_user`) into row ``k``."""
        state = self.get_all()
        missing = set(state) - set(user_state)
        if missing:
            raise KeyError(f"user state lacks {sorted(missing)}")
        for name, t in state.items():
            row = _one_fit_per_regime(name, torch.as_tensor(user_state[name], dtype=t.dtype)[None], torch.Size((1, *t.shape[1:])))[0]
            if row.shape != t.shape[1:]:
                raise ValueError(f"{name}: expected shape {tuple(t.shape[1:])}, got {tuple(row.shape)}")
            t[k] = row

    @torch.no_grad()
    def copy_users_from(self, other: "StackedLSTM", users: Tensor, source_row: int = 0, buffers: bool = False) -> None:
        """Copy ``other``'s row ``source_row`` (e.g. a global model, ``n_users=1``) into ``users``.

        ``users``: bool ``[U]`` mask or index tensor. Buffers (normalisation stats) are kept
        unless ``buffers`` is true.
        """
        mine = dict(self.named_parameters()) | (dict(self.named_buffers()) if buffers else {})
        theirs = dict(other.named_parameters()) | dict(other.named_buffers())
        for name, t in mine.items():
            t[users] = theirs[name][source_row].to(t.dtype)
