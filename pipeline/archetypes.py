"""Who the synthetic users are: archetypes, their seasonal intensity curves, and per-user traits.

:mod:`pipeline.generate` turns these into request logs. This module holds the *population*
(what each kind of user does and how often), the generator holds the *arrival process*.

Intensity curves are functions of the user's **local** time (hour of day, day of week with
Monday = 0) and peak at about 1; an archetype's ``peak_rate_per_min`` turns them into requests
per minute for a user of average size. Each user is then scaled by a mean-one lognormal
(``rate_scale``) so users of one archetype differ in volume but not in shape.

Archetypes (default mix in parentheses):

* ``office_hours`` (40 %): weekday 09:00-18:00 plateau with a lunch dip, ~3 % at night,
  ~10 % on weekends; short interactive runs (median 20 s), 0.5-2 cores.
* ``bursty`` (20 %): a mild diurnal Poisson base plus random bursts (scripts, CI fan-outs) of
  ~6 extra requests per minute lasting ~8 minutes; very short runs (median 4 s).
* ``sparse`` (25 %): a few requests a day, mostly daytime; median 45 s.
* ``nightly_batch`` (10 %): a burst around 02:00 local every day (each user's job time jittered
  by up to ±45 min); long runs (median 5 min) on 2-8 cores.
* ``gpu_heavy`` (5 %): GPU training runs (1-8 GPUs, median 30 min), daytime-to-late evening,
  on CUDA images only; never on the free tier.

Tiers and their provisioning weight (DESIGN.md "Aggregation"): free = 1, standard = 2,
premium = 4 — a premium user's uncertainty counts four times a free user's. ``max_cores`` per
tier: 8, 32, 128; every program a user runs fits within it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa

MINUTES_PER_DAY = 1440
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY

CPU_CONFIGS = ("python-3.11-slim", "python-3.12", "node-22", "r-4.4", "java-21", "julia-1.11")
GPU_CONFIGS = ("pytorch-2.13-cuda", "jax-0.7-cuda", "tensorflow-2.20-cuda")
#: The software-configuration catalogue; popularity decides which images users pick.
SOFTWARE_CONFIGS = CPU_CONFIGS + GPU_CONFIGS
_CONFIG_POPULARITY = np.array([5.0, 3.0, 2.0, 1.5, 1.5, 0.5, 5.0, 2.0, 1.0])

TIERS = ("free", "standard", "premium")
TIER_WEIGHT = {"free": 1.0, "standard": 2.0, "premium": 4.0}
TIER_MAX_CORES = {"free": 8.0, "standard": 32.0, "premium": 128.0}

#: UTC offsets (hours) of the user population and their shares: a global platform.
UTC_OFFSETS_H = np.array([-8.0, -5.0, 0.0, 1.0, 2.0, 5.5, 8.0, 9.0])
_UTC_OFFSET_P = np.array([0.10, 0.20, 0.10, 0.25, 0.10, 0.10, 0.10, 0.05])

#: Spread of user volume within an archetype (sigma of a mean-one lognormal).
RATE_SCALE_SIGMA = 0.6
#: Spread of a program's median duration around its archetype's (sigma of a lognormal).
PROGRAM_DURATION_SIGMA = 0.5


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _plateau(h: np.ndarray, on: float, off: float, soft: float) -> np.ndarray:
    """~1 between hours ``on`` and ``off``, smooth edges of ``soft`` hours, ~0 elsewhere."""
    return _sig((h - on) / soft) * _sig((off - h) / soft)


def _bump(h: np.ndarray, center: float, width_h: float) -> np.ndarray:
    """Gaussian bump on the 24-hour circle, peak 1 at ``center``, sd ``width_h`` hours."""
    dist = (h - center + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (dist / width_h) ** 2)


def _office_hours(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    day = _plateau(h, 9.0, 18.0, 0.5) * (1.0 - 0.3 * _bump(h, 12.75, 0.4))
    friday = np.where(d == 4, 0.85, 1.0)
    return np.where(d < 5, 0.03 + 0.97 * day * friday, 0.02 + 0.10 * day)


def _nightly_batch(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    return 0.01 + _bump(h, 2.0, 0.35)


def _bursty(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (0.35 + 0.65 * _plateau(h, 7.0, 22.0, 1.0)) * np.where(d < 5, 1.0, 0.6)


def _sparse(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (0.15 + 0.85 * _plateau(h, 8.0, 20.0, 1.0)) * np.where(d < 5, 1.0, 0.4)


def _gpu_heavy(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (0.2 + 0.8 * _plateau(h, 9.0, 23.0, 1.0)) * np.where(d < 5, 1.0, 0.5)


@dataclass(frozen=True)
class Archetype:
    """One kind of user. Rates in requests/minute, durations in seconds, memory in MB."""

    name: str
    mix: float  # default share of the population
    shape: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (local hour, weekday) -> intensity ~[0, 1]
    peak_rate_per_min: float  # requests/minute at intensity 1, for a user of average volume
    duration_median_s: float
    duration_sigma: float  # per-request lognormal sigma around the program's median
    cores: tuple[tuple[float, float], ...]  # (cores, probability) per program
    memory_per_core_mb: tuple[tuple[float, float], ...]  # (MB per core, probability) per program
    gpus: tuple[tuple[float, float], ...] = ((0.0, 1.0),)  # (GPUs, probability) per program
    gpu_configs: bool = False  # draws its images from GPU_CONFIGS instead of CPU_CONFIGS
    tier_p: tuple[float, float, float] = (0.5, 0.35, 0.15)  # free, standard, premium
    phase_jitter_min: int = 0  # each user's curve shifted by up to ± this many minutes
    burst_starts_per_hour: float = 0.0  # at intensity 1
    burst_mean_min: float = 0.0  # mean burst length, minutes (capped at 60)
    burst_rate_per_min: float = 0.0  # extra requests/minute during a burst (average user)


ARCHETYPES: tuple[Archetype, ...] = (
    Archetype("office_hours", 0.40, _office_hours, 0.5, 20.0, 1.0,
              cores=((0.5, 0.3), (1.0, 0.5), (2.0, 0.2)),
              memory_per_core_mb=((1024.0, 0.3), (2048.0, 0.5), (4096.0, 0.2))),
    Archetype("bursty", 0.20, _bursty, 0.15, 4.0, 0.7,
              cores=((0.25, 0.3), (0.5, 0.5), (1.0, 0.2)),
              memory_per_core_mb=((1024.0, 0.5), (2048.0, 0.5)),
              tier_p=(0.4, 0.4, 0.2), burst_starts_per_hour=0.4, burst_mean_min=8.0, burst_rate_per_min=6.0),
    Archetype("sparse", 0.25, _sparse, 0.005, 45.0, 1.2,
              cores=((0.5, 0.3), (1.0, 0.5), (2.0, 0.2)),
              memory_per_core_mb=((1024.0, 0.3), (2048.0, 0.5), (4096.0, 0.2)),
              tier_p=(0.8, 0.15, 0.05)),
    Archetype("nightly_batch", 0.10, _nightly_batch, 4.0, 300.0, 0.9,
              cores=((2.0, 0.3), (4.0, 0.4), (8.0, 0.3)),
              memory_per_core_mb=((2048.0, 0.5), (4096.0, 0.5)),
              tier_p=(0.2, 0.5, 0.3), phase_jitter_min=45),
    Archetype("gpu_heavy", 0.05, _gpu_heavy, 0.04, 1800.0, 0.8,
              cores=((4.0, 0.3), (8.0, 0.5), (16.0, 0.2)),
              memory_per_core_mb=((4096.0, 0.5), (8192.0, 0.5)),
              gpus=((1.0, 0.5), (2.0, 0.3), (4.0, 0.15), (8.0, 0.05)),
              gpu_configs=True, tier_p=(0.0, 0.4, 0.6)),
)
ARCHETYPE_NAMES = tuple(a.name for a in ARCHETYPES)


@cache
def shape_table() -> np.ndarray:
    """Intensity per archetype and local minute of the week (Monday 00:00 = 0); ``[A, 10080]``.

    Evaluated at each minute's midpoint.
    """
    minute = np.arange(MINUTES_PER_WEEK)
    hour = (minute % MINUTES_PER_DAY + 0.5) / 60.0
    weekday = minute // MINUTES_PER_DAY
    table = np.stack([a.shape(hour, weekday) for a in ARCHETYPES]).astype(np.float64)
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class UserTraits:
    """The drawn population; arrays are per user (length ``n``) or per program (length ``P``).

    Program ``p`` of user ``u`` is ``prog_offset[u] + j`` for ``j < n_programs[u]``.
    """

    user_ids: pa.StringArray  # "u00042"
    archetype: np.ndarray  # int, index into ARCHETYPES
    tier: np.ndarray  # int, index into TIERS
    utc_offset_min: np.ndarray  # int, the user's UTC offset in minutes
    shift_min: np.ndarray  # int, offset plus archetype phase jitter: local-curve minute = UTC minute + shift
    rate_scale: np.ndarray  # mean-one volume multiplier
    burst_rate_per_min: np.ndarray  # extra requests/minute during a burst; 0 for non-bursty users
    configs: tuple[tuple[int, ...], ...]  # per user, indices into SOFTWARE_CONFIGS (1-3)
    prog_offset: np.ndarray  # int, length n + 1
    prog_ids: pa.StringArray  # "u00042-p1"
    prog_config: np.ndarray  # int, index into SOFTWARE_CONFIGS
    prog_cores: np.ndarray  # cores
    prog_memory_mb: np.ndarray  # MB
    prog_gpus: np.ndarray  # GPUs
    prog_log_median_s: np.ndarray  # log of the program's median duration in seconds

    @property
    def n(self) -> int:
        return len(self.archetype)

    @property
    def n_programs(self) -> np.ndarray:
        return np.diff(self.prog_offset)


def normalise_mix(mix: Mapping[str, float] | None) -> np.ndarray:
    """Archetype shares as an array aligned with ARCHETYPES (default: each archetype's ``mix``)."""
    if mix is None:
        weights = np.array([a.mix for a in ARCHETYPES])
    else:
        unknown = set(mix) - set(ARCHETYPE_NAMES)
        if unknown:
            raise ValueError(f"unknown archetype(s) {sorted(unknown)}; choose from {', '.join(ARCHETYPE_NAMES)}")
        weights = np.array([float(mix.get(name, 0.0)) for name in ARCHETYPE_NAMES])
        if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"archetype mix needs finite, non-negative weights with a positive sum, got {dict(mix)}")
    return weights / weights.sum()


