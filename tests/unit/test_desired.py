"""desired_state(): one node's whole desired state from its NodeMesh (pure), table-driven."""

from __future__ import annotations

import pytest

from fabmesh.mesh.dataplane import BLOCK_PRIORITY, Direction, XfrmAction, XfrmPolicy
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.desired import desired_state

pytestmark = pytest.mark.unit

CLOUD_SIDE = ("10.233.0.0/16", "10.244.0.0/16", "10.96.0.0/12")


def edge_mesh(backend: Backend, connector_subnets: tuple[str, ...] = CLOUD_SIDE) -> NodeMesh:
    return NodeMesh(
        node=LocalNode(name="e1", role=Role.EDGE, address="192.0.2.1", endpoint="198.51.100.11",
                       pod_cidr="10.233.1.0/24", communities=("a",)),
        local_subnets=("10.233.1.0/24", "192.0.2.1/32"), mesh_cidrs=CLOUD_SIDE,
        peers=(Peer(name="c1", role=Role.CONNECTOR, endpoint="198.51.100.1", subnets=connector_subnets,
                    initiate=True),
               Peer(name="e2", role=Role.EDGE, endpoint="198.51.100.12", subnets=("10.233.2.0/24", "192.0.2.2/32"))),
        caCert="CA", tunnel=TunnelSettings(backend=backend))


def routes(mesh: NodeMesh, **kw: object) -> dict[str, tuple[str, str | None]]:
    state = desired_state(mesh, "CERT", **kw)  # type: ignore[arg-type]
    return {r.dst: (r.dev, r.src) for r in state.routes}


def test_libipsec_routes_every_peer_subnet_into_its_tun_and_the_own_cidr_to_the_bridge() -> None:
    got = routes(edge_mesh(Backend.LIBIPSEC))
    assert got == {"10.233.0.0/16": ("ipsec0", "10.233.1.1"), "10.244.0.0/16": ("ipsec0", "10.233.1.1"),
                   "10.96.0.0/12": ("ipsec0", "10.233.1.1"), "10.233.2.0/24": ("ipsec0", "10.233.1.1"),
                   "192.0.2.2/32": ("ipsec0", "10.233.1.1"), "10.233.1.0/24": ("fabmesh0", "10.233.1.1")}


def test_kernel_backend_routes_via_the_uplink_and_adds_bypass_policies_for_local_traffic() -> None:
    state = desired_state(edge_mesh(Backend.KERNEL), "CERT", uplink="wan0")
    assert {r.dev for r in state.routes} == {"wan0", "fabmesh0"}
    local = {(p.src, p.dst) for p in state.xfrm if p.action is XfrmAction.ALLOW}
    assert ("10.233.1.0/24", "10.233.1.0/24") in local and ("192.0.2.1/32", "10.233.1.0/24") in local
    bypasses = [p for p in state.xfrm if p.action is XfrmAction.ALLOW]
    assert {p.direction for p in bypasses} == {Direction.OUT, Direction.IN, Direction.FWD}
    assert state.anchors == ()


def test_kernel_backend_without_an_uplink_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="uplink"):
        desired_state(edge_mesh(Backend.KERNEL), "CERT")


CASES = {
    "configured-endpoint": ((*CLOUD_SIDE, "198.51.100.0/24"), frozenset(), "198.51.100.0/24"),
    "observed-nat-address": ((*CLOUD_SIDE, "203.0.113.0/24"), frozenset({"203.0.113.7"}), "203.0.113.0/24"),
}


@pytest.mark.parametrize("subnets,remotes,skipped", CASES.values(), ids=CASES.keys())
def test_a_subnet_holding_an_ike_endpoint_is_never_routed_into_a_tunnel(
        subnets: tuple[str, ...], remotes: frozenset[str], skipped: str) -> None:
    state = desired_state(edge_mesh(Backend.LIBIPSEC, subnets), "CERT", ike_remotes=remotes)
    assert skipped not in {r.dst for r in state.routes}
    assert any(skipped in note for note in state.skipped)


