"""The kubectl plugin's pure side: doctor's checks, status rows, metrics parsing and the DOT graph, table-driven."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabmesh.kubectl import cluster
from fabmesh.kubectl import doctor as c
from fabmesh.kubectl import status as st
from fabmesh.kubectl.doctor import Check, CheckName, ClusterState, Status
from fabmesh.kubectl.graph import mesh_dot, mesh_json, quote
from fabmesh.mesh import tunnelstatus
from fabmesh.mesh.model import LocalNode, NodeMesh, Peer, PeerShard, Role, dump_yaml
from fabmesh.mesh.timestamps import format_time
from fabmesh.mesh.tunnelstatus import NodeReport, Tunnel, TunnelState
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import issue_leaf, new_ca

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
NS = "fabmesh-system"
FLANNEL = {"flannel.alpha.coreos.com/backend-type": "vxlan",
           "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
           "flannel.alpha.coreos.com/public-ip": "198.51.100.1",
           "flannel.alpha.coreos.com/kube-subnet-manager": "true"}

CA = new_ca(now=NOW - timedelta(days=10), lifetime=timedelta(days=3650))
SHORT_CA = new_ca(now=NOW - timedelta(days=10), lifetime=timedelta(days=30))  # ends in 20 days


def leaf(name: str, days_left: float, issued_days_ago: float = 10) -> str:
    """A leaf PEM whose not-after is ``days_left`` days from NOW (negative: already expired)."""
    issued = NOW - timedelta(days=issued_days_ago)
    pair = issue_leaf(CA, name=name, addresses=["192.0.2.1"], now=issued,
                      lifetime=timedelta(days=issued_days_ago + days_left))
    return pair.cert_pem


# -- object builders ------------------------------------------------------------------------------

def node(name: str, ip: str | None = "198.51.100.9", labels: dict[str, str] | None = None,
         annotations: dict[str, str] | None = None, pod_cidr: str | None = None,
         uid: str = "", created: str = "2030-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid or f"uid-{name}", "labels": labels or {},
                         "annotations": annotations or {}, "creationTimestamp": created},
            "spec": {"podCIDR": pod_cidr} if pod_cidr else {},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}] if ip else []}}


def edge(name: str, ip: str, *communities: str, annotations: dict[str, str] | None = None,
         **kw: Any) -> dict[str, Any]:
    labels = {SETTINGS.edge_label: "", **{SETTINGS.community_label_prefix + x: "" for x in communities}}
    return node(name, ip, labels, {**FLANNEL, **(annotations or {})}, **kw)


def connector(name: str = "conn", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return node(name, "198.51.100.1", {SETTINGS.connector_label: ""}, FLANNEL if annotations is None else annotations)


CLOUD = node("cloud", "198.51.100.2")


def configmap(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS}, "data": data}


def mesh_cm(name: str, *peers: str, connector_name: str = "conn") -> dict[str, Any]:
    peer_models = [Peer(name=p, role=Role.CONNECTOR if p == connector_name else Role.EDGE,
                        subnets=("10.233.9.0/24",)) for p in peers]
    mesh = NodeMesh(node=LocalNode(name=name, role=Role.EDGE, address="192.0.2.1", endpoint="192.0.2.1"),
                    local_subnets=("10.233.0.0/24",), mesh_cidrs=("10.233.0.0/16",), peers=tuple(peer_models),
                    caCert="CA")
    return configmap(f"fabmesh-agent-{name}", {"mesh.yaml": mesh.to_yaml()})


def shard_cm(shard: int, *peers: str) -> dict[str, Any]:
    text = dump_yaml(PeerShard(shard=shard, peers=tuple(Peer(name=p, role=Role.EDGE, subnets=("10.233.0.0/24",))
                                                        for p in peers)))
    return configmap(f"fabmesh-connector-peers-{shard:02d}", {"peers.yaml": text})


def secret(name: str, cert_pem: str | None) -> dict[str, Any]:
    data = {"tls.crt": base64.b64encode(cert_pem.encode()).decode()} if cert_pem else {}
    return {"metadata": {"name": name, "namespace": NS}, "data": data}


def pod(node_name: str, phase: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"fabmesh-agent-{node_name}", "namespace": NS,
                            "labels": {"fabmesh.io/node": node_name, "fabmesh.io/kind": "agent"}}
    if deleting:
        meta["deletionTimestamp"] = "2030-06-01T11:59:00Z"
    return {"metadata": meta, "spec": {"nodeName": node_name}, "status": {"phase": phase}}


def lease(holder: str | None, renewed_s_ago: float | None, duration_s: int = 15) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseDurationSeconds": duration_s}
    if holder:
        spec["holderIdentity"] = holder
    if renewed_s_ago is not None:
        spec["renewTime"] = (NOW - timedelta(seconds=renewed_s_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"metadata": {"name": "fabmesh-operator", "namespace": NS}, "spec": spec}


def event(node_name: str, message: str, uid: str | None = None, last: str = "2030-06-01T11:00:00Z",
          reason: str = "FabmeshInvalidNode", type_: str = "Warning") -> dict[str, Any]:
    involved = {"kind": "Node", "name": node_name, **({"uid": uid} if uid else {})}
    return {"metadata": {"name": f"{node_name}.fabmesh.x", "namespace": "default"}, "involvedObject": involved,
            "reason": reason, "type": type_, "message": message, "lastTimestamp": last}


def summary(found: list[Check]) -> list[tuple[str, str]]:
    return [(x.status.value, x.message) for x in found]


def assert_matches(found: list[Check], expected: list[tuple[Status, str]]) -> None:
    """Each found check has the expected status and contains the expected text, in order."""
    assert len(found) == len(expected), summary(found)
    for got, (status, text) in zip(found, expected, strict=True):
        assert got.status is status and text in got.message, summary(found)
        assert got.status is Status.PASS or got.hint, f"{got} has no fix hint"


# -- pod CIDR overlaps ----------------------------------------------------------------------------

OVERLAP_CASES = {
    "disjoint-edges-pass": (
        [edge("e1", "192.0.2.1", pod_cidr="10.233.0.0/24"), edge("e2", "192.0.2.2", pod_cidr="10.233.1.0/24")],
        [(Status.PASS, "no overlap among 2 pod CIDR(s)")]),
    "same-spec-cidr-fails-naming-both": (
        [edge("e1", "192.0.2.1", pod_cidr="10.233.0.0/24"), edge("e2", "192.0.2.2", pod_cidr="10.233.0.0/24")],
        [(Status.FAIL, "e1 10.233.0.0/24 overlaps e2 10.233.0.0/24")]),
    "annotation-overlaps-other-nodes-spec": (
        [edge("e1", "192.0.2.1", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"}),
         edge("e2", "192.0.2.2", pod_cidr="10.233.0.128/25")],
        [(Status.FAIL, "e1 10.233.0.0/24 overlaps e2 10.233.0.128/25")]),
    "edge-inside-a-cloud-nodes-range": (
        [node("cloud", pod_cidr="10.233.0.0/16"), edge("e1", "192.0.2.1", pod_cidr="10.233.7.0/24")],
        [(Status.FAIL, "cloud 10.233.0.0/16 overlaps e1 10.233.7.0/24")]),
    "spec-and-annotation-of-one-node-are-not-an-overlap": (
        [edge("e1", "192.0.2.1", pod_cidr="10.233.0.0/24", annotations={"fabmesh.io/pod-cidr": "10.233.0.0/24"})],
        [(Status.PASS, "no overlap")]),
    "three-on-one-cidr-give-three-pairs": (
        [edge(f"e{i}", f"192.0.2.{i}", pod_cidr="10.233.0.0/24") for i in (1, 2, 3)],
        [(Status.FAIL, "e1 10.233.0.0/24 overlaps e2"), (Status.FAIL, "e1 10.233.0.0/24 overlaps e3"),
         (Status.FAIL, "e2 10.233.0.0/24 overlaps e3")]),
    "ipv4-and-ipv6-never-overlap": (
        [edge("e1", "192.0.2.1", pod_cidr="10.0.0.0/8"), edge("e2", "192.0.2.2", pod_cidr="fd00::/8")],
        [(Status.PASS, "no overlap")]),
    "malformed-cidr-is-left-to-the-operator": (
        [edge("e1", "192.0.2.1", pod_cidr="not-a-cidr"), edge("e2", "192.0.2.2", pod_cidr="10.233.0.0/24")],
        [(Status.PASS, "no overlap among 1 pod CIDR(s) on 2 node(s)")]),
    "adjacent-ranges-do-not-overlap": (
        [edge("e1", "192.0.2.1", pod_cidr="10.233.0.0/24"), edge("e2", "192.0.2.2", pod_cidr="10.233.1.0/24"),
         node("cloud", pod_cidr="10.232.0.0/16")],
        [(Status.PASS, "no overlap among 3")]),
}


@pytest.mark.parametrize(("nodes", "expected"), OVERLAP_CASES.values(), ids=OVERLAP_CASES.keys())
def test_pod_cidr_overlap(nodes: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_pod_cidr_overlap(nodes), expected)


NEWER_CASES = {
    "later-creation-is-re-created": ("2030-01-02T00:00:00Z", "2030-01-01T00:00:00Z", "re-create e1 "),
    "same-second-goes-by-name": ("2030-01-01T00:00:00Z", "2030-01-01T00:00:00Z", "re-create e2 "),
}


@pytest.mark.parametrize(("e1_created", "e2_created", "hint"), NEWER_CASES.values(), ids=NEWER_CASES.keys())
def test_pod_cidr_overlap_hint_names_the_newer_node(e1_created: str, e2_created: str, hint: str) -> None:
    nodes = [edge("e1", "192.0.2.1", pod_cidr="10.233.0.0/24", created=e1_created),
             edge("e2", "192.0.2.2", pod_cidr="10.233.0.0/24", created=e2_created)]
    assert hint in c.check_pod_cidr_overlap(nodes)[0].hint


# -- certificates ---------------------------------------------------------------------------------

CA_SECRET = secret("fabmesh-ca", CA.cert_pem)
CERT_CASES = {
    "all-valid-pass": (
        [edge("e1", "192.0.2.1"), connector(), CLOUD],
        [secret("fabmesh-tls-e1", leaf("e1", 300)), secret("fabmesh-connector-tls-conn", leaf("conn", 300)), CA_SECRET],
        [(Status.PASS, "3 certificate(s) valid")]),
    "edge-expiring-in-10-days-warns": (
        [edge("e1", "192.0.2.1")],
        [secret("fabmesh-tls-e1", leaf("e1", 10)), CA_SECRET],
        [(Status.WARN, "e1: certificate in fabmesh-tls-e1 expires in 10 day(s)")]),
    "edge-expired-fails": (
        [edge("e1", "192.0.2.1")],
        [secret("fabmesh-tls-e1", leaf("e1", -2, issued_days_ago=50)), CA_SECRET],
        [(Status.FAIL, "e1: certificate in fabmesh-tls-e1 expired at")]),
    "connector-secret-missing-fails": (
        [connector()],
        [CA_SECRET],
        [(Status.FAIL, "conn: no Secret fabmesh-connector-tls-conn")]),
    "garbage-certificate-fails": (
        [edge("e1", "192.0.2.1")],
        [secret("fabmesh-tls-e1", "not a certificate"), CA_SECRET],
        [(Status.FAIL, "e1: Secret fabmesh-tls-e1 holds no readable certificate")]),
    "secret-without-tls-crt-fails": (
        [edge("e1", "192.0.2.1")],
        [secret("fabmesh-tls-e1", None), CA_SECRET],
        [(Status.FAIL, "holds no readable certificate (no tls.crt)")]),
    "ca-close-to-its-end-warns": (
        [],
        [secret("fabmesh-ca", SHORT_CA.cert_pem)],
        [(Status.WARN, "CA: certificate in fabmesh-ca expires in 20 day(s)")]),
    "every-connector-has-its-own-certificate-cloud-none": (
        [connector("conn-a"), connector("conn-b"), CLOUD],
        [secret("fabmesh-connector-tls-conn-a", leaf("conn-a", 300)),
         secret("fabmesh-connector-tls-conn-b", leaf("conn-b", 300)), CA_SECRET],
        [(Status.PASS, "3 certificate(s) valid")]),
    "standby-connector-secret-missing-fails": (
        [connector("conn-a"), connector("conn-b")],
        [secret("fabmesh-connector-tls-conn-a", leaf("conn-a", 300)), CA_SECRET],
        [(Status.FAIL, "conn-b: no Secret fabmesh-connector-tls-conn-b")]),
}


@pytest.mark.parametrize(("nodes", "secrets", "expected"), CERT_CASES.values(), ids=CERT_CASES.keys())
def test_certificates(nodes: list[dict[str, Any]], secrets: list[dict[str, Any]],
                      expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_certificates(nodes, secrets, NOW, SETTINGS), expected)


def _status(expires: str) -> dict[str, str]:
    return {"fabmesh.io/status": f"cidr=10.233.0.0/24 communities=a cert-expires={expires}"}


UNREADABLE_SECRET_CASES = {
    "annotation-far-future-only-notes-the-fallback": (
        [edge("e1", "192.0.2.1", annotations=_status("2031-06-01T00:00:00+00:00"))],
        [(Status.WARN, "cannot read Secrets")]),
    "annotation-expiring-warns": (
        [edge("e1", "192.0.2.1", annotations=_status("2030-06-05T00:00:00+00:00"))],
        [(Status.WARN, "e1: certificate expires in 3 day(s)"), (Status.WARN, "cannot read Secrets")]),
    "annotation-without-expiry-fails": (
        [edge("e1", "192.0.2.1", annotations=_status("none"))],
        [(Status.FAIL, "e1: no cert-expires"), (Status.WARN, "cannot read Secrets")]),
}


@pytest.mark.parametrize(("nodes", "expected"), UNREADABLE_SECRET_CASES.values(), ids=UNREADABLE_SECRET_CASES.keys())
def test_certificates_from_status_annotation_when_secrets_are_forbidden(
        nodes: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_certificates(nodes, None, NOW, SETTINGS), expected)


# -- per-edge objects -----------------------------------------------------------------------------

CONFIGMAP_CASES = {
    "every-edge-has-a-readable-configmap": (
        [edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2"), CLOUD, connector()],
        [mesh_cm("e1", "conn"), mesh_cm("e2", "conn")],
        [(Status.PASS, "all 2 edge node(s)")]),
    "missing-configmap-fails": (
        [edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")],
        [mesh_cm("e1", "conn")],
        [(Status.FAIL, "e2: no ConfigMap fabmesh-agent-e2")]),
    "unparseable-mesh-yaml-fails": (
        [edge("e1", "192.0.2.1")],
        [configmap("fabmesh-agent-e1", {"mesh.yaml": "kind: NodeMesh\nbogus: 1\n"})],
        [(Status.FAIL, "e1: fabmesh-agent-e1:")]),
    "configmap-without-mesh-yaml-fails": (
        [edge("e1", "192.0.2.1")],
        [configmap("fabmesh-agent-e1", {})],
        [(Status.FAIL, "no mesh.yaml key")]),
}


@pytest.mark.parametrize(("nodes", "cms", "expected"), CONFIGMAP_CASES.values(), ids=CONFIGMAP_CASES.keys())
def test_edge_configmaps(nodes: list[dict[str, Any]], cms: list[dict[str, Any]],
                         expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_edge_configmaps(nodes, cms, SETTINGS), expected)


AGENT_POD_CASES = {
    "every-edge-has-an-agent-pod": (
        [edge("e1", "192.0.2.1"), CLOUD], [pod("e1", "Pending")], [(Status.PASS, "all 1 edge node(s)")]),
    "edge-without-agent-pod-fails": (
        [edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")], [pod("e1", "Running")],
        [(Status.FAIL, "e2: no agent Pod fabmesh-agent-e2")]),
    "cloud-and-connector-need-none": ([CLOUD, connector()], [], [(Status.PASS, "all 0 edge node(s)")]),
}


@pytest.mark.parametrize(("nodes", "pods", "expected"), AGENT_POD_CASES.values(), ids=AGENT_POD_CASES.keys())
def test_agent_pods_present(nodes: list[dict[str, Any]], pods: list[dict[str, Any]],
                            expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_agent_pods(nodes, pods, SETTINGS), expected)


RUNNING_CASES = {
    "running-pass": ([pod("e1", "Running"), pod("e2", "Running")], [(Status.PASS, "all 2 agent Pod(s) Running")]),
    "pending-warns-not-fails": ([pod("e1", "Pending"), pod("e2", "Running")],
                                [(Status.WARN, "e1: agent Pod fabmesh-agent-e1 is Pending")]),
    "terminating-warns": ([pod("e1", "Running", deleting=True)], [(Status.WARN, "is Terminating")]),
    "failed-warns": ([pod("e1", "Failed")], [(Status.WARN, "is Failed")]),
    "no-pods-pass": ([], [(Status.PASS, "all 0 agent Pod(s)")]),
}


@pytest.mark.parametrize(("pods", "expected"), RUNNING_CASES.values(), ids=RUNNING_CASES.keys())
def test_agents_running(pods: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_agents_running(pods), expected)


# -- flannel, connector, leader, clock, events ----------------------------------------------------

FLANNEL_CASES = {
    "edges-match-connector": (
        [connector(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2"), CLOUD],
        [(Status.PASS, "all 2 edge node(s) carry conn's flannel annotations")]),
    "edge-missing-annotations-fails": (
        [connector(), node("e1", "192.0.2.1", {SETTINGS.edge_label: ""})],
        [(Status.FAIL, "e1: missing flannel annotations backend-type, backend-data, public-ip, kube-subnet-manager")]),
    "edge-without-lease-marker-fails": (  # real flanneld skips such a Node: no cloud node routes its pod CIDR
        [connector(), edge("e1", "192.0.2.1", annotations={"flannel.alpha.coreos.com/kube-subnet-manager": "false"})],
        [(Status.FAIL, "e1: stale flannel annotations kube-subnet-manager (differ from conn)")]),
    "edge-with-stale-public-ip-fails": (
        [connector(), edge("e1", "192.0.2.1", annotations={"flannel.alpha.coreos.com/public-ip": "203.0.113.7"})],
        [(Status.FAIL, "e1: stale flannel annotations public-ip (differ from conn)")]),
    "connector-without-flannel-fails": (
        [connector(annotations={}), edge("e1", "192.0.2.1")],
        [(Status.FAIL, "connector conn has no flannel.alpha.coreos.com/backend-type")]),
    "no-connector-warns": ([edge("e1", "192.0.2.1")], [(Status.WARN, "no connector node")]),
}


@pytest.mark.parametrize(("nodes", "expected"), FLANNEL_CASES.values(), ids=FLANNEL_CASES.keys())
def test_flannel_annotations(nodes: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_flannel(nodes, SETTINGS), expected)


def held(obj: dict[str, Any], deleting: timedelta | None = None) -> dict[str, Any]:
    """``obj`` with the operator's flannel finalizer, and deleting for ``deleting`` before NOW."""
    meta = {**obj["metadata"], "finalizers": ["fabmesh.io/flannel-release"]}
    if deleting is not None:
        meta["deletionTimestamp"] = (NOW - deleting).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**obj, "metadata": meta}


