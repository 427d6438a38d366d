"""Benchmark: the forecast cycle's lake reads, streamed, against reading every row at once.

Every 5-minute ``forecast_and_scale`` cycle reads the lake's raw request logs three ways:

* ``demand`` — the system's per-user demand over the last day (``aggregate_issue``: the copula's
  residual history and the top-down band), and, per window, the forecast's context;
* ``active_users`` — the users with a request in the week before the issue (``plan_forecast``,
  ``forecast_demand``);
* ``configs`` — each user's most-requested software configurations over the last day (the
  scaler's sub-pools).

Each is timed twice, each run in a fresh interpreter so its peak RSS is its own:

* ``all_rows`` (baseline) — what the pipeline did before: every column of every row of the window
  read into one table (``read_requests``), then ``build_demand_series`` /
  ``pc.unique`` / ``top_software_configs`` of it;
* ``streamed`` — ``demand_from_lake`` / ``active_users`` / ``software_configs_from_lake``: a batch at
  a time, only the columns needed, ids read as their Parquet dictionaries.

Prints one JSON line: per read the seconds and peak RSS of both, the ratios, and whether the
results agree (the demand up to the order of its floating-point sums: ``max_rel_diff``). Where
requests run longer than the 6-hour look-back (the synthetic nightly batches) the demand does not
agree, by design: the streamed read also counts those that arrived before the look-back and still
run in the window (through the files' ``duration_s`` statistics), which the old read missed.

    python benchmarks/lake_reads.py                         # 3 M synthetic requests a day (~2 min)
    python benchmarks/lake_reads.py --rows-per-day 10000000
    python benchmarks/lake_reads.py --lake /tmp/wc-servegen/lake --at 2026-11-12T18:00:00Z   # a real lake
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
DAY = timedelta(days=1)
WEEK_CONTEXT = timedelta(days=7, hours=9)  # models.persist.FORECAST_CONTEXT
READS = ("demand", "active_users", "configs")


def _phase(read: str, way: str, lake_uri: str, at: datetime, out: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.demand import DEFAULT_LOOKBACK, active_users, build_demand_series, demand_from_lake, read_requests
    from pipeline.forecast_cycle import software_configs_from_lake
    from pipeline.storage import open_location
    from scaler.subpools import top_software_configs

    lake = open_location(lake_uri)
    since = at - DAY - timedelta(minutes=5)  # aggregate_issue: history_buckets + 1 buckets
    t0 = time.perf_counter()
    if read == "demand":
        if way == "all_rows":
            result = build_demand_series(read_requests(lake, since - DEFAULT_LOOKBACK, at), since, at)
        else:
            result = demand_from_lake(lake, since, at)
        seconds = time.perf_counter() - t0
        pq.write_table(result, out)
        rows = result.num_rows
    elif read == "active_users":
        if way == "all_rows":
            found = set(pc.unique(read_requests(lake, at - WEEK_CONTEXT, at, columns=["user_id"])["user_id"]).to_pylist())
        else:
            found = active_users(lake, at - WEEK_CONTEXT, at)
        seconds = time.perf_counter() - t0
        Path(out).write_text(json.dumps(sorted(found)))
        rows = len(found)
    else:
        if way == "all_rows":
            configs = top_software_configs(read_requests(lake, at - DAY, at), 3, start=at - DAY, end=at)
        else:
            configs = software_configs_from_lake(lake, at - DAY, at, 3)
        seconds = time.perf_counter() - t0
        Path(out).write_text(json.dumps({u: list(c) for u, c in sorted(configs.items())}))
        rows = len(configs)
    return {"seconds": seconds, "result_rows": rows}


def _run(read: str, way: str, lake: str, at: datetime, out: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", f"{read}:{way}", "--lake", lake, "--at", at.isoformat(), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {read}:{way} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agree(read: str, a: str, b: str) -> dict:
    if read != "demand":
        return {"equal": Path(a).read_text() == Path(b).read_text()}
    import numpy as np
    import pyarrow.parquet as pq

    x, y = pq.read_table(a), pq.read_table(b)
    same_keys = x.num_rows == y.num_rows and all(x[c].equals(y[c]) for c in ("user_id", "ts", "requests"))
    rel = 0.0
    if same_keys:
        for c in ("cpu_cores", "memory_gb", "gpus"):
            u, v = x[c].to_numpy(), y[c].to_numpy()
            rel = max(rel, float(np.max(np.abs(u - v) / np.maximum(np.abs(u), 1e-300), initial=0.0)))
    return {"equal": same_keys and rel < 1e-12, "max_rel_diff": rel}


def _requests_in(lake: str, since: datetime, until: datetime) -> int:
    from pipeline.demand import lake_batches
    from pipeline.storage import open_location

    return sum(b.num_rows for b in lake_batches(open_location(lake), since, until, ["ts"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-day", type=int, default=3_000_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--lake", help="an existing lake to read (default: generate and ingest one)")
    parser.add_argument("--at", help="the issue time (with --lake; default: the end of the generated data)")
    parser.add_argument("--workdir", help="keep generated data here (default: a temporary folder)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    if args.phase:
        read, way = args.phase.split(":")
        result = _phase(read, way, args.lake, datetime.fromisoformat(args.at.replace("Z", "+00:00")), args.out)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="warmcast-bench-"))
    gen_s = 0.0
    if args.lake:
        lake = args.lake
        at = datetime.fromisoformat(args.at.replace("Z", "+00:00")) if args.at else None
        if at is None:
            raise SystemExit("--at is required with --lake")
    else:  # 1.5 days: the last day, its 6-hour look-back and a little more
        from pipeline.config import load_settings
        from pipeline.generate import generate_landing
        from pipeline.ingest import ingest_interval
        from pipeline.storage import open_location

        days = 1.5
        t0 = time.perf_counter()
        generate_landing(open_location(str(work / "landing")), users=args.users, days=days, start=START, seed=1,
                         fmt="parquet", target_rows=int(args.rows_per_day * days))
        lake, at = str(work / "lake"), START + timedelta(days=days)
        ingest_interval(load_settings(overrides={"landing": str(work / "landing"), "lake": lake}, environ={}), START, at)
        gen_s = time.perf_counter() - t0
    reads = {}
    for read in READS:
        got = {}
        for way in ("all_rows", "streamed"):
            got[way] = _run(read, way, lake, at, str(work / f"{read}-{way}.out"))
        a, s = got["all_rows"], got["streamed"]
        reads[read] = {"all_rows_s": round(a["seconds"], 2), "streamed_s": round(s["seconds"], 2),
                       "speedup": round(a["seconds"] / max(s["seconds"], 1e-9), 2),
                       "all_rows_peak_rss_mb": round(a["peak_rss_mb"]), "streamed_peak_rss_mb": round(s["peak_rss_mb"]),
                       "rss_ratio": round(a["peak_rss_mb"] / s["peak_rss_mb"], 2), "result_rows": s["result_rows"],
                       **_agree(read, str(work / f"{read}-all_rows.out"), str(work / f"{read}-streamed.out"))}
    print(json.dumps({
        "benchmark": "lake_reads",
        "figure": "the forecast cycle's lake reads: seconds and peak RSS, streamed vs every row at once",
        "lake": "given" if args.lake else "synthetic", "issued_at": at.isoformat(),
        "requests_last_day": _requests_in(lake, at - DAY, at),
        "requests_last_week": _requests_in(lake, at - WEEK_CONTEXT, at),
        "reads": reads,
        "generate_and_ingest_s": round(gen_s, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
