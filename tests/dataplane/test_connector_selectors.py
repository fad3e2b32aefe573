"""A compromised edge cannot reach for another edge's subnets through the connector.

fabmesh promises that an edge certificate never obtains another edge's traffic selectors, so a
compromised edge harms at most that node. Here the connector is configured by fabmesh's own code
(``desired_connections`` for a connector ``NodeMesh`` with peers edge-a and edge-b, loaded over
VICI), and edge-a's host turns hostile: its charon holds edge-a's valid certificate and key, but its
connection to the connector is rewritten to ask for edge-b's subnet, for a /16 covering both edges,
or to claim the identity edge-b. Everything is asserted on what the connector's charon reports
(``list-sas``), never on what the configuration says.

No packet is spoofed: kernel ESP is not available where these tests run (the kernel has no AEAD ESP),
and with libipsec the hostile charon's own userspace policies, narrowed like the SA, would drop a
packet from edge-b's subnet before it reached the wire, which would prove nothing about the connector.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.tunnels import desired_connections
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon, ViciError
from fabmesh.testenv.hosts import Host, Network

pytestmark = pytest.mark.dataplane

NOW = datetime.datetime.now(datetime.UTC)
TUNNEL = TunnelSettings(backend=Backend.LIBIPSEC)
CLOUD = "10.244.0.0/16"
MESH_CIDRS = ("10.233.0.0/16", CLOUD)
SUBNETS = {"edge-a": "10.233.1.0/24", "edge-b": "10.233.2.0/24"}


@dataclass
class Site:
    connector: Host
    edge_a: Host
    edge_b: Host
    ca: KeyPair

    def connector_sas(self) -> dict[str, dict[str, Any]]:
        assert self.connector.charon
        with Charon(self.connector.charon.vici_socket) as charon:
            return charon.sas()


def _edge_mesh(ca: KeyPair, edge: Host, connector: Host) -> NodeMesh:
    """The edge's own mesh, as the operator plans it: one peer, the connector, which it initiates to."""
    to_connector = Peer(name="connector", role=Role.CONNECTOR, endpoint=connector.wan_ip, subnets=(CLOUD,),
                        initiate=True)
    node = LocalNode(name=edge.name, role=Role.EDGE, address=edge.wan_ip, endpoint=edge.wan_ip,
                     pod_cidr=SUBNETS[edge.name])
    return NodeMesh(node=node, local_subnets=(SUBNETS[edge.name],), mesh_cidrs=MESH_CIDRS, peers=(to_connector,),
                    caCert=ca.cert_pem, tunnel=TUNNEL)


def _connector_mesh(ca: KeyPair, connector: Host) -> NodeMesh:
    """The connector's mesh, as the operator plans it: each edge with no fixed address and its own subnet."""
    peers = tuple(Peer(name=name, role=Role.EDGE, subnets=(subnet,)) for name, subnet in SUBNETS.items())
    node = LocalNode(name="connector", role=Role.CONNECTOR, address=connector.wan_ip, endpoint=connector.wan_ip,
                     pod_cidr="10.244.0.0/24")
    return NodeMesh(node=node, local_subnets=(CLOUD,), mesh_cidrs=MESH_CIDRS, peers=peers, caCert=ca.cert_pem,
                    tunnel=TUNNEL)


def _load(host: Host, ca: KeyPair, leaf: KeyPair, conns: dict[str, dict[str, Any]]) -> None:
    assert host.charon
    with Charon(host.charon.vici_socket) as charon:
        charon.load_key(leaf.key_pem)
        charon.load_cert(ca.cert_pem, ca=True)
        for name, conn in conns.items():
            charon.load_conn(name, conn)


@pytest.fixture
def site(wan: Network) -> Site:
    ca = new_ca(now=NOW)
    connector, edge_a, edge_b = wan.add_host("connector"), wan.add_host("edge-a"), wan.add_host("edge-b")
    # Each node holds an address in its own subnet (its cni0 gateway on a real node): libipsec routes
    # a CHILD_SA's remote subnet through its TUN device from such an address, or fails the CHILD_SA.
    for host, gateway in ((connector, "10.244.0.1"), (edge_a, "10.233.1.1"), (edge_b, "10.233.2.1")):
        host.run("ip", "addr", "add", f"{gateway}/32", "dev", "lo")
        host.start_charon(backend=TUNNEL.backend)
    mesh = _connector_mesh(ca, connector)
    leaf = issue_leaf(ca, name="connector", addresses=[connector.wan_ip], now=NOW)
    _load(connector, ca, leaf, desired_connections(mesh, leaf.cert_pem))  # fabmesh's own code path
    return Site(connector=connector, edge_a=edge_a, edge_b=edge_b, ca=ca)


