"""Training entry point: demand table in, trained per-user models (and a global one) out.

``train(demand)`` does, on the 5-minute grid of the demand table:

1. holds out each user's last ``val_days`` (the *held-out tail*) for selection and stopping;
2. trains a **global** model (one LSTM, ``n_users=1``) on every user's chunks pooled;
3. builds the **stacked per-user** model, warm-started from the global model (or, with
   ``previous=``, from each user's previous version), and trains it with per-user early
   stopping (:class:`~models.lightning_module.StackedForecaster`); users with less than
   ``min_history_days`` before the tail keep the global model, frozen;
4. per user and resource, falls back to the prior (the last value with the empirical quantiles
   of its errors) where the trained forecast is worse on the held-out tail, so no user ends
   below the last-value baseline there;
5. with ``calibrate``, fits a post-hoc recalibration of each user's quantiles on the held-out
   tail (:mod:`models.calibration`), and of the global model's on its users' tails pooled,
   applied by :func:`predict` and the backtest;
6. reports per-user held-out pinball loss in real units of the final, global and last-value models.

``predict(models, demand, at)`` forecasts the 6 buckets after ``at`` for every user from data
before ``at`` only: quantiles ``[n_users, 6, 4, 7]`` in real units, non-negative (recalibrated).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from models.features import (BUCKET, BUCKETS_PER_DAY, BUCKETS_PER_WEEK, LAG_INPUTS, N_HORIZONS, N_INPUTS, N_RESOURCES, ChunkBatches,
                             DenseDemand, Normaliser,
                             dense_demand, fit_normaliser, input_features, last_value_error_quantiles, typical_scale)
from models.calibration import CALIBRATION_BUFFERS, calibrated, fit_calibration, zero_mass
from models.lightning_module import StackedForecaster, per_user_loss
from models.module import CALIBRATION, N_QUANTILES, StackedLSTM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains. Steps are 5-minute buckets."""

    #: LSTM units per user. 64: on two ServeGen hold-outs (3 days each) pinball loss at 15 / 30 min
    #: 1-2 points further below the best baseline than 32, for ~1.5x the inference time
    hidden: int = 64
    epochs: int = 8  # per-user stage (an upper bound: users stop early)
    global_epochs: int = 5
    lr: float = 1e-2
    global_lr: float = 1e-2
    weight_decay: float = 1e-3
    clip_norm: float = 1.0  # per user
    patience: int = 3  # epochs without held-out improvement before a user freezes
    chunk_steps: int = 144  # origins per parallel chunk of a user's history (12 h)
    segment_steps: int = 12  # steps per optimiser step: the truncated-BPTT length (1 h)
    burn_in: int = 12  # steps before each chunk that only warm up its state (1 h)
    eval_chunk_steps: int = 72  # held-out tail and forecasts: chunk length, warm-up, segment
    eval_burn_in: int = 48  # 4 h; 96 (8 h) forecast no better on ServeGen (two seeds) at twice the inference cost
    eval_segment_steps: int = 48
    val_days: float = 1.0
    min_history_days: float = 2.0
    seed: int = 0
    accelerator: str = "auto"
    progress_bar: bool = False
    checkpoint: bool = True
    log_dir: str | None = None  # CSV logs + checkpoints; None: a temporary folder, removed after
    keep_freed_memory: bool = True  # CPU: see _keep_freed_memory
    threads: int | None = None  # CPU threads while training (None: torch's default); 1 for many shards per machine
    calibrate: bool = True  # recalibrate the quantiles on the held-out tail (models/calibration.py)
    calibration_prior_points: float = 288.0  # tail points a user's own calibration is weighed against the pooled one
    #: also fit the zero floor (idle users' low quantiles -> 0). Designed on one ServeGen hold-out
    #: (the last 3 days) and confirmed on another (the 3 days before 2026-11-13): tie-aware 90 %
    #: coverage 0.76-0.78 -> 0.84-0.86, pinball loss equal or lower, and the aggregated system
    #: forecast and its scaling replay unchanged (within 1 %).
    calibration_floor: bool = True
    #: users the global model trains on: a seeded sample of this many when there are more, so its
    #: cost stops growing with the population; None: all
    global_max_users: int | None = 1024
    #: CPU training runs each step's forward and backward this many users at a time (the same
    #: gradients; one block's activations stay in cache): one segment's forward + backward, 2000
    #: users, hidden 32, 12 steps x 12 chunks, on the 2-core VM, three runs: 2.8-2.9 us per
    #: user-step in blocks of 64-256 (128: 2.76-2.93), 3.2-3.4 of 512, 4.2-4.9 all at once. None:
    #: all at once (on a GPU always: it wants big batches)
    train_block_users: int | None = 128
    #: GPU: hold the training data (inputs, targets) on the device for the whole run, so batches
    #: are cut there instead of on the CPU and copied over one by one. Off by default: not yet
    #: measured on a GPU (benchmarks/train_gpu.py turns it on, and off again if it fails)
    data_on_device: bool = False


