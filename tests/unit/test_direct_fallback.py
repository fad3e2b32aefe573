"""Fallback from a dead direct tunnel to the connector: the liveness rule, the DPD each tunnel gets, and,
for kernel ESP, which xfrm policy a pair's packets meet once the direct CHILD_SA is gone (pure).

The xfrm half models the kernel's lookup (``xfrm_policy_lookup_bytype``: of the policies of a
direction whose selector matches the flow, and whose device, when set, is the output device, the one
with the lowest priority value wins; no match sends the packet as it is) over fabmesh's planned
policies plus the ones charon installs for each CHILD_SA that is up. charon's priorities are modelled
as strongSwan 5.9 computes them for installed policies: twice ``PRIO_BASE`` (200,000) less a term
that grows with the selectors' prefix lengths, so a narrower selector wins, and always inside
fabmesh's bypass and block bands. The real kernel is exercised by the kernel tier.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from fabmesh.mesh.dataplane import BLOCK_PRIORITY_BAND, PRIORITY_BAND, Direction, XfrmAction, XfrmPolicy
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.desired import desired_state
from fabmesh.node.liveness import DeadTunnel, DirectLiveness

pytestmark = pytest.mark.unit

EDGE_POOL = "10.233.0.0/16"
CLOUD_SIDE = (EDGE_POOL, "10.244.0.0/16", "10.96.0.0/12")


def edge_mesh(name: str = "e1", pod: str = "10.233.1.0/24", address: str = "192.0.2.1",
              other: tuple[str, str, str] = ("e2", "10.233.2.0/24", "192.0.2.2"),
              tunnel: TunnelSettings | None = None) -> NodeMesh:
    peer, peer_pod, peer_address = other
    return NodeMesh(
        node=LocalNode(name=name, role=Role.EDGE, address=address, endpoint=public(address), pod_cidr=pod,
                       communities=("a",)),
        local_subnets=(pod, f"{address}/32"), mesh_cidrs=CLOUD_SIDE,
        peers=(Peer(name="c1", role=Role.CONNECTOR, endpoint="198.51.100.1", subnets=CLOUD_SIDE, initiate=True),
               Peer(name=peer, role=Role.EDGE, endpoint=public(peer_address), subnets=(peer_pod, f"{peer_address}/32"),
                    initiate=name < peer)),
        caCert="CA", tunnel=tunnel or TunnelSettings(backend=Backend.KERNEL))


def public(address: str) -> str:
    """An edge's ExternalIP, apart from its InternalIP (announced as a /32 and routed into tunnels)."""
    return f"198.51.100.{10 + int(address.rsplit('.', 1)[1])}"


# -- which DPD each tunnel gets ---------------------------------------------------------------------------

def test_direct_tunnels_get_the_short_dpd_and_the_connector_tunnel_keeps_its_own_on_both_ends() -> None:
    tunnel = TunnelSettings(dpd_delay_s=7, direct_dpd_delay_s=2)
    edge = desired_state(edge_mesh(tunnel=tunnel), "CERT", uplink="wan0").connections
    assert {n: c["dpd_delay"] for n, c in edge.items()} == {"c1": "7s", "e2": "2s"}
    connector = NodeMesh(
        node=LocalNode(name="c1", role=Role.CONNECTOR, address="198.51.100.1", endpoint="198.51.100.1",
                       pod_cidr="10.244.0.0/24"),
        local_subnets=CLOUD_SIDE, mesh_cidrs=CLOUD_SIDE,
        peers=(Peer(name="e1", role=Role.EDGE, subnets=("10.233.1.0/24",)),), caCert="CA", tunnel=tunnel)
    assert desired_state(connector, "CERT", uplink="wan0").connections["e1"]["dpd_delay"] == "7s"


def test_defaults_detect_a_dead_direct_tunnel_within_seconds_and_keep_charons_schedule_for_the_rest() -> None:
    tunnel = TunnelSettings()
    assert tunnel.direct_dpd_delay_s + tunnel.direct_dpd_timeout_s <= 5  # plus one 1 s poll
    assert tunnel.direct_dpd_timeout_s > 2.0  # charon's first DPD retransmission (retransmit_timeout) counts
    assert tunnel.dpd_delay_s < 10  # a WAN address change is repaired by the edge's next DPD (target < 10 s)


# -- the liveness rule ------------------------------------------------------------------------------------

def sa(uniqueid: str, *tasks: str) -> dict[str, object]:
    return {"uniqueid": uniqueid, "state": "ESTABLISHED", "tasks-active": list(tasks)}