RELEASE_CASES = {
    "held-edges-pass": ([connector(), held(edge("e1", "192.0.2.1"))],
                        [(Status.PASS, "no Node waits for the operator to release its flannel annotations")]),
    "deletion-in-progress-passes": ([held(edge("e1", "192.0.2.1"), timedelta(seconds=5))],
                                    [(Status.PASS, "no Node waits")]),
    "deletion-held-for-minutes-fails": ([held(edge("e1", "192.0.2.1"), timedelta(minutes=5))],
                                        [(Status.FAIL, "e1: deletion waits for finalizer fabmesh.io/flannel-release "
                                                       "since 2030-06-01T11:55:00Z")]),
    "unlabelled-node-still-held-warns": ([held(node("x1", annotations={"fabmesh.io/flannel-copy": "{}"}))],
                                         [(Status.WARN, "x1: not an edge but still holds finalizer "
                                                        "fabmesh.io/flannel-release and fabmesh.io/flannel-copy")]),
}


@pytest.mark.parametrize(("nodes", "expected"), RELEASE_CASES.values(), ids=RELEASE_CASES.keys())
def test_flannel_release(nodes: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_flannel_release(nodes, NOW, SETTINGS), expected)


def test_a_deleting_edge_without_flannel_keys_is_not_reported_missing_them() -> None:
    stripped = held(node("e1", "192.0.2.1", {SETTINGS.edge_label: ""}), timedelta(seconds=5))
    assert [x.status for x in c.check_flannel([connector(), stripped], SETTINGS)] == [Status.PASS]


