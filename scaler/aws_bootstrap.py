"""Create the fleet a :class:`~scaler.fleet.FleetConfig` describes, and the per-instance grace APIs.

:func:`bootstrap` is for a demo against a local endpoint or a fresh account, and is idempotent
(what exists is left as is; a group's MinSize/MaxSize are aligned with its policy). Per pool it
creates:

* a launch template ``warmcast-<pool>`` (instance tags: owning pool, software configurations)
  whose user data preloads the software configurations and then completes the launch hook;
* the Auto Scaling group (tagged ``warmcast:pool``), desired = the policy's minimum;
* two lifecycle hooks: ``warmcast-preload`` (``EC2_INSTANCE_LAUNCHING``: an instance is put in
  service — or stopped into the warm pool — only after its own bootstrap preloaded its software
  and called ``complete-lifecycle-action``; a long preload sends heartbeats) and
  ``warmcast-drain`` (``EC2_INSTANCE_TERMINATING`` → ``Terminating:Wait``: the termination grace
  period in which running work drains; the drain agent sends heartbeats and completes it with
  :func:`complete_lifecycle_action`);
* a warm pool at the policy's warm minimum when the policy allows one.

Busy instances are also protected from scale-in (:func:`protect_busy_instances`).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from botocore.exceptions import ClientError

from scaler.aws import AwsClients, RetryPolicy, call_with_retry, describe_groups
from scaler.fleet import FleetConfig, PoolConfig

log = logging.getLogger(__name__)

PRELOAD_HOOK = "warmcast-preload"
DRAIN_HOOK = "warmcast-drain"
POOL_TAG = "warmcast:pool"
SOFTWARE_TAG = "warmcast:software-configs"
#: The scaler's least-privilege IAM policy (runtime statement + bootstrap statement).
IAM_POLICY_FILE = Path(__file__).with_name("iam_policy.json")

#: User data: preload, then release the launch hook. A shutdown script tells "stopped into the
#: warm pool" (target state Warmed:*) from "terminating" through the instance metadata.
_USER_DATA = """#!/bin/bash
# First boot only: preload, then release the launch hook. (A warm instance that resumes keeps its
# preloaded disk; the site's boot unit completes the launch hook again when it leaves the pool.)
set -euo pipefail
TOKEN=$(curl -sX PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
ID=$(curl -s -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id)
mkdir -p /opt/warmcast
for cfg in {configs}; do /opt/warmcast/preload "$cfg"; done   # site-specific: pull images, warm caches
aws autoscaling complete-lifecycle-action --auto-scaling-group-name {group} \\
  --lifecycle-hook-name {hook} --instance-id "$ID" --lifecycle-action-result CONTINUE
cat >/opt/warmcast/on-shutdown <<'SCRIPT'
#!/bin/bash
# Target state Warmed:Stopped / Warmed:Hibernated: going into the warm pool, keep the preloaded state.
T=$(curl -sX PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')
STATE=$(curl -s -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/autoscaling/target-lifecycle-state)
case "$STATE" in Warmed:*) exit 0;; esac
/opt/warmcast/drain   # terminating: stop taking work, finish or hand off what runs
SCRIPT
chmod +x /opt/warmcast/on-shutdown
"""


@dataclass
class BootstrapReport:
    """What bootstrap did: ``(kind, name, action)`` with action created | exists | updated."""

    actions: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, name: str, action: str) -> None:
        self.actions.append((kind, name, action))
        log.info("%s %s: %s", kind, name, action)

    def render(self) -> str:
        return "\n".join(f"{kind:<16} {name:<28} {action}" for kind, name, action in self.actions)


def user_data(pc: PoolConfig) -> str:
    """The pool's launch user data (plain text; base64-encoded into the launch template)."""
    configs = " ".join(f"'{c}'" for c in pc.software_configs) or "''"
    return _USER_DATA.format(configs=configs, group=pc.name, hook=PRELOAD_HOOK)


def _ensure_launch_template(ec2: Any, pc: PoolConfig, report: BootstrapReport,
                            extra_tags: dict[str, str] | None = None) -> None:
    """Create the pool's launch template unless it exists; ``extra_tags`` also go on it and its instances."""
    name = pc.launch_template_name
    try:
        ec2.describe_launch_templates(LaunchTemplateNames=[name])
        report.add("launch-template", name, "exists")
        return
    except ClientError as exc:
        if "NotFound" not in exc.response.get("Error", {}).get("Code", ""):
            raise
    tags = [{"Key": POOL_TAG, "Value": pc.name}, {"Key": SOFTWARE_TAG, "Value": ",".join(pc.software_configs)[:256]}]
    tags += [{"Key": k, "Value": v} for k, v in (extra_tags or {}).items()]
    ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData={
            "ImageId": pc.image_id, "InstanceType": pc.instance_type,
            "UserData": base64.b64encode(user_data(pc).encode()).decode(),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
        },
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
    )
    report.add("launch-template", name, "created")


def _hooks(pc: PoolConfig) -> list[dict[str, Any]]:
    return [
        {"LifecycleHookName": PRELOAD_HOOK, "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
         "HeartbeatTimeout": pc.preload_timeout_s, "DefaultResult": "ABANDON"},
        {"LifecycleHookName": DRAIN_HOOK, "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
         "HeartbeatTimeout": pc.drain_timeout_s, "DefaultResult": "CONTINUE"},
    ]