@dataclass
class UserMetrics:
    """Per-user held-out-tail pinball loss, real units, ``[n_users, 4]`` (mean over origins,
    horizons and quantiles; NaN for a user with no held-out targets)."""

    pinball: np.ndarray  # the model each user ends with
    global_pinball: np.ndarray
    last_value_pinball: np.ndarray  # the untrained prior: last value + its empirical error quantiles
    best_epoch: np.ndarray  # int [n_users]; -1: kept its starting point
    history_days: np.ndarray  # days of history before the held-out tail
    prior_resources: np.ndarray  # bool [n_users, 4]: forecast by the prior (trained head was worse)


@dataclass
class TrainedModels:
    """What :func:`train` returns. Row ``k`` of ``model`` is user ``user_ids[k]``."""

    user_ids: list[str]
    model: StackedLSTM
    global_model: StackedLSTM
    uses_global: np.ndarray  # bool [n_users]: too little history, forecast by the global model
    since: datetime
    until: datetime  # end of the training window (held-out tail included)
    metrics: UserMetrics
    config: TrainConfig
    epochs_run: tuple[int, int] = (0, 0)  # (global, per-user) epochs actually run
    #: held-out-tail pinball (scaled units, mean over users) before and after recalibration; in-sample
    calibration_loss: tuple[float, float] | None = None
    #: per-user stage: Σ over its epochs of the users trained in it (early stopping's frozen users
    #: and those with too little history are not run); None where unknown (e.g. loaded from a store)
    user_epochs_run: int | None = None


@dataclass
class Forecast:
    """Quantile forecasts ``[n_users, 6, 4, 7]`` (horizon, ``DEMAND_RESOURCES``, ``QUANTILES``),
    real units, non-negative and non-decreasing in the quantile, for the buckets after ``issued_at``;
    ``p_zero`` ``[n_users, 6, 4]``: P(demand = 0) (:func:`models.calibration.zero_mass`)."""

    user_ids: list[str]
    issued_at: datetime
    quantiles: np.ndarray
    uses_global: np.ndarray  # bool [n_users]
    p_zero: np.ndarray | None = None


_freed_memory_kept = False