CONNECTOR_CASES = {
    "none-fails": ([CLOUD, edge("e1", "192.0.2.1")], [(Status.FAIL, "no connector node")]),
    "one-pass": ([CLOUD, connector()], [(Status.PASS, "conn is the active connector")]),
    "first-by-name-is-active": ([connector("conn-b"), connector("conn-a")],
                                [(Status.PASS, "conn-a is the active connector (standby: conn-b)")]),
    "node-with-both-labels-is-invalid-not-a-connector": (
        [node("both", labels={SETTINGS.edge_label: "", SETTINGS.connector_label: ""})],
        [(Status.FAIL, "no connector node")]),
}


@pytest.mark.parametrize(("nodes", "expected"), CONNECTOR_CASES.values(), ids=CONNECTOR_CASES.keys())
def test_connector(nodes: list[dict[str, Any]], expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_connector(nodes, SETTINGS), expected)


LEADER_CASES = {
    "fresh-lease-pass": (lease("op-1", 3), [(Status.PASS, "leader op-1, renewed 3s ago")]),
    "renewed-at-exactly-twice-the-duration-pass": (lease("op-1", 30, 15), [(Status.PASS, "renewed 30s ago")]),
    "stale-lease-fails": (lease("op-1", 31, 15),
                          [(Status.FAIL, "leader op-1 last renewed 31s ago (lease duration 15s)")]),
    "missing-lease-fails": (None, [(Status.FAIL, f"no Lease {NS}/fabmesh-operator")]),
    "lease-without-holder-fails": (lease(None, 1), [(Status.FAIL, "has no holder")]),
    "lease-never-renewed-fails": (lease("op-1", None), [(Status.FAIL, "has no holder")]),
}


