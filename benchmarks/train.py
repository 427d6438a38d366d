"""Benchmark: the stacked per-user trainer vs a per-user loop of Lightning ``Trainer.fit``.

Same synthetic demand (``pipeline.generate`` -> ``build_demand_series``), same features,
chunks, truncated-BPTT segments, epochs, hidden size, loss, optimiser and per-user early
stopping on the same held-out tail; the last day is a test day neither model sees.

* ``stacked`` — :func:`models.train.train` for every user at once: the global model, the
  per-user start-point choice, the per-user stage and the final evaluation, all timed;
* ``loop_chunks`` — per user: ``nn.LSTM`` + a linear quantile head (the same last-value skip
  and prior), its own ``pl.Trainer(...).fit`` over the *same* chunked, state-carrying segments
  (the strongest per-user loop we could write);
* ``loop_windows`` — per user, the conventional formulation the issue timed (~5 s/user):
  sliding one-day windows every hour, a forecast at each window's end, batches of 32;
  both timed on ``--loop-users`` users and extrapolated to all.

Prints one JSON line: microseconds per user-step (one user x one training origin x one epoch,
forward + backward; ``us_per_user_step`` is the whole ``train()`` wall time over all its
epochs, the global model's counted on the users it trains on (at most ``global_max_users``;
``us_per_trained_user_step``: over the user-steps actually run, the per-user stage skipping the
users early stopping froze, as each loop stops its own user),
``kernel_us_per_user_step`` one training segment's forward + backward alone), users/s,
each loop's extrapolated time and speed-up, and the held-out (test-day) pinball loss of every
model and of the last-value baseline (mean over users of Σ_resources pinball / user scale).
Targets on the 2-core CPU: speed-up >= 100x at equal or better loss; <= 3 us per user-step.
``compute_floor``: the matrix products' floating-point operations per user-step of that segment
(counted by torch as they run) over this machine's float32 matrix-product rate (a 2048² product,
measured in the same run): the time per user-step below which no trainer of this model can go
here, and ``speedup_bound_at_peak``, each loop's time over the user-steps the stacked run ran, at that
floor: the largest speed-up over that loop the machine allows. The same in bfloat16
(``*_bf16``, ``speedup_bound_at_bf16_peak``): a CPU with AMX multiplies large bf16 matrices
several times faster; ``kernel_us_per_user_step_bf16`` times the same segment with the model
and inputs cast to bf16, which shows whether these per-user products get that rate.
The machine's 1-minute load average is in the output: timings on a shared 2-core VM vary by
several times with other processes' load. ``machine.native_kernel``: whether the stacked trainer
ran its element-wise parts in the C kernel (:mod:`models.native`); ``WARMCAST_NATIVE=0`` times
the torch path instead (the loops are plain torch either way).

    python benchmarks/train.py                       # 256 users x 8 days (under a minute)
    python benchmarks/train.py --users 2000 --days 15 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import native  # noqa: E402
from models.features import ChunkBatches, dense_demand  # noqa: E402
from models.lightning_module import fused_adamw, per_user_loss, train_backward  # noqa: E402
from models.module import N_OUTPUTS, head_bias_from_quantiles, pinball, quantiles_from_head  # noqa: E402
from models.train import (TrainConfig, TrainingData, evaluate, global_sample, holdout_batches, prepare_data, prior_model,  # noqa: E402
                          train, training_batches)
from pipeline.demand import build_demand_series  # noqa: E402
from pipeline.generate import generate_requests  # noqa: E402

START = datetime(2026, 11, 2, tzinfo=timezone.utc)


class LoopLSTM(pl.LightningModule):
    """One user's model the conventional way: ``nn.LSTM`` + ``nn.Linear`` head (zero weights,
    prior bias: the same last-value skip), AdamW, Trainer-side global-norm clipping, and
    early stopping that keeps the best epoch's weights."""

    n_users = 1

    def __init__(self, n_inputs: int, hidden: int, prior: torch.Tensor, config: TrainConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_inputs, hidden)
        self.head = nn.Linear(hidden, N_OUTPUTS)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(head_bias_from_quantiles(prior))
        self.config, self.best_loss, self.stale, self.best_state = config, float("inf"), 0, None
        self._state: dict = {"train": None, "val": None}
        self._val: list = []

    def pinball_sums(self, x, last, target, weight, burn_in=0, state=None):
        out, (h, c) = self.lstm(x[0], state)  # x [1, S, C, F]: sequence-first for nn.LSTM
        q = quantiles_from_head(self.head(out[burn_in:]).view(*last.shape[1:3], 6, 4, 7), last[0])
        sums = (weight[0][..., None, None] * pinball(q, target[0])).sum(dim=(0, 1, 2, 4))
        return sums[None], (h.detach(), c.detach())

    def training_step(self, batch, batch_idx):
        sums, count, self._state["train"] = per_user_loss(self, batch, self._state["train"])
        return sums.sum() / (7.0 * count.clamp_min(1)).sum()

    def validation_step(self, batch, batch_idx):
        sums, count, self._state["val"] = per_user_loss(self, batch, self._state["val"])
        self._val.append((sums.sum().item(), count.sum().item()))

    def on_validation_epoch_end(self):
        loss = sum(s for s, _ in self._val) / max(7.0 * sum(c for _, c in self._val), 1.0)
        self._val.clear()
        if loss < self.best_loss:
            self.best_loss, self.stale = loss, 0
            self.best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        else:
            self.stale += 1
            self.trainer.should_stop = self.stale >= self.config.patience

    def on_train_end(self):
        if self.best_state is not None:
            self.load_state_dict(self.best_state)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if "weight" in n]
        rest = [p for n, p in self.named_parameters() if "weight" not in n]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=self.config.lr, fused=fused_adamw(self.parameters()))


