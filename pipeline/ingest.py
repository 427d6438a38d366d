"""Ingest one data interval of raw request logs into the Parquet lake.

For ``[start, end)`` (on the slot grid, 5 minutes by default) ingest

1. reads every landing file of each UTC hour partition that overlaps the interval
   (:mod:`pipeline.landing`, :mod:`pipeline.readers`), one hour at a time so memory stays
   bounded by one landing hour;
2. checks every row with vectorised Arrow compute (:mod:`pipeline.checks`) and de-duplicates
   ``request_id`` within the landing hour (the first valid copy wins);
3. keeps the rows this interval owns — valid rows by ``ts``; rows whose ``ts`` is missing or
   outside their file's hour, and lines that did not parse, by the interval holding the start
   of their file's hour — and stages them aside: valid rows per slot to
   ``<lake>/request_logs/date=YYYY-MM-DD/hour=HH/<slot>.parquet``, refused rows with their reason,
   file and line to ``<lake>/quarantine/date=YYYY-MM-DD/hour=HH/<slot>.parquet``;
4. gates the run with Great Expectations (:mod:`pipeline.validation`) and stores the result as
   ``_validation-<start>-<end>.json`` beside the first slot's partition;
5. only if the gate passes, publishes: each staged file replaces its slot's file, and a slot
   with no refused rows loses any old quarantine file. Re-running or back-filling an interval
   therefore never duplicates rows; a crash before publishing leaves the previous state.

Invariant (tested): rows in = rows in the lake + rows in quarantine, for every run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.checks import check_rows, duplicate_reason
from pipeline.config import Settings
from pipeline.intervals import check_interval, slots
from pipeline.landing import hour_partition, hours_overlapping, landing_files
from pipeline.readers import FileRows, as_text, read_landing_file
from pipeline.schemas import QUARANTINE, REQUEST_LOG
from pipeline.storage import Location, StorageError, location_from_settings
from pipeline.validation import validate_run

log = logging.getLogger(__name__)

LAKE_TABLE = "request_logs"
QUARANTINE_TABLE = "quarantine"
_US = 1_000_000
_MAX_EXAMPLES = 20


class ValidationGateError(RuntimeError):
    """The run failed its Great Expectations gate; nothing was published."""

    def __init__(self, report: "IngestReport"):
        self.report = report
        super().__init__(
            f"ingest {report.start} – {report.end} failed its validation gate; nothing was published "
            f"(result: {report.validation_file}): " + "; ".join(report.failed_expectations)
        )


@dataclass
class IngestReport:
    start: str
    end: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    files_read: int = 0
    empty_files: list[str] = field(default_factory=list)
    lake_files: list[str] = field(default_factory=list)
    quarantine_files: list[str] = field(default_factory=list)
    validation_file: str = ""
    gate_passed: bool = False
    failed_expectations: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # "file:line: reason" of the first refused rows
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"ingest {self.start} – {self.end}: {self.rows_in} rows in from {self.files_read} files, "
            f"{self.rows_valid} to the lake, {self.rows_quarantined} to quarantine "
            f"({'gate passed' if self.gate_passed else 'GATE FAILED'}, {self.seconds:.2f} s)"
        ]
        lines += [f"  {n:>8}  {reason}" for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        lines += [f"  e.g. {e}" for e in self.examples[:5]]
        return "\n".join(lines)


def slot_name(slot: datetime) -> str:
    return f"{slot:%Y%m%dT%H%M%SZ}"


def lake_file(lake: Location, table: str, slot: datetime) -> str:
    """Path of one slot's file in the lake (``table`` is ``request_logs`` or ``quarantine``)."""
    return lake.path(table, hour_partition(slot), f"{slot_name(slot)}.parquet")


@dataclass
class _Run:
    """Mutable state of one ingest run (its report, staged files, GE sample)."""

    settings: Settings
    lake: Location
    landing: Location
    start: datetime
    end: datetime
    staging: str
    report: IngestReport
    staged: dict[str, str] = field(default_factory=dict)  # final path -> staged path
    sample_parts: list[tuple[int, pa.Table]] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)

    def stage(self, lake_table: str, slot: datetime, table: pa.Table) -> tuple[str, str]:
        """Write ``table`` aside for its slot file; returns (final path, staged path)."""
        staged = f"{self.staging}/{lake_table}-{slot_name(slot)}.parquet"
        with self.lake.write_atomic(staged) as out:
            pq.write_table(table, out, compression="zstd")
        return lake_file(self.lake, lake_table, slot), staged


@dataclass
class _HourResult:
    """What one landing hour contributed; merged into the run in hour order."""

    files_read: int
    empty_files: list[str]
    rows_valid: int
    rows_quarantined: int
    reasons: Counter
    examples: list[str]
    staged: dict[str, str]
    sample: tuple[int, pa.Table] | None