@pytest.mark.parametrize(("obj", "expected"), LEADER_CASES.values(), ids=LEADER_CASES.keys())
def test_operator_leader(obj: dict[str, Any] | None, expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_operator_leader(obj, NOW, NS, "fabmesh-operator"), expected)


CLOCK_CASES = {
    "in-sync-pass": (NOW - timedelta(seconds=5), [(Status.PASS, "clock within 30s")]),
    "server-behind-warns": (NOW - timedelta(seconds=31), [(Status.WARN, "differ by 31s")]),
    "server-ahead-warns": (NOW + timedelta(minutes=2), [(Status.WARN, "differ by 120s")]),
    "no-date-header-warns": (None, [(Status.WARN, "no Date header")]),
}


@pytest.mark.parametrize(("server", "expected"), CLOCK_CASES.values(), ids=CLOCK_CASES.keys())
def test_clock_skew(server: datetime | None, expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_clock_skew(server, NOW), expected)


E1 = edge("e1", "192.0.2.1", uid="u1", created="2030-05-01T00:00:00Z")
EVENT_CASES = {
    "no-events-pass": ([], [(Status.PASS, "no FabmeshInvalidNode events")]),
    "event-on-current-node-listed": (
        [event("e1", "spec.podCIDR: overlaps e0", uid="u1")],
        [(Status.WARN, "e1: spec.podCIDR: overlaps e0 (last 2030-06-01T11:00:00Z)")]),
    "event-about-a-deleted-node-ignored": ([event("gone", "x")], [(Status.PASS, "no FabmeshInvalidNode")]),
    "event-about-an-older-node-of-the-same-name-ignored": (
        [event("e1", "x", uid="old-uid"), event("e1", "y", last="2030-04-01T00:00:00Z")],
        [(Status.PASS, "no FabmeshInvalidNode")]),
    "other-reasons-and-normal-events-ignored": (
        [event("e1", "x", reason="NodeReady"), event("e1", "y", type_="Normal")],
        [(Status.PASS, "no FabmeshInvalidNode")]),
    "repeats-collapse-to-the-latest": (
        [event("e1", "m", last="2030-06-01T10:00:00Z"), event("e1", "m", last="2030-06-01T11:30:00Z")],
        [(Status.WARN, "e1: m (last 2030-06-01T11:30:00Z)")]),
    "events-not-readable-warns": (None, [(Status.WARN, "cannot list Events")]),
}


