"""``fabmesh operator --uninstall``: the chart's pre-delete hook, removing everything fabmesh made.

A restart of an agent or connector must never touch the data plane, so the nodes cannot clean up
on their own when they stop. The hook tells them apart from a restart by asking, in this order:

1. Fence the operator: scale its Deployment to 0 and wait until no replica holds the leader
   Lease (a running operator would recreate every Pod, ConfigMap and Secret deleted below, and
   put the flannel finalizer back on every edge).
2. Ask every running agent and connector Pod to tear down: annotate it ``fabmesh.io/teardown=<token>``
   (``fabmesh/node/teardown.py``). Each node removes routes, rule, iptables chains, ipsets, xfrm
   policies, charon connections, its bridge and conflist, then reports the token in its TunnelStatus
   and exits 0 with the token as its termination message (kubelet reports that, whatever the node can
   reach: an edge's way to the API is often the connector tunnel the teardown has just removed).
3. Wait for those reports, at most ``node_timeout_s``: a node that never answers (kubelet down,
   partitioned) must not hold an uninstall for ever. The nodes left are printed with the by-hand
   command (``fabmesh agent cleanup``, docs/operator.md), and the uninstall goes on.
4. Delete what the operator created in its namespace (``uninstall_plan.DELETE_ORDER``) and its Lease.
5. Release every Node: the flannel strip and finalizer rounds of ``fabmesh operator --release``,
   then the operator's own annotations.

Exit 0 when everything above was done (nodes that did not answer are reported, not an error: the
objects are gone either way); 1 when an API write failed (run it again: every step is idempotent);
2 when an operator still holds the Lease.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable

from fabmesh.kube.client import ApiError, Kube
from fabmesh.mesh.names import MANAGED_SELECTOR, TEARDOWN_ANNOTATION
from fabmesh.operator.release import leader_gone, release_nodes
from fabmesh.operator.settings import OperatorSettings
from fabmesh.operator.uninstall_plan import (
    DELETE_ORDER,
    Targets,
    annotation_strip,
    answered,
    teardown_targets,
    waiting,
)

log = logging.getLogger(__name__)
POLL_S = 1.0
WHAT = "--uninstall"


def _say(text: str, error: bool = False) -> None:
    print(f"fabmesh operator {WHAT}: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def fence(kube: Kube, settings: OperatorSettings, deployment: str) -> None:
    """Scale the operator's Deployment to 0 (a missing one is fine: already gone, or run by hand)."""
    try:
        kube.merge_patch("deployments", deployment, {"spec": {"replicas": 0}}, settings.namespace, sub="scale")
        _say(f"scaled Deployment {settings.namespace}/{deployment} to 0")
    except ApiError as exc:
        if not exc.not_found:
            raise
        _say(f"no Deployment {settings.namespace}/{deployment}: nothing to scale down")


def ask_nodes(kube: Kube, settings: OperatorSettings, token: str) -> Targets:
    targets = teardown_targets(kube.list("pods", settings.namespace, MANAGED_SELECTOR))
    for node, pod in sorted(targets.asked.items()):
        kube.merge_patch("pods", pod, {"metadata": {"annotations": {TEARDOWN_ANNOTATION: token}}}, settings.namespace)
        _say(f"node={node} action=ask-teardown pod={settings.namespace}/{pod}")
    return targets


def wait_for_nodes(kube: Kube, settings: OperatorSettings, targets: Targets, token: str, timeout_s: float,
                   clock: Callable[[], float] = time.monotonic) -> list[str]:
    """The asked nodes that had not reported their teardown when ``timeout_s`` ran out."""
    deadline = clock() + timeout_s
    done: set[str] = set()
    while True:
        try:
            statuses = kube.list("tunnelstatuses", settings.namespace)
        except ApiError as exc:
            if not exc.not_found:  # no CRD: the Pods' termination messages still answer
                raise
            statuses = []
        done = answered(statuses, kube.list("pods", settings.namespace, MANAGED_SELECTOR), token)
        left = waiting(targets, done)
        if not left or clock() >= deadline:
            return left
        time.sleep(POLL_S)


def delete_objects(kube: Kube, settings: OperatorSettings) -> None:
    for kind in DELETE_ORDER:
        try:
            kube.delete_collection(kind, settings.namespace, MANAGED_SELECTOR)
        except ApiError as exc:
            if not exc.not_found:  # tunnelstatuses without the CRD
                raise
        _say(f"action=delete {kind} namespace={settings.namespace} selector={MANAGED_SELECTOR}")
    lease = settings.leader_election.lease_name
    if kube.delete("leases", lease, settings.namespace):
        _say(f"action=delete lease={settings.namespace}/{lease}")


def strip_nodes(kube: Kube) -> None:
    for node in kube.list("nodes"):
        patch = annotation_strip(node)
        if patch is not None:
            kube.merge_patch("nodes", node["metadata"]["name"], patch)
            _say(f"node={node['metadata']['name']} action=strip-annotations "
                 f"keys={','.join(sorted(patch['metadata']['annotations']))}")


def uninstall(kube: Kube, settings: OperatorSettings, *, deployment: str, lease_wait_s: float,
              node_timeout_s: float) -> int:
    started = time.monotonic()
    try:
        fence(kube, settings, deployment)
        holder = leader_gone(kube, settings, lease_wait_s) if settings.leader_election.enabled else None
        if holder is not None:
            _say(f"operator {holder} still holds Lease {settings.namespace}/{settings.leader_election.lease_name}"
                 f" after {lease_wait_s:.0f}s; nothing was removed", error=True)
            return 2
        token = uuid.uuid4().hex[:16]
        targets = ask_nodes(kube, settings, token)
        left = wait_for_nodes(kube, settings, targets, token, node_timeout_s)
        for node in sorted(set(targets.asked) - set(left)):
            _say(f"node={node} teardown done")
        stranded = {**targets.unreachable, **{n: f"no answer in {node_timeout_s:.0f}s" for n in left}}
        for node, why in sorted(stranded.items()):
            _say(f"node={node} NOT cleaned ({why}): run `fabmesh agent cleanup` (an edge) or `fabmesh connector "
                 "cleanup` (a connector) on that node, see docs/operator.md", error=True)
        delete_objects(kube, settings)
        released = release_nodes(kube, settings, WHAT)
        strip_nodes(kube)
    except ApiError as exc:
        _say(f"API error, run it again (every step is idempotent): {exc.status} {exc.reason} {exc.body[:300]}",
             error=True)
        return 1
    _say(f"done in {time.monotonic() - started:.1f}s: {len(targets.asked) - len(left)} node(s) cleaned, "
         f"{len(stranded)} left to clean by hand")
    return released
