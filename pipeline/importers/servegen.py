"""Import an Alibaba ServeGen language-model trace (Xiang et al., arXiv:2505.09999).

Input (a directory, e.g. ``servegen_language_m_large/``): one ``chunk-N-trace.csv`` per client
(tenant), no header, one row per 600-second window::

    timestamp_s, rate_req_per_s, cv, iat_distribution, param1, param2

``iat_distribution`` is ``Weibull``, ``Gamma``, ``Exponential`` or empty (no requests), fitted
to the window's inter-arrival times (IATs). As in ServeGen's own loader and generator
(``servegen/clientpool.py``, ``servegen/construct.py``), ``param1`` is the *shape* and
``param2`` the *scale* in seconds, in scipy's parametrisation: ``gamma(a=param1,
scale=param2)`` (mean ``a*scale``; in m-large ``1/sqrt(a)`` equals the ``cv`` column) and
``weibull_min(c=param1, scale=param2)``. numpy's equivalents are ``rng.gamma(shape, scale)`` and
``scale * rng.weibull(shape)`` — ``rng.weibull`` has no scale argument.

How arrivals are drawn (per window ``[start + timestamp_s, + 600 s)``):

- Count: the window's ``rate * 600`` is its observed request count (an integer in the real
  trace); a fractional value ``x`` gives ``floor(x)`` or ``floor(x)+1`` requests with
  ``P(+1) = x - floor(x)``, so the expected count is exactly ``rate * 600``.
- Times: ``N + 1`` gaps are drawn from the fitted shape and the arrivals placed at their
  cumulative sums, rescaled so the ``N+1`` gaps span the window (ServeGen's ``construct.py``
  rescales its IATs to the window the same way). This keeps the fitted burstiness (the
  shape, hence the CV) and the observed count. Using the fitted scale as is would not: the
  Weibull fits in m-large imply a mean IAT 1.46x the observed one on average (0.002x-8.9x), and
  a renewal process started at the window edge is biased by ``(cv^2 - 1)/2`` arrivals per window.
  Because the scale cancels in the rescaling, gaps are drawn at unit scale (m-large has scales
  down to 7e-6 s, which would underflow). ``Exponential`` (or a missing distribution with a
  positive rate) gives exponential gaps, i.e. uniform order statistics; its parameters are unused.
- Windows with no distribution and rate 0 produce no rows (in m-large every non-empty window has
  at least 10 requests, so windows with 1-9 requests seem to be published as empty; those
  requests cannot be recovered).

Mapping to the request log (LLM serving requests; the trace records only arrivals, so the
resources are documented, seeded stand-ins):

- ``user_id = f"sg-client-{N}"``; ``program_id = "sg-" + <directory name>`` (the served
  model); ``software_config = "sg-llm-serving"``;
  ``request_id = f"sg-c{N}-{timestamp_s}-{k}"`` (``k``: rank within the window).
- ``duration_s``: lognormal, median 4 s, sigma 0.8 (mean ~5.5 s: prefill plus a few hundred
  output tokens), clipped to [0.05, 600] s.
- ``memory_mb``: lognormal, median 512 MB, sigma 0.6 (KV cache of the request's context),
  clipped to [32, 16384] MB.
- ``cpu_cores = 0.25`` (tokenisation, HTTP streaming); ``gpus = 1/16``: a request's share of a
  GPU that serves about 16 requests concurrently with continuous batching, so the demand
  series' ``gpus`` is the number of GPUs the concurrent requests keep busy.

Randomness: one generator per client from ``(seed, "servegen/chunk-N")``. Memory: files are
validated first, then processed one client at a time; rows are written every
:data:`~pipeline.importers.CHUNK_ROWS` as ``servegen-c{N}-{i:05d}`` files per hour partition.
The full m-large trace implies about 237 million requests (162 clients x 14 days); use
``clients`` / ``max_rows_per_client`` for a demo-sized import.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.importers import ChunkWriter, ImportSummary, TraceFormatError, check_format, count, join_ids, request_table, rng_for, start_us
from pipeline.schemas import is_valid_id
from pipeline.storage import Location

WINDOW_S = 600
DISTRIBUTIONS = ("Weibull", "Gamma", "Exponential", "")
DURATION_MEDIAN_S, DURATION_SIGMA, DURATION_RANGE_S = 4.0, 0.8, (0.05, 600.0)
MEMORY_MEDIAN_MB, MEMORY_SIGMA, MEMORY_RANGE_MB = 512.0, 0.6, (32.0, 16384.0)
CPU_CORES_PER_REQUEST = 0.25
GPU_SHARE_PER_REQUEST = 1.0 / 16
SOFTWARE_CONFIG = "sg-llm-serving"
#: Windows are turned into a table (and their resources drawn) in batches of about this many rows.
BATCH_ROWS = 100_000
_FILE_RE = re.compile(r"^chunk-(\d+)-trace\.csv$")
_CLIENT_RE = re.compile(r"^(?:sg-client-|chunk-)?(\d+)(?:-trace\.csv)?$")
_WINDOW_US = WINDOW_S * 1_000_000


@dataclass(frozen=True)
class _Windows:
    """One client file, validated: per-window start (s), rate (1/s), distribution, shape."""

    ts_s: np.ndarray
    rate: np.ndarray
    dist: list[str]
    shape: np.ndarray


def import_servegen(
    trace_dir: str | os.PathLike[str],
    landing: Location,
    seed: int,
    start: datetime,
    fmt: str = "parquet",
    max_rows_per_client: int | None = None,
    clients: list[str] | None = None,
) -> ImportSummary:
    """Write one request-log row per request implied by the ServeGen trace in ``trace_dir``.

    ``start``: the instant of ``timestamp_s = 0`` (naive = UTC). ``clients``: client numbers
    (``"12"``, ``"chunk-12"`` or ``"sg-client-12"``); default all. ``max_rows_per_client``: keep
    each client's first rows only (the rest is counted in ``skipped["rows_over_cap"]``); default
    no cap. Raises :class:`TraceFormatError` for a missing directory or client file and for
    malformed rows (wrong field count, non-numeric or negative values, unknown distribution,
    windows out of order). Same inputs and seed give byte-identical files.
    """
    check_format(fmt)
    base_us = start_us(start)
    if max_rows_per_client is not None and (not isinstance(max_rows_per_client, int) or max_rows_per_client < 0):
        raise ValueError(f"max_rows_per_client must be a non-negative integer or None, got {max_rows_per_client!r}")
    root = Path(trace_dir)
    if not root.is_dir():
        raise TraceFormatError(f"ServeGen trace directory {root} does not exist (or is not a directory)")
    files = _client_files(root, clients)
    program_id = "sg-" + re.sub(r"[^A-Za-z0-9_.=+-]", "_", root.resolve().name)[:100]
    if not is_valid_id(program_id):
        raise TraceFormatError(f"{root}: the directory name does not give a well-formed program id ({program_id!r})")
    for path in files.values():
        _read_windows(path)  # validate every selected file before anything is written

    summary = ImportSummary(source=f"servegen:{root}")
    writer = ChunkWriter(landing, fmt, summary, "servegen")
    for client, path in files.items():
        writer.set_prefix(f"servegen-c{client}")
        rng = rng_for(seed, f"servegen/chunk-{client}")
        _import_client(client, _read_windows(path), rng, base_us, program_id, max_rows_per_client, writer, summary)
    writer.flush()
    return summary


def _client_files(root: Path, clients: list[str] | None) -> dict[int, Path]:
    """Client number -> trace file, in numeric order."""
    found = {int(m.group(1)): root / name for name in os.listdir(root) if (m := _FILE_RE.match(name))}
    if clients is None:
        if not found:
            raise TraceFormatError(f"{root}: no chunk-N-trace.csv files (is this a ServeGen trace directory?)")
        return dict(sorted(found.items()))
    chosen: dict[int, Path] = {}
    for name in clients:
        m = _CLIENT_RE.match(str(name))
        if not m:
            raise ValueError(f"client {name!r} is not a client number (e.g. '12', 'chunk-12' or 'sg-client-12')")
        client = int(m.group(1))
        if client not in found:
            raise TraceFormatError(f"{root / f'chunk-{client}-trace.csv'}: file missing for requested client {name!r}")
        chosen[client] = found[client]
    return dict(sorted(chosen.items()))


def _number(path: Path, row_no: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise TraceFormatError(f"{path}: row {row_no}, {column}: {cell!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceFormatError(f"{path}: row {row_no}, {column}: {cell!r} is not finite")
    if value < 0:
        raise TraceFormatError(f"{path}: row {row_no}, {column}: negative value {cell!r}")
    return value


def _read_windows(path: Path) -> _Windows:
    ts_s: list[int] = []
    rate: list[float] = []
    dist: list[str] = []
    shape: list[float] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 6:
                raise TraceFormatError(
                    f"{path}: row {row_no} has {len(row)} fields, expected 6 "
                    "(timestamp_s, rate_req_per_s, cv, iat_distribution, param1, param2; no header)"
                )
            cells = [c.strip() for c in row]
            t = _number(path, row_no, "timestamp_s", cells[0])
            if t != int(t):
                raise TraceFormatError(f"{path}: row {row_no}, timestamp_s: {cells[0]!r} is not a whole number of seconds")
            if ts_s and t < ts_s[-1] + WINDOW_S:
                raise TraceFormatError(f"{path}: row {row_no}: window {cells[0]} s starts before the previous one ({ts_s[-1]} s) ends ({WINDOW_S} s windows)")
            r = _number(path, row_no, "rate_req_per_s", cells[1])
            _number(path, row_no, "cv", cells[2])
            d = cells[3]
            if d not in DISTRIBUTIONS:
                raise TraceFormatError(f"{path}: row {row_no}, iat_distribution: {d!r} is not one of Weibull, Gamma, Exponential or empty")
            p1 = _number(path, row_no, "param1", cells[4])
            p2 = _number(path, row_no, "param2", cells[5])
            if d in ("Weibull", "Gamma") and r > 0 and (p1 <= 0 or p2 <= 0):
                raise TraceFormatError(f"{path}: row {row_no}: {d} shape and scale (param1, param2) must be positive, got {cells[4]}, {cells[5]}")
            ts_s.append(int(t))
            rate.append(r)
            dist.append(d)
            shape.append(p1)
    if not ts_s:
        raise TraceFormatError(f"{path}: no windows (empty file)")
    return _Windows(np.array(ts_s, dtype=np.int64), np.array(rate), dist, np.array(shape))


def _window_offsets_us(rng: np.random.Generator, n: int, dist: str, shape: float) -> tuple[np.ndarray, bool]:
    """``n`` sorted arrival offsets (us) in ``[0, 600 s)``; True if the gaps degenerated to uniform."""
    if dist == "Gamma":
        gaps = rng.gamma(shape, 1.0, n + 1)
    elif dist == "Weibull":
        gaps = rng.weibull(shape, n + 1)
    else:
        gaps = rng.exponential(1.0, n + 1)
    cum = np.cumsum(gaps)
    total = cum[-1]
    if not (np.isfinite(total) and total > 0):  # every gap underflowed to 0 (tiny shapes)
        return np.sort(rng.integers(0, _WINDOW_US, n)), True
    offsets = np.floor(cum[:n] * (_WINDOW_US / total)).astype(np.int64)
    return np.minimum(offsets, _WINDOW_US - 1), False


def _import_client(
    client: int,
    windows: _Windows,
    rng: np.random.Generator,
    base_us: int,
    program_id: str,
    cap: int | None,
    writer: ChunkWriter,
    summary: ImportSummary,
) -> None:
    user_id = f"sg-client-{client}"
    rows = 0
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ts_us, window ts_s, rank)
    batch_rows = 0
    for ts_s, rate, dist, shape in zip(windows.ts_s.tolist(), windows.rate.tolist(), windows.dist, windows.shape.tolist()):
        expected = round(rate * WINDOW_S, 6)
        if expected == 0:
            count(summary.skipped, "empty_windows")
            continue
        if cap is not None and rows >= cap:
            count(summary.skipped, "rows_over_cap", round(expected))
            continue
        whole = math.floor(expected)
        n = whole + int(expected > whole and rng.random() < expected - whole)
        if n == 0:
            continue
        if dist == "":
            count(summary.defaulted, "windows_without_distribution")
        offsets, degenerate = _window_offsets_us(rng, n, dist, shape)
        if degenerate:
            count(summary.defaulted, "windows_with_uniform_arrivals")
        if cap is not None and rows + n > cap:
            count(summary.skipped, "rows_over_cap", rows + n - cap)
            offsets = offsets[: cap - rows]
            n = len(offsets)
        batch.append((base_us + ts_s * 1_000_000 + offsets, np.full(n, ts_s), np.arange(n)))
        rows += n
        batch_rows += n
        if batch_rows >= BATCH_ROWS:
            _write_batch(batch, rng, user_id, client, program_id, writer)
            batch, batch_rows = [], 0
    _write_batch(batch, rng, user_id, client, program_id, writer)


def _write_batch(batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rng: np.random.Generator, user_id: str, client: int, program_id: str, writer: ChunkWriter) -> None:
    if not batch:
        return
    ts_us, window_s, rank = (np.concatenate(parts) for parts in zip(*batch))
    n = len(ts_us)
    duration_s = np.clip(rng.lognormal(math.log(DURATION_MEDIAN_S), DURATION_SIGMA, n), *DURATION_RANGE_S)
    memory_mb = np.clip(rng.lognormal(math.log(MEMORY_MEDIAN_MB), MEMORY_SIGMA, n), *MEMORY_RANGE_MB)
    table = request_table(
        join_ids(f"sg-c{client}", window_s, rank),
        user_id, program_id, SOFTWARE_CONFIG,
        ts_us, duration_s, CPU_CORES_PER_REQUEST, memory_mb, GPU_SHARE_PER_REQUEST,
    )  # fmt: skip
    writer.add(table, ts_us)
