"""Certificates on live tunnels, with real charons: renewal drops nothing, a replaced key is refused.

A connector and edges, each a namespace with its own charon (libipsec, routes installed by charon) and a
pod. Each node's connections are what the agent and the connector load: ``desired_connections`` of its
``NodeMesh``, applied by ``TunnelSync`` over VICI, with every peer pinned to its public key as the
operator writes it. What the tests observe is charon's own view (IKE_SA ids over VICI) and pings
between pods, counted.
"""

from __future__ import annotations

import datetime
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.tunnel_sync import Credentials, TunnelChanges, TunnelSync
from fabmesh.node.tunnels import desired_connections
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca, public_key_b64
from fabmesh.strongswan.driver import Charon, ViciError
from fabmesh.testenv.hosts import Host, Network, Pod, stop_pid, wait_for

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
CONNECTOR = "connector-1"
CLOUD_CIDR = "10.244.0.0/24"
TUNNEL = TunnelSettings(backend=Backend.LIBIPSEC, dpd_delay_s=5)


@dataclass
class Node:
    host: Host
    pod: Pod
    subnet: str
    leaf: KeyPair
    sync: TunnelSync
    pins: dict[str, str] = field(default_factory=dict)  # peer -> the public key this node pins for it

    @property
    def name(self) -> str:
        return self.host.name

    def charon(self) -> Charon:
        assert self.host.charon
        return Charon(self.host.charon.vici_socket)

    def ike_ids(self) -> dict[str, str]:
        with self.charon() as charon:
            return {name: sa["uniqueid"] for name, sa in charon.sas().items() if sa.get("state") == "ESTABLISHED"}


@dataclass
class Mesh:
    ca: KeyPair
    connector: Node
    edges: list[Node]

    def node_mesh(self, node: Node) -> NodeMesh:
        if node is self.connector:
            peers = [Peer(name=e.name, role=Role.EDGE, subnets=(e.subnet,), pubkey=node.pins.get(e.name, ""))
                     for e in self.edges if e.name in node.pins]
            role, local = Role.CONNECTOR, CLOUD_CIDR
        else:
            peers = [Peer(name=CONNECTOR, role=Role.CONNECTOR, endpoint=self.connector.host.wan_ip,
                          subnets=(CLOUD_CIDR,), initiate=True, pubkey=node.pins.get(CONNECTOR, ""))]
            role, local = Role.EDGE, node.subnet
        return NodeMesh(node=LocalNode(name=node.name, role=role, address=node.host.wan_ip,
                                       endpoint=node.host.wan_ip),
                        local_subnets=(local,), mesh_cidrs=(CLOUD_CIDR, "10.233.0.0/16"), peers=tuple(peers),
                        caCert=self.ca.cert_pem, tunnel=TUNNEL)

    def apply(self, node: Node) -> TunnelChanges:
        mesh = self.node_mesh(node)
        initiators = {p.name for p in mesh.peers if p.initiate}
        return node.sync.apply(desired_connections(mesh, node.leaf.cert_pem),
                               Credentials(key_pem=node.leaf.key_pem, ca_pem=self.ca.cert_pem), initiators)

    def pin_all(self) -> None:
        """What the operator writes: every node pins every peer's public key (a renewal keeps it)."""
        self.connector.pins = {e.name: public_key_b64(e.leaf.cert_pem) for e in self.edges}
        for e in self.edges:
            e.pins = {CONNECTOR: public_key_b64(self.connector.leaf.cert_pem)}


def _node(wan: Network, tmp_path: Path, ca: KeyPair, name: str, subnet: str) -> Node:
    host = wan.add_host(name)
    host.start_charon(install_routes=True)
    pod = host.add_pod("p", subnet.replace(".0/24", ".2/24"))
    leaf = issue_leaf(ca, name=name, addresses=[host.wan_ip], now=NOW)
    sync = TunnelSync(lambda h=host: Charon(h.charon.vici_socket), tmp_path / name / "tunnels.json")  # type: ignore[union-attr]
    return Node(host=host, pod=pod, subnet=subnet, leaf=leaf, sync=sync)


def _mesh(wan: Network, tmp_path: Path, edges: int) -> Mesh:
    ca = new_ca(now=NOW)
    connector = _node(wan, tmp_path, ca, CONNECTOR, CLOUD_CIDR)
    mesh = Mesh(ca=ca, connector=connector,
                edges=[_node(wan, tmp_path, ca, f"edge-{i}", f"10.233.{i}.0/24") for i in range(1, edges + 1)])
    mesh.pin_all()
    return mesh


def _up(mesh: Mesh, edge: Node) -> bool:
    mesh.apply(edge)  # the agent's pass: initiates when there is no IKE_SA
    return CONNECTOR in edge.ike_ids() and edge.pod.ping(mesh.connector.pod.ip, timeout=1)


def _establish(mesh: Mesh) -> None:
    mesh.apply(mesh.connector)
    for edge in mesh.edges:
        wait_for(lambda e=edge: _up(mesh, e), timeout=30, interval=1, what=f"{edge.name}'s tunnel")


