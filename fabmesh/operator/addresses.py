"""Which address an edge may announce to the mesh, and where its peers may reach it (pure).

An edge's kubelet writes its Node's ``status.addresses``, so they are claims, not facts,
and two of them reach other nodes' data planes:

* the InternalIP becomes a host route and traffic selector (``/32``, ``/128``) on the
  connector and on the edge's community peers, so the cloud reaches kubelet (:10250).
  An address that belongs to someone else (a cloud pod, another edge's pod CIDR, the
  API server, another node) would pull that traffic into this edge's tunnel;
* the endpoint (ExternalIP, else InternalIP) is where peers send IKE, and
  ``desired_state`` never routes a subnet holding an IKE endpoint into a tunnel: an
  endpoint inside the cloud pod CIDR would make every peer drop its cloud route.

So, per edge:

* its InternalIP is announced only inside ``edge_node_cidrs`` or, when that is empty,
  when it is not globally routable (private, CGNAT, ULA, documentation ranges: what an
  edge behind NAT has; a public address needs ``edge_node_cidrs``); never a loopback,
  link-local, multicast, unspecified or reserved address; never inside a mesh range
  (edge pod pool, cloud pod CIDRs, Service CIDR, ``cloud_node_cidrs``); never an address
  another node reports (cloud and connector nodes, where the API server runs; other
  edges, Internal or External). Two edges that report the same InternalIP (two NATed
  sites with the same private plan) both lose it: neither is announced and both get an
  Event. Age is not ownership (an older hostile edge could otherwise take a newcomer's
  address); their pod CIDRs and tunnels are untouched, only kubelet's ``/32`` is lost
  until one of them changes address;
* its endpoint is the ExternalIP, else the InternalIP (then the edge counts as behind NAT,
  ``Vetted.public`` false, and its community tunnels are hole-punched, ``plan.py``), if outside every mesh range, not a
  cloud node's address and not an address another edge announces. Edges may share an
  ExternalIP (one NAT router, several edges). An edge without a usable endpoint keeps its
  connector tunnel (the connector accepts edges from any address) and is relayed, without
  direct community tunnels.

A rejected address is an :class:`InvalidNode` (a Warning Event naming the field); the
edge itself is still planned. Checks are per address against a few ranges and one
address index: linear in the number of nodes.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fabmesh.operator.inventory import InvalidNode
from fabmesh.operator.settings import OperatorSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EdgeAddresses:
    """What one edge reports. A ``None`` field name means: report no Event (values we wrote before)."""

    name: str
    internal: str | None
    external: str | None
    internal_field: str | None = "status.addresses"
    external_field: str | None = "status.addresses"


@dataclass(frozen=True)
class Vetted:
    announced: str | None  # the host network offered to the mesh, e.g. "192.168.1.10/32"
    endpoint: str | None  # where peers send IKE; None: no direct tunnels
    public: bool = False  # the endpoint is the ExternalIP: peers can dial it (else the edge is taken as NATed)


def mesh_ranges(settings: OperatorSettings) -> tuple[Network, ...]:
    cidrs = {settings.edge_pod_pool, *settings.cloud_pod_cidrs, settings.service_cidr, *settings.cloud_node_cidrs}
    return tuple(ipaddress.ip_network(c) for c in sorted(cidrs))


def vet_edges(edges: Sequence[EdgeAddresses], cloud_addresses: Iterable[str],
              settings: OperatorSettings) -> tuple[dict[str, Vetted], list[InvalidNode]]:
    """Each edge's announced address and endpoint, and an error for every address refused."""
    ranges = mesh_ranges(settings)
    allowed = tuple(ipaddress.ip_network(c) for c in settings.edge_node_cidrs)
    cloud = {ipaddress.ip_address(a) for a in cloud_addresses}
    reported: dict[Address, set[str]] = defaultdict(set)
    for edge in edges:
        for text in (edge.internal, edge.external):
            if text:
                reported[ipaddress.ip_address(text)].add(edge.name)

    errors: list[InvalidNode] = []
    announced: dict[str, Address] = {}
    for edge in edges:
        if not edge.internal:
            continue
        ip = ipaddress.ip_address(edge.internal)
        problem = (_outside_allowed(ip, allowed) or _inside_mesh(ip, ranges) or _cloud_address(ip, cloud)
                   or _reported_by_others(ip, edge.name, reported))
        if problem is None:
            announced[edge.name] = ip
        elif edge.internal_field is not None:
            errors.append(InvalidNode(edge.name, edge.internal_field,
                                      f"InternalIP {ip} {problem}: not announced to the mesh "
                                      "(kubelet on this node is unreachable from the cloud)"))
    announced_by = {ip: name for name, ip in announced.items()}

    vetted: dict[str, Vetted] = {}
    for edge in edges:
        endpoint, public = None, False
        for text, field in ((edge.external, edge.external_field), (edge.internal, None)):
            if not text:
                continue
            ip = ipaddress.ip_address(text)
            owner = announced_by.get(ip)
            problem = _inside_mesh(ip, ranges) or _cloud_address(ip, cloud) or (
                f"is announced by node {owner}" if owner not in (None, edge.name) else None)
            if problem is None:
                endpoint, public = str(ip), text == edge.external
                break
            if field is not None:  # an InternalIP refused here was refused above, with its own Event
                errors.append(InvalidNode(edge.name, field, f"ExternalIP {ip} {problem}: not used as the "
                                          "IKE endpoint (peers would stop routing it into the mesh)"))
        ip = announced.get(edge.name)
        vetted[edge.name] = Vetted(announced=str(ipaddress.ip_network(ip)) if ip else None, endpoint=endpoint,
                                   public=public)
    return vetted, errors


def _outside_allowed(ip: Address, allowed: tuple[Network, ...]) -> str | None:
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "is not a unicast host address"
    if allowed:
        if any(ip in net for net in allowed):
            return None
        return f"is not inside edge_node_cidrs ({', '.join(map(str, allowed))})"
    if ip.is_global:
        return "is globally routable and edge_node_cidrs is empty (list the edges' ranges there to allow it)"
    return None


def _inside_mesh(ip: Address, ranges: tuple[Network, ...]) -> str | None:
    hit = next((net for net in ranges if ip in net), None)
    return None if hit is None else f"lies inside mesh range {hit}"


def _cloud_address(ip: Address, cloud: set[Address]) -> str | None:
    return "is a cloud node's address" if ip in cloud else None


def _reported_by_others(ip: Address, name: str, reported: dict[Address, set[str]]) -> str | None:
    others = sorted(reported[ip] - {name})
    if not others:
        return None
    return f"is also reported by node {others[0]}{' and others' if len(others) > 1 else ''}: announced by neither"
