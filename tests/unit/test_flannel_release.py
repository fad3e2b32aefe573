"""The flannel release planner: which Node gets which write, so flanneld never sees a marked edge go."""

from __future__ import annotations

from typing import Any

import pytest

from fabmesh.mesh.names import FLANNEL_COPY_ANNOTATION, FLANNEL_FINALIZER
from fabmesh.operator.flannel import FlannelHold, Release, Step, Why, copy_record, plan_release, read_hold
from fabmesh.operator.inventory import read_node
from fabmesh.operator.plan import plan
from fabmesh.operator.settings import OperatorSettings
from fabmesh.operator.status import node_writes

P = "flannel.alpha.coreos.com/"
CONNECTOR_KEYS = {P + "backend-type": "vxlan", P + "backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
                  P + "public-ip": "198.51.100.1"}
MARKER = {P + "kube-subnet-manager": "true"}
RECORD = {FLANNEL_COPY_ANNOTATION: copy_record(CONNECTOR_KEYS)}
COPIED = {**CONNECTOR_KEYS, **MARKER, **RECORD}
ALL_KEYS = tuple(sorted(COPIED))
OWN_FLANNELD = {**CONNECTOR_KEYS, P + "backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:07:07"}',
                P + "public-ip": "198.51.100.7"}


def hold(edge: bool = True, deleting: bool = False, finalizers: tuple[str, ...] = (FLANNEL_FINALIZER,),
         annotations: dict[str, str] | None = None) -> FlannelHold:
    return FlannelHold("e1", "7", edge=edge, deleting=deleting, finalizers=finalizers,
                       annotations=COPIED if annotations is None else annotations)


CASES: list[tuple[str, FlannelHold, bool, list[Release]]] = [
    ("live-edge-is-kept", hold(), False, []),
    ("deleting-edge-is-stripped-first-and-keeps-its-finalizer", hold(deleting=True), False,
     [Release("e1", Step.STRIP, Why.DELETING, "7", remove=ALL_KEYS)]),
    ("stripped-deleting-edge-loses-only-our-finalizer",
     hold(deleting=True, finalizers=("other.io/x", FLANNEL_FINALIZER), annotations={"kept": "1"}), False,
     [Release("e1", Step.RELEASE, Why.DELETING, "7", finalizers=("other.io/x",))]),
    ("unlabelled-edge-is-stripped", hold(edge=False), False,
     [Release("e1", Step.STRIP, Why.NOT_EDGE, "7", remove=ALL_KEYS)]),
    ("stripped-unlabelled-edge-loses-the-finalizer", hold(edge=False, annotations={}), False,
     [Release("e1", Step.RELEASE, Why.NOT_EDGE, "7", finalizers=())]),
    ("own-flanneld-keys-are-never-stripped-only-the-record",
     hold(edge=False, annotations={**OWN_FLANNELD, **MARKER, **RECORD}), False,
     [Release("e1", Step.STRIP, Why.NOT_EDGE, "7", remove=(FLANNEL_COPY_ANNOTATION,),
              kept=tuple(sorted({*OWN_FLANNELD, *MARKER})))]),
    ("no-record-nothing-stripped-finalizer-goes", hold(deleting=True, annotations={**CONNECTOR_KEYS, **MARKER}),
     False, [Release("e1", Step.RELEASE, Why.DELETING, "7", finalizers=())]),
    ("unreadable-record-strips-only-the-record",
     hold(deleting=True, annotations={**CONNECTOR_KEYS, **MARKER, FLANNEL_COPY_ANNOTATION: "{bad"}), False,
     [Release("e1", Step.STRIP, Why.DELETING, "7", remove=(FLANNEL_COPY_ANNOTATION,),
              kept=tuple(sorted({*CONNECTOR_KEYS, *MARKER})))]),
    ("keys-someone-removed-are-not-listed", hold(deleting=True, annotations={**MARKER, **RECORD}), False,
     [Release("e1", Step.STRIP, Why.DELETING, "7", remove=tuple(sorted({*MARKER, *RECORD})))]),
    ("record-without-finalizer-is-still-stripped", hold(edge=False, finalizers=()), False,
     [Release("e1", Step.STRIP, Why.NOT_EDGE, "7", remove=ALL_KEYS)]),
    ("record-gone-and-no-finalizer-nothing-to-do", hold(edge=False, finalizers=(), annotations={}), False, []),
    ("node-never-held-is-ignored-even-when-deleting",
     hold(deleting=True, finalizers=(), annotations={**CONNECTOR_KEYS, **MARKER}), False, []),
    ("uninstall-strips-a-live-edge", hold(), True, [Release("e1", Step.STRIP, Why.UNINSTALL, "7", remove=ALL_KEYS)]),
    ("uninstall-then-removes-the-finalizer", hold(annotations={}), True,
     [Release("e1", Step.RELEASE, Why.UNINSTALL, "7", finalizers=())]),
]