def _keep_freed_memory() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    Every CPU training batch allocates the same few hundred MB of tensors; by default glibc
    serves blocks that large with fresh ``mmap``s, and each is page-faulted in again on first
    touch (measured at ~1.7 ms per MB on the 2-core VM, more than the arithmetic). Called
    once per process, only when training on CPU under glibc.
    """
    global _freed_memory_kept
    if _freed_memory_kept or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
        for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20)):
            libc.mallopt(option, value)
        _freed_memory_kept = True
    except OSError:  # not glibc
        pass


def _device(config: TrainConfig) -> torch.device:
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


@torch.no_grad()
def evaluate(model: StackedLSTM, batches: ChunkBatches, device: torch.device | str | None = None) -> np.ndarray:
    """Mean pinball loss per user and resource over ``batches``' scored targets: ``[U, 4]``,
    in the model's scaled units (multiply by ``model.scale`` for real units); NaN without targets.
    Runs on ``device`` (default: where the model is), leaving the model where it was."""
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    model.to(device)
    sums = torch.zeros(model.n_users, 4, dtype=torch.float64)
    count = torch.zeros(model.n_users, dtype=torch.float64)
    state = None
    for i in range(len(batches)):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[i].items()}
        s, c, state = per_user_loss(model, batch, state)
        sums += s.double().cpu()
        count += c.double().cpu()
    model.to(home)
    out = sums / (N_QUANTILES * count[:, None])
    return torch.where(count[:, None] > 0, out, torch.nan).numpy()


def _trainer(config: TrainConfig, epochs: int, root: str, name: str) -> pl.Trainer:
    callbacks = [ModelCheckpoint(dirpath=Path(root) / name / "checkpoints", save_top_k=1)] if config.checkpoint else []
    return pl.Trainer(accelerator=config.accelerator, devices=1, max_epochs=epochs, logger=CSVLogger(root, name=name),
                      callbacks=callbacks, enable_checkpointing=config.checkpoint, enable_progress_bar=config.progress_bar,
                      enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)


def training_batches(data: "TrainingData", config: TrainConfig, pooled: bool) -> tuple[ChunkBatches, ChunkBatches]:
    """(training, held-out) batches of :func:`prepare_data`'s output: training origins and
    targets lie before the held-out tail; held-out origins score the tail's buckets."""
    common = dict(features=data.features, scaled=data.scaled, first_active=data.first_active, pooled=pooled)
    train = ChunkBatches(origin_lo=data.origin_lo, origin_hi=data.train_end - 1, target_end=data.train_end,
                         chunk_steps=config.chunk_steps, segment_steps=config.segment_steps, burn_in=config.burn_in, **common)
    val = ChunkBatches(origin_lo=data.train_end - 1, origin_hi=data.n_steps - 1, target_end=data.n_steps,
                       chunk_steps=config.eval_chunk_steps, segment_steps=config.eval_segment_steps,
                       burn_in=config.eval_burn_in, **common)
    return train, val


def _fit(task: StackedForecaster, train: ChunkBatches, val: ChunkBatches, config: TrainConfig, epochs: int, root: str, name: str) -> int:
    """Fit ``task``; returns the number of epochs run."""
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)  # noqa: E731  (ordered: state carries)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        trainer = _trainer(config, epochs, root, name)
        trainer.fit(task, loader(train), loader(val))
    task.cpu()
    return trainer.current_epoch


@dataclass
class TrainingData:
    """The grid of :func:`prepare_data`: ``n_steps`` buckets, held-out tail from ``train_end``."""

    norm: Normaliser
    n_steps: int
    train_end: int  # first bucket of the held-out tail
    origin_lo: int  # first training origin (the earliest first-active bucket)
    features: torch.Tensor  # [U, T, N_INPUTS]
    scaled: torch.Tensor  # [U, T, 4] demand / scale
    first_active: torch.Tensor  # [U]
    prior: torch.Tensor  # [U, 6, 4, 7] last-value error quantiles, scaled units
    history_days: np.ndarray  # [U] days of history before the tail


def prepare_data(dense: DenseDemand, config: TrainConfig) -> TrainingData:
    """Normaliser (training part only), input features, scaled demand and priors of ``dense``;
    the held-out tail is its last ``config.val_days``."""
    n_steps = dense.n_steps
    train_end = n_steps - round(config.val_days * BUCKETS_PER_DAY)
    if train_end < 2:
        raise ValueError(f"{n_steps} buckets of demand leave nothing to train on before a held-out tail of {config.val_days} day(s)")
    norm = fit_normaliser(dense, train_end)
    return TrainingData(
        norm=norm, n_steps=n_steps, train_end=train_end, origin_lo=int(min(dense.first_active.min(), train_end - 2)),
        features=torch.from_numpy(input_features(dense, norm)),
        scaled=torch.from_numpy(dense.values / norm.scale[:, None]),
        first_active=torch.from_numpy(dense.first_active),
        prior=torch.from_numpy(last_value_error_quantiles(dense, norm, train_end)),
        history_days=(train_end - dense.first_active).clip(0) / BUCKETS_PER_DAY,
    )


def _stacked(n_users: int, config: TrainConfig, norm: Normaliser, prior: torch.Tensor) -> StackedLSTM:
    model = StackedLSTM(n_users, N_INPUTS, config.hidden, prior=prior, seed=config.seed)
    model.log_mean.copy_(torch.from_numpy(norm.log_mean))
    model.log_std.copy_(torch.from_numpy(norm.log_std))
    model.scale.copy_(torch.from_numpy(norm.scale))
    return model