def _quarantine_rows(files: list[FileRows], offsets: list[int], take: np.ndarray, reason: pa.Array, landing: Location) -> pa.Table:
    """Quarantine rows (QUARANTINE schema) for the concatenated-row indices ``take``."""
    parts = []
    for f, off in zip(files, offsets):
        local = take[(take >= off) & (take < off + f.table.num_rows)] - off
        if len(local) == 0:
            continue
        idx = pa.array(local)
        source = f.original if f.original is not None else f.table
        values = pa.Table.from_arrays(
            [as_text(source[c].take(idx)) if c in source.column_names else pa.nulls(len(local), pa.string()) for c in REQUEST_LOG.names],
            names=REQUEST_LOG.names,
        )
        n = len(local)
        parts.append(
            values.append_column("reason", pc.take(reason, pa.array(local + off)))
            .append_column("source_file", pa.array([landing.display(f.path)] * n, pa.string()))
            .append_column("source_row", f.source_row.take(idx))
            .append_column("raw", pa.nulls(n, pa.string()))
        )
    return pa.concat_tables(parts).cast(QUARANTINE) if parts else QUARANTINE.empty_table()


def _broken_rows(files: list[FileRows], landing: Location) -> pa.Table:
    rows = [
        {"reason": b.reason, "source_file": landing.display(f.path), "source_row": b.line, "raw": b.raw}
        for f in files
        for b in f.broken
    ]
    return pa.Table.from_pylist(rows, schema=QUARANTINE) if rows else QUARANTINE.empty_table()