def test_mesh_traffic_is_never_snatted_and_pods_leaving_the_mesh_are() -> None:
    state = desired_state(edge_mesh(Backend.LIBIPSEC), "CERT")
    nat = next(c for c in state.chains if c.table == "nat").rules
    assert nat == (
        "-m mark --mark 0x4000/0x4000 -j RETURN",  # kube-proxy's masquerade mark goes on to KUBE-POSTROUTING
        "-o ipsec0 -m set --match-set FABMESH-MESH src -m set --match-set FABMESH-MESH dst -j ACCEPT",
        "-m set --match-set FABMESH-REMOTE src -m set --match-set FABMESH-MESH dst -j ACCEPT",
        "-s 10.233.1.0/24 -m set ! --match-set FABMESH-MESH dst -j MASQUERADE",
    )
    mss = next(c for c in state.chains if c.table == "mangle").rules[0]
    assert mss.endswith("--set-mss 1360")


MESH_BOTH = "-m set --match-set FABMESH-MESH src -m set --match-set FABMESH-MESH dst"
FORWARD = {
    "libipsec": (Backend.LIBIPSEC, (
        f"-i ipsec0 {MESH_BOTH} -m conntrack ! --ctstate INVALID -j ACCEPT",
        "! -i ipsec0 -m set --match-set FABMESH-REMOTE src -m set --match-set FABMESH-MESH dst -j DROP",
        f"-o ipsec0 {MESH_BOTH} -m conntrack ! --ctstate INVALID -j ACCEPT",
        "! -o ipsec0 -m set --match-set FABMESH-REMOTE dst -j DROP",
    )),
    "kernel": (Backend.KERNEL, (
        f"-m policy --dir in --pol ipsec {MESH_BOTH} -m conntrack ! --ctstate INVALID -j ACCEPT",
        "-m policy --dir in --pol none -m set --match-set FABMESH-REMOTE src -m set --match-set FABMESH-MESH dst "
        "-j DROP",
        f"-m policy --dir out --pol ipsec {MESH_BOTH} -m conntrack ! --ctstate INVALID -j ACCEPT",
        "-m policy --dir out --pol none -m set --match-set FABMESH-REMOTE dst -j DROP",
    )),
}


@pytest.mark.parametrize("backend,rules", FORWARD.values(), ids=FORWARD.keys())
def test_forward_accepts_only_tunnel_traffic_and_drops_cleartext_to_or_from_behind_a_tunnel(
        backend: Backend, rules: tuple[str, ...]) -> None:
    state = desired_state(edge_mesh(backend), "CERT", uplink="wan0")
    chains = {c.name: c.rules for c in state.chains if c.table == "filter"}
    assert chains["FABMESH-FORWARD"] == rules
    assert chains["FABMESH-OUTPUT"] == (rules[3],)


def test_remote_set_is_what_is_routed_into_tunnels_minus_the_own_pod_cidr_and_address() -> None:
    state = desired_state(edge_mesh(Backend.LIBIPSEC), "CERT")
    remote = next(s for s in state.ipsets if s.name == "FABMESH-REMOTE").members
    assert "10.233.1.0/24" not in remote and "10.233.0.0/16" not in remote
    assert {"10.233.0.0/24", "10.233.2.0/23", "10.233.128.0/17", "10.244.0.0/16", "10.96.0.0/12"} <= remote
    assert "192.0.2.2/32" in remote and "192.0.2.1/32" not in remote
    mesh = next(s for s in state.ipsets if s.name == "FABMESH-MESH").members
    assert "10.233.1.0/24" in mesh  # local pods are still mesh