def _per_user(loss: np.ndarray) -> torch.Tensor:
    """``[U, 4]`` scaled losses -> ``[U]`` selection loss (inf where unknown)."""
    return torch.from_numpy(np.nan_to_num(loss.sum(1), nan=np.inf)).float()


def _params(model: StackedLSTM) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _fits(model: StackedLSTM | None, config: TrainConfig) -> bool:
    """Whether ``model`` (a previous version's) has the shape ``config`` trains: one to fine-tune from."""
    return model is not None and model.hidden == config.hidden and model.n_inputs == N_INPUTS


def global_sample(n_users: int, config: TrainConfig) -> np.ndarray:
    """Rows (sorted) the global model trains on: every user, or a seeded sample of
    ``config.global_max_users`` of them when there are more."""
    cap = config.global_max_users
    if cap is not None and cap < 1:
        raise ValueError(f"global_max_users must be >= 1 or None, got {cap}")
    if cap is None or n_users <= cap:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(config.seed).choice(n_users, cap, replace=False))


def _train_global(data: TrainingData, config: TrainConfig, enough: torch.Tensor, previous: TrainedModels | None, root: str) -> tuple[StackedLSTM, int]:
    """One LSTM on the chunks of :func:`global_sample`'s users pooled; its prior is the median
    prior of those of them with enough history (of all of them when none has). With
    ``config.calibrate`` its quantiles are recalibrated on those users' held-out tails pooled (it
    forecasts the users without a model of their own; uncalibrated, its 80 % interval held 0.59-0.68
    of ServeGen's held-out points)."""
    rows = global_sample(len(enough), config)
    if len(rows) < len(enough):
        idx = torch.from_numpy(rows)
        on = idx.to(data.features.device)
        data = dataclasses.replace(data, features=data.features[on], scaled=data.scaled[on],
                                   first_active=data.first_active[on], prior=data.prior[idx],
                                   history_days=data.history_days[rows])
        enough = enough[idx]
    users_prior = data.prior[enough] if enough.any() else data.prior
    glob = StackedLSTM(1, N_INPUTS, config.hidden, prior=users_prior.median(dim=0).values[None], seed=config.seed)
    if previous is not None and _fits(previous.global_model, config):
        glob.load_state_dict(previous.global_model.state_dict())
    g_train, g_val = training_batches(data, config, pooled=True)
    g_task = StackedForecaster(glob, config.global_lr, config.weight_decay, config.clip_norm, config.patience)
    g_task.set_initial(_per_user(evaluate(glob, g_val, _device(config))))
    epochs = _fit(g_task, g_train, g_val, config, config.global_epochs, root, "global")
    if config.calibrate:
        fit_calibration(glob, g_val, config.calibration_prior_points, device=_device(config), floor=config.calibration_floor)
    else:  # not a previous version's, fitted to other weights
        with torch.no_grad():
            for name, value in CALIBRATION.items():
                getattr(glob, name).fill_(value)
    return glob, epochs


def _start_points(model: StackedLSTM, glob: StackedLSTM, val: ChunkBatches, user_ids: list[str], previous: TrainedModels | None,
                  device: torch.device) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Warm-start every user: from its previous version where there is one, else from the global
    model (choosing per user by held-out loss was measured to overfit the tail: worse test loss).
    Returns the start's held-out loss ``[U]`` and, ``[U, 4]``, the prior's and the global model's."""
    prior_loss = evaluate(model, val, device)
    model.copy_users_from(glob, torch.ones(model.n_users, dtype=torch.bool))
    global_loss = evaluate(model, val, device)
    rows = {u: i for i, u in enumerate(previous.user_ids)} if previous is not None else {}
    if not any(u in rows for u in user_ids):
        return _per_user(global_loss), prior_loss, global_loss
    params = dict(model.named_parameters())
    for k, u in enumerate(user_ids):
        if u in rows:
            old = previous.model.get_user(rows[u])
            model.set_user(k, {n: old[n] if n in params else t[k] for n, t in model.get_all().items()})
    return _per_user(evaluate(model, val, device)), prior_loss, global_loss


