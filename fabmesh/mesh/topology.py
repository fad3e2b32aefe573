"""The topology rules, once: who is what, which pairs get a direct tunnel, which way a pair's packets go.

Pure. The operator's planner, the kubectl plugin (status, doctor, graph) and
the lab all call these functions; none of them may restate a rule. The rules:

* A Node is an edge when it carries the edge label, a connector when it
  carries the connector label, else a plain cloud node. Both labels at once is
  an error on that node (it is left out of the mesh, never guessed).
* Only edges are in communities (``<prefix><name>=``, the name a DNS label);
  community labels on other nodes have no effect.
* The active connector is the oldest connector Node (by creationTimestamp,
  then name): a node labelled later never takes over from a working one, and
  a name chosen to sort first gains nothing. The others stand by.
* Two edges sharing a community get a direct tunnel, initiated by the one
  whose name sorts first; every edge has a tunnel to the active connector,
  which it initiates (edges sit behind NAT).
* A pod-to-pod path is ``direct`` between edges with a direct tunnel,
  ``relayed`` (through the connector) between edges without one, ``cloud``
  when one end is a cloud or connector node, ``local`` on one node.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fabmesh.mesh import names
from fabmesh.mesh.model import Role

_COMMUNITY = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Path(StrEnum):
    """The way a pair's packets go: what the rules intend, and what a probe observes."""

    DIRECT = "direct"
    RELAYED = "relayed"
    CLOUD = "cloud"
    LOCAL = "local"
    NONE = "none"  # observed only: no tunnel on the way counted the probe


@dataclass(frozen=True)
class LabelKeys:
    """Which Node labels mean what (the operator's settings may rename them)."""

    edge: str = names.EDGE_LABEL
    connector: str = names.CONNECTOR_LABEL
    community_prefix: str = names.COMMUNITY_LABEL_PREFIX


@dataclass(frozen=True)
class LabelError:
    field: str
    reason: str


@dataclass(frozen=True)
class NodeLabels:
    """What a Node's labels say about its place in the mesh."""

    role: Role
    communities: tuple[str, ...] = ()


def read_labels(labels: Mapping[str, str], keys: LabelKeys) -> NodeLabels | LabelError:
    is_edge, is_connector = keys.edge in labels, keys.connector in labels
    if is_edge and is_connector:
        return LabelError(f"metadata.labels[{keys.connector}]",
                          f"a node cannot be both edge ({keys.edge}) and connector")
    role = Role.EDGE if is_edge else Role.CONNECTOR if is_connector else Role.CLOUD
    if role is not Role.EDGE:
        return NodeLabels(role)
    communities = []
    for key in sorted(labels):
        if not key.startswith(keys.community_prefix):
            continue
        community = key[len(keys.community_prefix):]
        if not _COMMUNITY.match(community):
            return LabelError(f"metadata.labels[{key}]", f"community name {community!r} must be a lowercase DNS label")
        communities.append(community)
    return NodeLabels(role, tuple(communities))


def active_connector(connectors: Mapping[str, str]) -> str | None:
    """``connectors`` maps each connector Node's name to its creationTimestamp (RFC 3339, UTC)."""
    return min(connectors, key=lambda name: (connectors[name], name), default=None)


def initiates(node: str, peer: str) -> bool:
    """Of two edges with a direct tunnel, the one whose name sorts first initiates."""
    return node < peer


def community_members(communities: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Community -> its member edges, sorted."""
    members: dict[str, list[str]] = defaultdict(list)
    for node in sorted(communities):
        for community in communities[node]:
            members[community].append(node)
    return dict(members)


def community_peers_of(node: str, joined: Sequence[str],
                       members: Mapping[str, Sequence[str]]) -> tuple[Sequence[str], Sequence[str]]:
    """The edges ``node`` shares a community with: (those that initiate to it, those it initiates to).

    The split sits at the node's own place in the sorted members, which is :func:`initiates`'s
    rule. A node in one community gets slices of that community's list: at 5,000 edges in 100
    communities nothing per peer is built, which keeps ``plan()`` within its budget.
    """
    if not joined:
        return (), ()
    ordered = members[joined[0]] if len(joined) == 1 else sorted(set().union(*(members[c] for c in joined)))
    me = bisect.bisect_left(ordered, node)
    return ordered[:me], ordered[me + 1:]


def community_peers(communities: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Edge -> the edges it shares a community with, sorted; edges with none map to ()."""
    members = community_members(communities)
    peers = {}
    for node, joined in communities.items():
        before, after = community_peers_of(node, joined, members)
        peers[node] = (*before, *after)
    return peers


def shares_community(a: Sequence[str], b: Sequence[str]) -> bool:
    return not set(a).isdisjoint(b)


def expected_tunnels(roles: Mapping[str, Role], communities: Mapping[str, Sequence[str]],
                     connector: str | None) -> dict[str, set[str]]:
    """Node -> the peers it has a tunnel with: the active connector and every edge, each edge its peers."""
    edges = {n: tuple(communities.get(n, ())) for n, r in roles.items() if r is Role.EDGE}
    peers = community_peers(edges)
    expected = {edge: set(peers[edge]) | ({connector} if connector else set()) for edge in edges}
    if connector is not None:
        expected[connector] = set(edges)
    return expected


def intended_path(src: str, dst: str, roles: Mapping[str, Role | None],
                  communities: Mapping[str, Sequence[str]]) -> Path:
    """The path the rules give a packet from a pod on ``src`` to a pod on ``dst``."""
    if src == dst:
        return Path.LOCAL
    if roles.get(src) is Role.EDGE and roles.get(dst) is Role.EDGE:
        if shares_community(communities.get(src, ()), communities.get(dst, ())):
            return Path.DIRECT
        return Path.RELAYED
    return Path.CLOUD
