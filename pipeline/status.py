"""``warmcast status``: is each stage of the pipeline keeping up, as of a time?

One check per stage, each ``ok``, ``warn`` or ``fail`` with the facts behind it:

* ``ingest`` — the newest ingest run that ended at or before ``at`` (from the Great Expectations
  result every run writes, ``_validation-<start>-<end>.json``; a run that failed its gate writes one
  too, and a successful re-run of the same interval replaces it): how far behind ``at`` it is, and
  the intervals of the last day whose latest run failed the gate (their rows were not published);
* ``quarantine`` — rows refused over the last day and why, against ``ingest.max_quarantine_share``;
* ``models`` — the model version a forecast issued at ``at`` uses (the newest whose training
  window ends before ``at``) and how old its data is; ``latest`` when it is another;
* ``forecasts`` — the newest system forecast issued at or before ``at`` in the forecast store:
  older than ``scaler.max_forecast_age_s`` means the scaler sizes pools reactively; how many of
  its users were forecast by the fallback baseline;
* ``bands`` — the last day's system forecasts against the system's actual demand: how often it
  exceeded the bound the scaler sized for, and how often the 90 % band held it;
* ``scaler`` — the newest scaling cycle in the hour before ``at``: decisions applied, dry runs,
  pools whose apply failed or whose plan was invalid; who holds the scaler lease.

Reads only metadata (file names, a day of small JSON documents, the store's newest rows), so it
is cheap enough for a monitoring probe: the exit status of ``warmcast status`` is 1 when any
check fails, else 0.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pipeline.config import Settings
from pipeline.storage import Location, StorageError, location_from_settings

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

#: Ingest behind ``at`` by more than this warns, by more than ``INGEST_FAIL_LAG`` fails (the
#: pipeline ingests every 5 minutes; the forecasts read only what has landed).
INGEST_WARN_LAG = timedelta(minutes=15)
INGEST_FAIL_LAG = timedelta(hours=1)
#: The served model's training data ending more than this before ``at`` warns / fails (trained daily).
MODEL_WARN_AGE = timedelta(days=1, hours=12)
MODEL_FAIL_AGE = timedelta(days=3)
#: No scaling cycle this long before ``at`` warns (the scaler runs every 5 minutes).
SCALER_WARN_AGE = timedelta(minutes=15)
#: The window the ingest, quarantine and scaler checks total over.
WINDOW = timedelta(days=1)

_VALIDATION_RE = re.compile(r"^_validation-(\d{8}T\d{6}Z)-(\d{8}T\d{6}Z)\.json$")
#: Decision reasons that mean a pool was not resized as planned (scaler/aws.py).
_PROBLEMS = ("failed", "invalid plan", "skipped")


@dataclass
class Check:
    name: str
    state: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Status:
    at: datetime
    checks: list[Check]

    @property
    def state(self) -> str:
        return max((c.state for c in self.checks), key=_RANK.__getitem__, default=OK)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "state": self.state,
                "checks": [asdict(c) for c in self.checks]}

    def prometheus(self) -> str:
        """The status in Prometheus' text format (for node_exporter's textfile collector): each
        check's state (0 ok, 1 warn, 2 fail) and the figures behind it, as gauges."""
        by = {c.name: c.facts for c in self.checks}
        metrics: list[tuple[str, str, list[tuple[str, float]]]] = [
            ("warmcast_status_time_seconds", "Time the status was taken as of (UNIX seconds).", [("", self.at.timestamp())]),
            ("warmcast_check_state", "State of each warmcast status check: 0 ok, 1 warn, 2 fail.",
             [(f'{{check="{c.name}"}}', _RANK[c.state]) for c in self.checks])]

        def gauge(name: str, help_: str, value: Any, labels: str = "") -> None:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if metrics[-1][0] == name:
                    metrics[-1][2].append((labels, float(value)))
                else:
                    metrics.append((name, help_, [(labels, float(value))]))

        gauge("warmcast_ingest_lag_seconds", "Seconds from the newest ingest run's end to the status time.",
              by.get("ingest", {}).get("lag_s"))
        gauge("warmcast_ingest_failed_intervals", "Intervals of the last day whose latest ingest run failed its gate.",
              len(by["ingest"]["failed_intervals"]) if "failed_intervals" in by.get("ingest", {}) else None)
        gauge("warmcast_quarantine_share", "Share of the last day's rows ingest refused.", by.get("quarantine", {}).get("share"))
        gauge("warmcast_model_age_seconds", "Seconds from the served model's training data end to the status time.",
              by.get("models", {}).get("age_s"))
        gauge("warmcast_forecast_age_seconds", "Seconds since the newest system forecast was issued.",
              by.get("forecasts", {}).get("age_s"))
        gauge("warmcast_forecast_users_on_fallback", "Users of the newest forecast forecast by the fallback baseline.",
              by.get("forecasts", {}).get("users_on_fallback"))
        bands = by.get("bands", {})
        for key, name, help_ in (("sized_exceeded", "warmcast_bands_sized_exceeded_ratio",
                                  "Share of the last day's buckets whose demand exceeded the bound the pools were sized for."),
                                 ("band_coverage", "warmcast_bands_coverage_ratio",
                                  "Share of the last day's buckets whose demand the 90 % band held.")):
            for resource, value in sorted(bands.get(key, {}).items()):
                gauge(name, help_, value, f'{{resource="{resource}"}}')
        scaler = by.get("scaler", {})
        if scaler.get("decided_at"):
            gauge("warmcast_scaler_cycle_age_seconds", "Seconds since the newest scaling cycle.",
                  (self.at - datetime.fromisoformat(scaler["decided_at"])).total_seconds())
            gauge("warmcast_scaler_problem_decisions", "Decisions of the newest cycle not applied as planned.",
                  len(scaler.get("problems", [])))
        lines = []
        for name, help_, samples in metrics:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            lines += [f"{name}{labels} {value:.17g}" for labels, value in samples]
        return "\n".join(lines) + "\n"

    def render(self) -> str:
        lines = [f"warmcast status as of {self.at:%Y-%m-%d %H:%M:%S} UTC: {self.state.upper()}",
                 f"{'check':<11} {'state':<5} detail"]
        lines += [f"{c.name:<11} {c.state:<5} {c.detail}" for c in self.checks]
        return "\n".join(lines)