def train(demand: pa.Table, until: datetime | None = None, since: datetime | None = None,
          config: TrainConfig = TrainConfig(), previous: TrainedModels | None = None) -> TrainedModels:
    """Train the global and per-user models on the demand rows in ``[since, until)``.

    Defaults: the table's first bucket to the end of its last bucket. ``previous``: a
    :class:`TrainedModels` to fine-tune from (daily retraining); its users are matched by id.
    Finally, a user's forecast of one resource falls back to its prior (the last value with
    its empirical error quantiles) where the trained head is worse on the held-out tail.
    """
    if demand.num_rows == 0:
        raise ValueError("the demand table is empty: nothing to train on")
    if previous is not None:
        for what, m in (("per-user models", previous.model), ("global model", previous.global_model)):
            if m is not None and not _fits(m, config):
                log.warning("the previous version's %s have %d hidden units and %d inputs, this training %d and %d: "
                            "not fine-tuned from, training from the global model instead", what, m.hidden, m.n_inputs,
                            config.hidden, N_INPUTS)
        if not _fits(previous.model, config):
            previous = dataclasses.replace(previous, user_ids=[], model=None)
    since = since or pc.min(demand["ts"]).as_py()
    until = until or pc.max(demand["ts"]).as_py() + BUCKET
    return train_dense(dense_demand(demand, since, until), config, previous)


def train_dense(dense: DenseDemand, config: TrainConfig = TrainConfig(), previous: TrainedModels | None = None,
                data: TrainingData | None = None) -> TrainedModels:
    """:func:`train` on a dense grid (its whole span is the training window, the held-out tail
    included); ``previous`` must already fit ``config`` (:func:`train` checks). ``data``:
    :func:`prepare_data` of ``dense`` and ``config`` when already made (e.g. in another thread)."""
    torch.manual_seed(config.seed)
    if config.keep_freed_memory and _device(config).type == "cpu":
        _keep_freed_memory()
    data = prepare_data(dense, config) if data is None else data
    if config.data_on_device and _device(config).type != "cpu":
        dev = _device(config)
        data = dataclasses.replace(data, features=data.features.to(dev), scaled=data.scaled.to(dev),
                                   first_active=data.first_active.to(dev))
    root_ctx = tempfile.TemporaryDirectory(prefix="warmcast-train-") if config.log_dir is None else None
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        root = root_ctx.name if root_ctx else config.log_dir
        enough = torch.from_numpy(data.history_days >= config.min_history_days)
        glob, global_epochs = _train_global(data, config, enough, previous, root)
        model = _stacked(dense.n_users, config, data.norm, data.prior)
        train_b, val_b = training_batches(data, config, pooled=False)
        start_loss, prior_loss, global_loss = _start_points(model, glob, val_b, dense.user_ids, previous, _device(config))
        task = StackedForecaster(model, config.lr, config.weight_decay, config.clip_norm, config.patience,
                                 block_users=config.train_block_users if _device(config).type == "cpu" else None)
        task.set_initial(start_loss, active=enough)
        epochs = _fit(task, train_b, val_b, config, config.epochs, root, "users")
        trained = evaluate(model, val_b, _device(config))
        fallback = torch.from_numpy(np.nan_to_num(trained, nan=0.0) > np.nan_to_num(prior_loss, nan=0.0))
        model.reset_head(fallback)
        cal = fit_calibration(model, val_b, config.calibration_prior_points, device=_device(config),
                              floor=config.calibration_floor) if config.calibrate else None
        scale = data.norm.scale
        metrics = UserMetrics(
            pinball=np.where(fallback.numpy(), prior_loss, trained) * scale, global_pinball=global_loss * scale,
            last_value_pinball=prior_loss * scale, best_epoch=task.best_epoch.numpy().copy(),
            history_days=data.history_days, prior_resources=fallback.numpy())
        return TrainedModels(dense.user_ids, model, glob, (~enough).numpy(), dense.t0, dense.end, metrics, config,
                             (global_epochs, epochs), (cal.loss_before, cal.loss_after) if cal else None, task.user_epochs)
    finally:
        torch.set_num_threads(threads)
        if root_ctx:
            root_ctx.cleanup()


def _normaliser(model: StackedLSTM) -> Normaliser:
    return Normaliser(model.log_mean.numpy(), model.log_std.numpy(), model.scale.numpy())