def _hostile_edge_a(site: Site, *, local_ts: list[str] | None = None, claim: str | None = None) -> None:
    """Edge-a's host with its genuine certificate and key, and a hand-edited connection to the connector."""
    mesh = _edge_mesh(site.ca, site.edge_a, site.connector)
    leaf = issue_leaf(site.ca, name="edge-a", addresses=[site.edge_a.wan_ip], now=NOW)
    conn = desired_connections(mesh, leaf.cert_pem)["connector"]
    if local_ts is not None:
        conn["children"]["connector"]["local_ts"] = local_ts
        # An address in every subnet it asks for, so its own charon keeps whatever the connector grants
        # (libipsec fails a CHILD_SA it cannot route), and only the connector decides.
        for ts in local_ts:
            address = next(ipaddress.ip_network(ts).hosts())
            site.edge_a.run("ip", "addr", "replace", f"{address}/32", "dev", "lo")
    if claim is not None:
        conn["local"]["id"] = claim
    _load(site.edge_a, site.ca, leaf, {"connector": conn})


def _initiate(host: Host) -> None:
    assert host.charon
    with Charon(host.charon.vici_socket) as charon:
        charon.initiate("connector", "connector", timeout_ms=15000)


def _initiate_error(host: Host) -> str | None:
    """What initiating the connection to the connector failed with; None if it came up."""
    try:
        _initiate(host)
    except ViciError as exc:
        return str(exc)
    return None


def _assert_no_child_reaches_edge_b(sas: dict[str, dict[str, Any]]) -> None:
    """No IKE_SA authenticated as edge-a carries a CHILD_SA whose remote selectors touch edge-b's subnet."""
    edge_b = ipaddress.ip_network(SUBNETS["edge-b"])
    for name, ike in sas.items():
        if ike.get("remote-id") != "edge-a":
            continue
        for child in ike.get("child-sas", {}).values():
            for ts in child["remote-ts"]:
                assert not ipaddress.ip_network(ts).overlaps(edge_b), f"{name}: {child}"


def _genuine_edge_b_establishes(site: Site) -> None:
    mesh = _edge_mesh(site.ca, site.edge_b, site.connector)
    leaf = issue_leaf(site.ca, name="edge-b", addresses=[site.edge_b.wan_ip], now=NOW)
    _load(site.edge_b, site.ca, leaf, desired_connections(mesh, leaf.cert_pem))
    _initiate(site.edge_b)
    ike = site.connector_sas()["edge-b"]
    assert ike["state"] == "ESTABLISHED" and ike["remote-id"] == "edge-b"
    assert ike["remote-host"] == site.edge_b.wan_ip
    [child] = ike["child-sas"].values()
    assert child["state"] == "INSTALLED"
    assert child["local-ts"] == [CLOUD] and child["remote-ts"] == [SUBNETS["edge-b"]]


def test_edge_a_asking_for_edge_b_subnet_gets_no_child_sa(site: Site) -> None:
    _hostile_edge_a(site, local_ts=[SUBNETS["edge-b"]])
    error = _initiate_error(site.edge_a)

    sas = site.connector_sas()
    _assert_no_child_reaches_edge_b(sas)
    assert error and "establishing CHILD_SA 'connector' failed" in error, error
    # Refused, not narrowed: edge-a authenticates (its certificate is genuine), but the selectors have
    # nothing in common with edge-a's subnet, so the connector answers TS_UNACCEPTABLE and installs nothing.
    ike = sas["edge-a"]
    assert ike["state"] == "ESTABLISHED" and ike["remote-id"] == "edge-a"
    assert ike["child-sas"] == {}, ike
    assert "edge-b" not in sas

    _genuine_edge_b_establishes(site)
    _assert_no_child_reaches_edge_b(site.connector_sas())


def test_edge_a_asking_for_the_whole_edge_range_is_narrowed_to_its_own_subnet(site: Site) -> None:
    _hostile_edge_a(site, local_ts=["10.233.0.0/16"])
    _initiate(site.edge_a)

    sas = site.connector_sas()
    _assert_no_child_reaches_edge_b(sas)
    # Narrowed, not refused: the /16 holds edge-a's subnet, so charon answers with the intersection.
    ike = sas["edge-a"]
    assert ike["state"] == "ESTABLISHED" and ike["remote-id"] == "edge-a"
    [child] = ike["child-sas"].values()
    assert child["state"] == "INSTALLED"
    assert child["remote-ts"] == [SUBNETS["edge-a"]] and child["local-ts"] == [CLOUD], child
    # The hostile side sees the same narrowing.
    assert site.edge_a.charon
    with Charon(site.edge_a.charon.vici_socket) as charon:
        [mine] = charon.sas()["connector"]["child-sas"].values()
    assert mine["local-ts"] == [SUBNETS["edge-a"]], mine

    _genuine_edge_b_establishes(site)
    _assert_no_child_reaches_edge_b(site.connector_sas())
    edge_a_child = next(iter(site.connector_sas()["edge-a"]["child-sas"].values()))
    assert edge_a_child["remote-ts"] == [SUBNETS["edge-a"]]


def test_edge_a_certificate_claiming_edge_b_gets_no_ike_sa(site: Site) -> None:
    _hostile_edge_a(site, claim="edge-b")
    error = _initiate_error(site.edge_a)

    assert site.connector_sas() == {}  # AUTH_FAILED: edge-a's certificate does not vouch for "edge-b"
    assert error and "failed" in error, error

    _genuine_edge_b_establishes(site)
    sas = site.connector_sas()
    assert set(sas) == {"edge-b"}
    _assert_no_child_reaches_edge_b(sas)