# (observations as (time, [(connection, sa)]), what the last one removes)
LIVENESS = {
    "dpd-unanswered-past-timeout": ([(0.0, [("e2", sa("4", "IKE_DPD"))]), (1.0, [("e2", sa("4", "IKE_DPD"))]),
                                     (3.0, [("e2", sa("4", "IKE_DPD"))])], [DeadTunnel("e2", "4", 3.0)]),
    "dpd-answered-in-between": ([(0.0, [("e2", sa("4", "IKE_DPD"))]), (1.0, [("e2", sa("4"))]),
                                 (2.0, [("e2", sa("4", "IKE_DPD"))]), (4.0, [("e2", sa("4", "IKE_DPD"))])], []),
    "not-yet": ([(0.0, [("e2", sa("4", "IKE_DPD"))]), (2.9, [("e2", sa("4", "IKE_DPD"))])], []),
    "connector-tunnel-never": ([(0.0, [("c1", sa("1", "IKE_DPD"))]), (9.0, [("c1", sa("1", "IKE_DPD"))])], []),
    "new-ike-sa-starts-afresh": ([(0.0, [("e2", sa("4", "IKE_DPD"))]), (3.0, [("e2", sa("5", "IKE_DPD"))])], []),
    "other-task-is-no-dpd": ([(0.0, [("e2", sa("4", "CHILD_REKEY"))]), (9.0, [("e2", sa("4", "CHILD_REKEY"))])], []),
    "only-the-dead-duplicate": ([(0.0, [("e2", sa("4", "IKE_DPD")), ("e2", sa("6"))]),
                                 (3.5, [("e2", sa("4", "IKE_DPD")), ("e2", sa("6"))])], [DeadTunnel("e2", "4", 3.5)]),
}


@pytest.mark.parametrize(("observations", "removed"), LIVENESS.values(), ids=LIVENESS.keys())
def test_a_direct_ike_sa_is_removed_only_when_its_dpd_stays_unanswered_for_the_timeout(
        observations: list[tuple[float, list[tuple[str, dict[str, object]]]]], removed: list[DeadTunnel]) -> None:
    watch = DirectLiveness(timeout_s=3.0)
    got: list[DeadTunnel] = []
    for now, sas in observations:
        got = watch.observe(now, sas, direct={"e2"})
    assert got == removed


def test_timeout_zero_never_removes() -> None:
    watch = DirectLiveness(timeout_s=0)
    for now in (0.0, 100.0):
        assert watch.observe(now, [("e2", sa("4", "IKE_DPD"))], direct={"e2"}) == []


# -- kernel ESP: where a pair's packets go with and without the direct CHILD_SA ---------------------------

PRIO_BASE = 200_000


@dataclass(frozen=True)
class Installed:
    """A policy as the kernel holds it: fabmesh's (no SA: bypass or block) or charon's (``via`` a CHILD_SA)."""

    src: str
    dst: str
    direction: Direction
    priority: int
    action: XfrmAction
    dev: str = ""
    via: str = ""  # the connection whose CHILD_SA the template names


def charon_priority(src: str, dst: str) -> int:
    return 2 * PRIO_BASE - 256 * (ipaddress.ip_network(src).prefixlen + ipaddress.ip_network(dst).prefixlen)


def charon_policies(connections: dict[str, dict], up: Iterable[str]) -> list[Installed]:
    """What charon installs for each CHILD_SA that is up: out and fwd (``policies_fwd_out``) for
    local -> remote, in and fwd for remote -> local."""
    out: list[Installed] = []
    for name in up:
        child = connections[name]["children"][name]
        assert child.get("policies_fwd_out") == "yes"
        for local in child["local_ts"]:
            for remote in child["remote_ts"]:
                for d in (Direction.OUT, Direction.FWD):
                    out.append(Installed(local, remote, d, charon_priority(local, remote), XfrmAction.ALLOW, via=name))
                for d in (Direction.IN, Direction.FWD):
                    out.append(Installed(remote, local, d, charon_priority(remote, local), XfrmAction.ALLOW, via=name))
    return out


def fabmesh_policies(policies: Iterable[XfrmPolicy]) -> list[Installed]:
    return [Installed(p.src, p.dst, p.direction, p.priority, p.action, p.dev) for p in policies]


def lookup(policies: list[Installed], src: str, dst: str, direction: Direction, oif: str) -> Installed | None:
    """The kernel's choice for a flow, or None (no policy: the packet goes as it is)."""
    def matches(p: Installed) -> bool:
        return (p.direction == direction and ipaddress.ip_address(src) in ipaddress.ip_network(p.src)
                and ipaddress.ip_address(dst) in ipaddress.ip_network(p.dst) and p.dev in ("", oif))
    hits = sorted((p for p in policies if matches(p)), key=lambda p: p.priority)
    return hits[0] if hits else None


