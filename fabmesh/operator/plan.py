"""The operator's brain: from Nodes and settings to every node's mesh, as plain data.

``plan()`` is pure and deterministic (sorted everywhere), so the same cluster
always yields byte-identical configs and an unchanged resync writes nothing.

Topology (the rules themselves are :mod:`fabmesh.mesh.topology`'s):
* An edge peers with the active connector (it initiates: edges sit behind NAT)
  and with every edge it shares a community with (the smaller name initiates).
* The connector tunnel of an edge carries the cloud pod CIDRs, the Service
  CIDR, any configured cloud host ranges and the *whole edge pool*. The pool is what
  relays edges that share no community through the connector, at a constant
  config size per edge (listing each relayed edge would make the connector's
  config quadratic). Direct community tunnels carry the peer's exact /24 and
  win by specificity: charon gives narrower traffic selectors higher policy
  priority, and routes follow the longest prefix.
* Each edge offers its pod CIDR and its own InternalIP (/32), so the cloud
  reaches kubelet (:10250) on edge nodes for ``kubectl logs/exec``. Cloud hosts
  talk to edges from their flannel address (inside the cloud pod CIDR): the
  connector routes with that source, flannel.1 on other cloud nodes has it.
  Which InternalIP an edge may offer, and which endpoint peers may use, is
  :mod:`fabmesh.operator.addresses`' rule: a node's addresses are its kubelet's
  claim, and must never pull other nodes' traffic into its tunnel.
* One node's bad data stays with it: only edges' ``fabmesh.io/pod-cidr``
  annotations are read, the IPAM record outranks them, and an edge that turns
  invalid (a bad label, a contradicting ``spec.podCIDR``) stays in its peers'
  configs with its last good values, read from its own agent ConfigMap (what
  those peers were last told), until its Node is deleted or loses the edge label.
* Hole punching (``settings.hole_punching``, on by default): a community pair
  where either edge is behind NAT (no usable ExternalIP, ``Vetted.public``) is
  mediated by the active connector: both edges' peer entries for each other
  carry ``mediated_by`` (the endpoint stays, for the record: charon dials
  nobody for a mediated peer), and the connector marks those edges as
  mediation clients (``node/tunnels.py`` says what charon makes of it). Two
  public edges dial each other directly. A pair that cannot punch through
  (symmetric NAT, UDP blocked) is relayed by the connector tunnel, whose
  selectors cover the whole pool anyway. A held edge counts as behind NAT when
  its last config had a mediated peer.
* Every other cloud node routes edge node addresses (and, where the cloud CNI is not flannel,
  the edge pod pool) via the active connector's InternalIP: ``cloud`` is the one document their
  route agents read (:mod:`fabmesh.mesh.cloud`), written even without a connector so that they
  remove their routes.
* More than one connector is accepted; the oldest is active. Every connector
  gets its own certificate (``cert_addresses``), standbys included, so a
  failover issues nothing: the next oldest already holds its key.
"""

from __future__ import annotations

import bisect
import ipaddress
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fabmesh.mesh.cloud import ActiveConnector, CloudRoutes, CloudRouteSettings
from fabmesh.mesh.model import LocalNode, MeshConfigError, NodeMesh, Peer, Role, parse_node_mesh
from fabmesh.mesh.names import (
    FLANNEL_COPY_ANNOTATION,
    FLANNEL_FINALIZER,
    FLANNEL_KEYS,
    FLANNEL_LEASE_MARKER,
    FLANNEL_PREFIX,
    POD_CIDR_ANNOTATION,
)
from fabmesh.mesh.topology import active_connector, community_members, community_peers_of, shares_community
from fabmesh.operator.addresses import EdgeAddresses, vet_edges
from fabmesh.operator.flannel import copy_record
from fabmesh.operator.inventory import InvalidNode, NodeInfo
from fabmesh.operator.ipam import ANNOTATION_FIELD, Claim, plan_cidrs
from fabmesh.operator.settings import OperatorSettings


@dataclass(frozen=True, slots=True)
class NodePatch:
    """What the operator records on a Node object (only keys that must change are applied)."""

    annotations: dict[str, str] = field(default_factory=dict)
    spec_pod_cidr: str | None = None
    finalizers: tuple[str, ...] | None = None  # the whole new list, when it must change


