"""Post-hoc quantile recalibration, fitted on training's held-out tail (never on a test window).

The trained LSTM's quantiles can be too wide or too narrow for a level (on ServeGen the 90 %
interval covered 95 %, the 80 % one at 5 minutes only 72 %). Per user, horizon and resource,
a recalibration moves them, in the model's scaled units (demand / ``scale``)::

    q'_k = q_k + shift · (q75 − q25) + (spread_k − 1) · (q_k − q50)

i.e. the median moves by ``shift`` inter-quartile ranges and each other level's distance from
the median is multiplied by ``spread_k``; the result is sorted (rearranging crossing quantiles
never increases their pinball loss), and every quantile below ``floor`` is set to 0 (demand is
often exactly 0: an idle user's small positive lower quantiles cost little pinball loss but put
every idle bucket below its interval). Last, each level moves outwards by ``widen_k >= 0``
(``q'_k − widen_k`` below the median, ``+ widen_k`` above it; clipped at 0, sorted). A spread
scales the distance from the median, so it cannot widen a narrow forecast without also widening
the wide ones, and its pinball-optimal value is the spread-weighted quantile of the errors: on
ServeGen the forecasts of users who were active but forecast narrowly kept their lower and upper
10 % tails at 0.15-0.24 each (in-sample, on the tail the spreads were fitted on). An additive
step does not scale with the spread; the fit chose it almost only below the median (pushing low
quantiles towards 0), which lowered the holdout pinball loss by 0.1-1.1 % on every horizon and
resource and took the 80 % interval's tie-aware coverage from 0.67-0.76 to 0.73-0.77 (three
seeds; README "Backtest"). Identity: ``shift = 0``,
``spread = 1``, ``floor = 0``, ``widen = 0``, which leaves the quantiles bit for bit as they were
(up to the clipping at 0 done anyway).

Regimes. Every parameter above exists twice per user, horizon and resource: one set for origins
where the user's last observed requests are 0 (idle now) and one where they are above 0 (active
now), each fitted on its own origins (:func:`regimes`, :func:`apply_regimes`). One set for both let
the idle origins, most of the tail, set the upper levels: an idle origin's demand is almost never
above its q90, so the pooled pinball optimum left the active origins' q90 exceeded 21-22 % of the
time on ServeGen's holdout (two seeds; 14-15 % with the regimes, and pinball loss 1.2-4.1 % lower on
every horizon and resource: README "Backtest"). A user with no tail origin in a regime takes the users' pooled choice there.

Fitting (:func:`fit_calibration`), on the held-out tail of :func:`models.train.train` (the last
``val_days`` of the *training* window): ``shift`` is chosen from :data:`SHIFT_GRID` by the
median's pinball loss, then every ``spread_k`` from :data:`SPREAD_GRID` by level k's pinball loss
(minimising level k's pinball loss is what brings its empirical level to its nominal one), then
``floor`` from :data:`FLOOR_GRID` by the pinball loss of all levels, then every ``widen_k`` from
:data:`WIDEN_GRID` by level k's pinball loss. Each
user's choice minimises ``n_u · r_u(g) + n0 · p(g)``: ``r_u(g)`` its mean loss with grid value
``g`` relative to its uncalibrated loss, ``p(g)`` the same averaged over users (the pooled
estimate), ``n_u`` its number of tail points and ``n0`` the ``prior_points`` it is shrunk with,
so a user with few tail points takes the pooled choice.

Zero mass. Demand is often exactly 0 (70 % of ServeGen's user-buckets), and 7 quantile levels
only bracket P(demand = 0): with ``q05 = 0 < q10`` it lies somewhere in [0.05, 0.10], and the knots
alone say 0.05. On ServeGen's holdout the users' 5-minute buckets with ``q05 = 0 < q10`` were 0 in
44 % of cases: every one of them fell below the forecast's 90 % interval by the randomised PIT. So
the recalibration also estimates where in its bracket (:data:`pipeline.schemas.P_ZERO_LOW` …
``P_ZERO_HIGH``) P(demand = 0) lies (:func:`zero_mass`, the forecast's ``p_zero``): per user,
horizon, resource and bracket (how many of the recalibrated quantiles are 0) the share of the tail's
targets that were 0, shrunk towards the users' pooled share like the grid choices (``n_u`` points of
the user's own, ``prior_points`` of the pooled), clipped into the bracket. Stored as the fraction of
the bracket's width (0: its lower end, what the quantiles alone say). The quantiles are unchanged:
the pinball loss is not affected.

The parameters live in the :class:`~models.module.StackedLSTM` buffers ``cal_shift``,
``cal_floor`` ``[U, 2, 6, 4]``, ``cal_spread``, ``cal_widen`` ``[U, 2, 6, 4, 7]`` (regime after the
user) and ``cal_zero`` ``[U, 6, 4, 8]`` (one for both regimes: fitted on the final quantiles, whose
zero count already tells the states apart), so they travel with each user's weights (model store,
shards, ``predict``); a version saved before the regimes loads with its one fit in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as fn

from models import native
from models.features import ChunkBatches
from models.module import CALIBRATION, MID, N_HORIZONS, N_QUANTILES, N_REGIMES, N_RESOURCES, N_ZERO_BRACKETS, StackedLSTM, quantiles_from_head
from pipeline.schemas import DEMAND_RESOURCES, P_ZERO_HIGH, P_ZERO_LOW, QUANTILES

#: Median shifts, in inter-quartile ranges.
SHIFT_GRID = (-0.5, -0.3, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Multipliers of a level's distance from the median.
SPREAD_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5,
               1.75, 2.0, 2.5, 3.0, 4.0)
#: Thresholds (scaled units: demand / the user's RMS demand) below which a quantile becomes 0; only
#: fitted with ``fit_calibration(..., floor=True)`` (``TrainConfig.calibration_floor``, on by default).
FLOOR_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Outward steps of each level (scaled units, like the floor).
WIDEN_GRID = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
Q25, Q75 = QUANTILES.index(0.25), QUANTILES.index(0.75)
REQUESTS = DEMAND_RESOURCES.index("requests")
CALIBRATION_BUFFERS = tuple(CALIBRATION)


@dataclass
class CalibrationFit:
    """What :func:`fit_calibration` found: per-user parameters and the tail's mean pinball loss
    (scaled units, mean over users with tail points) before and after (in-sample: fitted there)."""

    shift: Tensor  # [U, 2, 6, 4]: per regime (idle now, active now)
    spread: Tensor  # [U, 2, 6, 4, 7]
    floor: Tensor  # [U, 2, 6, 4]
    loss_before: float
    loss_after: float
    zero: Tensor | None = None  # [U, 6, 4, 8] (cal_zero)
    widen: Tensor | None = None  # [U, 2, 6, 4, 7] (cal_widen)


def apply_calibration(q: Tensor, shift: Tensor, spread: Tensor, floor: Tensor | None = None,
                      widen: Tensor | None = None) -> Tensor:
    """Recalibrated quantiles: ``q`` ``[U, ..., 6, 4, 7]`` (scaled units), ``shift`` and ``floor``
    ``[U, 6, 4]``, ``spread`` and ``widen`` ``[U, 6, 4, 7]``. Returns the same shape,
    non-decreasing along the last axis; ``q`` itself where every parameter is the identity."""
    extra = q.dim() - 4
    out = q
    if bool((shift != 0).any() or (spread != 1).any()):
        shift = shift.reshape(shift.shape[0], *[1] * extra, N_HORIZONS, N_RESOURCES, 1).to(q.dtype)
        spread = spread.reshape(spread.shape[0], *[1] * extra, N_HORIZONS, N_RESOURCES, N_QUANTILES).to(q.dtype)
        mid = q[..., MID : MID + 1]
        out = (q + shift * (q[..., Q75 : Q75 + 1] - q[..., Q25 : Q25 + 1]) + (spread - 1) * (q - mid)).sort(dim=-1).values
    if floor is not None and bool((floor != 0).any()):  # the lowest values go to 0: the order is kept
        floor = floor.reshape(floor.shape[0], *[1] * extra, N_HORIZONS, N_RESOURCES, 1).to(q.dtype)
        out = torch.where(out < floor, torch.zeros_like(out), out)
    if widen is not None and bool((widen != 0).any()):
        widen = widen.reshape(widen.shape[0], *[1] * extra, N_HORIZONS, N_RESOURCES, N_QUANTILES).to(q.dtype)
        out = (out + _outwards(q) * widen).clamp_min(0).sort(dim=-1).values
    return out


def _outwards(q: Tensor) -> Tensor:
    """``[7]``: −1 below the median, 0 at it, +1 above it (the direction :func:`apply_calibration` widens in)."""
    return torch.sign(torch.tensor(QUANTILES, dtype=q.dtype, device=q.device) - 0.5)


def regimes(last: Tensor) -> Tensor:
    """The recalibration regime of each origin (:data:`models.module.N_REGIMES`) from ``last``
    ``[..., 4]``, the demand observed at it (any units): 1 where its requests are above 0 (the user
    is active now), 0 where they are 0 (idle now). Returns ``[...]`` (long)."""
    return (last[..., REQUESTS] > 0).long()


def apply_regimes(q: Tensor, regime: Tensor, shift: Tensor, spread: Tensor, floor: Tensor | None = None,
                  widen: Tensor | None = None) -> Tensor:
    """:func:`apply_calibration` with each origin's regime's parameters: ``q`` ``[U, ..., 6, 4, 7]``,
    ``regime`` ``[U, ...]`` (0/1, :func:`regimes`), ``shift`` and ``floor`` ``[U, 2, 6, 4]``, ``spread``
    and ``widen`` ``[U, 2, 6, 4, 7]``."""
    out = [apply_calibration(q, shift[:, r], spread[:, r], None if floor is None else floor[:, r],
                             None if widen is None else widen[:, r]) for r in range(N_REGIMES)]
    return torch.where(regime.bool()[..., None, None, None], out[1], out[0])


def calibrated(model: StackedLSTM, q: Tensor, last: Tensor) -> Tensor:
    """:func:`apply_regimes` with ``model``'s recalibration buffers, the regimes from ``last``
    ``[U, ..., 4]`` (the demand observed at each origin of ``q`` ``[U, ..., 6, 4, 7]``)."""
    return apply_regimes(q, regimes(last), model.cal_shift, model.cal_spread, model.cal_floor, model.cal_widen)


def zero_brackets(q: Tensor) -> Tensor:
    """How many of the 7 quantiles ``q [..., 7]`` are 0 (or below): the bracket of P(demand = 0)."""
    return (q <= 0).sum(-1)


def zero_mass(q: Tensor, frac: Tensor) -> Tensor:
    """P(demand = 0) ``[U, ..., 6, 4]`` of recalibrated quantiles ``q`` ``[U, ..., 6, 4, 7]`` (any
    units, 0 where clipped) given ``frac`` ``[U, 6, 4, 8]`` (``cal_zero``): ``P_ZERO_LOW[m] + frac[m]
    · (P_ZERO_HIGH[m] − P_ZERO_LOW[m])`` with ``m`` = :func:`zero_brackets`. ``frac = 0``: the
    level of the highest zero quantile (what the quantiles alone say)."""
    extra = q.dim() - 4
    m = zero_brackets(q)
    lo = torch.tensor(P_ZERO_LOW, dtype=q.dtype, device=q.device)[m]
    hi = torch.tensor(P_ZERO_HIGH, dtype=q.dtype, device=q.device)[m]
    f = frac.to(q.dtype).reshape(frac.shape[0], *[1] * extra, N_HORIZONS, N_RESOURCES, N_ZERO_BRACKETS)
    f = torch.gather(f.expand(*m.shape, N_ZERO_BRACKETS), -1, m[..., None])[..., 0]
    return lo + f * (hi - lo)


def fit_zero_mass(zeros: Tensor, points: Tensor, prior_points: float) -> Tensor:
    """``cal_zero`` ``[U, 6, 4, 8]`` from the tail's counts per user, horizon, resource and bracket:
    ``zeros`` (targets that were 0) and ``points`` (all scored targets). The user's share of zeros,
    shrunk towards the pooled share with ``prior_points`` points, as a fraction of the bracket
    (clipped to it; 0 where the pooled tail has no point in the bracket)."""
    zeros, points = zeros.double(), points.double()
    pooled_n = points.sum(0)
    pooled = torch.where(pooled_n > 0, zeros.sum(0) / pooled_n.clamp_min(1), torch.nan)
    lo = torch.tensor(P_ZERO_LOW, dtype=torch.float64)
    hi = torch.tensor(P_ZERO_HIGH, dtype=torch.float64)
    pooled = torch.where(torch.isnan(pooled), lo, pooled)
    share = (zeros + prior_points * pooled) / (points + prior_points)
    width = hi - lo
    frac = torch.where(width > 0, (share - lo) / torch.where(width > 0, width, 1.0), 0.0)
    return frac.clamp(0.0, 1.0).float()


@torch.no_grad()
def head_quantiles(model: StackedLSTM, batches: ChunkBatches) -> Iterator[tuple[dict, Tensor]]:
    """Each item of ``batches`` (in order, the LSTM state carried through) with the model's
    uncalibrated quantiles at its origins, ``[U, K, C, 6, 4, 7]`` scaled units."""
    state = None
    for j in range(len(batches)):
        b = batches[j]
        state = None if b["reset"] else state
        h, state = model.hidden_states(b["x"], b["burn_in"], state)
        raw = torch.baddbmm(model.b_out.unsqueeze(1), h, model.w_out)
        steps, chunks = b["last"].shape[1:3]
        yield b, quantiles_from_head(raw.view(model.n_users, steps, chunks, N_HORIZONS, N_RESOURCES, N_QUANTILES), b["last"])


def _tail(model: StackedLSTM, batches: ChunkBatches) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantiles ``[U, N, 6, 4, 7]``, targets ``[U, N, 6, 4]``, weights ``[U, N, 6]`` and the demand
    at the origin ``[U, N, 4]`` of every origin of ``batches`` (scaled units)."""
    qs, ys, ws, lasts = [], [], [], []
    for b, q in head_quantiles(model, batches):
        n = model.n_users
        qs.append(q.reshape(n, -1, N_HORIZONS, N_RESOURCES, N_QUANTILES))
        ys.append(b["target"].reshape(n, -1, N_HORIZONS, N_RESOURCES))
        ws.append(b["weight"].reshape(n, -1, N_HORIZONS))
        lasts.append(b["last"].reshape(n, -1, N_RESOURCES))
    return torch.cat(qs, 1), torch.cat(ys, 1), torch.cat(ws, 1), torch.cat(lasts, 1)


