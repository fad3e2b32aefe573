"""Every pod reaches every pod, by pod IP, with the sender's IP preserved, over the right path."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import sh, wait_for
from tests.e2e.helpers import ask_peer, child_packets, echo_peer_server, established, ping_ok, pod

pytestmark = pytest.mark.e2e
NODES = ("connector-1", "cloud-2", "edge-1", "edge-2", "edge-3")
PAIRS = [(a, b) for a, b in itertools.permutations(NODES, 2)]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_every_pod_reaches_every_pod_and_sees_the_senders_pod_ip(running_lab: LabState, proto: str) -> None:
    failures = []
    for dst in NODES:
        server = pod(running_lab, dst)
        with echo_peer_server(server.netns, 8080, proto):
            for src in NODES:
                if src == dst:
                    continue
                client = pod(running_lab, src)
                seen = ask_peer(client.netns, server.ip, 8080, proto)
                if seen != client.ip:
                    failures.append(f"{src}->{dst}: server saw {seen!r}, expected {client.ip}")
    assert failures == []


def test_edges_in_a_common_community_talk_directly_without_the_connector(running_lab: LabState) -> None:
    e1, e2 = pod(running_lab, "edge-1"), pod(running_lab, "edge-2")
    assert "edge-2" in established(running_lab, "edge-1")
    before_connector = child_packets(running_lab, "connector-1")
    before_e1 = child_packets(running_lab, "edge-1")["edge-2"]
    assert ping_ok(e1.netns, e2.ip, count=10)
    after_connector = child_packets(running_lab, "connector-1")
    after_e1 = child_packets(running_lab, "edge-1")["edge-2"]
    assert after_e1[1] - before_e1[1] >= 10 and after_e1[0] - before_e1[0] >= 10
    for edge in ("edge-1", "edge-2"):
        assert after_connector[edge] == before_connector[edge], f"traffic crossed the connector via {edge}"


def test_edges_without_a_common_community_are_relayed_by_the_connector(running_lab: LabState) -> None:
    e1, e3 = pod(running_lab, "edge-1"), pod(running_lab, "edge-3")
    assert "edge-3" not in established(running_lab, "edge-1")
    before = child_packets(running_lab, "connector-1")
    assert ping_ok(e1.netns, e3.ip, count=10)
    after = child_packets(running_lab, "connector-1")
    assert after["edge-1"][0] - before["edge-1"][0] >= 10  # into the connector from edge-1
    assert after["edge-3"][1] - before["edge-3"][1] >= 10  # and out again towards edge-3


@pytest.mark.parametrize("client,backend", [("edge-1", "cloud-2"), ("cloud-2", "edge-3")],
                         ids=["edge-to-cloud", "cloud-to-edge"])
def test_cluster_ip_dnat_on_the_sending_host_reaches_a_pod_on_another_host(
        running_lab: LabState, client: str, backend: str) -> None:
    src, dst = pod(running_lab, client), pod(running_lab, backend)
    host = running_lab.host(client).netns
    service = "10.96.0.100" if client.startswith("edge") else "10.96.0.101"
    rule = ["-d", f"{service}/32", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", f"{dst.ip}:8080"]
    sh("iptables", "-t", "nat", "-A", "PREROUTING", *rule, ns=host)  # as kube-proxy's KUBE-SERVICES would
    try:
        with echo_peer_server(dst.netns, 8080):
            assert ask_peer(src.netns, service, 80) == src.ip
    finally:
        sh("iptables", "-t", "nat", "-D", "PREROUTING", *rule, ns=host)


def test_edge_node_address_is_reachable_from_the_connector_like_kubelet(running_lab: LabState) -> None:
    edge = running_lab.host("edge-1")
    with echo_peer_server(edge.netns, 10250, bind=edge.node_ip):
        seen = wait_for(lambda: ask_peer(running_lab.host("connector-1").netns, edge.node_ip, 10250),
                        timeout=10, what="kubelet stand-in answering through the tunnel")
    assert seen == "10.244.0.0"  # the connector's flannel address: inside the tunnel's selectors


@pytest.mark.parametrize("target", ["edge-1", "edge-3"], ids=["masquerade-nat", "symmetric-nat"])
def test_edge_node_address_is_reachable_from_another_cloud_node_through_the_route_agent_and_connector(
        running_lab: LabState, target: str) -> None:
    edge, cloud = running_lab.host(target), running_lab.host("cloud-2")
    before = child_packets(running_lab, "connector-1")[target]
    with echo_peer_server(edge.netns, 10250, bind=edge.node_ip):
        seen = wait_for(lambda: ask_peer(cloud.netns, edge.node_ip, 10250),
                        timeout=20, what=f"kubelet stand-in on {target} answering cloud-2 through the connector")
    # cloud-2's flannel address, not SNATed: the route agent's source, inside the tunnel's selectors.
    assert seen == str(ipaddress.ip_network(cloud.pod_cidr or "").network_address)
    after = child_packets(running_lab, "connector-1")[target]
    assert after[1] > before[1] and after[0] > before[0]  # out to the edge and back, through its tunnel


def test_no_snat_rule_rewrites_mesh_traffic(running_lab: LabState) -> None:
    rules = sh("iptables-save", "-t", "nat", ns=running_lab.host("edge-1").netns).stdout
    postrouting = [r for r in rules.splitlines() if r.startswith("-A POSTROUTING")]
    assert postrouting[0].endswith("-j FABMESH-POSTROUTING")
    assert "-m set --match-set FABMESH-MESH src -m set --match-set FABMESH-MESH dst -j ACCEPT" in rules