def _one_user(batches: ChunkBatches, u: int) -> ChunkBatches:
    """``batches`` restricted to user ``u`` (same chunks, segments and warm-up)."""
    one = ChunkBatches.__new__(ChunkBatches)
    one.__dict__.update(batches.__dict__)
    one.features, one.scaled, one.first_active = batches.features[u : u + 1], batches.scaled[u : u + 1], batches.first_active[u : u + 1]
    return one


class WindowLSTM(LoopLSTM):
    """The conventional per-user formulation: sliding windows of ``WINDOW`` steps (one day of
    context), one forecast at each window's end, shuffled mini-batches of 32 windows."""

    def pinball_window(self, batch):
        out, _ = self.lstm(batch["x"].transpose(0, 1))  # [W, B, H]
        q = quantiles_from_head(self.head(out[-1]).view(-1, 6, 4, 7), batch["last"])
        return (batch["weight"][..., None, None] * pinball(q, batch["target"])).sum(), batch["weight"].sum()

    def training_step(self, batch, batch_idx):
        loss, count = self.pinball_window(batch)
        return loss / (7.0 * count.clamp_min(1))

    def validation_step(self, batch, batch_idx):
        loss, count = self.pinball_window(batch)
        self._val.append((loss.item(), count.item()))


WINDOW, WINDOW_STRIDE, WINDOW_BATCH = 288, 12, 32


def _windows(features: torch.Tensor, scaled: torch.Tensor, first_active: int, origins: range, target_end: int) -> torch.utils.data.TensorDataset:
    """One user's windows ending at ``origins``: x ``[N, W, F]``, last ``[N, 4]``, target ``[N, 6, 4]``, weight ``[N, 6]``."""
    t = torch.tensor(list(origins))
    steps = t[:, None] + torch.arange(1 - WINDOW, 1)
    x = features[steps.clamp(min=0)] * (steps >= 0)[..., None]
    tgt = t[:, None] + 1 + torch.arange(6)
    weight = ((tgt < target_end) & (t[:, None] >= first_active)).float()
    return torch.utils.data.TensorDataset(x, scaled[t], scaled[tgt.clamp(max=scaled.shape[0] - 1)], weight)


def _window_loader(ds: torch.utils.data.TensorDataset, shuffle: bool) -> torch.utils.data.DataLoader:
    names = ("x", "last", "target", "weight")
    return torch.utils.data.DataLoader(ds, batch_size=WINDOW_BATCH, shuffle=shuffle,
                                       collate_fn=lambda rows: {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(names)})


def _trainer(config: TrainConfig) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      gradient_clip_val=config.clip_norm)


def _run_loop(data: TrainingData, config: TrainConfig, users: list[int], style: str) -> tuple[float, dict, int]:
    """Per-user ``Trainer.fit`` for ``users``: (seconds, models by user, epochs run in total)."""
    train_b, val_b = training_batches(data, config, pooled=False)
    chunk_loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)  # noqa: E731
    models, epochs = {}, 0
    t0 = time.perf_counter()
    for u in users:
        cls = LoopLSTM if style == "chunks" else WindowLSTM
        model = cls(data.features.shape[-1], config.hidden, data.prior[u], config)
        trainer = _trainer(config)
        if style == "chunks":
            trainer.fit(model, chunk_loader(_one_user(train_b, u)), chunk_loader(_one_user(val_b, u)))
        else:
            end, n = data.train_end, data.n_steps
            args = (data.features[u], data.scaled[u], int(data.first_active[u]))
            fit_ds = _windows(*args, range(int(data.first_active[u]) + WINDOW_STRIDE - 1, end - 1, WINDOW_STRIDE), end)
            val_ds = _windows(*args, range(end - 1, n - 1, WINDOW_STRIDE), n)
            trainer.fit(model, _window_loader(fit_ds, True), _window_loader(val_ds, False))
        models[u], epochs = model, epochs + trainer.current_epoch
    return time.perf_counter() - t0, models, epochs