def _masked(q: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``q`` and ``y`` with every point of weight 0 set to 0 (quantiles and target), which takes
    it out of every :func:`_pinball_sums` (a 0 forecast of a 0 target costs nothing, and every
    recalibration maps 0 quantiles to 0). The weights must be a mask (0 or 1), as
    :class:`~models.features.ChunkBatches` makes them."""
    if not bool(((w == 0) | (w == 1)).all()):
        raise ValueError("fit_calibration needs 0/1 weights (a mask of the scored targets)")
    keep = w.bool()
    if bool((y[keep] < 0).any()):  # demand is never negative; the sums below rely on it
        raise ValueError("fit_calibration got negative scored targets: demand must be >= 0")
    return q * keep[..., None, None], y * keep[..., None]


def _pinball_sums(pred: Tensor, y: Tensor, tau: Tensor, consume: bool = False,
                  total: Callable[[Tensor], Tensor] = lambda v: v.sum(1)) -> Tensor:
    """Σ over origins of ``pinball_tau(y, max(pred, 0))``: ``pred`` ``[U, N, 6, 4, L]``, ``y``
    ``[U, N, 6, 4]`` (>= 0; unscored points masked to 0 by :func:`_masked`), ``tau`` ``[L]`` ->
    ``[U, 6, 4, L]`` (float64). ``consume``: ``pred`` is a temporary the function may overwrite.
    ``total``: the sum over origins (default over axis 1; :meth:`_Points.sums` for flattened points).

    For ``y >= 0``: ``pinball_tau(y − max(p, 0)) = max(p, y) − τ·max(p, 0) − (1 − τ)·y``, so the
    sum takes two float32 sums over the origins (torch sums in cascades, not one running
    total), combined in float64: two passes over ``pred`` fewer than the textbook form."""
    top = total(torch.maximum(pred, y[..., None])).double()
    positive = total(pred.clamp_min_(0) if consume else pred.clamp_min(0)).double()
    return top - tau.double() * positive - (1 - tau.double()) * total(y).double()[..., None]


def _choose(sums: Tensor, count: Tensor, identity: int, prior_points: float) -> Tensor:
    """Per user the grid index minimising ``n_u · r_u(g) + n0 · p(g)`` (see the module docstring).

    ``sums``: ``[G, U, ...]`` loss sums per grid value; ``count``: ``[U, ...]`` (broadcastable)
    points. Ties, and users and cells without a better choice, keep ``identity``. A cell whose
    identity has no loss at all (an idle user's 0 forecasts of 0 demand) is left out of the pooled
    estimate and never takes a value that costs it loss (the outward step of :data:`WIDEN_GRID`
    would lift its upper quantiles off 0)."""
    count = count.expand_as(sums[0]).to(torch.float64)
    mean = sums / count.clamp_min(1)
    base = mean[identity]
    has = (count > 0) & (base > 1e-12)
    rel = torch.where(has, mean / base.clamp_min(1e-12), torch.ones_like(mean))
    rel = torch.where((count > 0) & ~has & (mean > 1e-12), torch.inf, rel)  # worse than a perfect fit
    pooled = torch.where(has, rel, torch.zeros_like(rel)).sum(1) / has.sum(0).clamp_min(1)  # [G, ...]
    pooled = torch.where(has.any(0), pooled, torch.ones_like(pooled))
    crit = count * rel + prior_points * pooled[:, None]
    best = crit.argmin(0)
    better = crit.min(0).values < crit[identity] - 1e-9 * crit[identity].abs()
    return torch.where(better, best, torch.full_like(best, identity))


def _blocks(n_users: int, n_points: int, block_points: int) -> Iterator[tuple[slice, slice]]:
    """(users, origins) slices covering ``[n_users, n_points]`` in blocks of about
    ``block_points`` user-origins: whole users at a time, or one user's origins in pieces (the
    global model: one "user" with every sampled user's tail)."""
    users = max(1, block_points // max(n_points, 1))
    points = max(1, n_points if users > 1 else min(n_points, block_points))  # >= 1: an empty tail gives no block
    for a in range(0, n_users, users):
        for b in range(0, n_points, points):
            yield slice(a, a + users), slice(b, b + points)


class _Points:
    """One block of a regime's points, flattened user-major: ``user`` ``[P]`` (non-decreasing) and
    sums over the block's points per user, into the rows ``lo … hi - 1`` of a ``[U, ...]`` total."""

    def __init__(self, user: Tensor) -> None:
        self.user = user
        self.lo, self.hi = int(user[0]), int(user[-1]) + 1
        self.rows = slice(self.lo, self.hi)
        self.local = user - self.lo

    def sums(self, values: Tensor) -> Tensor:
        """Σ per user of ``values`` ``[P, ...]``: ``[hi - lo, ...]``, in the values' float32. A block of
        one user (the global model's pooled tail) is summed in torch's cascade, as accurate as a
        float64 sum here; several users' by ``index_add_``, a running sum per user, over at most one
        tail's points each (a running float32 sum over the global model's 16k points flipped choices)."""
        if self.hi - self.lo == 1:
            return values.sum(0, keepdim=True)
        return values.new_zeros(self.hi - self.lo, *values.shape[1:]).index_add_(0, self.local, values)

    def pinball(self, pred: Tensor, y: Tensor, tau: Tensor) -> Tensor:
        """:func:`_pinball_sums` per user of the block: ``pred`` ``[P, 6, 4, L]`` (overwritten),
        ``y`` ``[P, 6, 4]`` -> ``[hi - lo, 6, 4, L]`` float64."""
        return _pinball_sums(pred, y, tau, consume=True, total=self.sums)


def _fit_regime(q: Tensor, y: Tensor, w: Tensor, prior_points: float, block_points: int,
                fit_floor: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One regime's grid fits (shift, then spread, floor, widen; see the module docstring) on the
    points ``w`` (0/1 ``[U, N, 6]``) marks: ``(shift [U, 6, 4], spread [U, 6, 4, 7], floor [U, 6, 4],
    widen [U, 6, 4, 7])``. ``q`` ``[U, N, 6, 4, 7]`` and ``y`` ``[U, N, 6, 4]`` scaled units. Only the
    regime's origins are taken (flattened, ``block_points`` at a time), so the two regimes' fits
    together cost about what one fit on every origin does."""
    n_users = q.shape[0]
    count = w.sum(1, dtype=torch.float64)[..., None]  # [U, 6, 1] points per user and horizon
    taken = w.bool().any(-1)  # [U, N]
    user = torch.arange(n_users).unsqueeze(1).expand_as(taken)[taken]
    q, y = _masked(q[taken], y[taken], w[taken])  # [P, 6, 4, 7], [P, 6, 4]; unscored horizons 0
    keep = w[taken][..., None, None]  # [P, 6, 1, 1]
    blocks = [(slice(a, a + block_points), _Points(user[a : a + block_points])) for a in range(0, len(user), block_points)]
    tau = torch.tensor(QUANTILES, dtype=q.dtype)
    shifts = torch.tensor(SHIFT_GRID, dtype=q.dtype)
    spreads = torch.tensor(SPREAD_GRID, dtype=q.dtype)
    levels = [k for k in range(N_QUANTILES) if k != MID]
    # loss sums per grid value: [G, U, 6, 4] (median shift, floor) and [G, U, 6, 4, 6] (spread of each other level)
    shift_sums = torch.zeros(len(shifts), n_users, N_HORIZONS, N_RESOURCES, dtype=torch.float64)
    spread_sums = torch.zeros(len(spreads), n_users, N_HORIZONS, N_RESOURCES, len(levels), dtype=torch.float64)
    fast = native.usable(q)  # the grid's sums in one native pass per block (models/native.c), else in torch
    cols = lambda t, levels_: t.expand(t.shape[0], N_HORIZONS, N_RESOURCES, levels_).reshape(t.shape[0], -1).contiguous()  # noqa: E731

    def grid_sums(sums: Tensor, sl: slice, base: Tensor, delta: Tensor | None, taus: Tensor, grid: Tensor) -> None:
        """Add one block's loss sums ``[G, U, 6, 4, L]`` of every grid value to ``sums`` (native)."""
        n_levels = len(taus)
        native.grid_pinball(cols(base, n_levels), None if delta is None else cols(delta, n_levels), cols(y[sl, ..., None], n_levels),
                            taus.expand(N_HORIZONS, N_RESOURCES, n_levels).reshape(-1).contiguous(), grid.contiguous(),
                            user[sl], n_users, sums.view(len(grid), n_users, -1))

    for sl, pts in blocks:
        qb, yb = q[sl], y[sl]
        iqr, mid = qb[..., Q75] - qb[..., Q25], qb[..., MID]
        if fast:
            grid_sums(shift_sums, sl, mid[..., None], iqr[..., None], tau[MID : MID + 1], shifts)
            continue
        for g, c in enumerate(shifts):
            shift_sums[g, pts.rows] += pts.pinball(torch.add(mid, iqr, alpha=float(c))[..., None], yb, tau[MID : MID + 1])[..., 0]
    shift = shifts[_choose(shift_sums, count, SHIFT_GRID.index(0.0), prior_points)]
    for sl, pts in blocks:
        qb, yb = q[sl], y[sl]
        mid = qb[..., MID : MID + 1]
        new_mid = mid + shift[pts.user][..., None] * (qb[..., Q75 : Q75 + 1] - qb[..., Q25 : Q25 + 1])
        dist = qb[..., levels] - mid
        if fast:
            grid_sums(spread_sums, sl, new_mid, dist, tau[levels], spreads)
            continue
        for g, s in enumerate(spreads):
            spread_sums[g, pts.rows] += pts.pinball(torch.add(new_mid, dist, alpha=float(s)), yb, tau[levels])
    spread_idx = _choose(spread_sums, count[..., None], SPREAD_GRID.index(1.0), prior_points)
    spread = torch.ones(n_users, N_HORIZONS, N_RESOURCES, N_QUANTILES)
    spread[..., levels] = spreads[spread_idx]
    floors = torch.tensor(FLOOR_GRID if fit_floor else (0.0,), dtype=q.dtype)
    floor_sums = torch.zeros(len(floors), n_users, N_HORIZONS, N_RESOURCES, dtype=torch.float64)
    level_sums = torch.zeros(len(floors), n_users, N_HORIZONS, N_RESOURCES, N_QUANTILES, dtype=torch.float64) if fast else None
    for sl, pts in blocks:
        qc = apply_calibration(q[sl, None], shift[pts.user], spread[pts.user])[:, 0]  # each point its user's parameters
        if fast:
            grid_sums(level_sums, sl, qc, None, tau, floors)
            continue
        for g, f in enumerate(floors):
            floor_sums[g, pts.rows] += pts.pinball(torch.where(qc < f, 0.0, qc), y[sl], tau).sum(-1)
    if fast:
        floor_sums = level_sums.sum(-1)
    floor = floors[_choose(floor_sums, count, 0, prior_points)]
    widens = torch.tensor(WIDEN_GRID, dtype=q.dtype)
    outwards = _outwards(q)[levels]
    widen_sums = torch.zeros(len(widens), n_users, N_HORIZONS, N_RESOURCES, len(levels), dtype=torch.float64)
    for sl, pts in blocks:
        qc = apply_calibration(q[sl, None], shift[pts.user], spread[pts.user], floor[pts.user])[:, 0, ..., levels]
        if fast:  # (qc + a·outwards)·keep = qc·keep + a·(outwards·keep)
            grid_sums(widen_sums, sl, qc * keep[sl], outwards * keep[sl], tau[levels], widens)
            continue
        for g, a in enumerate(widens):  # an unscored horizon's upper levels would move off 0: kept at 0
            widen_sums[g, pts.rows] += pts.pinball(torch.add(qc, outwards, alpha=float(a)).mul_(keep[sl]), y[sl], tau[levels])
    widen = torch.zeros(n_users, N_HORIZONS, N_RESOURCES, N_QUANTILES)
    widen[..., levels] = widens[_choose(widen_sums, count[..., None], 0, prior_points)]
    return shift, spread, floor, widen


@torch.no_grad()
def fit_calibration(model: StackedLSTM, batches: ChunkBatches, prior_points: float = 288.0, block_points: int = 1 << 14,
                    device: torch.device | str | None = None, floor: bool = False) -> CalibrationFit:
    """Fit the recalibration of ``model`` on the origins of ``batches`` (training's held-out tail)
    and store it in the model's ``cal_shift`` / ``cal_spread`` / ``cal_floor`` / ``cal_widen`` / ``cal_zero``:
    each regime's (:func:`regimes`) parameters on that regime's origins only, the zero mass on
    every origin's final quantiles. ``prior_points``: tail points a user's own choice is weighed
    against the pooled one with (per regime). Runs on ``device`` (default: where the model is), leaving the model there.
    ``floor``: also fit the zero floor (off by default, see :data:`FLOOR_GRID`); without it the floor stays 0.
    The grid's loss sums are formed ``block_points`` user-origins at a time (cache-sized temporaries)."""
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    model.to(device)
    q, y, w, last = _tail(model, _on(batches, device))
    model.to(home)
    q, y, w, regime = q.cpu(), y.cpu(), w.cpu(), regimes(last.cpu())
    q, y = _masked(q, y, w)
    n_users = model.n_users
    tau = torch.tensor(QUANTILES, dtype=q.dtype)
    blocks = list(_blocks(n_users, q.shape[1], block_points))
    fits = [_fit_regime(q, y, w * (regime == r)[..., None], prior_points, block_points, floor) for r in range(N_REGIMES)]
    shift, spread, floor_, widen = (torch.stack(p, 1) for p in zip(*fits))  # [U, 2, ...]
    zeros = torch.zeros(n_users, N_HORIZONS, N_RESOURCES, N_ZERO_BRACKETS, dtype=torch.float64)
    points_m = torch.zeros_like(zeros)
    before = torch.zeros(n_users, N_HORIZONS, N_RESOURCES, dtype=torch.float64)
    after = torch.zeros_like(before)  # the recalibrated loss
    for us, ps in blocks:
        before[us] += _pinball_sums(q[us, ps], y[us, ps], tau).sum(-1)
        final = apply_regimes(q[us, ps], regime[us, ps], shift[us], spread[us], floor_[us], widen[us]) * w[us, ps, :, None, None]
        after[us] += _pinball_sums(final, y[us, ps], tau).sum(-1)
        m = fn.one_hot(zero_brackets(final), N_ZERO_BRACKETS)
        scored = w[us, ps, :, None, None].expand(-1, -1, -1, N_RESOURCES, 1).double()  # [u, n, 6, 4, 1]
        points_m[us] += (m * scored).sum(1)
        zeros[us] += (m * scored * (y[us, ps] <= 0)[..., None]).sum(1)
    zero = fit_zero_mass(zeros, points_m, prior_points)
    model.cal_shift.copy_(shift)
    model.cal_spread.copy_(spread)
    model.cal_floor.copy_(floor_)
    model.cal_widen.copy_(widen)
    model.cal_zero.copy_(zero)
    points = w.sum((1, 2), dtype=torch.float64)  # [U]
    per_user = lambda s: s.sum((1, 2)) / (N_QUANTILES * N_RESOURCES * points.clamp_min(1))  # noqa: E731
    ok = points > 0
    return CalibrationFit(shift, spread, floor_, float(per_user(before)[ok].mean()) if ok.any() else float("nan"),
                          float(per_user(after)[ok].mean()) if ok.any() else float("nan"), zero, widen)


class _OnDevice:
    """``batches`` with every item's tensors moved to ``device``."""

    def __init__(self, batches: ChunkBatches, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in self.batches[j].items()}


def _on(batches: ChunkBatches, device: torch.device) -> ChunkBatches:
    return batches if device.type == "cpu" else _OnDevice(batches, device)  # type: ignore[return-value]