@pytest.mark.parametrize(("events", "expected"), EVENT_CASES.values(), ids=EVENT_CASES.keys())
def test_invalid_node_events(events: list[dict[str, Any]] | None, expected: list[tuple[Status, str]]) -> None:
    assert_matches(c.check_invalid_node_events(events, [E1, CLOUD]), expected)


# -- live state: TunnelStatus ----------------------------------------------------------------------

def tunnel_status(name: str, *tunnels: tuple[str, str], cms: list[dict[str, Any]] | None = None,
                  written: datetime = NOW, server: datetime = NOW, error: str = "", nat: bool = False,
                  keepalive: int | None = 20, generation: str | None = None) -> dict[str, Any]:
    """A TunnelStatus object as the API returns it: (peer, state) tunnels, the server's write time."""
    cm = next((x for x in cms or [] if x["metadata"]["name"] == f"fabmesh-agent-{name}"), None)
    applied = generation or (tunnelstatus.config_generation({"mesh.yaml": cm["data"]["mesh.yaml"]}) if cm else "x")
    report = NodeReport(role="edge", config_generation=applied, last_error=error, tunnels_expected=len(tunnels),
                        tunnels_up=sum(1 for _, s in tunnels if s == "up"), nat_keepalive_s=keepalive,
                        written_at=format_time(written),
                        tunnels=tuple(Tunnel(peer=p, state=TunnelState(s), nat_local=nat) for p, s in tunnels))
    return {"metadata": {"name": name, "managedFields": [
        {"manager": "fabmesh", "subresource": "status", "time": format_time(server)}]},
            "status": report.to_api()}


HEALTHY_CMS = [mesh_cm("e1", "conn", "e2"), mesh_cm("e2", "conn", "e1"), shard_cm(0, "e1", "e2")]
HEALTHY_STATUSES = [tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS),
                    tunnel_status("e2", ("conn", "up"), ("e1", "up"), cms=HEALTHY_CMS),
                    tunnel_status("conn", ("e1", "up"), ("e2", "up"))]


def observed(*objs: dict[str, Any]) -> dict[str, cluster.Observed]:
    return cluster.observed_by_node(list(objs))