@dataclass
class MeshPlan:
    errors: list[InvalidNode] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cidrs: dict[str, str] = field(default_factory=dict)
    allocated: dict[str, str] = field(default_factory=dict)
    ipam_record: dict[str, str] = field(default_factory=dict)
    edges: dict[str, NodeMesh] = field(default_factory=dict)
    connector: NodeMesh | None = None  # header only: peers live in the shards
    connectors: tuple[str, ...] = ()  # every valid connector node, active and standby, by name
    connector_shards: dict[int, tuple[Peer, ...]] = field(default_factory=dict)
    cert_addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    node_patches: dict[str, NodePatch] = field(default_factory=dict)
    held: tuple[str, ...] = ()  # invalid edges kept in their peers' configs with their last good values
    cloud: CloudRoutes | None = None  # what the route agents on cloud nodes read (routes.yaml)

    def connector_mesh(self) -> NodeMesh | None:
        """The connector's full mesh: its header plus every shard's peers."""
        if self.connector is None:
            return None
        peers = tuple(sorted((p for s in self.connector_shards.values() for p in s), key=lambda p: p.name))
        return self.connector.model_copy(update={"peers": peers})


def shard_of(name: str, shards: int) -> int:
    return zlib.crc32(name.encode()) % shards


# One fields-set per model kind (every field counts as set: model_construct fills the defaults),
# shared by every instance the planner builds: pydantic copies it on model_copy, never changes it
# on a frozen model, and leaves it out of ==. That is ~25,000 fewer sets for the collector to scan.
_FIELDS_SET: dict[type, set[str]] = {kind: set(kind.model_fields) for kind in (Peer, LocalNode, NodeMesh)}


def _peer(**values: object) -> Peer:
    return Peer.model_construct(_fields_set=_FIELDS_SET[Peer], **values)