@pytest.mark.parametrize(("node", "everything", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_release_plan(node: FlannelHold, everything: bool, expected: list[Release]) -> None:
    assert plan_release([node], everything=everything) == expected


def test_strip_and_finalizer_removal_never_share_a_write() -> None:
    """The API server deletes a Node whose last finalizer goes *as stored*: a strip in that same write would
    never be stored, and flanneld's DELETED event would carry the marker."""
    node = hold(deleting=True, finalizers=(FLANNEL_FINALIZER,))
    for carried in (COPIED, {**MARKER, **RECORD}, RECORD, {**OWN_FLANNELD, **MARKER, **RECORD}):
        (release,) = plan_release([hold(deleting=True, annotations=carried)])
        assert release.step is Step.STRIP and release.finalizers == ()
    (release,) = plan_release([node.__class__(**{**node.__dict__, "annotations": {**CONNECTOR_KEYS, **MARKER}})])
    assert release.step is Step.RELEASE and not release.remove


def test_one_write_per_node_sorted_by_name() -> None:
    nodes = [FlannelHold(n, "1", edge=False, deleting=False, finalizers=(FLANNEL_FINALIZER,), annotations=a)
             for n, a in (("b", {}), ("a", COPIED), ("c", {}))]
    assert [(r.node, r.step) for r in plan_release(nodes)] == [("a", Step.STRIP), ("b", Step.RELEASE),
                                                              ("c", Step.RELEASE)]


def test_read_hold_from_a_node_object() -> None:
    obj: dict[str, Any] = {"metadata": {
        "name": "e1", "resourceVersion": "9", "labels": {"node-role.kubernetes.io/edge": ""},
        "deletionTimestamp": "2026-12-02T01:00:00Z", "finalizers": [FLANNEL_FINALIZER], "annotations": COPIED}}
    assert read_hold(obj, "node-role.kubernetes.io/edge") == FlannelHold(
        "e1", "9", edge=True, deleting=True, finalizers=(FLANNEL_FINALIZER,), annotations=COPIED)
    assert read_hold({"metadata": {"name": "n"}}, "x") == FlannelHold("n", "", edge=False, deleting=False)


# -- the holding side, in the planner: the finalizer comes with the copied keys, and a deleting edge gets nothing

def _node(name: str, labels: dict[str, str], annotations: dict[str, str], ip: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": name, "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": labels, "annotations": annotations, **meta},
            "spec": {}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


SETTINGS = OperatorSettings()
CONNECTOR = _node("conn", {SETTINGS.connector_label: ""}, {**CONNECTOR_KEYS, **MARKER}, "198.51.100.1")
HOLD_CASES = [
    ("new-edge-gets-keys-record-and-finalizer", {}, {}, (FLANNEL_FINALIZER,)),
    ("other-finalizers-are-kept", {}, {"finalizers": ["other.io/x"]}, ("other.io/x", FLANNEL_FINALIZER)),
    ("held-edge-gets-no-finalizer-write", COPIED, {"finalizers": [FLANNEL_FINALIZER]}, None),
    ("deleting-edge-gets-no-patch-at-all", {}, {"deletionTimestamp": "2026-12-02T01:00:00Z",
                                                "finalizers": [FLANNEL_FINALIZER]}, "no-patch"),
]


@pytest.mark.parametrize(("annotations", "meta", "finalizers"), [c[1:] for c in HOLD_CASES],
                         ids=[c[0] for c in HOLD_CASES])
def test_planner_holds_every_edge_it_gives_flannel_keys(annotations: dict[str, str], meta: dict[str, Any],
                                                        finalizers: object) -> None:
    edge = _node("e1", {SETTINGS.edge_label: ""}, {"fabmesh.io/pod-cidr": "10.233.0.0/24", **annotations},
                 "192.0.2.1", **meta)
    edge["spec"] = {"podCIDR": "10.233.0.0/24"}
    nodes = [read_node(o, SETTINGS) for o in (CONNECTOR, edge)]
    result = plan(nodes, SETTINGS, "CA", recorded={"e1": "10.233.0.0/24"})  # type: ignore[arg-type]
    assert "e1" in result.edges  # still in the mesh while its Node exists
    patch = result.node_patches.get("e1")
    if finalizers == "no-patch":
        assert patch is None
        return
    written = patch.annotations if patch else {}
    assert (patch.finalizers if patch else None) == finalizers
    assert {k: written.get(k, annotations.get(k)) for k in COPIED} == COPIED


def test_a_connector_change_repoints_the_keys_and_the_record_and_keeps_the_finalizer() -> None:
    moved = {**CONNECTOR_KEYS, P + "public-ip": "198.51.100.9"}
    connector = _node("conn", {SETTINGS.connector_label: ""}, {**moved, **MARKER}, "198.51.100.9")
    edge = _node("e1", {SETTINGS.edge_label: ""}, {"fabmesh.io/pod-cidr": "10.233.0.0/24", **COPIED},
                 "192.0.2.1", finalizers=[FLANNEL_FINALIZER])
    edge["spec"] = {"podCIDR": "10.233.0.0/24"}
    result = plan([read_node(o, SETTINGS) for o in (connector, edge)], SETTINGS, "CA",  # type: ignore[misc]
                  recorded={"e1": "10.233.0.0/24"})
    patch = result.node_patches["e1"]
    assert patch.annotations == {P + "public-ip": "198.51.100.9", FLANNEL_COPY_ANNOTATION: copy_record(moved)}
    assert patch.finalizers is None


def test_a_deleting_edge_gets_no_status_write_and_a_held_one_keeps_its_finalizer_in_the_status_patch() -> None:
    edges = {name: _node(name, {SETTINGS.edge_label: ""}, {}, ip, **meta) for name, ip, meta in (
        ("e1", "192.0.2.1", {"deletionTimestamp": "2026-12-02T01:00:00Z", "finalizers": [FLANNEL_FINALIZER]}),
        ("e2", "192.0.2.2", {}))}
    infos = {o["metadata"]["name"]: read_node(o, SETTINGS) for o in (CONNECTOR, *edges.values())}
    result = plan(list(infos.values()), SETTINGS, "CA")  # type: ignore[arg-type]
    writes = node_writes(result, infos, {})  # type: ignore[arg-type]
    assert set(writes) == {"e2"}
    assert writes["e2"].finalizers == (FLANNEL_FINALIZER,) and "fabmesh.io/status" in writes["e2"].annotations
