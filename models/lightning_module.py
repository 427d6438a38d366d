"""Training of stacked per-user models: the loss, per-user clipping and per-user early stopping.

Loss: pinball loss, per user the mean over (origin, horizon, quantile) summed over resources,
then *summed* over users, so a user's gradient is its own loss's gradient whatever the number
of users. Both training and selection use targets divided by a per-user, per-resource constant
(``scale``), i.e. pinball loss in the demand's own units up to that constant, never in log space.
"""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor

from models.module import StackedLSTM


State = tuple[Tensor, Tensor]


def fused_adamw(params) -> bool | None:
    """``fused=True`` for AdamW where torch has the fused kernel for these parameters' device
    (CPU and CUDA): one pass over the weights per step instead of a dozen (CPU, 256 users,
    hidden 32: 1.1 ms a step instead of 9.9, next to ~75 ms for the step's forward and
    backward). None (torch's default) elsewhere."""
    devices = {p.device.type for p in params}
    return True if devices <= {"cpu", "cuda"} else None


def _state_to_update(model: StackedLSTM, batch: dict, state: State | None) -> State:
    """A copy of ``state`` to write the run rows into (zeros after a reset): rows not run keep theirs."""
    x = batch["x"]
    if state is not None:
        return state[0].clone(), state[1].clone()
    return x.new_zeros(model.n_users, x.shape[2], model.hidden), x.new_zeros(model.n_users, x.shape[2], model.hidden)


def per_user_loss(model: StackedLSTM, batch: dict, state: State | None, users: Tensor | None = None) -> tuple[Tensor, Tensor, State]:
    """Weighted pinball sums ``[U, 4]`` and number of scored targets ``[U]`` of one
    :class:`~models.features.ChunkBatches` item, and the LSTM state to carry to the next one.

    ``users``: run only these rows (ascending indices, e.g. the users early stopping has not
    frozen); the others get zero sums and counts and keep their state (zeros after a reset).
    Each user's values are those of the whole batch at once: its rows only enter its own."""
    state = None if batch["reset"] else state
    n = model.n_users
    if users is None or len(users) == n:
        sums, state = model.pinball_sums(batch["x"], batch["last"], batch["target"], batch["weight"], batch["burn_in"], state)
        return sums, batch["weight"].sum(dim=(1, 2, 3)), state
    h, c = _state_to_update(model, batch, state)
    sums, count = h.new_zeros(n, batch["target"].shape[-1]), h.new_zeros(n)
    if len(users):
        part = {k: batch[k].index_select(0, users) for k in ("x", "last", "target", "weight")}
        start = None if state is None else (state[0].index_select(0, users), state[1].index_select(0, users))
        params = {k: p.detach().index_select(0, users) for k, p in model.named_parameters()}
        s, (h[users], c[users]) = model.pinball_sums(part["x"], part["last"], part["target"], part["weight"], batch["burn_in"], start, params)
        sums[users], count[users] = s, part["weight"].sum(dim=(1, 2, 3))
    return sums, count, (h, c)


