"""User sub-pools on AWS: describe them by tag, create / resize / drain / delete them idempotently.

Every sub-pool is an Auto Scaling group named :func:`scaler.subpools.subpool_group_name` (a hash
of the user id) from a launch template of the same name, tagged:

* ``warmcast:pool`` = the group name (what the IAM policy's conditions key on),
* ``warmcast:subpool`` = ``true`` (only such groups may be deleted, see ``iam_policy.json``),
* ``warmcast:user`` = the user id (validated with :func:`pipeline.schemas.check_id`),
* ``warmcast:software-configs`` = the preloaded configurations, comma-separated,
* ``warmcast:last-qualified`` = when the user last had qualifying demand (the retire grace
  counts from it; it is refreshed in one batched tag call per cycle),
* ``warmcast:last-scale-out`` as for shared pools.

A group carrying ``warmcast:user`` whose name is not the hash of that user (edited by hand, or a
user id that is not a well-formed id) is reported and never touched. The same guarantees as
:mod:`scaler.aws` hold: a call only when the described group differs, ``dry_run`` calls nothing,
failures are reported per sub-pool, and a plan made against an older description is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.schemas import is_valid_id
from scaler.aws import (LAST_SCALE_OUT_TAG, GroupSnapshot, PoolOutcome, RetryPolicy, _error_text, _parse_time, _row,
                        _snapshot, call_with_retry)
from scaler.aws_bootstrap import POOL_TAG, SOFTWARE_TAG, BootstrapReport, _ensure_hooks, _ensure_launch_template, _hooks
from scaler.fleet import SubpoolConfig
from scaler.subpools import SubpoolPlan, SubpoolsPlan, SubpoolState, subpool_group_name

log = logging.getLogger(__name__)

SUBPOOL_TAG = "warmcast:subpool"
USER_TAG = "warmcast:user"
LAST_QUALIFIED_TAG = "warmcast:last-qualified"


@dataclass
class SubpoolsView:
    """The sub-pools found on AWS: user id → state and group snapshot, and groups left alone (why)."""

    states: dict[str, SubpoolState] = field(default_factory=dict)
    snapshots: dict[str, GroupSnapshot] = field(default_factory=dict)  # by group name
    ignored: dict[str, str] = field(default_factory=dict)  # group name → why


def describe_subpools(client: Any, busy: dict[str, int] | None = None) -> SubpoolsView:
    """Every group tagged ``warmcast:user`` (one paginated, filtered describe)."""
    view = SubpoolsView()
    pages = client.get_paginator("describe_auto_scaling_groups").paginate(
        Filters=[{"Name": "tag-key", "Values": [USER_TAG]}], PaginationConfig={"PageSize": 100})
    for page in pages:
        for g in page["AutoScalingGroups"]:
            snap = _snapshot(g)
            user = snap.tags.get(USER_TAG, "")
            if not is_valid_id(user) or subpool_group_name(user) != snap.name:
                view.ignored[snap.name] = f"tag {USER_TAG}={user!r} does not match the group name: not a warmcast sub-pool"
                continue
            configs = tuple(c for c in snap.tags.get(SOFTWARE_TAG, "").split(",") if c)
            view.snapshots[snap.name] = snap
            view.states[user] = SubpoolState(
                user_id=user, group=snap.name, desired=snap.desired, in_service=snap.in_service,
                in_use=(busy or {}).get(snap.name, snap.protected),
                last_qualified_at=_parse_time(snap.tags.get(LAST_QUALIFIED_TAG), LAST_QUALIFIED_TAG),
                last_scale_out_at=snap.last_scale_out_at, software_configs=configs)
    return view


def _tag(group: str, key: str, value: str) -> dict[str, Any]:
    return {"ResourceId": group, "ResourceType": "auto-scaling-group", "Key": key, "Value": value,
            "PropagateAtLaunch": False}


def _validate(p: SubpoolPlan, snap: GroupSnapshot | None) -> str | None:
    if p.action == "create":
        return None if snap is None else f"group {p.group} already exists (created by a concurrent run?)"
    if snap is None:
        return f"group {p.group} no longer exists"
    if snap.desired != p.current:
        return f"group changed since planning (desired {snap.desired}, plan assumed {p.current})"
    return None


def apply_subpools(clients: Any, plan: SubpoolsPlan, view: SubpoolsView, config: SubpoolConfig, now: datetime, *,
                   dry_run: bool = False, retry: RetryPolicy = RetryPolicy(),
                   sleep: Callable[[float], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, PoolOutcome]]:
    """Apply every sub-pool decision; returns ``SCALING_DECISION`` rows (``pool_kind`` = subpool) and outcomes.

    ``clients``: :class:`scaler.aws.AwsClients` (the launch templates need EC2). Never raises
    for AWS errors: each sub-pool's failure is on its own row and outcome.
    """
    asg, ec2 = clients.autoscaling, clients.ec2
    kw: dict[str, Any] = {"retry": retry, **({"sleep": sleep} if sleep else {})}
    rows: list[dict[str, Any]] = []
    outcomes: dict[str, PoolOutcome] = {}
    refresh: list[dict[str, Any]] = []  # last-qualified tags, one batched call at the end
    refresh_for: list[str] = []
    for name, why in view.ignored.items():
        rows.append(_row(now, name, "subpool", 0, 0, False, dry_run, f"ignored: {why}"))
    for p in plan.pools:
        snap = view.snapshots.get(p.group)
        calls: list[str] = []
        errors: list[str] = []
        applied = False

        def call(client: Any, op: str, **kwargs: Any) -> bool:
            try:
                call_with_retry(getattr(client, op), **kw, **kwargs)
            except (ClientError, BotoCoreError) as exc:
                errors.append(f"{op}: {_error_text(exc)}")
                log.warning("sub-pool %s: %s", p.group, errors[-1])
                return False
            calls.append(op)
            return True

        invalid = _validate(p, snap) if p.changes else None
        if not p.applies:
            status = "not applied by mode"
        elif p.action == "delete" and snap is not None and snap.instances:
            status = f"waiting: {snap.instances} instance(s) still draining, delete at a later cycle"
        elif not p.changes:
            status = "unchanged"
        elif invalid:
            status, errors = f"nothing called: {invalid}", [invalid]
        elif dry_run:
            status = f"dry-run: would {p.action}"
        elif p.action == "create":
            tags = {POOL_TAG: p.group, SUBPOOL_TAG: "true", USER_TAG: p.user_id,
                    SOFTWARE_TAG: ",".join(p.software_configs)[:256], LAST_QUALIFIED_TAG: now.isoformat(),
                    LAST_SCALE_OUT_TAG: now.isoformat()}
            pc = config.pool_config(p.group, p.software_configs, tags)
            try:
                lt = BootstrapReport()
                _ensure_launch_template(ec2, pc, lt, {USER_TAG: p.user_id, SUBPOOL_TAG: "true"})
                calls.extend("create_launch_template" for _, _, a in lt.actions if a == "created")
            except (ClientError, BotoCoreError) as exc:
                errors.append(f"create_launch_template: {_error_text(exc)}")
            if not errors and call(asg, "create_auto_scaling_group", AutoScalingGroupName=p.group,
                                   LaunchTemplate={"LaunchTemplateName": pc.launch_template_name, "Version": "$Latest"},
                                   MinSize=0, MaxSize=config.policy.max_size, DesiredCapacity=p.target,
                                   AvailabilityZones=list(pc.availability_zones), LifecycleHookSpecificationList=_hooks(pc),
                                   Tags=[_tag(p.group, k, v) for k, v in pc.tags.items()]):
                try:
                    _ensure_hooks(asg, pc, BootstrapReport())
                except (ClientError, BotoCoreError) as exc:
                    errors.append(f"put_lifecycle_hook: {_error_text(exc)}")
                applied = not errors
            status = "created" if applied else f"failed: {'; '.join(errors)}"
        elif p.action == "delete":
            applied = call(asg, "delete_auto_scaling_group", AutoScalingGroupName=p.group, ForceDelete=False)
            if applied:
                try:
                    ec2.delete_launch_template(LaunchTemplateName=p.group)
                    calls.append("delete_launch_template")
                except ClientError as exc:
                    if "NotFound" not in exc.response.get("Error", {}).get("Code", ""):
                        errors.append(f"delete_launch_template: {_error_text(exc)}")
            status = "deleted" if applied else f"failed: {errors[-1]}"
        else:  # resize, keep with a new size, drain
            args: dict[str, Any] = {"AutoScalingGroupName": p.group, "DesiredCapacity": p.target}
            if snap is not None and p.target < snap.min_size:
                args["MinSize"] = p.target  # a drain goes below a sub-pool's minimum
            applied = call(asg, "update_auto_scaling_group", **args)
            if applied and p.target > p.current:
                call(asg, "create_or_update_tags", Tags=[_tag(p.group, LAST_SCALE_OUT_TAG, now.isoformat())])
            status = "applied" if applied else f"failed: {errors[-1]}"
        if (p.qualified_at is not None and p.action != "create" and p.applies and not dry_run and snap is not None
                and snap.tags.get(LAST_QUALIFIED_TAG) != p.qualified_at.isoformat()):
            refresh.append(_tag(p.group, LAST_QUALIFIED_TAG, p.qualified_at.isoformat()))
            refresh_for.append(p.group)
        rows.append(_row(now, p.group, "subpool", p.current, p.proposed, applied, dry_run, f"{status}; {p.reason}"))
        outcomes[p.group] = PoolOutcome(p.group, tuple(calls), "; ".join(errors) or None)
    batch = 50  # tags per call: one call per cycle for a typical number of sub-pools
    for i in range(0, len(refresh), batch):
        try:
            call_with_retry(asg.create_or_update_tags, **kw, Tags=refresh[i : i + batch])
        except (ClientError, BotoCoreError) as exc:
            for g in refresh_for[i : i + batch]:
                o = outcomes[g]
                outcomes[g] = PoolOutcome(g, o.calls, "; ".join(filter(None, [o.error, f"recording last-qualified: {_error_text(exc)}"])))
            continue
        for g in refresh_for[i : i + batch]:
            o = outcomes[g]
            outcomes[g] = PoolOutcome(g, o.calls + ("create_or_update_tags",), o.error)
    return rows, outcomes
