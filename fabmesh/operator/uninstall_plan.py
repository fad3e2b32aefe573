"""What ``helm uninstall`` removes, decided from what the API lists (pure).

The uninstall hook (``fabmesh/operator/uninstall.py``) asks every node that runs an agent or a
connector to tear down, waits for their answers, then deletes every object the operator made.
The decisions live here so that they are tested with tables: which Pods can be asked (a Pod
that is not running has no loop to read its annotation), which nodes have answered, what is
deleted and in which order, which annotations come off each Node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fabmesh.mesh.names import (
    FLANNEL_COPY_ANNOTATION,
    KIND_LABEL,
    MANAGED_BY_KEY,
    POD_CIDR_ANNOTATION,
    STATUS_ANNOTATION,
)

# Every kind the operator creates in its namespace, all labelled app.kubernetes.io/managed-by=fabmesh. Pods
# first (their loops are done, nothing may recreate what follows under them), then their config and keys,
# then the node identities (a Pod still terminating keeps its token valid until its ServiceAccount goes).
# The leader Lease is named, not labelled; the TunnelStatus CRD is the chart's and goes with the release.
DELETE_ORDER = ("pods", "configmaps", "secrets", "tunnelstatuses", "rolebindings", "roles", "serviceaccounts")
NODE_KINDS = ("agent", "connector")
# Node annotations only the operator writes (the flannel ones go with the finalizer: fabmesh/operator/flannel.py).
NODE_ANNOTATIONS = (POD_CIDR_ANNOTATION, STATUS_ANNOTATION, FLANNEL_COPY_ANNOTATION)


@dataclass(frozen=True)
class Targets:
    """The Pods asked to tear down (node -> Pod name), and nodes whose Pod cannot answer (node -> why)."""

    asked: dict[str, str]
    unreachable: dict[str, str]


def teardown_targets(pods: Iterable[Mapping[str, Any]]) -> Targets:
    """Running agent and connector Pods are asked; any other of them names a node to clean up by hand."""
    asked: dict[str, str] = {}
    unreachable: dict[str, str] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(MANAGED_BY_KEY) != "fabmesh" or labels.get(KIND_LABEL) not in NODE_KINDS:
            continue
        node = (pod.get("spec") or {}).get("nodeName") or ""
        phase = (pod.get("status") or {}).get("phase")
        if not node:
            continue  # never scheduled: it programmed nothing
        if meta.get("deletionTimestamp"):
            unreachable[node] = f"Pod {meta['name']} is being deleted"
        elif phase != "Running":
            unreachable[node] = f"Pod {meta['name']} is {phase or 'not running'}"
        else:
            asked[node] = meta["name"]
    return Targets(asked=asked, unreachable=unreachable)


def answered(statuses: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], token: str) -> set[str]:
    """Nodes that report this uninstall's teardown done, by either of two ways.

    Their TunnelStatus (``status.teardown == token``), written by the node itself; or, as kubelet reports
    it, a node-loop container that exited 0 with the token as its termination message (the node loop exits
    so once done: an edge often reaches the API only through the connector tunnel the teardown removes).
    """
    done = {s["metadata"]["name"] for s in statuses if (s.get("status") or {}).get("teardown") == token}
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or labels.get(KIND_LABEL) not in NODE_KINDS:
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or ():
            if status.get("name") != labels.get(KIND_LABEL):
                continue
            ends = [(status.get(k) or {}).get("terminated") or {} for k in ("state", "lastState")]
            if any(e.get("exitCode") == 0 and (e.get("message") or "").strip() == token for e in ends):
                done.add(node)
    return done


def waiting(targets: Targets, done: set[str]) -> list[str]:
    return sorted(set(targets.asked) - done)


def annotation_strip(node: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch taking the operator's own annotations off ``node``; None when it carries none."""
    annotations = node["metadata"].get("annotations") or {}
    gone = {key: None for key in NODE_ANNOTATIONS if key in annotations}
    return {"metadata": {"annotations": gone}} if gone else None