def _ingest_hour(run: _Run, hour: datetime) -> _HourResult:
    """Read, check and stage one landing hour (runs in a worker thread; touches no shared state)."""
    paths = landing_files(run.landing, hour)
    files = [read_landing_file(run.landing, p) for p in paths]
    offsets = list(np.cumsum([0] + [f.table.num_rows for f in files])[:-1])
    table = pa.concat_tables([f.table for f in files]) if files else REQUEST_LOG.empty_table()
    table = table.combine_chunks()
    reason = pa.concat_arrays([f.reason for f in files]) if files else pa.nulls(0, pa.string())
    reason = check_rows(table, reason, hour, run.settings.ingest)
    reason = duplicate_reason(reason, table["request_id"])

    # Which slot owns each row: valid ts -> its slot; bad ts -> the slot holding the hour's start.
    hour_us = int(hour.timestamp()) * _US
    ts_us = pc.fill_null(pc.cast(table["ts"], pa.int64()), hour_us).to_numpy()
    ts_ok = (ts_us >= hour_us) & (ts_us < hour_us + 3600 * _US)
    anchor = np.where(ts_ok, ts_us, hour_us)
    start_us, slot_us = int(run.start.timestamp()) * _US, run.settings.ingest.slot_minutes * 60 * _US
    owned = (anchor >= start_us) & (anchor < int(run.end.timestamp()) * _US)
    slot_idx = (anchor - start_us) // slot_us
    valid = pc.is_null(reason).to_numpy(zero_copy_only=False)

    hour_owned = run.start <= hour < run.end  # lines that did not parse belong to the hour's start
    broken = _broken_rows(files, run.landing) if hour_owned else QUARANTINE.empty_table()
    bad_idx = np.flatnonzero(owned & ~valid)
    bad = _quarantine_rows(files, offsets, bad_idx, reason, run.landing)
    bad_slot = slot_idx[bad_idx]
    if broken.num_rows:
        bad = pa.concat_tables([bad, broken])
        bad_slot = np.concatenate([bad_slot, np.full(broken.num_rows, (hour_us - start_us) // slot_us)])

    keep = owned & valid
    good_slot = slot_idx[keep]
    if np.all(good_slot[1:] >= good_slot[:-1]):  # landing files are usually in time order
        good = table if keep.all() else table.filter(pa.array(keep))
    else:
        order = np.argsort(good_slot, kind="stable")
        good = table.take(pa.array(np.flatnonzero(keep)[order]))
        good_slot = good_slot[order]

    staged = {}
    hour_slots = [s for s in slots(run.start, run.end, run.settings.ingest.slot_minutes) if hour <= s < hour + timedelta(hours=1)]
    for s in hour_slots:
        k = (int(s.timestamp()) * _US - start_us) // slot_us
        lo, hi = np.searchsorted(good_slot, [k, k + 1])
        final, path = run.stage(LAKE_TABLE, s, good.slice(lo, hi - lo))
        staged[final] = path
        qmask = bad_slot == k
        if qmask.any():
            final, path = run.stage(QUARANTINE_TABLE, s, bad.filter(pa.array(qmask)))
            staged[final] = path

    n_good, n_bad = good.num_rows, bad.num_rows
    head = bad.slice(0, _MAX_EXAMPLES).select(["source_file", "source_row", "reason"]).to_pylist()
    sample = None
    if n_good:  # seeded by the run and the hour, so the sample does not depend on thread timing
        rng = np.random.default_rng([start_us, int(hour.timestamp())])
        pick = np.sort(rng.choice(n_good, size=min(n_good, run.settings.ingest.ge_sample_rows), replace=False))
        sample = (n_good, good.take(pa.array(pick)))
    return _HourResult(
        files_read=len(files),
        empty_files=[run.landing.display(f.path) for f in files if f.table.num_rows == 0 and not f.broken],
        rows_valid=n_good,
        rows_quarantined=n_bad,
        reasons=Counter(bad["reason"].to_pylist()),
        examples=[f"{r['source_file']}:{r['source_row']}: {r['reason']}" for r in head],
        staged=staged,
        sample=sample,
    )


def _merge(run: _Run, hour: _HourResult) -> None:
    report = run.report
    report.files_read += hour.files_read
    report.empty_files += hour.empty_files
    report.rows_valid += hour.rows_valid
    report.rows_quarantined += hour.rows_quarantined
    run.reasons.update(hour.reasons)
    report.examples += hour.examples[: _MAX_EXAMPLES - len(report.examples)]
    run.staged.update(hour.staged)
    if hour.sample is not None:
        run.sample_parts.append(hour.sample)


def _ge_sample(run: _Run, rng: np.random.Generator):
    """Stratified sample: each hour contributes in proportion to its valid rows."""
    total = sum(n for n, _ in run.sample_parts)
    cap = run.settings.ingest.ge_sample_rows
    parts = []
    for n, part in run.sample_parts:
        k = min(part.num_rows, int(round(cap * n / total))) if total > cap else part.num_rows
        if k:
            parts.append(part.take(pa.array(np.sort(rng.choice(part.num_rows, size=k, replace=False)))))
    table = pa.concat_tables(parts) if parts else REQUEST_LOG.empty_table()
    return table.to_pandas()


def _check_landing(landing: Location) -> None:
    # S3 has no folders: an absent prefix is an empty landing zone, a missing bucket an error.
    if not landing.uri.startswith("s3://") and not landing.is_dir():
        raise StorageError(f"landing location {landing.uri} does not exist or is not a folder")
    try:
        landing.list_dirs()
    except OSError as exc:
        raise StorageError(f"landing location {landing.uri} is not readable: {exc}") from exc


def ingest_interval(settings: Settings, start: datetime, end: datetime) -> IngestReport:
    """Ingest ``[start, end)``; returns the report, or raises :class:`ValidationGateError`.

    Raises :class:`~pipeline.intervals.IntervalError` for an interval off the slot grid,
    :class:`~pipeline.storage.StorageError` for a missing or unreadable landing location and
    :class:`~pipeline.readers.LandingFileError` for a file that cannot be read at all; in
    every one of those cases nothing is written.
    """
    t0 = time.perf_counter()
    start, end = check_interval(start, end, settings.ingest.slot_minutes)
    landing = location_from_settings(settings.landing, settings)
    lake = location_from_settings(settings.lake, settings)
    _check_landing(landing)
    report = IngestReport(start=start.isoformat(), end=end.isoformat())
    run = _Run(settings, lake, landing, start, end, lake.path("_staging", uuid.uuid4().hex), report)
    rng = np.random.default_rng([int(start.timestamp()), int(end.timestamp())])
    try:
        # Hours are independent until publishing; Arrow releases the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=settings.ingest.threads) as pool:
            try:
                for hour in pool.map(lambda h: _ingest_hour(run, h), hours_overlapping(start, end)):
                    _merge(run, hour)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # do not read the remaining hours for nothing
                raise
        report.rows_in = report.rows_valid + report.rows_quarantined
        report.reasons = dict(run.reasons)
        gate = validate_run(_ge_sample(run, rng), report.rows_in, report.rows_quarantined, settings.ingest)
        report.gate_passed, report.failed_expectations = gate.success, gate.failed
        first = slots(start, end, settings.ingest.slot_minutes)[0]
        report.validation_file = lake.path(LAKE_TABLE, hour_partition(first), f"_validation-{slot_name(start)}-{slot_name(end)}.json")
        report.seconds = round(time.perf_counter() - t0, 3)
        document = {"interval": [report.start, report.end], "report": report.to_dict(), "great_expectations": gate.results}
        lake.write_bytes(report.validation_file, json.dumps(document, indent=1, default=str).encode())
        if not gate.success:
            raise ValidationGateError(report)
        _publish(run)
    finally:
        with contextlib.suppress(OSError):
            lake.fs.delete_dir(run.staging)
    report.seconds = round(time.perf_counter() - t0, 3)
    log.info("%s", report.summary())
    return report


def _publish(run: _Run) -> None:
    for s in slots(run.start, run.end, run.settings.ingest.slot_minutes):
        for table in (LAKE_TABLE, QUARANTINE_TABLE):
            final = lake_file(run.lake, table, s)
            if final in run.staged:
                run.lake.makedirs(final.rsplit("/", 1)[0])
                run.lake.fs.move(run.staged[final], final)
                (run.report.lake_files if table == LAKE_TABLE else run.report.quarantine_files).append(final)
            else:
                run.lake.delete(final)  # the slot has no refused rows now: drop an old quarantine file
