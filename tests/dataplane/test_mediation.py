"""Hole punching across two NATs, with the connector as strongSwan's mediation server (kernel-libipsec).

Real charons, real NAT routers (``Network.add_nat_router``, the lab's own): a connector on the WAN,
edge-a behind one router and edge-b behind another, each edge's pod subnet relayed through the
connector tunnel (its selectors cover the whole edge pool) as the mesh does. Each edge also holds a
mediation connection to the connector and a mediated connection to the other edge (``mediated_by``);
edge-a initiates it. What is asserted is what charon reports (``list-sas``) and the pings its
CHILD_SA counters saw:

* both routers endpoint-independent (MASQUERADE): an IKE_SA and a CHILD_SA directly between the two
  edges, whose remote host is the other router's WAN address, carry the ping, and the connector's data
  IKE_SAs outlive the mediation IKE_SAs made beside them with the same identities;
* edge-b behind a symmetric router (``--random-fully``): the mediated connection fails, and the pair
  stays reachable through the connector, which counts the ping.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import pytest

from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.tunnels import desired_connections
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, Pod, wait_for

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
TUNNEL = TunnelSettings(backend=Backend.LIBIPSEC, dpd_delay_s=5)
CONNECTOR = "connector-1"
CLOUD = "10.244.0.0/24"
POOL = "10.233.0.0/16"
SUBNETS = {"edge-a": "10.233.1.0/24", "edge-b": "10.233.2.0/24"}


@dataclass
class Node:
    host: Host
    pod: Pod
    leaf: KeyPair

    @property
    def name(self) -> str:
        return self.host.name

    def charon(self) -> Charon:
        assert self.host.charon
        return Charon(self.host.charon.vici_socket)

    def sas(self) -> dict[str, dict[str, Any]]:
        with self.charon() as charon:
            return charon.sas()

    def established(self) -> dict[str, dict[str, Any]]:
        return {name: sa for name, sa in self.sas().items() if sa.get("state") == "ESTABLISHED"}


def _node(wan: Network, ca: KeyPair, host: Host, subnet: str) -> Node:
    host.start_charon(install_routes=True)
    pod = host.add_pod("p", subnet.replace(".0/24", ".2/24"))
    # The connector tunnel's selectors cover the whole pool, this node's own pods included; charon's
    # table 220 would route replies to them into it. The agent keeps local pods local; so does this.
    host.run("ip", "rule", "add", "to", subnet, "lookup", "main", "priority", "100")
    return Node(host=host, pod=pod, leaf=issue_leaf(ca, name=host.name, addresses=[host.wan_ip], now=NOW))


def _meshes(ca: KeyPair, connector: Node, edges: list[Node]) -> dict[str, NodeMesh]:
    """What the operator plans for a mediated pair: the connector mediates, edge-a initiates."""
    def local(node: Node, role: Role) -> LocalNode:
        return LocalNode(name=node.name, role=role, address=node.host.wan_ip, endpoint=node.host.wan_ip)

    out = {CONNECTOR: NodeMesh(
        node=local(connector, Role.CONNECTOR), local_subnets=(CLOUD,), mesh_cidrs=(CLOUD, POOL),
        peers=tuple(Peer(name=e.name, role=Role.EDGE, subnets=(SUBNETS[e.name],), local_subnets=(CLOUD, POOL),
                         mediation_client=True) for e in edges),
        caCert=ca.cert_pem, tunnel=TUNNEL)}
    for edge in edges:
        other = next(e for e in edges if e is not edge)
        peers = (
            Peer(name=CONNECTOR, role=Role.CONNECTOR, endpoint=connector.host.wan_ip, subnets=(CLOUD, POOL),
                 initiate=True),
            Peer(name=other.name, role=Role.EDGE, subnets=(SUBNETS[other.name],), initiate=edge.name < other.name,
                 mediated_by=CONNECTOR),
        )
        out[edge.name] = NodeMesh(node=local(edge, Role.EDGE), local_subnets=(SUBNETS[edge.name],),
                                  mesh_cidrs=(CLOUD, POOL), peers=peers, caCert=ca.cert_pem, tunnel=TUNNEL)
    return out


def _load(node: Node, ca: KeyPair, mesh: NodeMesh) -> dict[str, dict[str, Any]]:
    conns = desired_connections(mesh, node.leaf.cert_pem)
    with node.charon() as charon:
        charon.load_key(node.leaf.key_pem)
        charon.load_cert(ca.cert_pem, ca=True)
        for name, conn in conns.items():
            charon.load_conn(name, conn)
    return conns


@dataclass
class Site:
    connector: Node
    a: Node
    b: Node


def _site(wan: Network, *, symmetric_b: bool) -> Site:
    ca = new_ca(now=NOW)
    connector = _node(wan, ca, wan.add_host(CONNECTOR, "198.51.100.1"), CLOUD)
    # libipsec installs a CHILD_SA only with a local address inside its local selectors: the agent's
    # anchor address for the edge pool the connector relays (node/desired.py), put here by hand.
    connector.host.run("ip", "addr", "add", f"{POOL.split('/')[0]}/32", "dev", "lo")
    nat_a = wan.add_nat_router("site-a", "198.51.100.11", "172.16.1.0/24")
    nat_b = wan.add_nat_router("site-b", "198.51.100.12", "172.16.2.0/24", symmetric=symmetric_b)
    a = _node(wan, ca, wan.add_host_behind_router("edge-a", nat_a, "172.16.1.2"), SUBNETS["edge-a"])
    b = _node(wan, ca, wan.add_host_behind_router("edge-b", nat_b, "172.16.2.2"), SUBNETS["edge-b"])
    meshes = _meshes(ca, connector, [a, b])
    for node in (connector, a, b):
        _load(node, ca, meshes[node.name])
    # The agent's pass: each edge brings up its connector tunnel and its mediation connection.
    for edge in (a, b):
        with edge.charon() as charon:
            charon.initiate(CONNECTOR, CONNECTOR, timeout_ms=15000)
            charon.initiate_ike(f"mediation@{CONNECTOR}", timeout_ms=15000)
    return Site(connector=connector, a=a, b=b)


def _punch(edge: Node, other: Node, attempts: int = 4) -> dict[str, Any] | None:
    """Initiate the mediated connection as the agent does: an attempt that has not established
    within a few seconds is stuck, so end it and start anew, and let the responder try too (charon
    can keep a lost attempt registered on one side, see docs/agent.md, "Hole punching").
    Returns ``edge``'s IKE_SA with ``other``."""
    for attempt in range(attempts):
        side, peer = (edge, other) if attempt % 2 == 0 else (other, edge)
        with side.charon() as charon:
            charon.terminate_ike(peer.name, timeout_ms=2000)
            charon.initiate(peer.name, peer.name)
        try:
            return wait_for(lambda: edge.established().get(other.name), timeout=8, interval=0.2,
                            what=f"{edge.name}'s mediated IKE_SA with {other.name}")
        except TimeoutError:
            continue
    return None