def plan(nodes: Sequence[NodeInfo], settings: OperatorSettings, ca_cert: str,
         recorded: Mapping[str, str] | None = None, last_good: Mapping[str, str] | None = None,
         keys: Mapping[str, str] | None = None) -> MeshPlan:
    """Everything the operator should write, given the cluster as it is.

    ``recorded`` is the IPAM record (node -> CIDR) kept in the operator's own
    ConfigMap: the durable truth for allocations, over anything a Node says.
    ``last_good`` is, for every Node that carries the edge label (valid or not),
    the ``mesh.yaml`` of its existing agent ConfigMap: only those of edges that
    cannot be planned now are parsed.
    ``keys`` maps each node to the public key of the leaf its Secret holds (``Peer.pubkey``):
    every peer is pinned to it, and a peer whose node has none yet is left out (fail closed:
    nothing could authenticate as it, and an unpinned peer would accept any key the CA ever
    signed for that name). A renewal keeps the key, so it changes no pin. ``None``: no pins
    (for callers that plan topology only).

    Cost at 10,000 nodes is dominated by the objects that outlive the call: every one of them
    is a container the cyclic garbage collector rescans in each full collection. So each edge
    is built as one shared ``Peer`` per initiate flag, every model of a kind shares one
    fields-set (no set per instance), and per-edge peer lists are cut from per-community
    sorted name lists rather than built element by element.
    """
    result = MeshPlan()
    recorded = dict(recorded or {})
    last_good = last_good or {}
    by_name = {n.name: n for n in sorted(nodes, key=lambda n: n.name)}
    edges = [n for n in by_name.values() if n.role is Role.EDGE]
    connectors = [n for n in by_name.values() if n.role is Role.CONNECTOR]

    claims = [_claim(n, recorded.get(n.name), result.errors) for n in by_name.values()]
    # An edge that could not even be read keeps its recorded CIDR taken while it exists.
    claims += [Claim(node=name, spec_pod_cidr=None, annotation=None, created="", recorded=recorded[name])
               for name in sorted(last_good.keys() - by_name.keys()) if name in recorded]
    ipam = plan_cidrs(settings.edge_pod_pool, settings.edge_pod_prefix_len, claims,
                      want=[n.name for n in edges],
                      reserved=(*settings.cloud_pod_cidrs, settings.service_cidr))
    for error in ipam.errors:
        result.errors.append(InvalidNode(error.node, error.field, error.reason))
    result.cidrs = {**ipam.assigned, **ipam.allocated}
    result.allocated = dict(ipam.allocated)
    # Keep the record of every existing node (even one in error: its CIDR stays taken);
    # a deleted node's entry is dropped, which frees its CIDR.
    result.ipam_record = {n: c for n, c in recorded.items() if n in by_name or n in last_good} | result.cidrs

    ready = [n for n in edges if n.name in result.cidrs]
    held = _held(last_good, {n.name for n in ready}, recorded)
    result.held = tuple(held)
    vetted, address_errors = vet_edges(
        [*(EdgeAddresses(n.name, n.internal_ip, n.external_ip, n.internal_field, n.external_field) for n in ready),
         *(EdgeAddresses(h, _announced_address(m), m.node.endpoint, None, None) for h, m in held.items())],
        [a for n in by_name.values() if n.role is not Role.EDGE for a in (n.internal_ip, n.external_ip)
         if a and a != "0.0.0.0"],
        settings)
    result.errors.extend(address_errors)
    connector_name = active_connector({n.name: n.created for n in connectors})
    connector = by_name[connector_name] if connector_name is not None else None
    if connector is None and ready:
        result.warnings.append("no node carries the connector label "
                               f"{settings.connector_label}: edges reach only their community peers")

    cloud_side = tuple(sorted({*settings.cloud_pod_cidrs, settings.service_cidr, *settings.cloud_node_cidrs}))
    mesh_cidrs = tuple(sorted({*settings.cloud_pod_cidrs, settings.service_cidr, settings.edge_pod_pool}))
    to_connector = tuple(sorted({*cloud_side, settings.edge_pod_pool}))

    # An edge no peer can reach (no usable endpoint) gets no direct tunnels: it is relayed.
    communities = {n.name: n.communities if vetted[n.name].endpoint else () for n in ready}
    members = community_members(communities)
    # A held edge stays a peer of those it had a tunnel with, while they still share a community with what it had.
    held_peers: dict[str, set[str]] = {}
    for name, mesh in held.items():
        if vetted[name].endpoint is None:
            continue
        for other in {p.name for p in mesh.peers} & communities.keys():
            if shares_community(communities[other], mesh.node.communities):
                held_peers.setdefault(other, set()).add(name)

    flannel = {}
    if connector is not None:
        missing = [k for k in FLANNEL_KEYS if k not in connector.flannel]
        if missing:
            result.errors.append(InvalidNode(
                connector.name, f"metadata.annotations[{FLANNEL_PREFIX}{missing[0]}]",
                "the connector has no flannel annotations yet: cloud nodes cannot route edge pod "
                "CIDRs to it (is flanneld running there?)"))
        else:
            # What real flanneld (kube subnet manager, vxlan) needs to route an edge's pod CIDR to the
            # connector's VTEP: the connector's three keys, the marker (without it flanneld skips the
            # Node), and spec.podCIDR (the lease's subnet; set below when empty).
            flannel = {FLANNEL_PREFIX + k: connector.flannel[k] for k in FLANNEL_KEYS}
            flannel |= {FLANNEL_PREFIX + k: v for k, v in FLANNEL_LEASE_MARKER.items()}
            # The record of what was copied, so a release strips only these values (fabmesh/operator/flannel.py).
            flannel[FLANNEL_COPY_ANNOTATION] = copy_record(flannel)

    # Built once and shared: every edge that lists Y holds the same two Peer objects for Y (one per
    # initiate flag; the lower name initiates), so planning is O(edges + peer references) and
    # rendering caches per Peer. model_construct skips validation: every value here is already
    # canonical (from read_node and IPAM).
    pod_cidrs = {**{n.name: result.cidrs[n.name] for n in ready}, **{h: m.node.pod_cidr for h, m in held.items()}}
    own = {name: tuple(sorted({cidr, vetted[name].announced} - {None})) for name, cidr in pod_cidrs.items()}
    pins = dict.fromkeys(own, "") if keys is None else {name: keys[name] for name in own if keys.get(name)}
    initiator = {name: _peer(name=name, role=Role.EDGE, endpoint=vetted[name].endpoint, subnets=own[name],
                             initiate=True, pubkey=pin) for name, pin in pins.items()}
    responder = {name: _peer(name=name, role=Role.EDGE, endpoint=vetted[name].endpoint, subnets=own[name],
                             initiate=False, pubkey=pin) for name, pin in pins.items()}
    unpinned = len(pins) < len(own)  # some edge has no key yet: it is left out of every peer list
    connector_pin = "" if keys is None or connector is None else keys.get(connector.name, "")
    to_connector_peer = None if connector is None or (keys is not None and not connector_pin) else _peer(
        name=connector.name, role=Role.CONNECTOR, endpoint=connector.endpoint, subnets=to_connector, initiate=True,
        pubkey=connector_pin)
    # Hole punching needs a mediator every edge can dial and authenticate: the active connector's peer entry.
    mediator = to_connector_peer.name if settings.hole_punching and to_connector_peer is not None else None
    natted = {name for name in own if not (vetted[name].public if name not in held
                                           else not any(p.mediated_by for p in held[name].peers))}
    mediated_initiator = {name: p.model_copy(update={"mediated_by": mediator})
                          for name, p in initiator.items()} if mediator else {}
    mediated_responder = {name: p.model_copy(update={"mediated_by": mediator})
                          for name, p in responder.items()} if mediator else {}
    # Edges with a mediated peer: the connector serves them mediation. A held edge keeps its last config.
    clients = {h for h, m in held.items() if any(p.mediated_by for p in m.peers)}
    for node in ready:
        cidr = result.cidrs[node.name]
        before, after = community_peers_of(node.name, communities[node.name], members)
        if node.name in held_peers:
            ordered = sorted({*before, *after, *held_peers[node.name]})
            me = bisect.bisect_left(ordered, node.name)
            before, after = ordered[:me], ordered[me:]
        # Peers sorting before the node initiate to it (it responds); it initiates to those after.
        if unpinned:
            before, after = [n for n in before if n in pins], [n for n in after if n in pins]
        if mediator is None:
            peers = [*map(responder.__getitem__, before), *map(initiator.__getitem__, after)]
        elif node.name in natted:  # every community pair of a NATed edge is mediated
            peers = [*map(mediated_responder.__getitem__, before), *map(mediated_initiator.__getitem__, after)]
            if peers:
                clients.add(node.name)
        else:  # a public edge: mediated with NATed peers only
            peers = [*((mediated_responder if n in natted else responder)[n] for n in before),
                     *((mediated_initiator if n in natted else initiator)[n] for n in after)]
            if natted.intersection(before) or natted.intersection(after):
                clients.add(node.name)
        if to_connector_peer is not None:
            name = to_connector_peer.name  # peers are listed by name: the connector takes its place
            at = bisect.bisect(before, name) if name < node.name else len(before) + bisect.bisect(after, name)
            peers.insert(at, to_connector_peer)
        result.edges[node.name] = NodeMesh.model_construct(
            _fields_set=_FIELDS_SET[NodeMesh],
            node=LocalNode.model_construct(_fields_set=_FIELDS_SET[LocalNode], name=node.name, role=Role.EDGE,
                                           address=node.internal_ip, endpoint=node.endpoint, pod_cidr=cidr,
                                           communities=node.communities),
            local_subnets=own[node.name], mesh_cidrs=mesh_cidrs, peers=tuple(peers),
            ca_cert=ca_cert, tunnel=settings.tunnel, settings=settings.node)
        result.cert_addresses[node.name] = tuple(sorted({node.internal_ip, node.endpoint}))
        if node.deleting:
            continue  # going away: the release (fabmesh/operator/flannel.py) strips it, nothing is added
        annotations = {POD_CIDR_ANNOTATION: cidr, **flannel}
        # The finalizer comes in the same write as the copied keys: no moment where a deletion would
        # reach flanneld with the marker on (fabmesh/operator/flannel.py says why).
        held = not flannel or FLANNEL_FINALIZER in node.finalizers
        patch = NodePatch(
            annotations={k: v for k, v in annotations.items() if node.annotations.get(k) != v},
            spec_pod_cidr=cidr if not node.spec_pod_cidr else None,
            finalizers=None if held else (*node.finalizers, FLANNEL_FINALIZER))
        if patch.annotations or patch.spec_pod_cidr or patch.finalizers:
            result.node_patches[node.name] = patch

    result.connectors = tuple(n.name for n in connectors)
    for node in connectors:
        result.cert_addresses[node.name] = tuple(sorted({node.internal_ip, node.endpoint}))
    if connector is not None:
        result.connector = NodeMesh(
            # The connector's cloud pod CIDR gives it a source address inside the tunnels' selectors.
            node=LocalNode(name=connector.name, role=Role.CONNECTOR, address=connector.internal_ip,
                           endpoint=connector.endpoint, pod_cidr=connector.spec_pod_cidr),
            local_subnets=to_connector, mesh_cidrs=mesh_cidrs, peers=(),
            caCert=ca_cert, tunnel=settings.tunnel, settings=settings.node)
        shards: dict[int, list[Peer]] = {i: [] for i in range(settings.connector_shards)}
        for name in sorted(pins):
            # Seen from the connector an edge has no fixed address (NAT): it accepts it from anywhere.
            shards[shard_of(name, settings.connector_shards)].append(
                _peer(name=name, role=Role.EDGE, subnets=own[name], pubkey=pins[name],
                      mediation_client=name in clients))
        result.connector_shards = {i: tuple(peers) for i, peers in shards.items()}
    result.cloud = _cloud_routes(connector, [vetted[name].announced for name in pins], settings)
    return result


