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
* More than one connector is accepted; the ones not active stay idle until
  failover is built.
"""

from __future__ import annotations

import bisect
import ipaddress
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from fabmesh.mesh.model import LocalNode, NodeMesh, Peer, Role
from fabmesh.mesh.names import FLANNEL_KEYS, FLANNEL_PREFIX, POD_CIDR_ANNOTATION
from fabmesh.mesh.topology import active_connector, community_members, community_peers_of
from fabmesh.operator.inventory import InvalidNode, NodeInfo
from fabmesh.operator.ipam import Claim, plan_cidrs
from fabmesh.operator.settings import OperatorSettings


@dataclass(frozen=True, slots=True)
class NodePatch:
    """What the operator records on a Node object (only keys that must change are applied)."""

    annotations: dict[str, str] = field(default_factory=dict)
    spec_pod_cidr: str | None = None


@dataclass
class MeshPlan:
    errors: list[InvalidNode] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cidrs: dict[str, str] = field(default_factory=dict)
    allocated: dict[str, str] = field(default_factory=dict)
    ipam_record: dict[str, str] = field(default_factory=dict)
    edges: dict[str, NodeMesh] = field(default_factory=dict)
    connector: NodeMesh | None = None  # header only: peers live in the shards
    connector_shards: dict[int, tuple[Peer, ...]] = field(default_factory=dict)
    cert_addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    node_patches: dict[str, NodePatch] = field(default_factory=dict)

    def connector_mesh(self) -> NodeMesh | None:
        """The connector's full mesh: its header plus every shard's peers."""
        if self.connector is None:
            return None
        peers = tuple(sorted((p for s in self.connector_shards.values() for p in s), key=lambda p: p.name))
        return self.connector.model_copy(update={"peers": peers})


def shard_of(name: str, shards: int) -> int:
    return zlib.crc32(name.encode()) % shards


def _host(ip: str) -> str:
    return str(ipaddress.ip_network(ip))


# One fields-set per model kind (every field counts as set: model_construct fills the defaults),
# shared by every instance the planner builds: pydantic copies it on model_copy, never changes it
# on a frozen model, and leaves it out of ==. That is ~25,000 fewer sets for the collector to scan.
_FIELDS_SET: dict[type, set[str]] = {kind: set(kind.model_fields) for kind in (Peer, LocalNode, NodeMesh)}


def _peer(**values: object) -> Peer:
    return Peer.model_construct(_fields_set=_FIELDS_SET[Peer], **values)


def pin_certificates(mesh: MeshPlan, leaves: Mapping[str, str]) -> MeshPlan:
    """The plan with every peer pinned to its node's current leaf (``Peer.cert``).

    Separate from :func:`plan` because the leaves are known only once the certificates
    planned from ``plan().cert_addresses`` are issued. A peer whose node has no leaf is
    left out (fail closed: nothing could authenticate as it, and an unpinned peer would
    accept any key the CA ever signed for that name). Shared ``Peer`` objects stay
    shared: one pinned copy is made per planned object.
    """
    pinned: dict[int, Peer | None] = {}
    for peers in (*(m.peers for m in mesh.edges.values()), *mesh.connector_shards.values()):
        for peer in peers:
            if id(peer) not in pinned:
                cert = leaves.get(peer.name)
                pinned[id(peer)] = peer.model_copy(update={"cert": cert}) if cert else None

    def pin(peers: tuple[Peer, ...]) -> tuple[Peer, ...]:
        out = tuple(map(pinned.__getitem__, map(id, peers)))
        return out if None not in out else tuple(p for p in out if p is not None)

    edges = {name: m.model_copy(update={"peers": pin(m.peers)}) for name, m in mesh.edges.items()}
    shards = {i: pin(peers) for i, peers in mesh.connector_shards.items()}
    return replace(mesh, edges=edges, connector_shards=shards)


def plan(nodes: Sequence[NodeInfo], settings: OperatorSettings, ca_cert: str,
         recorded: Mapping[str, str] | None = None) -> MeshPlan:
    """Everything the operator should write, given the cluster as it is.

    ``recorded`` is the IPAM record (node -> CIDR) kept in the operator's own
    ConfigMap: the durable truth for allocations not yet mirrored on a Node.

    Cost at 10,000 nodes is dominated by the objects that outlive the call: every one of them
    is a container the cyclic garbage collector rescans in each full collection. So each edge
    is built as one shared ``Peer`` per initiate flag, every model of a kind shares one
    fields-set (no set per instance), and per-edge peer lists are cut from per-community
    sorted name lists rather than built element by element.
    """
    result = MeshPlan()
    recorded = dict(recorded or {})
    by_name = {n.name: n for n in sorted(nodes, key=lambda n: n.name)}
    edges = [n for n in by_name.values() if n.role is Role.EDGE]
    connectors = [n for n in by_name.values() if n.role is Role.CONNECTOR]

    claims = [Claim(node=n.name, spec_pod_cidr=n.spec_pod_cidr,
                    annotation=n.pod_cidr_annotation or recorded.get(n.name), created=n.created)
              for n in by_name.values()]
    ipam = plan_cidrs(settings.edge_pod_pool, settings.edge_pod_prefix_len, claims,
                      want=[n.name for n in edges],
                      reserved=(*settings.cloud_pod_cidrs, settings.service_cidr))
    for error in ipam.errors:
        result.errors.append(InvalidNode(error.node, error.field, error.reason))
    result.cidrs = {**ipam.assigned, **ipam.allocated}
    result.allocated = dict(ipam.allocated)
    # Keep the record of every existing node (even one in error: its CIDR stays taken);
    # a deleted node's entry is dropped, which frees its CIDR.
    result.ipam_record = {n: c for n, c in recorded.items() if n in by_name} | result.cidrs

    ready = [n for n in edges if n.name in result.cidrs]
    connector_name = active_connector({n.name: n.created for n in connectors})
    connector = by_name[connector_name] if connector_name is not None else None
    if connector is None and ready:
        result.warnings.append("no node carries the connector label "
                               f"{settings.connector_label}: edges reach only their community peers")

    cloud_side = tuple(sorted({*settings.cloud_pod_cidrs, settings.service_cidr, *settings.cloud_node_cidrs}))
    mesh_cidrs = tuple(sorted({*settings.cloud_pod_cidrs, settings.service_cidr, settings.edge_pod_pool}))
    to_connector = tuple(sorted({*cloud_side, settings.edge_pod_pool}))

    members = community_members({n.name: n.communities for n in ready})

    flannel = {}
    if connector is not None:
        missing = [k for k in FLANNEL_KEYS if k not in connector.flannel]
        if missing:
            result.errors.append(InvalidNode(
                connector.name, f"metadata.annotations[{FLANNEL_PREFIX}{missing[0]}]",
                "the connector has no flannel annotations yet: cloud nodes cannot route edge pod "
                "CIDRs to it (is flanneld running there?)"))
        else:
            flannel = {FLANNEL_PREFIX + k: connector.flannel[k] for k in FLANNEL_KEYS}

    # Built once and shared: every edge that lists Y holds the same two Peer objects for Y (one per
    # initiate flag; the lower name initiates), so planning is O(edges + peer references) and
    # rendering caches per Peer. model_construct skips validation: every value here is already
    # canonical (from read_node and IPAM).
    own = {n.name: tuple(sorted({result.cidrs[n.name], _host(n.internal_ip)})) for n in ready}
    initiator = {n.name: _peer(name=n.name, role=Role.EDGE, endpoint=n.endpoint, subnets=own[n.name], initiate=True)
                 for n in ready}
    responder = {n.name: _peer(name=n.name, role=Role.EDGE, endpoint=n.endpoint, subnets=own[n.name],
                               initiate=False) for n in ready}
    to_connector_peer = None if connector is None else _peer(
        name=connector.name, role=Role.CONNECTOR, endpoint=connector.endpoint, subnets=to_connector, initiate=True)
    for node in ready:
        cidr = result.cidrs[node.name]
        before, after = community_peers_of(node.name, node.communities, members)
        # Peers sorting before the node initiate to it (it responds); it initiates to those after.
        peers = [*map(responder.__getitem__, before), *map(initiator.__getitem__, after)]
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
        annotations = {POD_CIDR_ANNOTATION: cidr, **flannel}
        patch = NodePatch(
            annotations={k: v for k, v in annotations.items() if node.annotations.get(k) != v},
            spec_pod_cidr=cidr if not node.spec_pod_cidr else None)
        if patch.annotations or patch.spec_pod_cidr:
            result.node_patches[node.name] = patch

    if connector is not None:
        result.cert_addresses[connector.name] = tuple(sorted({connector.internal_ip, connector.endpoint}))
        result.connector = NodeMesh(
            # The connector's cloud pod CIDR gives it a source address inside the tunnels' selectors.
            node=LocalNode(name=connector.name, role=Role.CONNECTOR, address=connector.internal_ip,
                           endpoint=connector.endpoint, pod_cidr=connector.spec_pod_cidr),
            local_subnets=to_connector, mesh_cidrs=mesh_cidrs, peers=(),
            caCert=ca_cert, tunnel=settings.tunnel, settings=settings.node)
        shards: dict[int, list[Peer]] = {i: [] for i in range(settings.connector_shards)}
        for node in ready:
            # Seen from the connector an edge has no fixed address (NAT): it accepts it from anywhere.
            shards[shard_of(node.name, settings.connector_shards)].append(
                _peer(name=node.name, role=Role.EDGE, subnets=own[node.name]))
        result.connector_shards = {i: tuple(peers) for i, peers in shards.items()}
    return result