def verdict(policy: Installed | None) -> str:
    if policy is None:
        return "clear"  # a leak, when the destination is behind a tunnel
    if policy.action is XfrmAction.BLOCK:
        return "block"
    return f"via {policy.via}" if policy.via else "bypass"


def installed(mesh: NodeMesh, up: Iterable[str]) -> list[Installed]:
    state = desired_state(mesh, "CERT", uplink="wan0")
    return fabmesh_policies(state.xfrm) + charon_policies(state.connections, up)


def test_modelled_charon_priorities_sit_between_fabmeshs_bypass_and_block_bands() -> None:
    for src, dst in (("0.0.0.0/0", "0.0.0.0/0"), ("10.233.1.7/32", "10.233.2.7/32")):
        assert PRIORITY_BAND.stop <= charon_priority(src, dst) < BLOCK_PRIORITY_BAND.start


# Pod 10.233.1.7 on e1 (and the bridge gateway 10.233.1.1, the source of what the host sends) to pod
# 10.233.2.7 on e2; (CHILD_SAs up on e1, direction, source) -> verdict.
OUTBOUND = {
    "both-up-pod": (("c1", "e2"), Direction.FWD, "10.233.1.7", "via e2"),
    "both-up-host": (("c1", "e2"), Direction.OUT, "10.233.1.1", "via e2"),
    "direct-gone-pod-relayed": (("c1",), Direction.FWD, "10.233.1.7", "via c1"),
    "direct-gone-host-relayed": (("c1",), Direction.OUT, "10.233.1.1", "via c1"),
    "both-gone-pod-blocked": ((), Direction.FWD, "10.233.1.7", "block"),
    "both-gone-host-blocked": ((), Direction.OUT, "10.233.1.1", "block"),
    "connector-gone-direct-still-used": (("e2",), Direction.FWD, "10.233.1.7", "via e2"),
}


@pytest.mark.parametrize(("up", "direction", "src", "expected"), OUTBOUND.values(), ids=OUTBOUND.keys())
def test_a_pairs_outbound_packets_take_the_direct_sa_else_the_connectors_else_are_blocked(
        up: tuple[str, ...], direction: Direction, src: str, expected: str) -> None:
    policies = installed(edge_mesh(), up)
    assert verdict(lookup(policies, src, "10.233.2.7", direction, oif="wan0")) == expected


def test_with_the_direct_sa_gone_nothing_behind_a_tunnel_leaves_in_clear() -> None:
    """Every remote address the edge routes into a tunnel, from its pods and its gateway, with the direct
    SA gone: relayed where the connector tunnel covers it, blocked where it does not (e2's node address:
    the connector tunnel of an edge carries the edge pool and the cloud side, not other edges' /32s)."""
    policies = installed(edge_mesh(), ("c1",))
    got = {(src, dst, d): verdict(lookup(policies, src, dst, d, oif="wan0"))
           for src in ("10.233.1.7", "10.233.1.1") for dst in ("10.233.2.7", "10.233.9.7", "10.244.0.7", "192.0.2.2")
           for d in (Direction.OUT, Direction.FWD)}
    assert "clear" not in got.values()
    assert {k[1]: v for k, v in got.items()} == {"10.233.2.7": "via c1", "10.233.9.7": "via c1",
                                                  "10.244.0.7": "via c1", "192.0.2.2": "block"}


# On e2, a packet from pod 10.233.1.7 (e1) to pod 10.233.2.7 that arrived through the SA named, forwarded
# to the local pod: accepted only if the fwd policy the kernel picks names that SA's connection.
INBOUND = {
    "relayed-after-e2-dropped-the-direct-sa": (("c1",), "c1", True),
    "direct-while-up": (("c1", "e1"), "e1", True),
    "relayed-while-e2-still-holds-the-direct-sa": (("c1", "e1"), "c1", False),
}


@pytest.mark.parametrize(("up", "arrived_via", "accepted"), INBOUND.values(), ids=INBOUND.keys())
def test_relayed_packets_are_accepted_once_the_receiver_has_dropped_its_direct_sa_too(
        up: tuple[str, ...], arrived_via: str, accepted: bool) -> None:
    """Why both ends run the liveness rule (each sees its DPD unanswered): with kernel ESP the receiver's
    inbound check takes its best-matching fwd policy, the direct tunnel's while that CHILD_SA is up, and
    a packet that came through the connector's SA does not match its template (XfrmInTmplMismatch)."""
    e2 = edge_mesh(name="e2", pod="10.233.2.0/24", address="192.0.2.2", other=("e1", "10.233.1.0/24", "192.0.2.1"))
    policy = lookup(installed(e2, up), "10.233.1.7", "10.233.2.7", Direction.FWD, oif="fabmesh0")
    assert policy is not None and (policy.via == arrived_via) is accepted