def train_backward(model: StackedLSTM, batch: dict, state: State | None, block_users: int | None,
                   backward: Callable[[Tensor], None], users: Tensor | None = None) -> tuple[Tensor, State]:
    """Forward and backward pass of one training item (:class:`~models.features.ChunkBatches`),
    ``block_users`` users at a time (None: all at once): each block's loss (Σ over its users of
    the per-user mean pinball loss) is passed to ``backward`` as soon as it is formed, so only
    one block's activations are alive. A user's gradient depends on its own rows only, so the
    gradients are those of the whole batch at once (up to float summation order); a block runs
    on leaf views of its rows of the parameters, whose gradients are then added into the
    parameters' own (autograd through a slice would add a zero tensor of every user per block).

    ``users``: the rows to run (ascending indices, e.g. the users early stopping has not frozen);
    None: all. The others cost nothing: their gradient rows are 0 and their state rows are carried
    over unchanged (zeros after a reset). Returns the loss summed over the users run (detached) and
    the LSTM state ``[U, C, H]`` to carry to the next item."""
    state = None if batch["reset"] else state
    n = model.n_users
    if users is not None and len(users) == n:
        users = None  # every row: the slices below, no gathering
    m = n if users is None else len(users)
    size = m if not block_users or block_users >= m else block_users
    params = dict(model.named_parameters())
    fresh = set()  # parameters whose gradient the blocks write (every row run once) rather than add to
    if size < n:
        for k, p in params.items():
            if p.requires_grad and p.grad is None:
                p.grad = torch.empty_like(p) if users is None else torch.zeros_like(p)
                fresh.add(k)
    total, hs, cs = batch["x"].new_zeros(()), [], []
    for lo in range(0, m, max(size, 1)):
        rows = slice(lo, lo + size) if users is None else users[lo : lo + size]
        take = (lambda t: t[rows]) if users is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        part = {k: take(batch[k]) for k in ("x", "last", "target", "weight")}
        start = None if state is None else (take(state[0]), take(state[1]))
        block = None if size == n else {k: take(p.detach()).requires_grad_(p.requires_grad) for k, p in params.items()}
        sums, (h, c) = model.pinball_sums(part["x"], part["last"], part["target"], part["weight"], batch["burn_in"], start, block)
        count = part["weight"].sum(dim=(1, 2, 3))
        loss = (sums.sum(1) / (count.clamp_min(1) * sums.new_tensor(7.0))).sum()
        backward(loss)
        if block is not None:
            for k, leaf in block.items():
                if not params[k].requires_grad:
                    continue
                if leaf.grad is None:
                    if k in fresh:
                        params[k].grad[rows] = 0.0
                elif k in fresh:
                    params[k].grad[rows] = leaf.grad
                else:
                    params[k].grad[rows] += leaf.grad
        total = total + loss.detach()
        hs.append(h)
        cs.append(c)
    if users is None:
        return total, ((hs[0], cs[0]) if len(hs) == 1 else (torch.cat(hs), torch.cat(cs)))
    h, c = _state_to_update(model, batch, state)  # the rows not run keep their state
    if hs:
        h[users], c[users] = torch.cat(hs), torch.cat(cs)
    return total, (h, c)


