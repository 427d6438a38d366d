"""Benchmark: the stacked trainer at platform scale on one GPU (the issue's H200 check).

Default: 100,000 users x 14 days x 10 per-user epochs, trained as ``--shard-users`` shards one
after another on one device (what the ``train_user_models`` DAG's mapped tasks do, serially):
per shard :func:`models.train.train_dense` (normaliser, inputs and priors, the global model,
the per-user stage with early stopping, the held-out evaluation, the recalibration), the
accelerator Lightning picks (``auto``: the GPU when there is one). Target: <= 300 s in all on
the H200.

Demand is synthetic and dense (made in numpy per shard, not timed): per user a level, a daily
cycle in one of 8 time zones, a weekday/weekend factor, noise, idle buckets, and a start within
the first two days for a fifth of the users (so some have a short history).

The next shard's demand and :func:`models.train.prepare_data` (inputs, normaliser, priors:
numpy on the CPU) are made in a thread while a shard trains. Prints one JSON line: ``value``
(wall seconds from the first shard's data to the last shard trained: ``meets_target`` only at
the full size), ``train_s`` (the sum of :func:`models.train.train_dense` calls) and each shard's
wait for its data, microseconds per user-step (``value`` over users x training origins x
per-user epochs run), users per second, the held-out-tail pinball loss against the last-value
baseline's (mean over users of Σ resources, scaled units), the device and its peak memory.

    python benchmarks/train_gpu.py                                  # the H200 check (GPU)
    python benchmarks/train_gpu.py --users 64 --days 4 --epochs 2   # a smoke run (any machine)

A prepared script: written and run on the CPU at small sizes (tests/models/test_train.py runs it
tiny); the GPU figure is measured only in a session that has the device. There, the image's
python3 has every package it imports (torch, pytorch-lightning, numpy, pyarrow, pyyaml); one call:

    PYTHONUNBUFFERED=1 python3 benchmarks/train_gpu.py 2>&1 | tee $OUT/train_gpu.log   # timeout_s ~540
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.features import BUCKETS_PER_DAY, DenseDemand  # noqa: E402
from models.train import TrainConfig, TrainingData, _device, prepare_data, train_dense  # noqa: E402

START = datetime(2026, 11, 2, tzinfo=timezone.utc)  # a Monday
TARGET_S = 300.0


def synthetic_dense(first_user: int, users: int, days: float, seed: int) -> DenseDemand:
    """``users`` users' dense demand over ``days`` days from :data:`START` (float32 ``[U, T, 4]``)."""
    rng = np.random.default_rng([seed, first_user])
    steps = round(days * BUCKETS_PER_DAY)
    t = np.arange(steps, dtype=np.float32)
    phase = rng.choice(8, users).astype(np.float32) / 8.0
    level = rng.lognormal(0.0, 1.0, users).astype(np.float32)
    diurnal = 1.0 + 0.7 * np.sin(2 * np.pi * (t[None, :] / BUCKETS_PER_DAY - phase[:, None]))
    weekend = np.where((t // BUCKETS_PER_DAY) % 7 >= 5, 0.5, 1.0).astype(np.float32)
    cores = level[:, None] * diurnal * weekend[None, :] * rng.lognormal(0.0, 0.3, (users, steps)).astype(np.float32)
    cores *= rng.random((users, steps), dtype=np.float32) > 0.2  # idle buckets
    first = np.where(rng.random(users) < 0.2, rng.integers(0, 2 * BUCKETS_PER_DAY, users), 0).astype(np.int64)
    cores *= np.arange(steps)[None, :] >= first[:, None]
    values = np.stack([rng.poisson(3.0 * cores).astype(np.float32), cores, 2.0 * cores, 0.1 * cores], axis=-1)
    ids = [f"user-{first_user + i:06d}" for i in range(users)]
    return DenseDemand(ids, START, values, first)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--epochs", type=int, default=10, help="per-user epochs (an upper bound: users stop early)")
    parser.add_argument("--global-epochs", type=int, default=TrainConfig.global_epochs)
    parser.add_argument("--shard-users", type=int, default=25_000, help="users per shard (one train_dense call)")
    parser.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    parser.add_argument("--accelerator", default="auto", help="auto (GPU when present), gpu or cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-on-host", action="store_true",
                        help="keep the training data on the CPU (TrainConfig.data_on_device off; batches copied one by one)")
    args = parser.parse_args(argv)
    config = TrainConfig(hidden=args.hidden, epochs=args.epochs, global_epochs=args.global_epochs, accelerator=args.accelerator,
                         seed=args.seed, checkpoint=False, data_on_device=not args.data_on_host)
    device = _device(config)
    on_device_error = None
    firsts = list(range(0, args.users, args.shard_users))
    prepare_s: list[float] = []

    def make(first: int) -> tuple[DenseDemand, TrainingData]:
        """Shard ``first``'s demand and :func:`prepare_data` (numpy on the CPU, mostly outside the
        GIL): made in a thread while the previous shard trains, as mapped tasks on other workers would."""
        dense = synthetic_dense(first, min(args.shard_users, args.users - first), args.days, args.seed)
        t = time.perf_counter()
        data = prepare_data(dense, config)
        prepare_s.append(time.perf_counter() - t)
        return dense, data

    shards, user_steps, ratios = [], 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(make, firsts[0])
        for k in range(len(firsts)):
            t_wait = time.perf_counter()
            dense, data = ahead.result()
            waited = time.perf_counter() - t_wait
            if k + 1 < len(firsts):
                ahead = pool.submit(make, firsts[k + 1])
            t = time.perf_counter()
            try:
                trained = train_dense(dense, config, data=data)
            except Exception as exc:  # noqa: BLE001 (the on-device data path, unmeasured before: fall back, say so)
                if not config.data_on_device:
                    raise
                on_device_error = f"{type(exc).__name__}: {exc}"[:500]
                config = dataclasses.replace(config, data_on_device=False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t = time.perf_counter()
                trained = train_dense(dense, config, data=data)
            if device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t
            origins = np.clip(data.train_end - 1 - dense.first_active, 0, None)
            user_steps += int(origins.sum()) * trained.epochs_run[1]
            scale = trained.model.scale.numpy()
            final = np.nansum(trained.metrics.pinball / scale, 1)
            last = np.nansum(trained.metrics.last_value_pinball / scale, 1)
            ratios.append(float(np.mean(final[last > 0] / last[last > 0])))
            shards.append({"users": dense.n_users, "train_s": round(took, 2), "waited_for_data_s": round(waited, 2),
                           "epochs_run": list(trained.epochs_run)})
            del dense, data, trained
    total_s = time.perf_counter() - t_all
    full_size = args.users >= 100_000 and args.days >= 14 and args.epochs >= 10
    out = {
        "figure": "train_gpu", "unit": "s to train every user (all shards on one device; data made and prepared alongside)",
        "value": round(total_s, 2), "target_s": TARGET_S, "meets_target": (total_s <= TARGET_S) if full_size else None,
        "train_s": round(sum(s["train_s"] for s in shards), 2), "prepare_s_overlapped": round(sum(prepare_s), 2),
        "us_per_user_step": round(1e6 * total_s / max(user_steps, 1), 4), "users_per_s": round(args.users / total_s, 1),
        "heldout_pinball_over_last_value": round(float(np.mean(ratios)), 4),
        "data_on_device": config.data_on_device and device.type != "cpu", "data_on_device_error": on_device_error,
        "sizes": {"users": args.users, "days": args.days, "epochs": args.epochs, "global_epochs": args.global_epochs,
                  "hidden": args.hidden, "shard_users": args.shard_users, "shards": shards},
        "machine": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                    "cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