def _ensure_group(asg: Any, pc: PoolConfig, existing: Any, report: BootstrapReport) -> None:
    pol = pc.pool.policy
    if existing is None:
        tags = {POOL_TAG: pc.name, SOFTWARE_TAG: ",".join(pc.software_configs)[:256], **pc.tags}
        asg.create_auto_scaling_group(
            AutoScalingGroupName=pc.name,
            LaunchTemplate={"LaunchTemplateName": pc.launch_template_name, "Version": "$Latest"},
            MinSize=pol.min_size, MaxSize=pol.max_size, DesiredCapacity=pol.min_size,
            AvailabilityZones=list(pc.availability_zones),
            # hooks at creation, so the very first instances preload too (moto ignores this list;
            # _ensure_hooks below adds what is missing)
            LifecycleHookSpecificationList=_hooks(pc),
            Tags=[{"ResourceId": pc.name, "ResourceType": "auto-scaling-group", "Key": k, "Value": v,
                   "PropagateAtLaunch": False} for k, v in tags.items()],
        )
        report.add("group", pc.name, "created")
    elif (existing.min_size, existing.max_size) != (pol.min_size, pol.max_size):
        asg.update_auto_scaling_group(AutoScalingGroupName=pc.name, MinSize=pol.min_size, MaxSize=pol.max_size)
        report.add("group", pc.name, f"updated MinSize..MaxSize to {pol.min_size}..{pol.max_size}")
    else:
        report.add("group", pc.name, "exists")


def _ensure_hooks(asg: Any, pc: PoolConfig, report: BootstrapReport) -> None:
    have = {h["LifecycleHookName"]: h for h in asg.describe_lifecycle_hooks(AutoScalingGroupName=pc.name)["LifecycleHooks"]}
    for hook in _hooks(pc):
        name = hook["LifecycleHookName"]
        old = have.get(name)
        if old and all(old.get(k) == v for k, v in hook.items()):
            report.add("lifecycle-hook", f"{pc.name}/{name}", "exists")
            continue
        asg.put_lifecycle_hook(AutoScalingGroupName=pc.name, **hook)
        report.add("lifecycle-hook", f"{pc.name}/{name}", "updated" if old else "created")


def bootstrap(clients: AwsClients, fleet: FleetConfig) -> BootstrapReport:
    """Create (or align) every pool of ``fleet``: launch template, group, hooks, warm pool."""
    report = BootstrapReport()
    existing = describe_groups(clients.autoscaling, [pc.name for pc in fleet.pools])
    for pc in fleet.pools:
        _ensure_launch_template(clients.ec2, pc, report)
        _ensure_group(clients.autoscaling, pc, existing.get(pc.name), report)
        _ensure_hooks(clients.autoscaling, pc, report)
        pol = pc.pool.policy
        snap = existing.get(pc.name)
        if pol.warm_max_size > 0 and (snap is None or snap.warm is None):
            clients.autoscaling.put_warm_pool(
                AutoScalingGroupName=pc.name, MinSize=pol.warm_min_size, MaxGroupPreparedCapacity=pol.warm_min_size,
                PoolState=pol.idle_warm_state, InstanceReusePolicy={"ReuseOnScaleIn": pol.warm_reuse_on_scale_in})
            report.add("warm-pool", pc.name, "created")
        elif snap is not None and snap.warm is not None:
            report.add("warm-pool", pc.name, "exists")
    return report


def complete_lifecycle_action(client: Any, group: str, instance_id: str, *, hook: str = DRAIN_HOOK,
                              result: str = "CONTINUE", token: str | None = None,
                              retry: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] | None = None) -> None:
    """End an instance's wait in ``hook``: its drain (or preload) is done. ``result``: CONTINUE | ABANDON."""
    if result not in ("CONTINUE", "ABANDON"):
        raise ValueError(f"lifecycle action result {result!r} must be CONTINUE or ABANDON")
    kwargs: dict[str, Any] = {"AutoScalingGroupName": group, "LifecycleHookName": hook, "InstanceId": instance_id,
                              "LifecycleActionResult": result}
    if token:
        kwargs["LifecycleActionToken"] = token
    call_with_retry(client.complete_lifecycle_action, retry=retry, **({"sleep": sleep} if sleep else {}), **kwargs)


def record_lifecycle_heartbeat(client: Any, group: str, instance_id: str, *, hook: str = DRAIN_HOOK,
                               token: str | None = None) -> None:
    """Extend an instance's wait in ``hook`` by the hook's heartbeat timeout (a long drain or preload)."""
    kwargs: dict[str, Any] = {"AutoScalingGroupName": group, "LifecycleHookName": hook, "InstanceId": instance_id}
    if token:
        kwargs["LifecycleActionToken"] = token
    client.record_lifecycle_action_heartbeat(**kwargs)


def protect_busy_instances(client: Any, group: str, busy: Iterable[str], idle: Iterable[str] = ()) -> int:
    """Protect ``busy`` instances from scale-in and release ``idle`` ones; returns calls made.

    AWS takes at most 50 instance ids per call.
    """
    calls = 0
    for ids, protected in ((sorted(set(busy)), True), (sorted(set(idle)), False)):
        for i in range(0, len(ids), 50):
            client.set_instance_protection(AutoScalingGroupName=group, InstanceIds=ids[i : i + 50],
                                           ProtectedFromScaleIn=protected)
            calls += 1
    return calls


def iam_policy() -> dict[str, Any]:
    """The least-privilege IAM policy document for the scaler and for bootstrap."""
    return json.loads(IAM_POLICY_FILE.read_text())