def _age(delta: timedelta) -> str:
    s = delta.total_seconds()
    if abs(s) < 120:
        return f"{s:.0f} s"
    if abs(s) < 7200:
        return f"{s / 60:.0f} min"
    if abs(s) < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def validation_runs(lake: Location, at: datetime, since: datetime) -> list[tuple[datetime, datetime, str]]:
    """``(start, end, path)`` of the ingest runs that ended in ``(since, at]``, plus the newest one
    that ended at or before ``since`` (so the lag is known however far ingest is behind); by end."""
    from pipeline.ingest import LAKE_TABLE

    root = lake.path(LAKE_TABLE)
    dates = [d for d in lake.list_dirs(root) if posixpath.basename(d)[len("date="):] <= f"{at:%Y-%m-%d}"]
    found: list[tuple[datetime, datetime, str]] = []
    for d in reversed(dates):  # newest day first; a run's document sits in its first slot's hour
        for path in lake.list_files(d):
            m = _VALIDATION_RE.match(posixpath.basename(path))
            if m:
                start, end = _stamp(m.group(1)), _stamp(m.group(2))
                if end <= at:
                    found.append((start, end, path))
        # documents sit in the hour their run *starts*: a day's partition can hold a run ending later,
        # so stop only once a run that ended at or before ``since`` is in hand and this day is older
        if any(end <= since for _, end, _ in found) and posixpath.basename(d)[len("date="):] < f"{since:%Y-%m-%d}":
            break
    found.sort(key=lambda r: r[1])
    older = [r for r in found if r[1] <= since]
    return older[-1:] + [r for r in found if r[1] > since]


