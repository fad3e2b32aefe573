"""``fabmesh operator --release``: let go of every Node before fabmesh is uninstalled.

Edges carry the finalizer ``fabmesh.io/flannel-release`` (see ``flannel.py``); without a running
operator their deletion would wait for ever. This takes the copied flannel keys off every Node and
then removes the finalizer, the same two writes the operator makes, one round apart, with a pause
so that every flanneld's watch sees the strip before the Node can go.

It first waits until no operator holds the leader Lease (a running one would put the finalizer back
on every edge): stop the operator first (``helm uninstall`` runs this as a post-delete hook).
"""

from __future__ import annotations

import logging
import sys
import time

from fabmesh.kube.client import Kube
from fabmesh.operator.election import Action, decide, view
from fabmesh.operator.flannel import plan_release, read_hold
from fabmesh.operator.plan import MeshPlan
from fabmesh.operator.reconcile import PassResult, Reconciler
from fabmesh.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
PAUSE_S = 2.0  # between the strip round and the finalizer round: watchers see the first write first
ROUNDS = 6


def leader_gone(kube: Kube, settings: OperatorSettings, wait_s: float) -> str | None:
    """None once the Lease is free or has not changed for its duration (our clock); else who holds it."""
    election = settings.leader_election
    seen, since = None, time.monotonic()
    deadline = since + wait_s
    while True:
        lease = view(kube.get("leases", election.lease_name, settings.namespace), election.lease_duration_s)
        if lease is None or lease.resource_version != seen:
            seen, since = (lease.resource_version if lease else None), time.monotonic()
        if decide(lease, "fabmesh-release", time.monotonic() - since) is not Action.WAIT:
            return None
        if time.monotonic() >= deadline:
            assert lease is not None
            return lease.holder
        time.sleep(1.0)


def release_all(kube: Kube, settings: OperatorSettings, wait_s: float) -> int:
    holder = leader_gone(kube, settings, wait_s) if settings.leader_election.enabled else None
    if holder is not None:
        print(f"fabmesh operator --release: operator {holder} still holds Lease "
              f"{settings.namespace}/{settings.leader_election.lease_name}; stop it first "
              "(scale Deployment fabmesh-operator to 0)", file=sys.stderr)
        return 2
    return release_nodes(kube, settings)


def release_nodes(kube: Kube, settings: OperatorSettings, what: str = "--release") -> int:
    """The strip and finalizer rounds, once no operator runs; 0 when no Node holds anything of fabmesh's."""
    reconciler = Reconciler(kube, settings)
    touched: set[str] = set()
    for _ in range(ROUNDS):
        releases = plan_release([read_hold(n, settings.edge_label) for n in kube.list("nodes")], everything=True)
        if not releases:
            print(f"fabmesh operator {what}: no Node carries fabmesh's flannel annotations or finalizer"
                  + (f" (released now: {','.join(sorted(touched))})" if touched else ""))
            return 0
        touched |= {r.node for r in releases}
        result = PassResult(plan=MeshPlan())  # only its errors are used here
        for release in releases:
            reconciler.release_flannel(result, release)
        for error in result.errors:
            print(f"fabmesh operator {what}: {error}", file=sys.stderr)
        time.sleep(PAUSE_S)
    print(f"fabmesh operator {what}: Nodes still hold fabmesh's finalizer; run again", file=sys.stderr)
    return 1
