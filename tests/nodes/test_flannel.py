"""Real flanneld (v0.28, kube subnet manager, vxlan) on two cloud nodes takes an edge's pod CIDR to the
connector's VTEP, from the annotations and ``spec.podCIDR`` the fabmesh operator writes on the edge Node.

This is the FabEdge annotation trick proven against flannel itself rather than against
``fabmesh.lab.nodesim``: flanneld on the connector writes its own annotations, the real reconciler
(with the chart's RBAC) copies them onto the edge, and flanneld on the other cloud node programs
route, neighbour and FDB entries from them; a packet sent there into the edge pod CIDR comes out of
the connector's flannel.1. No kubelet is needed: flanneld only reads Node objects, which the test
creates as kubelets would (address, podCIDR for cloud nodes; none for the edge).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.mesh.names import CONNECTOR_LABEL, EDGE_LABEL, FLANNEL_PREFIX
from fabmesh.operator.reconcile import Reconciler
from fabmesh.operator.settings import OperatorSettings
from fabmesh.testenv.cluster import install_operator_rbac
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.flannel import Flanneld
from fabmesh.testenv.hosts import Host, Network, sh, wait_for
from fabmesh.testenv.kubenode import NodeLink

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

CLOUD_NETWORK = "10.244.0.0/16"
PODS = {"cloud-a": "10.244.1.0/24", "cloud-b": "10.244.2.0/24"}  # cloud-a is the connector
EDGE = "edge-1"


def _node(name: str, ip: str, labels: dict[str, str], pod_cidr: str | None) -> dict:
    spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    # kubelet's registration annotation: flanneld v0.28.10 panics on a Node with no annotations at all.
    annotations = {"volumes.kubernetes.io/controller-managed-attach-detach": "true"}
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def _json(host: Host, *args: str) -> list[dict]:
    return json.loads(host.run(*args).stdout or "[]")


@pytest.fixture(scope="module")
def cloud(node_network: tuple[Network, NodeLink], control_plane: ControlPlane, admin: Kube,
          flanneld_binary: Path) -> Iterator[dict[str, Host]]:
    """cloud-a (connector) and cloud-b, each with its Node and real flanneld; edge-1 as a Node only."""
    net, link = node_network
    hosts = {name: net.add_host(name) for name in PODS}
    admin.create("nodes", _node("cloud-a", hosts["cloud-a"].wan_ip, {CONNECTOR_LABEL: ""}, PODS["cloud-a"]))
    admin.create("nodes", _node("cloud-b", hosts["cloud-b"].wan_ip, {}, PODS["cloud-b"]))
    admin.create("nodes", _node(EDGE, "192.0.2.10", {EDGE_LABEL: ""}, None))
    daemons = []
    try:
        for name, host in hosts.items():
            daemons.append(Flanneld(host=host, name=name, binary=flanneld_binary,
                                    directory=host.directory / "flannel").start(control_plane, link, admin,
                                                                                CLOUD_NETWORK))
        # flannel itself works: each cloud node routes the other's pod CIDR over flannel.1.
        for name, other in (("cloud-a", "cloud-b"), ("cloud-b", "cloud-a")):
            wait_for(lambda n=name, o=other: _route(hosts[n], PODS[o]) is not None, timeout=60, interval=0.5,
                     what=f"flanneld on {name} routing {other}'s {PODS[other]}")
        yield hosts
    finally:
        for daemon in daemons:
            daemon.stop()
        for node in admin.list("nodes"):  # no operator runs any more: nothing else would release its finalizer
            if node["metadata"].get("finalizers"):
                admin.merge_patch("nodes", node["metadata"]["name"], {"metadata": {"finalizers": None}})
            admin.delete("nodes", node["metadata"]["name"])


def _route(host: Host, cidr: str) -> dict | None:
    routes = _json(host, "ip", "-j", "route", "show", "exact", cidr)
    return routes[0] if routes else None


def _fdb(host: Host) -> dict[str, str | None]:
    return {e["mac"]: e.get("dst") for e in _json(host, "bridge", "-j", "fdb", "show", "dev", "flannel.1")}


@pytest.fixture(scope="module")
def reconciler(control_plane: ControlPlane, admin: Kube) -> Reconciler:
    """The real reconciler, with the chart's RBAC, run pass by pass by the tests."""
    namespace = "fabmesh-flannel"
    operator = Kube(load_api_client(str(install_operator_rbac(control_plane, admin, namespace))))
    settings = OperatorSettings.model_validate({"namespace": namespace, "cloud_pod_cidrs": [CLOUD_NETWORK],
                                                "agent_pods": {"enabled": False},
                                                "connector_pods": {"enabled": False}})
    return Reconciler(operator, settings)


