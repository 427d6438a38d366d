"""The AWS applier: describe the pools' Auto Scaling groups, apply a :class:`~scaler.policy.Plan`.

The only module (with :mod:`scaler.aws_bootstrap`) that talks to AWS. Guarantees:

* **Explicit retries.** Every client gets ``botocore.config.Config(retries={"mode": ...,
  "max_attempts": ...})`` from settings (botocore reads ``max_attempts`` as retries after the
  first call), so throttling and HTTP 5xx are retried by botocore. Neither retry mode knows the
  Auto Scaling codes: ``ScalingActivityInProgress`` (HTTP 400) is never retried by botocore, and
  ``ResourceContention`` only by its HTTP 500 status. :func:`call_with_retry` retries both, with
  capped exponential backoff and full jitter, after botocore gives up.
* **Idempotent.** A mutating call is made only when the described group differs from the plan's
  target; applying the same plan twice makes no call the second time.
* **Validated.** AWS (unlike moto) rejects a desired capacity outside the group's
  ``[MinSize, MaxSize]``; the applier checks that itself, and checks that the group has not moved
  since the plan was made, before calling.
* **Per-pool failure.** One pool failing (or missing) is reported on its own decision rows while
  the others proceed.
* **Dry run** describes but never calls a mutating API; every decision is still returned as
  ``SCALING_DECISION`` rows (applied or not, with the rollout mode in the reason).

Inside Airflow the clients come from the ``aws_default`` connection (:func:`clients_from_airflow`,
which imports Airflow lazily); elsewhere from boto3's credential chain (:func:`make_clients`).
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

import boto3
import pyarrow as pa
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.config import AwsSettings
from pipeline.schemas import SCALING_DECISION
from scaler.policy import Plan, PlanOptions, Pool, PoolPlan, PoolState, plan_pools

log = logging.getLogger(__name__)

#: Errors botocore's retry modes leave alone but Auto Scaling returns while a group is busy.
RETRYABLE_CODES = frozenset({"ResourceContention", "ScalingActivityInProgress"})
#: Group tag holding the UTC time (ISO-8601) of the last scale-out warmcast applied.
LAST_SCALE_OUT_TAG = "warmcast:last-scale-out"


def botocore_config(aws: AwsSettings, *, max_pool_connections: int = 16) -> Config:
    """The client config every warmcast client uses: retry mode and attempts set explicitly."""
    return Config(region_name=aws.region, retries={"mode": aws.retry_mode, "max_attempts": aws.max_attempts},
                  max_pool_connections=max_pool_connections, connect_timeout=5, read_timeout=30)


@dataclass(frozen=True)
class AwsClients:
    """The two clients the scaler needs."""

    autoscaling: Any
    ec2: Any


def make_clients(aws: AwsSettings, **client_kwargs: Any) -> AwsClients:
    """Plain boto3 clients (credentials from boto3's chain; ``client_kwargs`` e.g. for a demo's keys)."""
    config = botocore_config(aws)
    make = lambda kind: boto3.client(kind, endpoint_url=aws.endpoint_url, config=config, **client_kwargs)  # noqa: E731
    return AwsClients(make("autoscaling"), make("ec2"))


def clients_from_airflow(aws: AwsSettings, conn_id: str = "aws_default") -> AwsClients:
    """Clients built from an Airflow connection through ``AwsBaseHook`` (only inside Airflow)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook  # lazy: scaler never needs airflow

    config = botocore_config(aws)

    def make(kind: str) -> Any:
        return AwsBaseHook(aws_conn_id=conn_id, client_type=kind, region_name=aws.region, config=config).get_conn()

    return AwsClients(make("autoscaling"), make("ec2"))


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for :data:`RETRYABLE_CODES`: ``attempts`` tries in all, delays in seconds."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full-jitter delay before retry number ``attempt + 1``."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