def test_kernel_backend_blocks_every_tunnel_selector_out_and_forwarded_and_asks_charon_for_fwd_out() -> None:
    state = desired_state(edge_mesh(Backend.KERNEL), "CERT", uplink="wan0")
    blocks = {p for p in state.xfrm if p.action is XfrmAction.BLOCK}
    remotes = (*CLOUD_SIDE, "10.233.2.0/24", "192.0.2.2/32")
    assert blocks == {XfrmPolicy(src, dst, d, BLOCK_PRIORITY, XfrmAction.BLOCK, dev="wan0")
                      for src in ("10.233.1.0/24", "192.0.2.1/32") for dst in remotes
                      for d in (Direction.OUT, Direction.FWD)}
    assert all(c["children"][n]["policies_fwd_out"] == "yes" for n, c in state.connections.items())
    libipsec = desired_state(edge_mesh(Backend.LIBIPSEC), "CERT")
    assert libipsec.xfrm == ()
    assert all("policies_fwd_out" not in c["children"][n] for n, c in libipsec.connections.items())


def test_a_subnet_holding_an_ike_endpoint_gets_no_block_policy() -> None:
    state = desired_state(edge_mesh(Backend.KERNEL, (*CLOUD_SIDE, "198.51.100.0/24")), "CERT", uplink="wan0")
    assert all(p.dst != "198.51.100.0/24" for p in state.xfrm)
    remote = next(s for s in state.ipsets if s.name == "FABMESH-REMOTE").members
    assert "198.51.100.0/24" not in remote


def test_connector_gets_anchors_for_local_selectors_and_routes_from_its_flannel_address() -> None:
    mesh = NodeMesh(
        node=LocalNode(name="c1", role=Role.CONNECTOR, address="198.51.100.1", endpoint="198.51.100.1",
                       pod_cidr="10.244.0.0/24"),
        local_subnets=CLOUD_SIDE, mesh_cidrs=CLOUD_SIDE,
        peers=(Peer(name="e1", role=Role.EDGE, subnets=("10.233.1.0/24", "192.0.2.1/32")),),
        caCert="CA", tunnel=TunnelSettings(backend=Backend.LIBIPSEC))
    state = desired_state(mesh, "CERT")
    assert state.bridge is None and state.conflist is None
    assert set(state.anchors) == set(CLOUD_SIDE)
    assert {r.src for r in state.routes} == {"10.244.0.0"}
    assert state.initiators == frozenset()
    assert not any("MASQUERADE" in r for r in next(c for c in state.chains if c.table == "nat").rules)
    # Cloud pods are local here (they reach the connector in clear, over flannel): only the edge is remote.
    remote = next(s for s in state.ipsets if s.name == "FABMESH-REMOTE").members
    assert remote == {"10.233.1.0/24", "192.0.2.1/32"}


BAD_PEERS = {
    "ipv6-host-route": (Peer(name="e3", role=Role.EDGE, endpoint="198.51.100.13",
                             subnets=("10.233.3.0/24", "2001:db8::3/128")), "peer e3 subnets[1] 2001:db8::3/128"),
    "ipv6-endpoint": (Peer(name="e3", role=Role.EDGE, endpoint="2001:db8::3", subnets=("10.233.3.0/24",)),
                      "peer e3 endpoint 2001:db8::3"),
}


@pytest.mark.parametrize("bad,note", BAD_PEERS.values(), ids=BAD_PEERS.keys())
def test_a_peer_of_another_family_is_rejected_with_a_note_and_the_others_are_planned(bad: Peer, note: str) -> None:
    mesh = edge_mesh(Backend.LIBIPSEC)
    mesh = mesh.model_copy(update={"peers": (*mesh.peers, bad)})
    state = desired_state(mesh, "CERT")
    assert len(state.rejected) == 1 and state.rejected[0].startswith(note)
    assert set(state.connections) == {"c1", "e2"}
    assert {r.dst for r in state.routes} == {*CLOUD_SIDE, "10.233.2.0/24", "192.0.2.2/32", "10.233.1.0/24"}
    assert desired_state(edge_mesh(Backend.LIBIPSEC), "CERT").rejected == ()