def test_real_flanneld_sends_the_edge_pod_cidr_to_the_connectors_vtep(
        cloud: dict[str, Host], reconciler: Reconciler, admin: Kube) -> None:
    connector, other = cloud["cloud-a"], cloud["cloud-b"]
    # flanneld on the connector published its VTEP on its Node; that is what the operator copies.
    annotations = admin.get("nodes", "cloud-a")["metadata"]["annotations"]
    vtep_mac = json.loads(annotations[FLANNEL_PREFIX + "backend-data"])["VtepMAC"]
    assert vtep_mac == _json(connector, "ip", "-j", "link", "show", "flannel.1")[0]["address"]
    assert annotations[FLANNEL_PREFIX + "public-ip"] == connector.wan_ip

    settings = reconciler.settings
    wait_for(lambda: reconciler.run_once() is not None and bool(
        (admin.get("nodes", EDGE).get("spec") or {}).get("podCIDR")), timeout=30, interval=1,
        what=f"the operator giving {EDGE} a pod CIDR")
    edge_cidr = admin.get("nodes", EDGE)["spec"]["podCIDR"]
    assert ipaddress.ip_network(edge_cidr).subnet_of(ipaddress.ip_network(settings.edge_pod_pool))
    vtep = str(ipaddress.ip_network(edge_cidr).network_address)

    # On the other cloud node: route, neighbour and FDB entry, exactly as flanneld's vxlan backend makes them.
    wait_for(lambda: _route(other, edge_cidr) is not None, timeout=60, interval=0.5,
             what=f"flanneld on cloud-b routing {EDGE}'s {edge_cidr}")
    route = _route(other, edge_cidr)
    assert (route["dev"], route["gateway"], "onlink" in route.get("flags", [])) == ("flannel.1", vtep, True), route
    neighbours = {n["dst"]: n for n in _json(other, "ip", "-j", "neigh", "show", "dev", "flannel.1")}
    assert neighbours[vtep]["lladdr"] == vtep_mac, neighbours
    fdb = _fdb(other)
    assert fdb[vtep_mac] == connector.wan_ip, fdb

    # A packet from cloud-b into the edge pod CIDR comes out of the connector's flannel.1. It leaves cloud-b
    # from its flannel.1 address (its pod CIDR's network address), so nothing else can match the rule.
    target = str(ipaddress.ip_network(edge_cidr).network_address + 7)
    source = str(ipaddress.ip_network(PODS["cloud-b"]).network_address)
    rule = ["-i", "flannel.1", "-s", source, "-d", target, "-p", "icmp", "-j", "ACCEPT"]
    connector.run("iptables", "-t", "raw", "-I", "PREROUTING", *rule)
    other.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", target, check=False)
    counters = connector.run("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n").stdout
    hits = [line.split() for line in counters.splitlines() if target in line and source in line]
    assert hits and int(hits[0][0]) >= 1, counters
    sh("iptables", "-t", "raw", "-D", "PREROUTING", *rule, ns=connector.netns)


def test_deleting_an_edge_node_keeps_the_cloud_nodes_fdb_entry_and_path_to_the_connector(
        cloud: dict[str, Host], reconciler: Reconciler, admin: Kube) -> None:
    """flanneld turns the deletion of a marked Node into a lease removal that deletes the FDB entry of its
    VtepMAC: for an edge, the connector's, shared by every edge. The operator's finalizer holds the Node
    until the marker is gone (fabmesh/operator/flannel.py), so flanneld ignores the deletion."""
    connector, other = cloud["cloud-a"], cloud["cloud-b"]
    vtep_mac = json.loads(admin.get("nodes", "cloud-a")["metadata"]["annotations"][FLANNEL_PREFIX + "backend-data"])[
        "VtepMAC"]
    gone = "edge-2"
    admin.create("nodes", _node(gone, "192.0.2.20", {EDGE_LABEL: ""}, None))
    wait_for(lambda: reconciler.run_once() is not None and bool(
        (admin.get("nodes", gone).get("spec") or {}).get("podCIDR")), timeout=30, interval=1,
        what=f"the operator giving {gone} a pod CIDR")
    cidr = admin.get("nodes", gone)["spec"]["podCIDR"]
    wait_for(lambda: _route(other, cidr) is not None, timeout=60, interval=0.5,
             what=f"flanneld on cloud-b routing {gone}'s {cidr}")
    assert _fdb(other).get(vtep_mac) == connector.wan_ip

    admin.delete("nodes", gone)
    wait_for(lambda: reconciler.run_once() is not None and admin.get("nodes", gone) is None, timeout=60,
             interval=1, what=f"the operator releasing {gone} and the API server deleting it")
    # flanneld handles Node events in order: once it has programmed a Node added after the deletion, it has
    # handled the deletion too. This probe is a flannel node of its own (its own VtepMAC and public-ip).
    probe_mac, probe_ip = "0a:58:0a:f4:63:63", "203.0.113.238"
    probe = _node("probe", probe_ip, {}, "10.244.99.0/24")
    probe["metadata"]["annotations"].update({
        FLANNEL_PREFIX + "kube-subnet-manager": "true", FLANNEL_PREFIX + "backend-type": "vxlan",
        FLANNEL_PREFIX + "backend-data": json.dumps({"VNI": 1, "VtepMAC": probe_mac}),
        FLANNEL_PREFIX + "public-ip": probe_ip})
    admin.create("nodes", probe)
    wait_for(lambda: _fdb(other).get(probe_mac) == probe_ip, timeout=60, interval=0.5,
             what="flanneld on cloud-b programming the probe Node added after the deletion")

    assert _fdb(other).get(vtep_mac) == connector.wan_ip, _fdb(other)
    # ...and the connector is still reachable over flannel.1: cloud-b to the connector's flannel.1 address.
    target = str(ipaddress.ip_network(PODS["cloud-a"]).network_address)
    ping = other.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", "flannel.1", target, check=False)
    assert ping.returncode == 0, ping.stdout