@torch.no_grad()
def _window_test(model: WindowLSTM, hold: ChunkBatches, u: int) -> np.ndarray:
    """Held-out loss ``[4]`` (scaled) of a window model at every test origin."""
    ds = _windows(hold.features[u], hold.scaled[u], int(hold.first_active[u]), range(hold.origin_lo, hold.origin_hi), hold.target_end)
    sums, count = torch.zeros(4, dtype=torch.float64), 0.0
    for batch in _window_loader(ds, False):
        out, _ = model.lstm(batch["x"].transpose(0, 1))
        q = quantiles_from_head(model.head(out[-1]).view(-1, 6, 4, 7), batch["last"])
        sums += (batch["weight"][..., None, None] * pinball(q, batch["target"])).sum(dim=(0, 1, 3)).double()
        count += batch["weight"].sum().item()
    return (sums / (7.0 * max(count, 1.0))).numpy()


def _kernel_batch(data: TrainingData, config: TrainConfig) -> dict:
    """One training segment as training runs it: the second of a chunk (no warm-up steps) where
    chunks have several."""
    return training_batches(data, config, pooled=False)[0][1 if config.segment_steps < config.chunk_steps else 0]


def _kernel_us(models, data: TrainingData, config: TrainConfig, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Forward + backward of one training segment of every user, as training runs it (in blocks
    of ``config.train_block_users`` users), microseconds per user-step. ``dtype``: the parameters
    and the segment's inputs cast to it (a copy of the model: training itself runs in float32)."""
    model = models.model
    batch = _kernel_batch(data, config)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        train_backward(model, batch, None, config.train_block_users, lambda loss: loss.backward())
        best = min(best, time.perf_counter() - t)
    model.zero_grad()
    return best / (model.n_users * batch["last"].shape[1] * batch["last"].shape[2]) * 1e6


def _kernel_flops(models, data: TrainingData, config: TrainConfig) -> float:
    """Floating-point operations of the matrix products (``aten.bmm`` / ``baddbmm``, counted by
    torch's ``FlopCounterMode`` as they run) in the forward + backward of the segment
    :func:`_kernel_us` times, per user-step: the work no implementation of this model avoids
    (the element-wise gates, softplus and pinball terms are left out, so it is a lower bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.model
    batch = _kernel_batch(data, config)
    with FlopCounterMode(display=False) as counter:
        train_backward(model, batch, None, config.train_block_users, lambda loss: loss.backward())
    model.zero_grad()
    return counter.get_total_flops() / (model.n_users * batch["last"].shape[1] * batch["last"].shape[2])


def _peak_gflops(size: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-product rate in ``dtype`` (GFLOP/s, best of ``reps``) on a large square
    product at torch's current thread count: the fastest any of the products above can run."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def _scaled_mean(loss: np.ndarray, scale: np.ndarray) -> float:
    return float(np.nanmean((loss / scale).sum(axis=1)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--days", type=float, default=8.0, help="days of demand; the last one is the test day")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--global-epochs", type=int, default=TrainConfig.global_epochs)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--loop-users", type=int, default=8, help="users the per-user loops are timed (and scored) on")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    t_gen = time.perf_counter()
    demand = build_demand_series(pa.concat_tables(list(generate_requests(args.users, args.days, START, args.seed))))
    test_end = START + timedelta(days=args.days)
    test_start = test_end - timedelta(days=1)
    before = demand.filter(pc.less(demand["ts"], pa.scalar(test_start, demand.schema.field("ts").type)))
    gen_s = time.perf_counter() - t_gen
    config = TrainConfig(hidden=args.hidden, epochs=args.epochs, global_epochs=args.global_epochs, seed=args.seed,
                         accelerator="cpu", checkpoint=False)

    t0 = time.perf_counter()
    models = train(before, until=test_start, config=config)
    stacked_s = time.perf_counter() - t0
    data = prepare_data(dense_demand(before, models.since, models.until, users=models.user_ids), config)
    origins = data.train_end - 1 - data.origin_lo
    n_users = len(models.user_ids)
    global_users = len(global_sample(n_users, config))  # the global model trains on a sample of at most global_max_users
    stacked_steps = origins * (global_users * models.epochs_run[0] + n_users * models.epochs_run[1])
    # the user-steps actually run: the per-user stage skips users early stopping froze (as the loops do)
    trained_steps = origins * (global_users * models.epochs_run[0] + models.user_epochs_run)

    hold = holdout_batches(models, demand, test_start, test_end)
    scale = models.model.scale.numpy()
    lstm_test = evaluate(models.model, hold) * scale
    last_test = evaluate(prior_model(models.model), hold) * scale

    own = np.flatnonzero(~models.uses_global)  # users with their own model, spread over the population
    eligible = own[np.unique(np.linspace(0, len(own) - 1, min(args.loop_users, len(own))).round().astype(int))].tolist()
    kernel = _kernel_us(models, data, config)
    kernel_bf16 = _kernel_us(models, data, config, dtype=torch.bfloat16)
    flops, peak, peak_bf16 = _kernel_flops(models, data, config), _peak_gflops(), _peak_gflops(dtype=torch.bfloat16)
    floor_us = flops / (peak * 1e3)  # us per user-step if every product ran at the peak rate and nothing else took time
    floor_bf16_us = flops / (peak_bf16 * 1e3)
    loops = {}
    for style in ("chunks", "windows"):
        loop_s, loop_models, loop_epochs = _run_loop(data, config, eligible, style)
        if style == "chunks":
            test = np.stack([evaluate(loop_models[u], _one_user(hold, u))[0] for u in eligible]) * scale[eligible]
        else:
            test = np.stack([_window_test(loop_models[u], hold, u) for u in eligible]) * scale[eligible]
        per_user = loop_s / max(len(eligible), 1)
        loops[style] = {"s_per_user": round(per_user, 3), "extrapolated_s": round(per_user * n_users, 1),
                        "users_per_s": round(1 / per_user, 3), "epochs_run": loop_epochs,
                        "us_per_user_step": round(loop_s / max(origins * loop_epochs, 1) * 1e6, 2),
                        "speedup_stacked": round(per_user * n_users / stacked_s, 1),
                        # the most any trainer of this model could reach over this loop here: the
                        # user-steps the stacked run ran, at the compute floor
                        "speedup_bound_at_peak": round(per_user * n_users / (floor_us * 1e-6 * trained_steps), 1),
                        "speedup_bound_at_bf16_peak": round(per_user * n_users / (floor_bf16_us * 1e-6 * trained_steps), 1),
                        "heldout_pinball_scaled": round(_scaled_mean(test, scale[eligible]), 4)}
    stacked_loop_users = _scaled_mean(lstm_test[eligible], scale[eligible])
    out = {
        "figure": "train", "unit": "us per user-step (one user x one training origin x one epoch, fwd+bwd)",
        "sizes": {"users": n_users, "global_model_users": global_users, "days": args.days, "train_origins_per_user": origins, "epochs": args.epochs,
                  "global_epochs": args.global_epochs, "hidden": args.hidden, "loop_users_timed": len(eligible)},
        "stacked": {"train_s": round(stacked_s, 2), "users_per_s": round(n_users / stacked_s, 1),
                    "epochs_run": list(models.epochs_run), "us_per_user_step": round(stacked_s / stacked_steps * 1e6, 3),
                    "per_user_stage_user_epochs": models.user_epochs_run,
                    "us_per_trained_user_step": round(stacked_s / trained_steps * 1e6, 3),
                    "kernel_us_per_user_step": round(kernel, 3)},
        "compute_floor": {"matmul_flops_per_user_step": round(flops), "peak_matmul_gflops": round(peak, 1),
                          "floor_us_per_user_step": round(floor_us, 3), "kernel_share_of_peak": round(floor_us / kernel, 3),
                          "peak_matmul_gflops_bf16": round(peak_bf16, 1), "floor_us_per_user_step_bf16": round(floor_bf16_us, 3),
                          "kernel_us_per_user_step_bf16": round(kernel_bf16, 3)},
        "loop_chunks": loops["chunks"], "loop_windows": loops["windows"],
        "heldout_pinball_scaled": {"stacked_all_users": round(_scaled_mean(lstm_test, scale), 4),
                                   "last_value_all_users": round(_scaled_mean(last_test, scale), 4),
                                   "stacked_loop_users": round(stacked_loop_users, 4)},
        "heldout_pinball_real_mean": {r: round(float(np.nanmean(lstm_test[:, i])), 4) for i, r in enumerate(("requests", "cpu_cores", "memory_gb", "gpus"))},
        "targets": {"speedup_min": 100, "us_per_user_step_max": 3.0},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                    "platform": platform.platform(), "torch": torch.__version__, "generate_s": round(gen_s, 2),
                    "native_kernel": native.usable(torch.empty(0))},
    }
    for style in ("chunks", "windows"):
        out[f"loop_{style}"]["loss_ratio_loop_over_stacked"] = round(loops[style]["heldout_pinball_scaled"] / stacked_loop_users, 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