class StackedForecaster(pl.LightningModule):
    """Trains a :class:`StackedLSTM`; keeps, per user, the parameters of its best epoch.

    Early stopping is per user: after each validation epoch a user whose held-out loss did not
    improve for ``patience`` epochs is frozen: it is no longer run (no forward or backward pass, a
    zero gradient) and its rows are reset to its best epoch after every step (the optimiser's decay
    would still move them). Training stops when every user is frozen. ``best_loss`` holds the
    best held-out loss per user; call :meth:`set_initial` with the loss before training.
    """

    def __init__(self, model: StackedLSTM, lr: float = 1e-2, weight_decay: float = 1e-3,
                 clip_norm: float = 1.0, patience: int = 2, block_users: int | None = None) -> None:
        super().__init__()
        # the optimiser step is ours: forward and backward run block by block of users
        # (train_backward), then per-user clipping, then the step
        self.automatic_optimization = False
        self.model = model
        self.block_users = block_users
        self._state: dict[str, State | None] = {"train": None, "val": None}
        self.lr, self.weight_decay, self.clip_norm, self.patience = lr, weight_decay, clip_norm, patience
        n = model.n_users
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        self.register_buffer("best_loss", torch.full((n,), float("inf")))
        self.register_buffer("best_epoch", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("stale", torch.zeros(n, dtype=torch.long))
        self.best = {k: p.detach().clone() for k, p in model.named_parameters()}
        self._val: list[tuple[Tensor, Tensor]] = []
        self.user_epochs = 0  # Σ over training epochs of the users trained in each

    def set_initial(self, loss: Tensor, active: Tensor | None = None) -> None:
        """Held-out loss ``[U]`` of the current parameters (epoch -1); ``active`` masks users to train."""
        self.best_loss.copy_(loss)
        self.best = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        if active is not None:
            self.active.copy_(active)

    def on_fit_start(self) -> None:
        self.best = {k: v.to(self.device) for k, v in self.best.items()}

    def on_train_epoch_start(self) -> None:
        self.user_epochs += int(self.active.sum())  # the users this epoch trains (frozen ones are not run)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        # frozen users (early stopping, or too little history) are not run: their rows would be
        # reset to their best parameters after the step anyway
        users = self.active.nonzero().squeeze(1)
        loss, self._state["train"] = train_backward(self.model, batch, self._state["train"], self.block_users,
                                                    self.manual_backward, users=users)
        self.configure_gradient_clipping(opt)
        opt.step()
        self.log("train_loss", loss / max(len(users), 1), prog_bar=True, batch_size=1)  # mean over the users trained
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # frozen users are not run: their held-out loss no longer decides anything
        users = self.active.nonzero().squeeze(1)
        sums, count, self._state["val"] = per_user_loss(self.model, batch, self._state["val"], users)
        self._val.append((sums, count))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val:
            self._val.clear()
            return
        sums = torch.stack([s for s, _ in self._val]).sum(0).sum(1)
        count = torch.stack([c for _, c in self._val]).sum(0)
        self._val.clear()
        loss = torch.where(count > 0, sums / (7.0 * count.clamp_min(1)), torch.full_like(sums, float("inf")))
        self.update_best(loss, self.current_epoch)
        # the mean over the users validated (frozen ones are not: their loss is inf here)
        self.log("val_loss", loss[torch.isfinite(loss)].mean() if torch.isfinite(loss).any() else loss.new_tensor(0.0), batch_size=1)
        self.log("active_users", self.active.sum().float(), batch_size=1)
        if not self.active.any():
            self.trainer.should_stop = True

    @torch.no_grad()
    def update_best(self, loss: Tensor, epoch: int) -> None:
        """Record ``loss`` ``[U]``: improved active users keep these parameters; others go stale."""
        better = self.active & (loss < self.best_loss)
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_epoch[better] = epoch
        for name, p in self.model.named_parameters():
            self.best[name] = torch.where(better.view(-1, *[1] * (p.dim() - 1)), p, self.best[name])
        self.stale = torch.where(better, 0, self.stale + 1)
        self.active &= self.stale < self.patience
        self.restore_frozen()

    @torch.no_grad()
    def restore_frozen(self, users: Tensor | None = None) -> None:
        """Reset the rows of ``users`` (default: the frozen ones) to their best parameters."""
        rows = (~self.active if users is None else users).nonzero().squeeze(1)
        if rows.numel():  # the frozen rows only (after every step: a full pass over the weights cost more than the optimiser)
            for name, p in self.model.named_parameters():
                p.index_copy_(0, rows, self.best[name].index_select(0, rows))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Per-user clipping: each user's gradient (its rows of every parameter) is scaled to
        norm <= ``clip_norm`` on its own; frozen users' gradients are zeroed. Called by
        :meth:`training_step` before every step (manual optimisation: Lightning does not)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))
        factor = (self.clip_norm / (norm + 1e-6)).clamp(max=1.0) * self.active
        for g in grads:
            g.mul_(factor.view(-1, *[1] * (g.dim() - 1)))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.restore_frozen()  # AdamW's momentum and decay would still move frozen rows

    def on_train_end(self) -> None:
        self.restore_frozen(torch.ones_like(self.active))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if n.startswith("w_")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("w_")]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=self.lr, fused=fused_adamw(self.model.parameters()))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_parameters"] = self.best

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = checkpoint.get("best_parameters", self.best)