def holdout_batches(models: TrainedModels, demand: pa.Table, start: datetime, end: datetime) -> ChunkBatches:
    """Evaluation batches for ``models``' users scoring the buckets ``[start, end)`` (origins
    from the bucket before ``start``), with the inputs' context read from ``demand`` before."""
    config = models.config
    context = context_buckets(config)
    dense = dense_demand(demand, start - context * BUCKET, end, users=models.user_ids)
    norm = _normaliser(models.model)
    return ChunkBatches(torch.from_numpy(input_features(dense, norm)), torch.from_numpy(dense.values / norm.scale[:, None]),
                        torch.from_numpy(dense.first_active), origin_lo=context - 1, origin_hi=dense.n_steps - 1,
                        target_end=dense.n_steps, chunk_steps=config.eval_chunk_steps, segment_steps=config.eval_segment_steps,
                        burn_in=config.eval_burn_in)


def holdout_pinball(models: TrainedModels, demand: pa.Table, start: datetime, end: datetime,
                    model: StackedLSTM | None = None) -> np.ndarray:
    """Pinball loss ``[n_users, 4]`` in real units (mean over origins, horizons, quantiles) on
    the buckets ``[start, end)`` of ``model`` (default ``models.model``; see :func:`prior_model`)."""
    model = models.model if model is None else model
    return evaluate(model, holdout_batches(models, demand, start, end)) * model.scale.numpy()


def prior_model(model: StackedLSTM) -> StackedLSTM:
    """A copy of ``model`` whose every forecast is its prior: the last value with the empirical
    quantiles of its errors (the last-value baseline)."""
    copy = StackedLSTM(model.n_users, model.n_inputs, model.hidden)
    copy.load_state_dict(model.state_dict())
    copy.reset_head(torch.ones(model.n_users, 4, dtype=torch.bool))
    for name in CALIBRATION_BUFFERS:  # the baseline as it is: no recalibration
        getattr(copy, name).fill_(CALIBRATION[name])
    return copy


def context_buckets(config: TrainConfig) -> int:
    """Buckets of demand before an origin that its inputs can read: the warm-up
    (``eval_burn_in + 1`` steps) and a week before its first step (the last-week lag)."""
    return BUCKETS_PER_WEEK + config.eval_burn_in + 1


def forecast_windows(at: datetime, config: TrainConfig) -> list[tuple[datetime, datetime]]:
    """The bucket ranges ``[start, end)`` whose demand :func:`predict` at ``at`` reads: the
    warm-up before ``at`` (``eval_burn_in + 1`` buckets) and the buckets the lag inputs of those
    steps read (the same span one day and one week earlier, shifted by the bucket they forecast),
    merged where they touch, earliest first. A week of context, of which ~7 % is read (at the
    default 4-hour warm-up): a forecast needs these rows only, not every bucket between."""
    steps = config.eval_burn_in + 1
    spans = []
    for _, lag, ahead, _ in ((0, 0, 0, None), *LAG_INPUTS):
        shift = lag - ahead  # a lag input at step t reads bucket t + ahead - lag
        spans.append((at - (steps + shift) * BUCKET, at - shift * BUCKET))
    merged: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else all)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


