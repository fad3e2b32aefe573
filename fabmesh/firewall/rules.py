"""The iptables rules and the ipsets fabmesh puts on a node, rendered from plain inputs (pure).

This is where a reader finds what fabmesh does to a node's firewall; ``fabmesh/firewall/iptables.py``
and ``ipset.py`` only make the kernel match it. Everything lives in ``FABMESH-*`` chains, each jumped
to first from its built-in chain, and matches through two hash:net sets: ``MESH_SET``, every CIDR of
the mesh, and ``REMOTE_SET``, the subnets this node routes into its tunnels minus its own pod CIDR
and address (what lives behind a tunnel, seen from here).

"Through a tunnel" is the backend's: with kernel ESP the packet carries an xfrm policy
(``-m policy --dir in|out --pol ipsec``), with libipsec it enters or leaves the TUN device ``ipsec0``.

* filter FORWARD, fail closed and scoped:
  1. mesh to mesh from a tunnel is accepted (before any default DROP), unless conntrack calls it
     INVALID (kube-proxy's KUBE-FORWARD drops those; accepting them here would skip that);
  2. a packet with a source behind a tunnel that did *not* come through one is dropped: cleartext
     from the WAN forging a remote pod's address (rp_filter cannot catch it with kernel ESP, where
     decrypted packets arrive on the uplink too);
  3. mesh to mesh into a tunnel is accepted, INVALID aside;
  4. a packet to an address behind a tunnel that is not leaving through one is dropped: with
     libipsec the routes through ``ipsec0`` vanish with the device when charon stops and the
     packet would fall back to the main table's default route, in clear.
  Everything else (local bridge traffic, cloud traffic on the connector) is not ours: it goes on
  to the other chains of FORWARD (NetworkPolicy, kube-proxy).
* filter OUTPUT: rule 4 for what the host itself sends.
* nat POSTROUTING: packets kube-proxy marked for masquerading (``0x4000/0x4000`` by KUBE-MARK-MASQ,
  masqueraded in KUBE-POSTROUTING: hairpin, external clients of a Service) return untouched; mesh
  to mesh into a tunnel, and mesh traffic from a source behind a tunnel (rule 2 made sure it came
  through one; nat POSTROUTING cannot match the input side), are ACCEPTed, which ends NAT
  processing, so no later MASQUERADE (flannel's) rewrites a pod source IP; pods leaving the mesh
  are masqueraded (edges only);
* mangle FORWARD/OUTPUT: TCP SYNs into the mesh get their MSS clamped to the tunnel MTU (an MTU
  mistake costs several times the throughput).

Rules are written exactly as ``iptables-save`` prints them, so a restarted agent compares equal and
writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fabmesh.mesh.dataplane import Chain, IPSet, Jump

MESH_SET = "FABMESH-MESH"
REMOTE_SET = "FABMESH-REMOTE"
KUBE_MASQ_MARK = "0x4000/0x4000"  # kube-proxy's --iptables-masquerade-bit 14, its default
IP_OVERHEAD = 40  # IPv4 + TCP headers, for MSS from MTU


def mesh_ipset(members: Iterable[str]) -> IPSet:
    """The set every rule matches mesh traffic with: ``members`` are all the mesh's CIDRs."""
    return IPSet(name=MESH_SET, family="inet", members=frozenset(members))


def remote_ipset(members: Iterable[str]) -> IPSet:
    """The set of addresses behind this node's tunnels: reached, and heard from, only through one."""
    return IPSet(name=REMOTE_SET, family="inet", members=frozenset(members))


@dataclass(frozen=True)
class TunnelMatch:
    """How a rule says "came through a tunnel" and "goes into a tunnel", and their negations."""

    came: str
    came_not: str
    goes: str
    goes_not: str


def tunnel_match(*, kernel: bool, device: str) -> TunnelMatch:
    """The kernel backend's xfrm policy match, or libipsec's TUN ``device`` (as iptables-save prints them)."""
    if kernel:
        return TunnelMatch("-m policy --dir in --pol ipsec", "-m policy --dir in --pol none",
                           "-m policy --dir out --pol ipsec", "-m policy --dir out --pol none")
    return TunnelMatch(f"-i {device}", f"! -i {device}", f"-o {device}", f"! -o {device}")


def firewall_chains(*, tunnel_mtu: int, masquerade: str | None, tunnel: TunnelMatch) -> tuple[Chain, ...]:
    """Our chains; ``masquerade`` is the pod CIDR whose traffic leaving the mesh is masqueraded, or None."""
    both = f"-m set --match-set {MESH_SET} src -m set --match-set {MESH_SET} dst"
    valid = "-m conntrack ! --ctstate INVALID"
    # Written interface first, then matches in order: the way iptables-save prints them.
    came, goes = f"{tunnel.came} {both}", f"{tunnel.goes} {both}"
    forged = f"{tunnel.came_not} -m set --match-set {REMOTE_SET} src -m set --match-set {MESH_SET} dst"
    leak = f"{tunnel.goes_not} -m set --match-set {REMOTE_SET} dst"
    forward = (f"{came} {valid} -j ACCEPT", f"{forged} -j DROP", f"{goes} {valid} -j ACCEPT", f"{leak} -j DROP")
    nat = [f"-m mark --mark {KUBE_MASQ_MARK} -j RETURN", f"{goes} -j ACCEPT",
           f"-m set --match-set {REMOTE_SET} src -m set --match-set {MESH_SET} dst -j ACCEPT"]
    if masquerade is not None:
        nat.append(f"-s {masquerade} -m set ! --match-set {MESH_SET} dst -j MASQUERADE")
    mss = tunnel_mtu - IP_OVERHEAD
    return (
        Chain("filter", "FABMESH-FORWARD", forward),
        Chain("filter", "FABMESH-OUTPUT", (f"{leak} -j DROP",)),
        Chain("nat", "FABMESH-POSTROUTING", tuple(nat)),
        Chain("mangle", "FABMESH-MSS",
              # The cheap SYN test first: every forwarded TCP packet passes here, few are SYNs.
              (f"-p tcp -m tcp --tcp-flags SYN,RST SYN -m set --match-set {MESH_SET} dst "
               f"-j TCPMSS --set-mss {mss}",)),
    )


def firewall_jumps() -> tuple[Jump, ...]:
    """The jumps from the built-in chains into ours, one per (table, built-in chain)."""
    return (
        Jump("filter", "FORWARD", "FABMESH-FORWARD"),
        Jump("filter", "OUTPUT", "FABMESH-OUTPUT"),
        Jump("nat", "POSTROUTING", "FABMESH-POSTROUTING"),
        Jump("mangle", "FORWARD", "FABMESH-MSS"),
        Jump("mangle", "OUTPUT", "FABMESH-MSS"),
    )
