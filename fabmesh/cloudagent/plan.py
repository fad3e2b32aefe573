"""What a cloud node that is not the connector should hold, from ``routes.yaml`` and what it observes (pure).

Why: edges' node addresses (kubelet on :10250, for ``kubectl logs/exec`` and metrics) and, where
the cloud CNI is not flannel, edge pod CIDRs are reachable only through the connector's tunnels.
Flannel already sends edge pod CIDRs to the connector (the operator gives edge Nodes the connector's
flannel annotations); nothing sends edge node addresses there, so the API server on any other cloud
node could not dial an edge kubelet. FabEdge's cloud-agent does the same for pod CIDRs.

What it plans:
* one route per subnet in the agent's own table (``settings.route_table``, not the node agents'),
  ``via`` the connector's address on the cloud network, out of the device the kernel reaches it by;
  its source is this node's address inside the cloud pod CIDRs (flannel.1's, cni0's) when it has
  one: the connector's tunnels carry only mesh sources (the cloud pod CIDRs, the Service CIDR and
  ``cloud_node_cidrs``), and the edge answers to that address through the tunnel and flannel;
* a nat POSTROUTING chain that ACCEPTs packets to those subnets and to the rest of ``no_snat`` (the
  edge pod pool, which flannel routes), which ends NAT before flannel's MASQUERADE
  (``-s 10.244.0.0/16 ! -d 224.0.0.0/4``) would rewrite the source: to the node's own address, outside
  every tunnel selector, or to flannel.1's, which hides the cloud pod from the edge; packets
  kube-proxy marked for masquerading still are;
* nothing at all where it must not route: no active connector, this node *is* the connector (its
  node agent routes into the tunnels itself), or the connector cannot be reached. "Nothing" is also
  what the agent applies when it stops, so the same reconcilers remove every trace.

Chains and sets are named ``FMCLOUD-*``, not ``FABMESH-*``: the node agents' reconcilers own every
``FABMESH-*`` chain and set on their node and would delete ours as stale.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fabmesh.firewall.rules import KUBE_MASQ_MARK
from fabmesh.mesh.cloud import CloudRoutes
from fabmesh.mesh.dataplane import Chain, IPSet, Jump, Route

PREFIX = "FMCLOUD-"
EDGE_SET = "FMCLOUD-EDGE"
NAT_CHAIN = "FMCLOUD-POSTROUTING"
RULE_PRIORITY = 101  # right after the node agents' rule (100): on a node with both, theirs is looked up first


@dataclass(frozen=True)
class CloudState:
    routes: tuple[Route, ...]
    route_table: int
    ipsets: tuple[IPSet, ...]
    chains: tuple[Chain, ...]
    jumps: tuple[Jump, ...]
    gateway: str | None = None  # the connector address routed via, None when idle
    notes: tuple[str, ...] = ()  # why something is not routed, for a person

    @property
    def idle(self) -> bool:
        return not (self.routes or self.chains)


def idle_state(route_table: int, *notes: str) -> CloudState:
    """No route, no chain, no set: what an agent leaves behind (stop, uninstall) and what the connector holds."""
    return CloudState(routes=(), route_table=route_table, ipsets=(), chains=(), jumps=(), notes=tuple(notes))


def cloud_state(config: CloudRoutes, *, node_name: str | None, local_addresses: frozenset[str],
                device: str | None) -> CloudState:
    """The routes and firewall of this cloud node.

    ``local_addresses`` are the addresses configured on the node; ``device`` is the one the kernel sends
    to the connector's address out of (None: no route there). Both are observed by the caller.
    """
    table = config.settings.route_table
    connector = config.connector
    if connector is None:
        return idle_state(table, "no active connector: nothing to route via")
    if connector.name == node_name or connector.address in local_addresses:
        return idle_state(table, f"this node is the active connector {connector.name}: its node agent routes")
    if device is None:
        return idle_state(table, f"no route to the connector {connector.name} at {connector.address}")
    gateway = ipaddress.ip_address(connector.address)
    # Parsed once: a connector-wide document lists one /32 per edge, thousands of them.
    local = [a for a in map(ipaddress.ip_address, local_addresses) if a.version == gateway.version]
    notes: list[str] = []
    routed: list[str] = []
    for subnet in config.subnets:
        net = ipaddress.ip_network(subnet)
        if net.version != gateway.version:
            notes.append(f"{subnet}: not IPv{gateway.version} like the connector address: not routed")
        elif gateway in net:
            notes.append(f"{subnet} holds the connector address {gateway}: not routed")
        elif any(a in net for a in local):
            notes.append(f"{subnet} holds an address of this node: not routed")
        else:
            routed.append(str(net))
    src = _source(config.source_cidrs, local_addresses, gateway.version)
    routes = tuple(sorted(Route(dst=s, dev=device, table=table, gateway=str(gateway), src=src) for s in routed))
    unsnat = set(routed) | {str(n) for n in map(ipaddress.ip_network, config.no_snat) if n.version == gateway.version}
    if not unsnat:
        return idle_state(table, *notes, "no subnet to route")
    family = "inet" if gateway.version == 4 else "inet6"
    nat = (f"-m mark --mark {KUBE_MASQ_MARK} -j RETURN", f"-m set --match-set {EDGE_SET} dst -j ACCEPT")
    return CloudState(
        routes=routes, route_table=table,
        ipsets=(IPSet(name=EDGE_SET, family=family, members=frozenset(unsnat)),),
        chains=(Chain("nat", NAT_CHAIN, nat),),
        jumps=(Jump("nat", "POSTROUTING", NAT_CHAIN, comment="fabmesh cloud-agent"),),
        gateway=str(gateway), notes=tuple(notes))


def _source(cidrs: tuple[str, ...], local_addresses: frozenset[str], version: int) -> str | None:
    """The lowest local address inside the cloud pod CIDRs (flannel.1's is its subnet's first), or None.

    None leaves the choice to the kernel (the outgoing device's address): then the cloud nodes' own
    range must be in the operator's ``cloud_node_cidrs`` for the connector's tunnels to carry it.
    """
    nets = [ipaddress.ip_network(c) for c in cidrs]
    inside = sorted((ipaddress.ip_address(a) for a in local_addresses
                     if ipaddress.ip_address(a).version == version),
                    key=int)
    return next((str(a) for a in inside if any(a in n for n in nets if n.version == version)), None)