LIVE_CASES = {
    "all-up": (HEALTHY_STATUSES, set()),
    "cut-edge-tunnel-fails": ([tunnel_status("e1", ("conn", "unresponsive"), ("e2", "up"), cms=HEALTHY_CMS),
                               *HEALTHY_STATUSES[1:]], {(CheckName.TUNNELS_UP, Status.FAIL)}),
    "last-error-fails": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS, error="routes: EPERM"),
                          *HEALTHY_STATUSES[1:]], {(CheckName.TUNNELS_UP, Status.FAIL)}),
    "no-status-from-an-edge-warns": ([HEALTHY_STATUSES[0], HEALTHY_STATUSES[2]],
                                     {(CheckName.TUNNEL_STATUS, Status.WARN)}),
    "stale-status-warns": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS,
                                          written=NOW - timedelta(hours=1), server=NOW - timedelta(hours=1)),
                            *HEALTHY_STATUSES[1:]], {(CheckName.TUNNEL_STATUS, Status.WARN)}),
    "lagging-generation-fails": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), generation="0ld"),
                                  *HEALTHY_STATUSES[1:]], {(CheckName.GENERATION, Status.FAIL)}),
    "clock-40s-ahead-warns": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS,
                                             written=NOW + timedelta(seconds=40)), *HEALTHY_STATUSES[1:]],
                              {(CheckName.NODE_CLOCK, Status.WARN)}),
    "clock-an-hour-behind-fails": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS,
                                                  written=NOW - timedelta(hours=1)), *HEALTHY_STATUSES[1:]],
                                   {(CheckName.NODE_CLOCK, Status.FAIL)}),
    "nat-without-keepalive-fails": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS, nat=True,
                                                   keepalive=0), *HEALTHY_STATUSES[1:]],
                                    {(CheckName.NAT_KEEPALIVE, Status.FAIL)}),
    "nat-with-keepalive-passes": ([tunnel_status("e1", ("conn", "up"), ("e2", "up"), cms=HEALTHY_CMS, nat=True),
                                   *HEALTHY_STATUSES[1:]], set()),
    "community-pair-without-tunnel-is-relayed": ([tunnel_status("e1", ("conn", "up")),
                                                  tunnel_status("e2", ("conn", "up")), HEALTHY_STATUSES[2]],
                                                 {(CheckName.RELAYED, Status.WARN),
                                                  (CheckName.GENERATION, Status.FAIL)}),
    # hole punching failed (or the path between them died): both list the tunnel, it is not up
    "community-pair-whose-direct-tunnel-is-down-is-relayed": (
        [tunnel_status("e1", ("conn", "up"), ("e2", "connecting"), cms=HEALTHY_CMS),
         tunnel_status("e2", ("conn", "up"), ("e1", "down"), cms=HEALTHY_CMS), HEALTHY_STATUSES[2]],
        {(CheckName.RELAYED, Status.WARN), (CheckName.TUNNELS_UP, Status.FAIL)}),
}


@pytest.mark.parametrize(("statuses", "not_pass"), LIVE_CASES.values(), ids=LIVE_CASES.keys())
def test_doctor_learns_from_live_state(statuses: list[dict[str, Any]],
                                       not_pass: set[tuple[CheckName, Status]]) -> None:
    found = c.run_checks(healthy_state(statuses=statuses))
    assert {(x.name, x.status) for x in found if x.status is not Status.PASS} == not_pass


def test_a_relayed_community_pair_names_the_state_of_its_direct_tunnel() -> None:
    nodes = healthy_state().nodes
    found = c.check_relayed_pairs(nodes, observed(tunnel_status("e1", ("conn", "up"), ("e2", "unresponsive")),
                                                  tunnel_status("e2", ("conn", "up"), ("e1", "up"))), SETTINGS)
    assert [(x.status, x.message) for x in found] == [(Status.WARN, (
        "e1 and e2 share community a but their direct tunnel is unresponsive: their traffic is relayed through "
        "the connector once the agents drop it"))]


def test_an_unlistable_status_warns_once_and_skips_the_live_checks() -> None:
    found = c.run_checks(healthy_state(statuses=None))
    assert [(x.name, x.status) for x in found if x.status is not Status.PASS] == [
        (CheckName.TUNNEL_STATUS, Status.WARN)]
    assert CheckName.TUNNELS_UP not in {x.name for x in found}


def test_a_cut_tunnel_names_node_peer_and_state() -> None:
    found = c.check_tunnels_up(observed(tunnel_status("e1", ("conn", "unresponsive"), ("e2", "up"))))
    assert [x.message.split(" since")[0] for x in found] == ["e1: tunnel to conn is unresponsive"]


def test_status_rows_show_live_state_and_generation() -> None:
    nodes = healthy_state().nodes
    statuses = [tunnel_status("e1", ("conn", "up"), ("e2", "down"), cms=HEALTHY_CMS, error="boom",
                              server=NOW - timedelta(seconds=42)),
                tunnel_status("e2", ("conn", "up"), ("e1", "up"), generation="0ld")]
    rows = {r.name: r for r in st.status_rows(nodes, HEALTHY_CMS, None, [], SETTINGS,
                                              observed=cluster.observed_by_node(statuses), server_now=NOW)}
    e1, e2 = rows["e1"], rows["e2"]
    assert (e1.tunnels_up, e1.tunnels_expected, e1.last_error, e1.status_age_s) == (1, 2, "boom", 42)
    assert e1.generation_applied == e1.generation_wanted
    assert e2.generation_applied == "0ld" != e2.generation_wanted
    assert rows["conn"].generation_applied is None  # it has published no status


def test_graph_json_has_the_edges_the_dot_draws() -> None:
    nodes = healthy_state().nodes
    e3 = edge("e3", "192.0.2.3", "b")
    cms = [mesh_cm("e1", "conn"), mesh_cm("e2", "conn"), mesh_cm("e3", "conn")]
    got = mesh_json([*nodes, e3], cms, SETTINGS, observed(tunnel_status("e1", ("conn", "unresponsive"))))
    assert got["nodes"][:2] == [{"name": "cloud", "role": "cloud", "communities": []},
                                {"name": "conn", "role": "connector", "communities": []}]
    assert got["edges"] == [
        {"a": "conn", "b": "e1", "kind": "tunnel", "state": "unresponsive", "via": None, "insteadOfDirect": False},
        {"a": "conn", "b": "e2", "kind": "tunnel", "state": None, "via": None, "insteadOfDirect": False},
        {"a": "conn", "b": "e3", "kind": "tunnel", "state": None, "via": None, "insteadOfDirect": False},
        {"a": "e1", "b": "e2", "kind": "relayed", "state": None, "via": "conn", "insteadOfDirect": True},
        {"a": "e1", "b": "e3", "kind": "relayed", "state": None, "via": "conn", "insteadOfDirect": False},
        {"a": "e2", "b": "e3", "kind": "relayed", "state": None, "via": "conn", "insteadOfDirect": False}]
    dot = mesh_dot([*nodes, e3], cms, SETTINGS)
    assert dot.count(" -- ") == len(got["edges"])