def _child(sa: dict[str, Any]) -> dict[str, Any]:
    children = [c for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED"]
    assert len(children) == 1, sa
    return children[0]


def test_two_edges_behind_two_cone_nats_get_a_direct_tunnel_by_mediation(wan: Network) -> None:
    site = _site(wan, symmetric_b=False)
    established_at = time.monotonic()
    connector_ids = {name: sa["uniqueid"] for name, sa in site.connector.established().items()}
    assert set(connector_ids) == {"edge-a", "edge-b"}, site.connector.sas()

    direct = _punch(site.a, site.b)
    assert direct is not None, "no mediated IKE_SA in 4 attempts"
    assert direct["remote-host"] == "198.51.100.12", direct  # edge-b's router, punched through
    assert direct["remote-id"] == "edge-b"
    assert site.b.established()["edge-a"]["remote-host"] == "198.51.100.11"

    before = int(_child(site.a.established()["edge-b"])["packets-out"])
    assert wait_for(lambda: site.a.pod.ping(site.b.pod.ip), timeout=10, what="ping over the direct tunnel")
    child = _child(site.a.established()["edge-b"])
    assert int(child["packets-out"]) > before and int(child["packets-in"]) >= 1, child

    # The mediation IKE_SAs share the data connection's identities (and peer config) on the connector:
    # they must not replace the data IKE_SAs there. unique = replace would, 10 s after the mediation
    # IKE_SA came up (same address: "suspected reauthentication", ike_sa_manager.c enforce_replace),
    # so watch past that.
    deadline = established_at + 12
    while time.monotonic() < deadline:
        after = site.connector.established()
        assert {n: sa["uniqueid"] for n, sa in after.items() if sa.get("child-sas")} == connector_ids, after
        time.sleep(0.5)
    for edge in (site.a, site.b):
        mine = edge.established()
        assert CONNECTOR in mine and f"mediation@{CONNECTOR}" in mine, mine
        assert not mine[f"mediation@{CONNECTOR}"].get("child-sas"), mine


def test_a_symmetric_nat_defeats_mediation_and_the_pair_stays_relayed(wan: Network) -> None:
    site = _site(wan, symmetric_b=True)
    assert _punch(site.a, site.b, attempts=2) is None
    assert "edge-b" not in site.a.established()

    def relay_packets() -> int:
        return int(_child(site.connector.established()["edge-b"])["packets-out"])

    before = relay_packets()
    assert wait_for(lambda: site.a.pod.ping(site.b.pod.ip), timeout=10, what="ping through the connector")
    assert relay_packets() > before
