"""Taking back the flannel annotations the operator copied onto an edge before its Node goes (pure).

Why: flanneld's kube subnet manager (v0.28.10, ``pkg/subnet/kube/kube.go``) turns the deletion of a
Node that carries ``flannel.alpha.coreos.com/kube-subnet-manager: "true"`` into a lease removal
(``DeleteFunc`` -> ``handleAddLeaseEvent(EventRemoved)``), and the vxlan backend then deletes the
lease's route, its neighbour *and* the FDB entry ``VtepMAC dst public-ip dev flannel.1``. On an edge
that VtepMAC is the connector's, shared by the connector's own lease and by every edge, and the
kernel keys that FDB entry by MAC alone: every cloud node would lose its path to the connector's
VTEP (and so to every edge) until its flanneld restarts.

How: while an edge carries copied keys it also carries the finalizer ``FLANNEL_FINALIZER`` (added by
the planner in the same write as the keys). When the Node is being deleted, or stops being an edge,
the operator takes two steps, one per pass:

1. ``STRIP``: remove the marker, the copied keys and the record ``FLANNEL_COPY_ANNOTATION``. flanneld's
   ``handleUpdateLeaseEvent`` returns early when the *new* Node lacks the marker: no lease event,
   nothing torn down (the edge's route and neighbour stay behind, pointing at the connector: harmless).
2. ``RELEASE``: remove the finalizer. The Node is deleted as stored, without the marker, so
   ``DeleteFunc``'s ``handleAddLeaseEvent`` skips it too.

Never both in one write: an update that empties a deleting object's finalizers is not stored; the
API server deletes the object as it was (``Store.Update`` -> ``errEmptiedFinalizers`` ->
``deleteWithoutFinalizers``, k8s.io/apiserver v0.37), so the DELETED event would still carry the
marker. Taking the second step in a later pass also gives every flanneld's watch time to see the first.

Only keys that still hold what the operator copied (the record) are stripped: a node's own flanneld
(an edge turned cloud node) may have written its own, and those stay. No record, nothing stripped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fabmesh.mesh.names import (
    FLANNEL_COPY_ANNOTATION,
    FLANNEL_FINALIZER,
    FLANNEL_KEYS,
    FLANNEL_LEASE_MARKER,
    FLANNEL_PREFIX,
)

COPIED = tuple(FLANNEL_PREFIX + k for k in FLANNEL_KEYS)
MARKERS = tuple(FLANNEL_PREFIX + k for k in FLANNEL_LEASE_MARKER)


class Step(StrEnum):
    STRIP = "strip-flannel-annotations"
    RELEASE = "remove-finalizer"


class Why(StrEnum):
    DELETING = "node-deleting"
    NOT_EDGE = "edge-label-removed"
    UNINSTALL = "release-all"


@dataclass(frozen=True)
class FlannelHold:
    """What the release planner reads of one Node, valid for the mesh or not."""

    name: str
    resource_version: str
    edge: bool  # carries the edge label
    deleting: bool  # metadata.deletionTimestamp is set
    finalizers: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Release:
    """One write on one Node: strip annotations (``remove``) or set ``finalizers`` without ours."""

    node: str
    step: Step
    why: Why
    resource_version: str
    remove: tuple[str, ...] = ()
    finalizers: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # flannel keys left alone: another writer changed them


def copy_record(copied: Mapping[str, str]) -> str:
    """The record of what the operator copied: JSON of the three keys, without the prefix, sorted."""
    return json.dumps({k: copied[FLANNEL_PREFIX + k] for k in sorted(FLANNEL_KEYS)}, separators=(",", ":"))


def read_hold(obj: Mapping[str, Any], edge_label: str) -> FlannelHold:
    meta = obj.get("metadata") or {}
    return FlannelHold(name=meta.get("name", ""), resource_version=meta.get("resourceVersion", ""),
                       edge=edge_label in (meta.get("labels") or {}), deleting=bool(meta.get("deletionTimestamp")),
                       finalizers=tuple(meta.get("finalizers") or ()), annotations=meta.get("annotations") or {})


def strippable(annotations: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys to remove, flannel keys kept) for a Node the operator lets go of.

    The marker and the copied keys go only when every copied key still present holds the recorded
    value; one that differs means another flanneld writes this Node now, and then only the record goes.
    """
    if FLANNEL_COPY_ANNOTATION not in annotations:
        return (), ()
    try:
        record = json.loads(annotations[FLANNEL_COPY_ANNOTATION])
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {}
    present = [k for k in (*MARKERS, *COPIED) if k in annotations]
    foreign = [k for k in COPIED if k in annotations and record.get(k.removeprefix(FLANNEL_PREFIX)) != annotations[k]]
    if foreign or not record:
        return (FLANNEL_COPY_ANNOTATION,), tuple(sorted(present))
    return tuple(sorted({FLANNEL_COPY_ANNOTATION, *present})), ()


def plan_release(nodes: Iterable[FlannelHold], everything: bool = False) -> list[Release]:
    """The next write for every Node the operator should let go of, at most one each, sorted by node.

    A Node is let go of when it carries the finalizer or the record and is being deleted or has no
    edge label any more (``everything``: every Node, for an uninstall). Strip comes first; the
    finalizer goes only once nothing is left to strip, i.e. in a later pass.
    """
    releases = []
    for node in sorted(nodes, key=lambda n: n.name):
        ours = FLANNEL_FINALIZER in node.finalizers
        if not ours and FLANNEL_COPY_ANNOTATION not in node.annotations:
            continue
        if everything:
            why = Why.UNINSTALL
        elif node.deleting:
            why = Why.DELETING
        elif not node.edge:
            why = Why.NOT_EDGE
        else:
            continue
        remove, kept = strippable(node.annotations)
        if remove:
            releases.append(Release(node.name, Step.STRIP, why, node.resource_version, remove=remove, kept=kept))
        elif ours:
            releases.append(Release(node.name, Step.RELEASE, why, node.resource_version,
                                    finalizers=tuple(f for f in node.finalizers if f != FLANNEL_FINALIZER)))
    return releases