def check_ingest(lake: Location, settings: Settings, at: datetime) -> tuple[Check, Check]:
    """The ``ingest`` and ``quarantine`` checks (both from the runs' validation documents)."""
    since = at - WINDOW
    try:
        runs = validation_runs(lake, at, since)
    except (OSError, StorageError) as exc:
        err = f"cannot read the lake {lake.uri}: {exc}"
        return Check("ingest", FAIL, err), Check("quarantine", FAIL, err)
    if not runs:
        none = f"no ingest run has ended by then in {lake.uri}"
        return Check("ingest", FAIL, none), Check("quarantine", OK, "nothing ingested")
    newest_end = runs[-1][1]
    lag = at - newest_end
    rows_in = rows_q = 0
    reasons: Counter[str] = Counter()
    failed: dict[tuple[datetime, datetime], str] = {}
    unreadable: list[str] = []
    for start, end, path in runs:
        if end <= since:
            continue  # only there for the lag
        try:
            report = json.loads(lake.read_bytes(path))["report"]
        except (OSError, ValueError, KeyError) as exc:
            unreadable.append(f"{lake.display(path)}: {exc}")
            continue
        rows_in += int(report.get("rows_in", 0))
        rows_q += int(report.get("rows_quarantined", 0))
        reasons.update({k: int(v) for k, v in (report.get("reasons") or {}).items()})
        if not report.get("gate_passed", False):
            failed[(start, end)] = ", ".join(report.get("failed_expectations") or []) or "gate failed"
    state = OK if lag <= INGEST_WARN_LAG else WARN if lag <= INGEST_FAIL_LAG else FAIL
    detail = f"newest run ended {newest_end:%Y-%m-%d %H:%M} UTC, {_age(lag)} before"
    if failed:
        state = FAIL
        (s, e), why = max(failed.items())
        detail += (f"; {len(failed)} interval(s) of the last day failed the validation gate and were not published "
                   f"(newest {s:%m-%d %H:%M}–{e:%H:%M}: {why}); fix the landing files and re-run them")
    if unreadable:
        state = max(state, WARN, key=_RANK.__getitem__)
        detail += f"; {len(unreadable)} validation document(s) unreadable, e.g. {unreadable[0]}"
    ingest = Check("ingest", state, detail, {
        "newest_run_end": newest_end.isoformat(), "lag_s": lag.total_seconds(),
        "failed_intervals": [[s.isoformat(), e.isoformat(), why] for (s, e), why in sorted(failed.items())],
        "unreadable": unreadable})
    share = rows_q / rows_in if rows_in else 0.0
    limit = settings.ingest.max_quarantine_share
    top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
    q_state = OK if share <= limit / 2 else WARN if share <= limit else FAIL
    q_detail = (f"{rows_q:,} of {rows_in:,} rows refused over the last day ({share:.2%}; a run's gate fails above "
                f"{limit:.0%})" + (f": {top}" if top else "") if rows_in else "nothing ingested over the last day")
    quarantine = Check("quarantine", q_state, q_detail, {"rows_in": rows_in, "rows_quarantined": rows_q,
                                                        "share": share, "reasons": dict(reasons)})
    return ingest, quarantine


def check_models(lake: Location, at: datetime) -> Check:
    from models.persist import USERS
    from models.store import ModelStore, ModelStoreError

    store = ModelStore(lake, USERS)
    try:
        served = store.version_trained_before(at)
        latest = store.latest_version()
        window = store.training_window(served) if served else None
        meta = store.metadata(served) if served else {}
    except (ModelStoreError, OSError, StorageError) as exc:
        return Check("models", FAIL, f"cannot read the model store: {exc}")
    if served is None:
        return Check("models", WARN, "no model version trained before then: users are forecast by the "
                                     "`forecast.fallback` baseline (run `warmcast train` or the train_user_models DAG)",
                     {"served": None, "latest": latest})
    age = at - window[1] if window else None
    state = OK if age is not None and age <= MODEL_WARN_AGE else WARN if age is not None and age <= MODEL_FAIL_AGE else FAIL
    n_users, on_global = meta.get("n_users"), len(meta.get("uses_global", []))
    detail = (f"{served}: trained on data until {window[1]:%Y-%m-%d %H:%M} UTC ({_age(age)} before), "
              f"{n_users} users ({on_global} on the global model)" if window else f"{served}: no training window in its metadata")
    if latest != served:
        detail += f"; latest is {latest} (trained on later data: used from its window's end)"
    return Check("models", state, detail, {"served": served, "latest": latest, "users": n_users, "users_on_global": on_global,
                                           "trained_until": window[1].isoformat() if window else None,
                                           "age_s": age.total_seconds() if age is not None else None})


