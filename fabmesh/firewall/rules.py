"""The iptables rules and the ipset fabmesh puts on a node, rendered from plain inputs (pure).

This is where a reader finds what fabmesh does to a node's firewall; ``fabmesh/firewall/iptables.py``
and ``ipset.py`` only make the kernel match it. Everything lives in ``FABMESH-*`` chains, each jumped
to first from its built-in chain, and matches mesh traffic through one hash:net set (``MESH_SET``)
holding every CIDR of the mesh:

* filter FORWARD: mesh to mesh is accepted (before any default DROP);
* nat POSTROUTING: mesh to mesh is ACCEPTed, which ends NAT processing, so no later MASQUERADE
  (flannel's, kube-proxy's) can rewrite a pod source IP; pods leaving the mesh are masqueraded
  (edges only);
* mangle FORWARD/OUTPUT: TCP SYNs into the mesh get their MSS clamped to the tunnel MTU (an MTU
  mistake costs several times the throughput).

Rules are written exactly as ``iptables-save`` prints them, so a restarted agent compares equal and
writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabmesh.mesh.dataplane import Chain, IPSet, Jump

MESH_SET = "FABMESH-MESH"
IP_OVERHEAD = 40  # IPv4 + TCP headers, for MSS from MTU


def mesh_ipset(members: Iterable[str]) -> IPSet:
    """The set every rule matches mesh traffic with: ``members`` are all the mesh's CIDRs."""
    return IPSet(name=MESH_SET, family="inet", members=frozenset(members))


def firewall_chains(*, tunnel_mtu: int, masquerade: str | None) -> tuple[Chain, ...]:
    """Our chains; ``masquerade`` is the pod CIDR whose traffic leaving the mesh is masqueraded, or None."""
    both = f"-m set --match-set {MESH_SET} src -m set --match-set {MESH_SET} dst"
    nat = [f"{both} -j ACCEPT"]
    if masquerade is not None:
        nat.append(f"-s {masquerade} -m set ! --match-set {MESH_SET} dst -j MASQUERADE")
    mss = tunnel_mtu - IP_OVERHEAD
    return (
        Chain("filter", "FABMESH-FORWARD", (f"{both} -j ACCEPT",)),
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
        Jump("nat", "POSTROUTING", "FABMESH-POSTROUTING"),
        Jump("mangle", "FORWARD", "FABMESH-MSS"),
        Jump("mangle", "OUTPUT", "FABMESH-MSS"),
    )