def test_graph_colours_tunnels_by_what_the_nodes_report() -> None:
    nodes = healthy_state().nodes
    text = mesh_dot(nodes, HEALTHY_CMS, SETTINGS, observed(
        tunnel_status("e1", ("conn", "up"), ("e2", "unresponsive")), tunnel_status("e2", ("conn", "up"), ("e1", "up"))))
    assert '"e1" -- "e2" [color=red, penwidth=2, fontcolor=red, label="unresponsive"];' in text
    assert '"conn" -- "e1" [color=green3, penwidth=2];' in text


def test_graph_draws_a_community_pair_without_a_tunnel_as_relayed_instead_of_direct() -> None:
    nodes = healthy_state().nodes
    text = mesh_dot(nodes, [mesh_cm("e1", "conn"), mesh_cm("e2", "conn")], SETTINGS)
    assert '"e1" -- "e2" [style=dashed, color=orange' in text


# -- all checks together --------------------------------------------------------------------------

def healthy_state(**changes: Any) -> ClusterState:
    nodes = [connector(), CLOUD, edge("e1", "192.0.2.1", "a", pod_cidr="10.233.0.0/24"),
             edge("e2", "192.0.2.2", "a", pod_cidr="10.233.1.0/24")]
    base: dict[str, Any] = dict(
        statuses=HEALTHY_STATUSES,
        nodes=nodes, configmaps=[mesh_cm("e1", "conn", "e2"), mesh_cm("e2", "conn", "e1"), shard_cm(0, "e1", "e2")],
        secrets=[secret("fabmesh-tls-e1", leaf("e1", 300)), secret("fabmesh-tls-e2", leaf("e2", 300)),
                 secret("fabmesh-connector-tls-conn", leaf("conn", 300)), CA_SECRET],
        pods=[pod("e1", "Running"), pod("e2", "Running")], lease=lease("op-1", 1), events=[],
        now=NOW, server_date=NOW, namespace=NS, settings=SETTINGS)
    return ClusterState(**{**base, **changes})


RUN_CASES = {
    "healthy-cluster-exits-0": (healthy_state(), True, 0, set()),
    "pending-agents-only-warn": (healthy_state(pods=[pod("e1", "Pending"), pod("e2", "Pending")]), True, 0,
                                 {(CheckName.AGENTS_RUNNING, Status.WARN)}),
    "missing-agent-pods-fail": (healthy_state(pods=[]), True, 1, {(CheckName.AGENT_PODS, Status.FAIL)}),
    "missing-agent-pods-ignored-with-no-agent-pods": (healthy_state(pods=[]), False, 0, set()),
    "no-leader-fails": (healthy_state(lease=None), True, 1, {(CheckName.LEADER, Status.FAIL)}),
}


@pytest.mark.parametrize(("state", "agent_pods", "code", "not_pass"), RUN_CASES.values(), ids=RUN_CASES.keys())
def test_run_checks(state: ClusterState, agent_pods: bool, code: int,
                    not_pass: set[tuple[CheckName, Status]]) -> None:
    found = c.run_checks(state, agent_pods=agent_pods)
    assert {(x.name, x.status) for x in found if x.status is not Status.PASS} == not_pass
    assert c.exit_code(found) == code
    assert (CheckName.AGENT_PODS in {x.name for x in found}) is agent_pods


# -- status ---------------------------------------------------------------------------------------

def test_status_rows_cover_every_role_and_column() -> None:
    state = healthy_state(pods=[pod("e1", "Pending")])
    rows = {r.name: r for r in st.status_rows(state.nodes, state.configmaps, state.secrets, state.pods, SETTINGS,
                                             {"e1": 1})}
    assert list(rows) == ["cloud", "conn", "e1", "e2"]
    assert rows["e1"] == st.StatusRow(name="e1", role=Role.EDGE, pod_cidr="10.233.0.0/24", communities=("a",),
                                     cert_expires=rows["e1"].cert_expires, agent="Pending", peers=2, tunnels_up=1,
                                     generation_wanted=tunnelstatus.config_generation(
                                         {"mesh.yaml": state.configmaps[0]["data"]["mesh.yaml"]}))
    assert rows["e1"].cert_expires is not None and rows["e1"].cert_expires.startswith("2031-03-2")
    assert (rows["e2"].agent, rows["e2"].tunnels_up) == (None, None)
    assert (rows["conn"].role, rows["conn"].peers, rows["conn"].agent) == (Role.CONNECTOR, 2, None)
    assert rows["conn"].cert_expires is not None
    assert rows["cloud"] == st.StatusRow(name="cloud", role=Role.CLOUD, pod_cidr=None, communities=(),
                                        cert_expires=None, agent=None, peers=None, tunnels_up=None)


STATUS_FALLBACK_CASES = {
    "secrets-forbidden-uses-annotation": (None, "2031-01-02T03:04:05Z"),
    "secret-missing-shows-nothing": ([], None),
    "secret-unreadable-says-so": ([secret("fabmesh-tls-e1", "junk")], "unreadable"),
}


@pytest.mark.parametrize(("secrets", "expected"), STATUS_FALLBACK_CASES.values(), ids=STATUS_FALLBACK_CASES.keys())
def test_status_cert_expiry_sources(secrets: list[dict[str, Any]] | None, expected: str | None) -> None:
    nodes = [edge("e1", "192.0.2.1", annotations=_status("2031-01-02T03:04:05+00:00"))]
    assert st.status_rows(nodes, [], secrets, [], SETTINGS)[0].cert_expires == expected


METRICS_CASES = {
    "two-of-three-up": ('# TYPE fabmesh_tunnel_up gauge\nfabmesh_tunnel_up{peer="conn"} 1.0\n'
                        'fabmesh_tunnel_up{peer="e2"} 1.0\nfabmesh_tunnel_up{peer="e3"} 0.0\n', 2),
    "other-metrics-ignored": ('fabmesh_reconcile_total{result="ok"} 1.0\nfabmesh_tunnel_bytes{peer="conn",'
                              'direction="in"} 1.0\n', 0),
    "empty": ("", 0),
}