def check_forecasts(store: Any, settings: Settings, at: datetime) -> Check:
    import pyarrow.compute as pc

    try:
        system = store.latest_system_forecast(at)
    except Exception as exc:  # noqa: BLE001 (the store's errors name the database; shown, not raised)
        return Check("forecasts", FAIL, f"cannot read the forecast store: {exc}")
    if system.num_rows == 0:
        return Check("forecasts", FAIL, f"no system forecast issued by then in {store.display_url}: the scaler has "
                                        "nothing to act on", {"issued_at": None})
    issued = system["issued_at"][0].as_py()
    age = at - issued
    limit = settings.scaler.max_forecast_age_s
    state = OK if age.total_seconds() <= limit else FAIL
    users = store.read_user_forecasts(issued)
    ids = users["user_id"].unique()
    fallback = users.filter(pc.starts_with(users["model_version"], "fallback:"))["user_id"].unique()
    detail = (f"newest issued {issued:%Y-%m-%d %H:%M} UTC ({_age(age)} before), {len(ids)} users"
              + (f", {len(fallback)} of them on the fallback baseline" if len(fallback) else ""))
    if state == FAIL:
        detail += f"; older than scaler.max_forecast_age_s={limit:g}: the scaler sizes pools reactively"
    return Check("forecasts", state, detail, {"issued_at": issued.isoformat(), "age_s": age.total_seconds(),
                                              "users": len(ids), "users_on_fallback": len(fallback),
                                              "methods": sorted(set(system["method"].to_pylist()))})


#: ``bands`` warns when, over the last day's scored issues, the bound the scaler sizes for was
#: exceeded more often than this on some resource, or the 90 % sampled band covered less than
#: ``BAND_MIN_COVERAGE`` of the actual demand; with fewer than ``BAND_MIN_ISSUES`` issues it only reports.
SIZED_MAX_EXCEEDED = 0.10
#: The resources pools are sized on (the request count is forecast but not provisioned).
SIZED_RESOURCES = ("cpu_cores", "memory_gb", "gpus")
BAND_MIN_COVERAGE = 0.80
BAND_MIN_ISSUES = 24