def _quota(shares: np.ndarray, n: int) -> np.ndarray:
    """Users per archetype: at least one of each present archetype (when n allows), the rest by
    largest remainder, so even a 10-user demo shows every kind of user."""
    present = shares > 0
    floor = present.astype(np.int64) if n >= present.sum() else np.zeros(len(shares), np.int64)
    ideal = shares * (n - floor.sum())
    counts = floor + np.floor(ideal).astype(np.int64)
    order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _pick(rng: np.random.Generator, options: list[tuple[tuple[float, float], ...]], group: np.ndarray) -> np.ndarray:
    """Draw one value per row of ``group`` from that group's (value, probability) options."""
    width = max(len(o) for o in options)
    values = np.zeros((len(options), width))
    cdf = np.ones((len(options), width))
    for i, opts in enumerate(options):
        values[i, : len(opts)] = [v for v, _ in opts]
        cdf[i, : len(opts)] = np.cumsum([p for _, p in opts]) / sum(p for _, p in opts)
    r = rng.random(len(group))
    idx = np.minimum((r[:, None] >= cdf[group]).sum(axis=1), width - 1)
    return values[group, idx]


def user_traits(users: int, seed: int, mix: Mapping[str, float] | None = None) -> UserTraits:
    """Draw ``users`` users deterministically from ``seed`` (the same population every time)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
    n = users
    arch = np.repeat(np.arange(len(ARCHETYPES)), _quota(normalise_mix(mix), n))
    arch = rng.permutation(arch)
    tier = _pick(rng, [tuple(zip(range(3), a.tier_p)) for a in ARCHETYPES], arch).astype(np.int64)
    offset = np.round(UTC_OFFSETS_H[rng.choice(len(UTC_OFFSETS_H), size=n, p=_UTC_OFFSET_P)] * 60).astype(np.int64)
    jitter_max = np.array([a.phase_jitter_min for a in ARCHETYPES])[arch]
    jitter = np.floor(rng.random(n) * (2 * jitter_max + 1)).astype(np.int64) - jitter_max
    rate_scale = np.exp(RATE_SCALE_SIGMA * rng.standard_normal(n) - RATE_SCALE_SIGMA**2 / 2)
    burst = np.array([a.burst_rate_per_min for a in ARCHETYPES])[arch] * np.exp(0.4 * rng.standard_normal(n) - 0.08)

    # 1-3 distinct images per user, weighted by popularity (Gumbel top-k), CPU or GPU catalogue.
    is_gpu = np.array([c in GPU_CONFIGS for c in SOFTWARE_CONFIGS])
    wants_gpu = np.array([a.gpu_configs for a in ARCHETYPES])[arch]
    allowed = is_gpu[None, :] == wants_gpu[:, None]
    keys = np.where(allowed, np.log(_CONFIG_POPULARITY)[None, :] + rng.gumbel(size=(n, len(SOFTWARE_CONFIGS))), -np.inf)
    ranked = np.argsort(-keys, axis=1, kind="stable")
    n_cfg = rng.integers(1, 4, size=n)
    configs = tuple(tuple(int(c) for c in ranked[u, : n_cfg[u]]) for u in range(n))

    # Programs: as many as images plus 0-3; program j runs on the user's image j mod n_cfg.
    n_prog = n_cfg + rng.integers(0, 4, size=n)
    prog_offset = np.concatenate([[0], np.cumsum(n_prog)])
    prog_user = np.repeat(np.arange(n), n_prog)
    prog_j = np.arange(prog_offset[-1]) - prog_offset[prog_user]
    ranked_flat = ranked[prog_user, prog_j % n_cfg[prog_user]]
    prog_arch = arch[prog_user]
    cores = _pick(rng, [a.cores for a in ARCHETYPES], prog_arch)
    memory = cores * _pick(rng, [a.memory_per_core_mb for a in ARCHETYPES], prog_arch)
    gpus = _pick(rng, [a.gpus for a in ARCHETYPES], prog_arch)
    median = np.array([a.duration_median_s for a in ARCHETYPES])[prog_arch]
    log_median = np.log(median) + PROGRAM_DURATION_SIGMA * rng.standard_normal(len(prog_user))

    width = max(5, len(str(n - 1)))
    names = [f"u{u:0{width}d}" for u in range(n)]
    return UserTraits(
        user_ids=pa.array(names, pa.string()),
        archetype=arch,
        tier=tier,
        utc_offset_min=offset,
        shift_min=offset + jitter,
        rate_scale=rate_scale,
        burst_rate_per_min=burst,
        configs=configs,
        prog_offset=prog_offset,
        prog_ids=pa.array([f"{names[u]}-p{j}" for u, j in zip(prog_user.tolist(), prog_j.tolist())], pa.string()),
        prog_config=ranked_flat.astype(np.int64),
        prog_cores=cores,
        prog_memory_mb=memory,
        prog_gpus=gpus,
        prog_log_median_s=log_median,
    )