def call_with_retry(fn: Callable[..., Any], *, retry: RetryPolicy = RetryPolicy(),
                    sleep: Callable[[float], None] = time.sleep, **kwargs: Any) -> Any:
    """Call ``fn(**kwargs)``, retrying :data:`RETRYABLE_CODES` errors with backoff."""
    for attempt in range(retry.attempts):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in RETRYABLE_CODES or attempt == retry.attempts - 1:
                raise
            delay = retry.delay(attempt)
            log.info("%s: %s, retry %d in %.2f s", getattr(fn, "__name__", "call"), code, attempt + 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class WarmPoolConfig:
    """A group's warm pool configuration as described (sizes are instance counts)."""

    min_size: int
    max_prepared: int | None  # None or -1: the group's MaxSize
    pool_state: str
    reuse_on_scale_in: bool

    def size(self, group_max: int, desired: int) -> int:
        """Instances the warm pool holds for this desired capacity (AWS's sizing rule)."""
        cap = group_max if self.max_prepared is None or self.max_prepared < 0 else self.max_prepared
        return max(self.min_size, cap - desired)


@dataclass(frozen=True)
class GroupSnapshot:
    """One Auto Scaling group as described: bounds, desired, instances, warm pool, last scale-out."""

    name: str
    min_size: int
    max_size: int
    desired: int
    in_service: int
    protected: int  # in-service instances protected from scale-in: the platform's busy ones
    warm: WarmPoolConfig | None
    last_scale_out_at: datetime | None
    tags: dict[str, str] = field(default_factory=dict)
    instances: int = 0  # in any lifecycle state (pending, in service, draining, warmed)

    def pool_state(self, in_use: int | None = None) -> PoolState:
        """The policy's view; ``in_use`` (busy instances from the platform) defaults to ``protected``."""
        warm_size = self.warm.size(self.max_size, self.desired) if self.warm else 0
        return PoolState(desired=self.desired, in_service=self.in_service,
                         in_use=self.protected if in_use is None else in_use, warm_size=warm_size,
                         warm_state=self.warm.pool_state if self.warm else None,  # type: ignore[arg-type]
                         last_scale_out_at=self.last_scale_out_at)


def _parse_time(text: str | None, tag: str = LAST_SCALE_OUT_TAG) -> datetime | None:
    try:
        t = datetime.fromisoformat(text) if text else None
    except ValueError:
        log.warning("ignoring unparsable %s tag %r", tag, text)
        return None
    return t.replace(tzinfo=timezone.utc) if t and t.tzinfo is None else t


def _snapshot(g: Mapping[str, Any]) -> GroupSnapshot:
    instances = [i for i in g.get("Instances", []) if i.get("LifecycleState") == "InService"]
    w = g.get("WarmPoolConfiguration")
    warm = None
    if w and w.get("Status") != "PendingDelete":
        warm = WarmPoolConfig(int(w.get("MinSize", 0)), w.get("MaxGroupPreparedCapacity"), w.get("PoolState", "Stopped"),
                              bool((w.get("InstanceReusePolicy") or {}).get("ReuseOnScaleIn", False)))
    tags = {t["Key"]: t.get("Value") for t in g.get("Tags", [])}
    return GroupSnapshot(g["AutoScalingGroupName"], int(g["MinSize"]), int(g["MaxSize"]), int(g["DesiredCapacity"]),
                         len(instances), sum(1 for i in instances if i.get("ProtectedFromScaleIn")), warm,
                         _parse_time(tags.get(LAST_SCALE_OUT_TAG)), tags, len(g.get("Instances", [])))


def describe_groups(client: Any, names: Iterable[str]) -> dict[str, GroupSnapshot]:
    """Describe groups by name, 50 per request (one request for a typical fleet).

    A name that does not exist is simply absent from the result (never an error here: the plan
    reports it as skipped, and nothing is called for it).
    """
    names = list(dict.fromkeys(names))
    out: dict[str, GroupSnapshot] = {}
    for i in range(0, len(names), 50):
        pages = client.get_paginator("describe_auto_scaling_groups").paginate(
            AutoScalingGroupNames=names[i : i + 50], PaginationConfig={"PageSize": 50})
        for page in pages:
            for g in page["AutoScalingGroups"]:
                out[g["AutoScalingGroupName"]] = _snapshot(g)
    return out


@dataclass(frozen=True)
class PoolOutcome:
    """What the applier did for one pool: the mutating calls made and the error, if any."""

    pool: str
    calls: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class ApplyReport:
    """Every decision of one apply, as ``SCALING_DECISION`` rows, plus each pool's outcome.

    ``notes``: plan-wide facts an operator must see (e.g. the forecast was unusable and the plan
    fell back to reactive sizing), printed above the table."""

    decided_at: datetime
    dry_run: bool
    decisions: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, PoolOutcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Pools whose apply failed or could not start (missing group, invalid plan)."""
        return [p for p, o in self.outcomes.items() if o.error]

    @property
    def calls(self) -> int:
        """Mutating API calls made in all."""
        return sum(len(o.calls) for o in self.outcomes.values())

    def table(self) -> pa.Table:
        """The decisions as a ``SCALING_DECISION`` table."""
        return pa.Table.from_pylist(self.decisions, schema=SCALING_DECISION)

    def render(self) -> str:
        """A fixed-width table for a terminal: pool, kind, current → target, applied, reason."""
        lines = [f"note: {n}" for n in self.notes]
        lines.append(f"{'pool':<29} {'kind':<7} {'current':>7} {'target':>6} {'applied':<7} reason")
        for d in self.decisions:
            lines.append(f"{d['pool']:<29} {d['pool_kind']:<7} {d['current']:>7} {d['target']:>6} "
                         f"{'yes' if d['applied'] else 'no':<7} {d['reason']}")
        return "\n".join(lines)


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _validate(pp: PoolPlan, snap: GroupSnapshot) -> str | None:
    """Why this pool's plan must not be applied to this group, or None."""
    if pp.active.current != snap.desired:
        return f"group changed since planning (desired {snap.desired}, plan assumed {pp.active.current})"
    if pp.active.changes and not snap.min_size <= pp.active.target <= snap.max_size:
        return (f"target {pp.active.target} outside the group's MinSize..MaxSize {snap.min_size}..{snap.max_size}"
                " (align the pool policy's min/max with the group)")
    if pp.warm.target < 0:
        return f"warm pool target {pp.warm.target} is negative"
    return None


def _apply_pool(client: Any, pp: PoolPlan, snap: GroupSnapshot, now: datetime, dry_run: bool,
                retry: RetryPolicy, sleep: Callable[[float], None]) -> tuple[list[dict[str, Any]], PoolOutcome]:
    """Apply one pool's plan; returns its two decision rows and its outcome. Never raises for AWS errors."""
    new_desired = pp.active.target
    warm_now = snap.warm.size(snap.max_size, new_desired) if snap.warm else 0
    want_warm = WarmPoolConfig(pp.warm.target, pp.warm.target, pp.warm_state, pp.warm_reuse_on_scale_in)
    change_active = pp.active.changes
    change_warm = pp.mode != "forecast_only" and (
        (snap.warm is None and pp.warm.target > 0)
        or (snap.warm is not None and (pp.warm.target != warm_now or snap.warm.pool_state != pp.warm_state
                                       or snap.warm.reuse_on_scale_in != pp.warm_reuse_on_scale_in)))
    invalid = _validate(pp, snap) if (change_active or change_warm) else None
    calls: list[str] = []
    errors: list[str] = [invalid] if invalid else []
    applied = {"active": False, "warm": False}
    status = {"active": "unchanged", "warm": "unchanged"}

    def call(op: str, **kwargs: Any) -> bool:
        try:
            call_with_retry(getattr(client, op), retry=retry, sleep=sleep, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            errors.append(f"{op}: {_error_text(exc)}")
            log.warning("pool %s: %s", pp.pool, errors[-1])
            return False
        calls.append(op)
        return True

    if pp.mode == "forecast_only":  # shadow: nothing may change, so nothing is validated or called
        status = {k: "shadow (forecast_only), not applied" for k in status}
    elif invalid:
        status = {k: f"invalid plan, nothing called: {invalid}" for k in status}
    elif dry_run:
        status = {"active": "dry-run: would apply" if change_active else "unchanged",
                  "warm": "dry-run: would apply" if change_warm else "unchanged"}
    else:
        if change_active:
            applied["active"] = call("update_auto_scaling_group", AutoScalingGroupName=pp.pool,
                                     DesiredCapacity=new_desired)
            status["active"] = "applied" if applied["active"] else f"failed: {errors[-1]}"
            if applied["active"] and new_desired > snap.desired:  # the scale-in grace counts from here
                if not call("create_or_update_tags", Tags=[{
                        "ResourceId": pp.pool, "ResourceType": "auto-scaling-group", "Key": LAST_SCALE_OUT_TAG,
                        "Value": now.isoformat(), "PropagateAtLaunch": False}]):
                    status["active"] += f" (but recording the scale-out time failed: {errors[-1]})"
        if change_warm and change_active and not applied["active"]:
            # the warm target assumed the new active size; resizing it alone could shrink capacity
            status["warm"] = "skipped: the active resize failed"
        elif change_warm:
            applied["warm"] = call("put_warm_pool", AutoScalingGroupName=pp.pool, MinSize=want_warm.min_size,
                                   MaxGroupPreparedCapacity=want_warm.max_prepared, PoolState=want_warm.pool_state,
                                   InstanceReusePolicy={"ReuseOnScaleIn": want_warm.reuse_on_scale_in})
            status["warm"] = "applied" if applied["warm"] else f"failed: {errors[-1]}"
    rows = [
        _row(now, pp.pool, "active", snap.desired, pp.active.proposed, applied["active"], dry_run,
             f"{status['active']}; {pp.active.reason}"),
        _row(now, pp.pool, "warm", pp.warm.current, pp.warm.proposed, applied["warm"], dry_run,
             f"{status['warm']}; {pp.warm.reason}"),
    ]
    error = "; ".join(errors) or None
    return rows, PoolOutcome(pp.pool, tuple(calls), error)


def _row(now: datetime, pool: str, kind: str, current: int, target: int, applied: bool, dry_run: bool,
         reason: str) -> dict[str, Any]:
    return {"decided_at": now, "pool": pool, "pool_kind": kind, "current": int(current), "target": int(target),
            "applied": bool(applied), "dry_run": bool(dry_run), "reason": reason}


def apply_plan(client: Any, plan: Plan, snapshots: Mapping[str, GroupSnapshot], *, dry_run: bool = False,
               retry: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
               max_workers: int = 8) -> ApplyReport:
    """Apply ``plan`` to the groups described in ``snapshots`` (see the module doc).

    ``client``: an ``autoscaling`` client. Pools needing calls are applied on up to
    ``max_workers`` threads (1 keeps calls in plan order, as botocore's Stubber needs).
    Returns every decision, including pools that were skipped or failed.
    """
    report = ApplyReport(decided_at=plan.decided_at, dry_run=dry_run)
    for name, why in plan.skipped.items():
        why = f"pool does not exist: no Auto Scaling group named {name!r}" if name not in snapshots else f"skipped: {why}"
        report.decisions.append(_row(plan.decided_at, name, "active", 0, 0, False, dry_run, why))
        report.outcomes[name] = PoolOutcome(name, (), why)
    for pp in (pp for pp in plan.pools if pp.pool not in snapshots):
        why = f"pool does not exist: no Auto Scaling group named {pp.pool!r}"
        report.decisions.append(_row(plan.decided_at, pp.pool, "active", pp.active.current, pp.active.proposed,
                                     False, dry_run, why))
        report.outcomes[pp.pool] = PoolOutcome(pp.pool, (), why)
    todo = [pp for pp in plan.pools if pp.pool in snapshots]

    def work(pp: PoolPlan) -> tuple[list[dict[str, Any]], PoolOutcome]:
        return _apply_pool(client, pp, snapshots[pp.pool], plan.decided_at, dry_run, retry, sleep)

    if max_workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="warmcast-apply") as pool:
            results = list(pool.map(work, todo))
    else:
        results = [work(pp) for pp in todo]
    for rows, outcome in results:
        report.decisions.extend(rows)
        report.outcomes[outcome.pool] = outcome
    return report


def is_backfill(now: datetime, *, max_lag_s: float = 600.0, wall_clock: datetime | None = None) -> bool:
    """True when a run decides for ``now`` more than ``max_lag_s`` seconds in the past: a back-fill,
    which must record its decisions (``dry_run=True``) and never touch AWS (DESIGN.md "Scaling")."""
    wall_clock = wall_clock or datetime.now(timezone.utc)
    return (wall_clock - now).total_seconds() > max_lag_s


def scale_cycle(client: Any, pools: Sequence[Pool], forecast: Any, now: datetime, *, dry_run: bool = False,
                busy: Mapping[str, int] | None = None, options: PlanOptions = PlanOptions(),
                subpools: Any = None, user_forecast: pa.Table | None = None,
                user_configs: Mapping[str, Sequence[str]] | None = None, ec2: Any = None, lease: Any = None,
                **apply_kwargs: Any) -> tuple[Plan, ApplyReport]:
    """One cycle: describe the pools' groups, plan from ``forecast``, apply (or dry-run).

    ``busy``: instances in use per pool (or sub-pool group) from the platform, overriding the
    count of instances protected from scale-in. ``apply_kwargs`` go to :func:`apply_plan`.

    User sub-pools (all optional): ``subpools`` a :class:`scaler.fleet.SubpoolConfig` turns them
    on; ``user_forecast`` a ``USER_FORECAST`` table; ``user_configs`` user id → most-requested
    software configurations (:func:`scaler.subpools.top_software_configs`); ``ec2`` the EC2 client
    for their launch templates. Their decisions are ``pool_kind="subpool"`` rows, and the demand
    they serve is subtracted before the shared pools are sized (``Plan.served``).

    ``lease``: a :class:`scaler.lease.ScalerLease`. Unless ``dry_run``, it is taken before AWS is
    described (another holder: :class:`scaler.lease.LeaseHeldError`, nothing was called or
    recorded), renewed right before the first mutating call (lost: ``LeaseLostError``), and
    released at the end.
    """
    use_lease = lease is not None and not dry_run
    if use_lease:
        lease.acquire()
    try:
        snapshots = describe_groups(client, [p.name for p in pools])
        states = {name: s.pool_state((busy or {}).get(name)) for name, s in snapshots.items()}
        subplan, view = None, None
        if subpools is not None:
            from scaler.aws_subpools import describe_subpools  # noqa: PLC0415 (import cycle: it uses this module)
            from scaler.subpools import plan_subpools, read_user_demand  # noqa: PLC0415

            view = describe_subpools(client, dict(busy or {}))
            demand = read_user_demand(user_forecast, now, max_age_s=options.max_forecast_age_s,
                                      quantile=subpools.policy.quantile)
            subplan = plan_subpools(demand, view.states, user_configs or {}, subpools.policy, now,
                                    decision_interval_s=options.decision_interval_s)
        plan = plan_pools(forecast, states, pools, now, options=options, served=subplan.served if subplan else None)
        plan = replace(plan, subpools=subplan)
        notes = []
        if plan.held:
            notes.append(f"forecast unusable ({plan.held}): pools sized on basis={plan.basis}"
                         + (" (target tracking on instances in use, scale-out only)" if plan.basis == "reactive" else ""))
            log.warning("scale cycle at %s: %s", now.isoformat(), notes[-1])
        if subplan is not None and subplan.held:
            notes.append(f"user sub-pools hold: {subplan.held}")
            log.warning("scale cycle at %s: %s", now.isoformat(), notes[-1])
        if plan.served:
            cores = max(v[0] for v in plan.served.values())
            notes.append(f"user sub-pools serve up to {cores:.3g} cores: subtracted from the shared pools' demand")
        if use_lease:
            lease.ensure_held()
        report = apply_plan(client, plan, snapshots, dry_run=dry_run, **apply_kwargs)
        report.notes.extend(notes)
        if subplan is not None and view is not None:
            from scaler.aws_subpools import apply_subpools  # noqa: PLC0415

            kw = {k: apply_kwargs[k] for k in ("retry", "sleep") if k in apply_kwargs}
            rows, outcomes = apply_subpools(AwsClients(client, ec2), subplan, view, subpools, now, dry_run=dry_run, **kw)
            report.decisions.extend(rows)
            report.outcomes.update(outcomes)
        return plan, report
    finally:
        if use_lease:
            lease.release()