def _cloud_routes(connector: NodeInfo | None, announced: Sequence[str | None],
                  settings: OperatorSettings) -> CloudRoutes:
    """The route agents' document: every edge address the connector's tunnels carry, via the connector.

    Only vetted addresses are listed (the ones announced into the tunnels): an edge's kubelet must never
    pull a cloud node's traffic for another address towards the connector.
    """
    agent = settings.cloud_agent
    addresses = {str(ipaddress.ip_network(a)) for a in announced if a}
    subnets = addresses | ({settings.edge_pod_pool} if agent.route_edge_pod_cidrs else set())
    return CloudRoutes(
        connector=None if connector is None else ActiveConnector(name=connector.name, address=connector.internal_ip),
        subnets=_sorted_cidrs(subnets), no_snat=(settings.edge_pod_pool,),
        source_cidrs=tuple(sorted(settings.cloud_pod_cidrs)),
        settings=CloudRouteSettings(route_table=agent.route_table, resync_period_s=agent.resync_period_s))


def _sorted_cidrs(cidrs: set[str]) -> tuple[str, ...]:
    return tuple(sorted(cidrs, key=lambda c: (ipaddress.ip_network(c).version, ipaddress.ip_network(c))))


def _claim(node: NodeInfo, record: str | None, errors: list[InvalidNode]) -> Claim:
    """What IPAM reads of a Node: the record first; the annotation only on edges.

    A cloud kubelet can write ``fabmesh.io/pod-cidr`` on its own Node; read there it
    would outrank every edge (``10.233.0.0/16`` would drop them all), so only edges'
    annotations count. An edge's annotation that contradicts the record gets an Event
    and is rewritten; the record is kept.
    """
    if node.role is not Role.EDGE:
        return Claim(node.name, node.spec_pod_cidr, None, node.created, recorded=record)
    if record and node.pod_cidr_annotation and node.pod_cidr_annotation != record:
        errors.append(InvalidNode(node.name, ANNOTATION_FIELD,
                                  f"{node.pod_cidr_annotation} differs from the operator's record {record} "
                                  "(ConfigMap fabmesh-ipam), which is kept; the annotation is rewritten"))
    return Claim(node.name, node.spec_pod_cidr, node.pod_cidr_annotation, node.created, recorded=record)


def _held(last_good: Mapping[str, str], ready: set[str], recorded: Mapping[str, str]) -> dict[str, NodeMesh]:
    """Edges that exist but cannot be planned now, with the mesh their peers were last told about.

    Only a config whose pod CIDR is still the one recorded for the node counts: that CIDR stays
    taken in IPAM while the node exists, so its peers can keep routing it there.
    """
    held = {}
    for name in sorted(last_good.keys() - ready):
        try:
            mesh = parse_node_mesh(last_good[name], f"configmap of node {name}")
        except MeshConfigError:
            continue
        if mesh.node.name == name and mesh.node.pod_cidr and recorded.get(name) == mesh.node.pod_cidr:
            held[name] = mesh
    return held


def _announced_address(mesh: NodeMesh) -> str | None:
    """The node address an edge's config offered its peers (its /32 among its local subnets), if any."""
    host = str(ipaddress.ip_network(mesh.node.address))
    return mesh.node.address if host in mesh.local_subnets else None