@torch.no_grad()
def predict(models: TrainedModels, demand: pa.Table, at: datetime | None = None, users: Sequence[str] | None = None,
            block_users: int = 1024, threads: int | None = 1, workers: int | None = None) -> Forecast:
    """Forecast the 6 buckets from ``at`` (default: ``models.until``) from demand before ``at``.

    ``users``: whom to forecast (default: the trained users plus any new user with rows in the
    context window). A user without its own model is forecast by the global model with its
    own statistics (of the warm-up buckets before ``at``), and flagged in ``uses_global``.
    ``demand`` needs rows in :func:`forecast_windows` only, plus any row before them (a
    user's history starts at its first row; :func:`models.persist.forecast_demand` marks it).
    Only the inputs of the last ``eval_burn_in + 1`` buckets are built, from a grid holding
    the buckets of :func:`forecast_windows` only (a :class:`~models.features.WindowedDemand`: the
    rows between the windows count for where a user's history starts only), and the LSTMs are
    built ``block_users`` users at a time (the results do not depend on it).
    ``threads``: torch threads meanwhile (None: leave as is). The per-step operations are too
    small to gain from intra-op threads, and waking them for each one costs more (measured on
    the 2-core VM: ``tanh`` of 8k values 58 us on one thread, 1.8 ms on two under load).
    The recurrence instead spreads blocks of users over ``workers`` threads (default: the
    CPUs this process may use; see :func:`models.module.recurrence_no_grad`).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _predict(models, demand, at, users, block_users, workers or usable_cpus())
    finally:
        torch.set_num_threads(previous)


def _predict(models: TrainedModels, demand: pa.Table, at: datetime | None, users: Sequence[str] | None, block_users: int,
             workers: int) -> Forecast:
    config = models.config
    at = at or models.until
    steps = config.eval_burn_in + 1
    context = context_buckets(config)
    known = {u: i for i, u in enumerate(models.user_ids)}
    # rows before `at` only, the buckets the inputs read held (the rest counts for first_active)
    hold = forecast_windows(at, config)
    if users is None:  # the trained users first, then new ones
        dense = dense_demand(demand, at - context * BUCKET, at, users=models.user_ids, others=True, hold=hold)
    else:
        dense = dense_demand(demand, at - context * BUCKET, at, users=users, hold=hold)
    rows = np.array([known.get(u, -1) for u in dense.user_ids], dtype=np.int64)
    new = rows < 0
    own = models.model
    stats = {k: getattr(own, k).numpy()[rows.clip(0)] for k in ("log_mean", "log_std", "scale")}
    if new.any():  # users without a model: their own statistics of the warm-up buckets (the
        # context's other buckets may not have been read), floored at the trained users' typical scale
        lo = dense.n_steps - steps
        warm_up = DenseDemand(dense.user_ids, dense.t0 + lo * BUCKET, dense.values_at(np.arange(lo, dense.n_steps)),
                              np.clip(dense.first_active - lo, 0, steps))
        fitted = fit_normaliser(warm_up, steps, rows=np.flatnonzero(new), typical=typical_scale(own.scale.numpy()))
        for k in stats:
            stats[k][new] = getattr(fitted, k)
    norm = Normaliser(**stats)
    # [U, S, 1, F]; a version trained with fewer inputs (older code) reads the first ones
    x = torch.from_numpy(np.ascontiguousarray(input_features(dense, norm, last=steps)[:, :, None, : own.n_inputs]))
    last = torch.from_numpy(dense.values_at(np.array([dense.n_steps - 1]))[:, :, None] / norm.scale[:, None, None])  # [U, 1, 1, 4]
    weights = own.get_all()
    glob = models.global_model.get_all()
    q = torch.empty(len(rows), N_HORIZONS, N_RESOURCES, N_QUANTILES)
    p_zero = torch.empty(len(rows), N_HORIZONS, N_RESOURCES)
    for a in range(0, len(rows), block_users):
        sl = slice(a, a + block_users)
        idx, fresh = torch.from_numpy(rows[sl].clip(0)), torch.from_numpy(new[sl])
        lo, n = int(idx[0]), len(idx)
        # consecutive trained users (the usual block): their rows as views, nothing copied
        run = not fresh.any() and bool((idx == torch.arange(lo, lo + n)).all())
        block = {}
        for k, t in weights.items():
            block[k] = t[lo : lo + n].detach() if run else t[idx]
            if fresh.any():
                block[k][fresh] = glob[k][0]
        for k in ("log_mean", "log_std", "scale"):
            block[k] = torch.from_numpy(stats[k][sl])
        model = StackedLSTM.from_weights(block, copy=False)  # copies or views; inference changes none
        model.inference_workers = workers
        raw = calibrated(model, model(x[sl], last[sl], burn_in=steps - 1)[:, 0, 0], last[sl][:, 0, 0])
        q[sl] = (raw * model.scale[:, None, :, None]).clamp_min(0)
        p_zero[sl] = zero_mass(q[sl], model.cal_zero)  # of the quantiles as published: the same zero count
    uses_global = new | np.array([models.uses_global[r] if r >= 0 else True for r in rows.tolist()], dtype=bool)
    return Forecast(list(dense.user_ids), at, q.numpy(), uses_global, p_zero.numpy())