@pytest.mark.parametrize(("text", "up"), METRICS_CASES.values(), ids=METRICS_CASES.keys())
def test_count_tunnels_up(text: str, up: int) -> None:
    assert st.count_tunnels_up(text) == up


def test_metrics_text_that_is_not_prometheus_raises_value_error() -> None:
    with pytest.raises(ValueError):
        st.count_tunnels_up("<html>not metrics</html>\n")


def test_metrics_targets_are_edges_and_the_active_connector_on_their_internal_ip() -> None:
    nodes = [connector("conn-a"), connector("conn-b"), CLOUD, edge("e1", "192.0.2.1"), edge("e6", "fd00::6"),
             node("e-noip", None, {SETTINGS.edge_label: ""})]
    assert st.metrics_targets(nodes, SETTINGS, 10120) == {
        "conn-a": "http://198.51.100.1:10120/metrics", "e1": "http://192.0.2.1:10120/metrics",
        "e6": "http://[fd00::6]:10120/metrics"}


# -- graph ----------------------------------------------------------------------------------------

GRAPH_NODES = [connector(), CLOUD, edge("e1", "192.0.2.1", "north"), edge("e2", "192.0.2.2", "north", "south"),
               edge("e3", "192.0.2.3", "south"), edge("e4", "192.0.2.4")]
GRAPH_CMS = [mesh_cm("e1", "conn", "e2"), mesh_cm("e2", "conn", "e1", "e3"), mesh_cm("e3", "conn", "e2"),
             mesh_cm("e4", "conn")]
RELAYED = '[style=dashed, color=gray50, label="relayed via conn"];'

GRAPH_CASES = {
    "community-cluster-holds-its-single-community-members": (
        GRAPH_NODES, GRAPH_CMS,
        ['  subgraph "cluster_north" {\n    label="community north"; style=dashed; color=gray40;\n'
         '    "e1" [shape=ellipse, label="e1\\nedge"];\n  }',
         '  subgraph "cluster_south" {\n    label="community south"; style=dashed; color=gray40;\n'
         '    "e3" [shape=ellipse, label="e3\\nedge"];\n  }'], []),
    "node-in-two-communities-drawn-once-with-both-in-its-label": (
        GRAPH_NODES, GRAPH_CMS, ['\n  "e2" [shape=ellipse, label="e2\\nedge\\ncommunities: north, south"];'], []),
    "shapes-by-role": (
        GRAPH_NODES, GRAPH_CMS,
        ['"conn" [shape=hexagon', '"cloud" [shape=box', '"e4" [shape=ellipse, label="e4\\nedge"];'], []),
    "solid-tunnels-from-configmaps-once-per-pair": (
        GRAPH_NODES, GRAPH_CMS,
        ['  "conn" -- "e1";\n  "conn" -- "e2";\n  "conn" -- "e3";\n  "conn" -- "e4";\n'
         '  "e1" -- "e2";\n  "e2" -- "e3";\n'], []),
    "dashed-relayed-edges-for-pairs-sharing-no-community": (
        GRAPH_NODES, GRAPH_CMS,
        [f'  "e1" -- "e3" {RELAYED}', f'  "e1" -- "e4" {RELAYED}', f'  "e2" -- "e4" {RELAYED}',
         f'  "e3" -- "e4" {RELAYED}'],
        ['"e1" -- "e2" [', '"e2" -- "e3" [']),
    "no-connector-no-relayed-edges": (
        [n for n in GRAPH_NODES if cluster.name_of(n) != "conn"],
        GRAPH_CMS, ['  "e1" -- "e2";'], ["relayed", '"conn"']),
    "edge-without-configmap-still-drawn": (
        GRAPH_NODES, GRAPH_CMS[:1], ['"e4" [shape=ellipse', '  "conn" -- "e1";'], ['"conn" -- "e4";']),
}


@pytest.mark.parametrize(("nodes", "cms", "present", "absent"), GRAPH_CASES.values(), ids=GRAPH_CASES.keys())
def test_mesh_dot(nodes: list[dict[str, Any]], cms: list[dict[str, Any]], present: list[str],
                  absent: list[str]) -> None:
    dot = mesh_dot(nodes, cms, SETTINGS)
    assert dot.startswith("graph fabmesh {\n") and dot.endswith("}\n")
    for text in present:
        assert text in dot, f"{text!r} missing from:\n{dot}"
    for text in absent:
        assert text not in dot, f"{text!r} unexpectedly in:\n{dot}"
    for n in nodes:  # every node declared exactly once
        assert dot.count(f'"{cluster.name_of(n)}" [shape=') == 1


def test_mesh_dot_is_the_same_whatever_the_input_order() -> None:
    shuffled_nodes, shuffled_cms = GRAPH_NODES[:], GRAPH_CMS[:]
    random.Random(7).shuffle(shuffled_nodes)
    random.Random(8).shuffle(shuffled_cms)
    assert mesh_dot(shuffled_nodes, shuffled_cms, SETTINGS) == mesh_dot(GRAPH_NODES, GRAPH_CMS, SETTINGS)


QUOTE_CASES = {"plain": ("e1", '"e1"'), "double-quote": ('a"b', '"a\\"b"'), "backslash": ("a\\b", '"a\\\\b"'),
               "newline-becomes-dot-escape": ("a\nb", '"a\\nb"')}


@pytest.mark.parametrize(("text", "quoted"), QUOTE_CASES.values(), ids=QUOTE_CASES.keys())
def test_dot_quoting(text: str, quoted: str) -> None:
    assert quote(text) == quoted
