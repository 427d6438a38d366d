"""Benchmark: validated ingest throughput and peak memory against a plain pyarrow read+write.

For each input format (CSV and Parquet) it generates ``--rows`` synthetic request-log rows over
one day into a landing folder (hourly files), then measures, each in a fresh subprocess so its
peak RSS is its own:

* ``baseline`` — plain pyarrow: read every landing file (typed) and write one zstd Parquet file
  per hour; no checks, no de-duplication, no Great Expectations;
* ``ingest``   — ``pipeline.ingest.ingest_interval`` over the same day (row checks,
  de-duplication, GE gate, per-slot staged publish). The per-process start-up (importing
  Great Expectations and building its context, a fixed few seconds) is measured and reported
  apart as ``ingest_startup_s``, as the baseline's imports are.

Prints one JSON line per format: rows/s of both, the overhead ratio ingest/baseline, peak RSS.
Targets on a 2-core machine: >= 1 M rows/s, overhead <= 1.5, peak RSS <= 1.5 GB.

    python benchmarks/ingest.py                 # 1 M rows (under a minute)
    python benchmarks/ingest.py --rows 10000000 # the headline figure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2026, 11, 2, tzinfo=timezone.utc)


def _phase_baseline(landing: str, out: str) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.schemas import REQUEST_LOG

    t0 = time.perf_counter()
    rows = 0
    for hour_dir in sorted(Path(landing).glob("date=*/hour=*")):
        for f in sorted(hour_dir.iterdir()):
            if f.suffix == ".csv":
                try:
                    table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=REQUEST_LOG))
                except pa.ArrowInvalid:  # dirty data: a plain reader can only fall back to inferred types
                    table = pacsv.read_csv(f)
            elif f.suffix == ".parquet":
                table = pq.read_table(f)
            else:
                continue
            target = Path(out) / hour_dir.relative_to(landing) / (f.stem + ".parquet")
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target, compression="zstd")
            rows += table.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def _phase_ingest(landing: str, out: str) -> dict:
    t_import = time.perf_counter()
    from pipeline.config import load_settings
    from pipeline.ingest import ingest_interval
    from pipeline.validation import warm_up

    warm_up()  # imports Great Expectations and builds its context: a fixed cost per process
    startup = time.perf_counter() - t_import
    settings = load_settings(overrides={"landing": landing, "lake": out}, environ={})
    t0 = time.perf_counter()
    report = ingest_interval(settings, START, START + timedelta(days=1))
    seconds = time.perf_counter() - t0
    return {"rows": report.rows_in, "valid": report.rows_valid, "quarantined": report.rows_quarantined,
            "gate_passed": report.gate_passed, "seconds": seconds, "startup_s": startup}


def _spoil(landing: Path, fmt: str, every: int) -> None:
    """Make every ``every``-th row bad: a non-number in CSV (forcing the text path), a negative
    duration in Parquet. Done before timing; the quarantine must then hold exactly those rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for f in sorted(landing.glob("date=*/hour=*/*." + fmt)):
        if fmt == "csv":
            lines = f.read_text().split("\n")
            for i in range(every, len(lines) - 1, every):
                cells = lines[i].split(",")
                cells[6] = "oops"  # cpu_cores: not a number, not a null marker
                lines[i] = ",".join(cells)
            f.write_text("\n".join(lines))
        else:
            table = pq.read_table(f)
            bad = np.zeros(table.num_rows, dtype=bool)
            bad[every - 1 :: every] = True
            col = pc.if_else(pa.array(bad), -1.0, table["duration_s"])
            pq.write_table(table.set_column(table.schema.get_field_index("duration_s"), "duration_s", col), f, compression="zstd")


def _run_phase(phase: str, landing: str, out: str) -> dict:
    """Run one phase in a fresh interpreter; returns its result plus its own peak RSS."""
    cmd = [sys.executable, __file__, "--phase", phase, "--landing", landing, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--bad-every", type=int, default=0, help="spoil every N-th row (0: clean data)")
    parser.add_argument("--workdir", help="keep generated data here (default: a temporary folder)")
    parser.add_argument("--phase", choices=("baseline", "ingest"), help=argparse.SUPPRESS)
    parser.add_argument("--landing", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    if args.phase:
        result = (_phase_baseline if args.phase == "baseline" else _phase_ingest)(args.landing, args.out)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from pipeline.generate import generate_landing
    from pipeline.storage import open_location


    work = Path(args.workdir or tempfile.mkdtemp(prefix="warmcast-bench-"))
    for fmt in args.formats.split(","):
        landing = work / f"landing-{fmt}"
        t0 = time.perf_counter()
        gen = generate_landing(open_location(str(landing)), users=args.users, days=1.0, start=START, seed=1,
                               fmt=fmt, target_rows=args.rows)
        gen_s = time.perf_counter() - t0
        if args.bad_every:
            _spoil(landing, fmt, args.bad_every)
        base = _run_phase("baseline", str(landing), str(work / f"baseline-{fmt}"))
        ing = _run_phase("ingest", str(landing), str(work / f"lake-{fmt}"))
        print(json.dumps({
            "benchmark": "ingest",
            "format": fmt,
            "bad_every": args.bad_every,
            "rows": ing["rows"],
            "generated_rows": gen.rows,
            "ingest_rows_per_s": round(ing["rows"] / ing["seconds"]),
            "baseline_rows_per_s": round(base["rows"] / base["seconds"]),
            "ingest_s": round(ing["seconds"], 2),
            "baseline_s": round(base["seconds"], 2),
            "overhead_ratio": round(ing["seconds"] / base["seconds"], 3),
            "ingest_peak_rss_mb": round(ing["peak_rss_mb"]),
            "baseline_peak_rss_mb": round(base["peak_rss_mb"]),
            "ingest_startup_s": round(ing["startup_s"], 2),
            "quarantined": ing["quarantined"],
            "gate_passed": ing["gate_passed"],
            "generate_s": round(gen_s, 1),
            "targets": {"rows_per_s": 1_000_000, "overhead_ratio": 1.5, "peak_rss_mb": 1536},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }))


if __name__ == "__main__":
    main()