def _ping(pod: Pod, dst: str, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", pod.netns, "ping", "-n", "-q", "-i", "0.2", "-W", "1",
                             "-w", str(seconds), dst], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _lost(process: subprocess.Popen[str]) -> int:
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_pid(process.pid)
        raise
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    sent, received = int(match[1]), int(match[2])
    assert sent >= 20, out
    return sent - received


def test_connector_renewal_under_ping_from_three_edges_keeps_every_ike_sa_and_loses_no_packet(
        wan: Network, tmp_path: Path) -> None:
    mesh = _mesh(wan, tmp_path, edges=3)
    _establish(mesh)
    connector = mesh.connector
    before = connector.ike_ids()
    assert set(before) == {"edge-1", "edge-2", "edge-3"}, before
    edge_side = {e.name: e.ike_ids()[CONNECTOR] for e in mesh.edges}

    pings = {e.name: _ping(e.pod, connector.pod.ip, seconds=12) for e in mesh.edges}
    try:
        # The operator's renewal: a new leaf for the connector's key. Edges pin the key, so their
        # configs stay exactly as they were; only the connector loads its connections with the new leaf.
        edge_configs = {e.name: desired_connections(mesh.node_mesh(e), e.leaf.cert_pem) for e in mesh.edges}
        connector.leaf = issue_leaf(mesh.ca, name=CONNECTOR, addresses=[connector.host.wan_ip],
                                    now=NOW + datetime.timedelta(minutes=1), key_pem=connector.leaf.key_pem)
        mesh.pin_all()
        assert {e.name: desired_connections(mesh.node_mesh(e), e.leaf.cert_pem) for e in mesh.edges} == edge_configs
        changes = mesh.apply(connector)
        assert sorted(changes.loaded) == ["edge-1", "edge-2", "edge-3"] and changes.terminated == [], changes
        for edge in mesh.edges:
            edge_changes = mesh.apply(edge)
            assert not edge_changes.loaded and not edge_changes.terminated, edge_changes
    finally:
        lost = {name: _lost(p) for name, p in pings.items()}

    assert connector.ike_ids() == before, "the renewal ended an IKE_SA on the connector"
    assert {e.name: e.ike_ids().get(CONNECTOR) for e in mesh.edges} == edge_side
    assert all(n <= 1 for n in lost.values()), f"pings lost per edge: {lost}"

    # A new IKE_SA is made with the new leaf: the connector presents it, the edge's unchanged key pin accepts it.
    edge = mesh.edges[0]
    with edge.charon() as charon:
        charon.terminate_ike(CONNECTOR, timeout_ms=5000)
    wait_for(lambda: _up(mesh, edge), timeout=30, interval=1, what="edge-1's new IKE_SA after the renewal")
    assert edge.ike_ids()[CONNECTOR] != edge_side["edge-1"]


def test_a_reissued_edges_old_key_is_refused_and_its_old_ike_sa_ends(wan: Network, tmp_path: Path) -> None:
    mesh = _mesh(wan, tmp_path, edges=1)
    _establish(mesh)
    edge, connector = mesh.edges[0], mesh.connector
    stolen = edge.leaf
    old_sa = connector.ike_ids()["edge-1"]

    # Revocation: the operator gives edge-1 a new key; the connector pins the new leaf.
    edge.leaf = issue_leaf(mesh.ca, name="edge-1", addresses=[edge.host.wan_ip], now=NOW)
    mesh.pin_all()
    changes = mesh.apply(connector)
    assert changes.terminated == ["edge-1"], changes
    wait_for(lambda: connector.ike_ids().get("edge-1") != old_sa, timeout=10, what="the old IKE_SA to end")

    # A thief elsewhere on the WAN with the old key and certificate gets no tunnel.
    thief = Node(host=wan.add_host("thief"), pod=edge.pod, subnet=edge.subnet, leaf=stolen,
                 sync=TunnelSync(lambda: Charon(thief.host.charon.vici_socket),  # type: ignore[union-attr]
                                 tmp_path / "thief" / "tunnels.json"))
    thief.host.start_charon()
    thief.pins = {CONNECTOR: public_key_b64(connector.leaf.cert_pem)}
    thief_mesh = mesh.node_mesh(edge).model_copy(update={"node": mesh.node_mesh(edge).node.model_copy(
        update={"address": thief.host.wan_ip, "endpoint": thief.host.wan_ip})})
    thief.sync.apply(desired_connections(thief_mesh, stolen.cert_pem),
                     Credentials(key_pem=stolen.key_pem, ca_pem=mesh.ca.cert_pem), set())
    with thief.charon() as charon, pytest.raises(ViciError):
        charon.initiate(CONNECTOR, CONNECTOR, timeout_ms=15000)
    assert "edge-1" not in connector.ike_ids(), "the connector accepted the old key"

    # The real edge, with its new key, comes back.
    wait_for(lambda: _up(mesh, edge), timeout=30, interval=1, what="edge-1 with its new key")