def check_bands(store: Any, lake: Location, at: datetime) -> Check:
    """``bands``: the last day's system forecasts scored against the system's actual demand (the
    lake's demand series summed over users) wherever the bucket forecast is over by ``at``: how
    often actual demand exceeded ``reconciled_target``'s upper bound (what the scaler sizes for: the
    pools were short) and how often the ``copula_sample`` band held it, per resource of
    :data:`SIZED_RESOURCES`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.aggregate import METHOD_COPULA, METHOD_RECONCILED
    from pipeline.demand import system_demand_from_lake
    from pipeline.schemas import BUCKET_SECONDS

    step = timedelta(seconds=BUCKET_SECONDS)
    n = int(WINDOW / step)
    end = datetime.fromtimestamp(at.timestamp() // BUCKET_SECONDS * BUCKET_SECONDS, tz=timezone.utc)  # the grid
    start = end - n * step
    try:
        rows = store.read_system_forecasts(start - 6 * step, at)
    except Exception as exc:  # noqa: BLE001
        return Check("bands", FAIL, f"cannot read the forecast store: {exc}")
    rows = rows.filter(pc.is_in(rows["method"], pa.array([METHOD_RECONCILED, METHOD_COPULA]))).to_pylist()
    scored: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    issues: set[datetime] = set()
    totals = None
    for r in rows:
        target = r["issued_at"] + timedelta(minutes=r["horizon_min"]) - step
        if target < start or target + step > end or r["resource"] not in SIZED_RESOURCES:
            continue
        if totals is None:
            try:
                totals = system_demand_from_lake(lake, start, end)
            except (OSError, StorageError) as exc:
                return Check("bands", WARN, f"cannot read the lake's demand to score the forecasts: {exc}")
        actual = float(getattr(totals, r["resource"])[int((target - start) / step)])
        scored.setdefault((r["method"], r["resource"]), []).append((r["lower"], r["upper"], actual))
        issues.add(r["issued_at"])
    if not issues:
        return Check("bands", OK, "no forecast of the last day has its bucket over yet: nothing to score")
    facts: dict[str, Any] = {"issues": len(issues), "sized_exceeded": {}, "band_coverage": {}, "band_above": {},
                             "band_below": {}}
    for (method, resource), v in sorted(scored.items()):
        lower, upper, actual = np.array(v).T
        above, below = float(np.mean(actual > upper + 1e-9)), float(np.mean(actual < lower - 1e-9))
        if method == METHOD_RECONCILED:
            facts["sized_exceeded"][resource] = above
        else:
            facts["band_coverage"][resource] = 1.0 - above - below
            facts["band_above"][resource], facts["band_below"][resource] = above, below
    worst_exc = max(facts["sized_exceeded"].items(), key=lambda kv: kv[1], default=None)
    worst_cov = min(facts["band_coverage"].items(), key=lambda kv: kv[1], default=None)
    judged = len(issues) >= BAND_MIN_ISSUES
    parts, problems = [], []
    if worst_exc:
        parts.append(f"demand above the bound the pools were sized for in {worst_exc[1]:.1%} of the buckets "
                     f"({worst_exc[0]}, the worst resource)")
        if judged and worst_exc[1] > SIZED_MAX_EXCEEDED:
            problems.append(f"the pools were sized short of demand more than {SIZED_MAX_EXCEEDED:.0%} of the time")
    if worst_cov:
        r = worst_cov[0]
        parts.append(f"the 90 % band held {worst_cov[1]:.1%} ({r}, the worst: {facts['band_above'][r]:.1%} above it, "
                     f"{facts['band_below'][r]:.1%} below)")
        if judged and worst_cov[1] < BAND_MIN_COVERAGE:
            problems.append(f"the 90 % band held less than {BAND_MIN_COVERAGE:.0%}: too narrow"
                            + (", mostly short of demand" if facts["band_above"][r] > facts["band_below"][r] else ""))
    detail = f"{len(issues)} issues of the last day scored: " + "; ".join(parts)
    if not judged:
        detail += f" (fewer than {BAND_MIN_ISSUES} issues: not judged)"
    elif problems:
        detail += "; " + "; ".join(problems) + " (new users, a shift in load, or a model gone stale?)"
    bad = bool(problems)
    return Check("bands", WARN if bad else OK, detail, facts)


def check_scaler(store: Any, at: datetime) -> Check:
    from scaler.lease import ScalerLease

    try:
        rows = store.read_decisions(at - timedelta(hours=1), at + timedelta(microseconds=1)).to_pylist()
        holder = ScalerLease(store).holder()
    except Exception as exc:  # noqa: BLE001
        return Check("scaler", FAIL, f"cannot read the forecast store: {exc}")
    lease = None
    if holder is not None:
        expires = holder["expires_at"]
        expires = expires.replace(tzinfo=timezone.utc) if expires.tzinfo is None else expires
        lease = {"owner": holder["owner"], "expires_at": expires.isoformat(), "live": expires > at}
    if not rows:
        return Check("scaler", WARN, "no scaling decision in the hour before (is forecast_and_scale running?)",
                     {"decided_at": None, "lease": lease})
    newest = max(r["decided_at"] for r in rows)
    cycle = [r for r in rows if r["decided_at"] == newest]
    problems = [r for r in cycle if r["reason"].startswith(_PROBLEMS)]
    dry = all(r["dry_run"] for r in cycle)
    applied = sum(1 for r in cycle if r["applied"])
    age = at - newest
    state = FAIL if problems else WARN if age > SCALER_WARN_AGE else OK
    detail = (f"newest cycle {newest:%Y-%m-%d %H:%M} UTC ({_age(age)} before): {len(cycle)} decisions, "
              + ("a dry run (recorded, nothing called)" if dry else f"{applied} applied"))
    if problems:
        detail += "; not applied as planned: " + "; ".join(f"{r['pool']} {r['pool_kind']}: {r['reason'].split(';')[0]}"
                                                          for r in problems[:3])
    if lease and lease["live"]:
        detail += f"; lease held by {lease['owner']} until {lease['expires_at']}"
    return Check("scaler", state, detail, {"decided_at": newest.isoformat(), "decisions": len(cycle), "applied": applied,
                                           "dry_run": dry, "problems": [f"{r['pool']}/{r['pool_kind']}: {r['reason']}"
                                                                         for r in problems], "lease": lease})


def pipeline_status(settings: Settings, at: datetime | None = None, *, store: Any = None) -> Status:
    """Every check as of ``at`` (default now) for the lake and forecast store of ``settings``. Reads
    only: the store's tables are not created (a probe may run with a read-only database role), so a
    store the pipeline never wrote to fails the store's checks, naming the error."""
    from pipeline.forecast_store import ForecastStore

    at = at or datetime.now(timezone.utc)
    lake = location_from_settings(settings.lake, settings)
    ingest, quarantine = check_ingest(lake, settings, at)
    checks = [ingest, quarantine, check_models(lake, at)]
    if store is None:
        try:
            store = ForecastStore(settings.store_url)
        except Exception as exc:  # noqa: BLE001
            msg = f"cannot open the forecast store: {exc}"
            return Status(at, checks + [Check(name, FAIL, msg) for name in ("forecasts", "bands", "scaler")])
    checks += [check_forecasts(store, settings, at), check_bands(store, lake, at), check_scaler(store, at)]
    return Status(at, checks)
