"""Everything one node should look like, computed from its ``NodeMesh`` (pure).

The agent (edge) and the connector (cloud) share this; the differences are
data: an edge has a pod CIDR (so a bridge, a CNI config and a MASQUERADE rule
for traffic leaving the mesh), the connector does not.

Routing: our routes live in a table of our own (``settings.route_table``),
looked up by one ``ip rule`` before ``main``. Each peer subnet goes to the
tunnel device: libipsec's TUN (``ipsec0``) or, with kernel ESP, the uplink
(the xfrm policy then takes the packet). Two exceptions keep the tunnels from
swallowing traffic they must not carry:
* the node's own pod CIDR goes to its bridge (the edge pool, routed to the
  connector for relaying, contains it);
* a subnet holding a peer's IKE endpoint is not routed into a tunnel, or the
  tunnel's own UDP packets would be routed into it (the endpoint stays
  reachable directly, which IKE needs anyway).

One bad peer never costs the others: a peer whose subnets or endpoint are not of
this node's address family (an IPv6 host route from a dual-stack node, in an IPv4
mesh) is left out, with a note naming the peer and the field in ``rejected``, and
everything else is planned. Raising instead would stop every pass on this node, so
no peer could be added or removed here until the bad one went away.

The iptables chains and the ipsets are rendered by ``fabmesh/firewall/rules.py``
from this node's CIDRs, MTU and role.

Fail closed: no packet for an address behind a tunnel leaves in clear, and no cleartext packet
claiming such a source is forwarded, at any moment (a tunnel down, charon restarting). The
firewall enforces both for either backend (``FABMESH-REMOTE``: the subnets routed into tunnels,
minus this node's own pod CIDR and address, which may sit inside one, e.g. the edge pool). With
kernel ESP, ``block`` xfrm policies under every tunnel's outbound selectors add the same at the
xfrm layer: charon's policies override them only while a CHILD_SA is up.

Pure: this module and everything it imports stay free of pyroute2, vici,
kubernetes, jinja2 and the drivers (the import contract in ``pyproject.toml``
checks it), so planning a node never needs the tools that apply the plan.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fabmesh.firewall.rules import firewall_chains, firewall_jumps, mesh_ipset, remote_ipset, tunnel_match
from fabmesh.mesh.dataplane import Chain, IPSet, Jump, Route, XfrmPolicy, block_policies, bypass_policies
from fabmesh.mesh.model import Backend, NodeMesh, Peer, Role
from fabmesh.node.cni import gateway
from fabmesh.node.tunnels import desired_connections, initiated

RULE_PRIORITY = 100
LIBIPSEC_DEVICE = "ipsec0"


@dataclass(frozen=True)
class NodeState:
    bridge: tuple[str, str, int] | None  # name, gateway CIDR, MTU
    conflist: str | None
    routes: tuple[Route, ...]
    route_table: int
    ipsets: tuple[IPSet, ...]
    chains: tuple[Chain, ...]
    jumps: tuple[Jump, ...]
    connections: dict[str, dict[str, Any]] = field(hash=False)
    initiators: frozenset[str] = frozenset()
    skipped: tuple[str, ...] = ()  # human notes about subnets deliberately not routed
    rejected: tuple[str, ...] = ()  # human notes about peers left out, naming the peer and the field
    anchors: tuple[str, ...] = ()  # local subnets that need a local address (libipsec), see below
    # kernel ESP: bypasses keeping local traffic out of tunnels, blocks under the tunnels (fail closed)
    xfrm: tuple[XfrmPolicy, ...] = ()


class _Endpoints:
    """IKE endpoints as sorted integers per family: "does this subnet hold one?" in O(log n).

    A connector checks thousands of subnets against thousands of observed peer addresses on every
    pass; comparing each pair would be quadratic.
    """

    def __init__(self, addresses: set[str]) -> None:
        parsed = sorted((a.version, int(a), str(a)) for a in map(ipaddress.ip_address, addresses))
        self._keys = [(version, value) for version, value, _ in parsed]
        self._text = [text for _, _, text in parsed]

    def inside(self, cidr: str) -> str | None:
        net = ipaddress.ip_network(cidr)
        i = bisect.bisect_left(self._keys, (net.version, int(net.network_address)))
        if i < len(self._keys) and self._keys[i] <= (net.version, int(net.broadcast_address)):
            return self._text[i]
        return None


def desired_state(mesh: NodeMesh, cert_pem: str, *, uplink: str | None = None,
                  conflist: str | None = None, ike_remotes: frozenset[str] = frozenset()) -> NodeState:
    """``uplink`` is the device IKE leaves by (needed for the kernel backend only).

    ``ike_remotes`` are the peer addresses charon currently talks IKE with (from
    ``list-sas``): behind NAT they are only known at run time, and must never be
    routed into a tunnel either.
    """
    settings, table = mesh.settings, mesh.settings.route_table
    device = LIBIPSEC_DEVICE if mesh.tunnel.backend is Backend.LIBIPSEC else uplink
    if device is None:
        raise ValueError("the kernel backend needs the uplink device to route tunnel traffic")
    src = _source(mesh)
    family = ipaddress.ip_address(src).version
    problems = {p.name: note for p in mesh.peers if (note := _peer_problem(p, family))}
    if problems:
        mesh = mesh.model_copy(update={"peers": tuple(p for p in mesh.peers if p.name not in problems)})
    own = {mesh.node.address, mesh.node.endpoint}
    endpoints = _Endpoints({p.endpoint for p in mesh.peers if p.endpoint} | own | set(ike_remotes))
    routes: dict[str, Route] = {}
    skipped: list[str] = []
    local = set(mesh.local_subnets)
    for peer in sorted(mesh.peers, key=lambda p: p.name):
        for subnet in peer.subnets:
            if subnet in routes:
                continue
            blocked = endpoints.inside(subnet)
            if blocked:
                skipped.append(f"{subnet} (peer {peer.name}) holds IKE endpoint {blocked}: not routed")
                continue
            if subnet in local:
                continue
            routes[subnet] = Route(dst=subnet, dev=device, table=table, src=src)
    bridge = None
    if mesh.node.role is Role.EDGE and mesh.node.pod_cidr:
        prefix = ipaddress.ip_network(mesh.node.pod_cidr).prefixlen
        bridge = (settings.bridge, f"{gateway(mesh.node.pod_cidr)}/{prefix}", mesh.tunnel.mtu)
        routes[mesh.node.pod_cidr] = Route(dst=mesh.node.pod_cidr, dev=settings.bridge, table=table, src=src)

    # kernel-libipsec installs a route per outbound policy and refuses the whole CHILD_SA when
    # no local address lies inside a local traffic selector (connector: Service CIDR, edge pool).
    # The applier gives such subnets an anchor address (their network address, never a pod's
    # or a Service's) on lo; the kernel backend has no such requirement.
    anchors: set[str] = set()
    if mesh.tunnel.backend is Backend.LIBIPSEC:
        anchors = {s for p in mesh.peers for s in mesh.local_ts(p)}
    # Kernel ESP: the connector tunnel's selectors cover the whole edge pool, which holds this
    # edge's own pod CIDR, so host <-> local pod traffic would be encrypted towards the connector
    # without higher-priority bypass policies. libipsec only sees what is routed into its TUN.
    # Block policies sit under every tunnel's outbound selectors (fail closed, module docstring).
    xfrm: set[XfrmPolicy] = set()
    tunneled = {r.dst for r in routes.values() if r.dev == device}  # canonical, as Route keeps them
    if mesh.tunnel.backend is Backend.KERNEL:
        if mesh.node.role is Role.EDGE and mesh.node.pod_cidr:
            xfrm = bypass_policies([mesh.node.pod_cidr, mesh.node.address])
        under = [(mesh.local_ts(p), [s for s in p.subnets if str(ipaddress.ip_network(s)) in tunneled])
                 for p in mesh.peers]
        xfrm |= block_policies(under, dev=device)
    ours = [s for s in (mesh.node.pod_cidr, mesh.node.address) if s]
    members = set(mesh.mesh_cidrs) | local | {s for p in mesh.peers for s in p.subnets}
    masquerade = mesh.node.pod_cidr if mesh.node.role is Role.EDGE else None
    tunnel = tunnel_match(kernel=mesh.tunnel.backend is Backend.KERNEL, device=device)
    return NodeState(
        bridge=bridge, conflist=conflist if bridge else None,
        routes=tuple(sorted(routes.values())), route_table=table,
        ipsets=(mesh_ipset(members), remote_ipset(_without(tunneled, ours))),
        chains=firewall_chains(tunnel_mtu=mesh.tunnel.mtu, masquerade=masquerade, tunnel=tunnel),
        jumps=firewall_jumps(),
        connections=desired_connections(mesh, cert_pem),
        initiators=frozenset(initiated(mesh)), skipped=tuple(skipped),
        rejected=tuple(note for _, note in sorted(problems.items())),
        anchors=tuple(sorted(anchors)), xfrm=tuple(sorted(xfrm)))


def _without(subnets: set[str], holes: list[str]) -> set[str]:
    """``subnets`` with every address of ``holes`` taken out, as CIDRs (the edge pool minus this edge's pods)."""
    left = [ipaddress.ip_network(s) for s in subnets]
    for hole in map(ipaddress.ip_network, holes):
        pieces: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for net in left:
            if net.version != hole.version or not net.overlaps(hole):
                pieces.append(net)
            elif hole.subnet_of(net):  # type: ignore[arg-type]
                pieces.extend(net.address_exclude(hole))  # type: ignore[arg-type]
            # else net lies inside the hole: nothing of it is left
        left = pieces
    return {str(n) for n in ipaddress.collapse_addresses(left)}  # type: ignore[arg-type]


def _peer_problem(peer: Peer, family: int) -> str | None:
    """Why ``peer`` cannot be planned on a node of IP version ``family``, or None.

    The model has validated every address, so a colon tells the family: a connector checks
    thousands of peers on every pass.
    """
    v6 = family == 6
    if peer.endpoint and (":" in peer.endpoint) != v6:
        return f"peer {peer.name} endpoint {peer.endpoint} is not IPv{family}: peer left out"
    for key in ("subnets", "local_subnets"):
        for i, subnet in enumerate(getattr(peer, key)):
            if (":" in subnet) != v6:
                return f"peer {peer.name} {key}[{i}] {subnet} is not IPv{family}: peer left out"
    return None


def _source(mesh: NodeMesh) -> str:
    """Source address for traffic this host itself sends into the tunnels: inside the local selectors.

    An edge uses its bridge gateway; the connector its flannel.1 address (the network address
    of its cloud pod CIDR, which flanneld's vxlan backend assigns). Not the node address: that is
    the IKE endpoint, which must stay outside the tunnels.
    """
    if mesh.node.pod_cidr is None:
        return mesh.node.address
    if mesh.node.role is Role.EDGE:
        return gateway(mesh.node.pod_cidr)
    return str(ipaddress.ip_network(mesh.node.pod_cidr).network_address)

