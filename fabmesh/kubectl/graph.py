"""The mesh as Graphviz DOT (pure): who has a tunnel to whom, and who is relayed through the connector.

Solid edges are the tunnels the operator planned (each edge's ConfigMap peers,
so the picture shows what agents are told, not what labels suggest). Edge
pairs that share no community have no tunnel: their traffic is relayed by the
connector, drawn as a dashed edge. Communities are Graphviz clusters; a node
can sit in one cluster only, so a node in several communities is drawn once,
outside them, with its communities in its label.

With the nodes' TunnelStatus reports (``observed``) each tunnel is coloured by
what its two ends report: green when both (or the one that reports) say up,
red with the state otherwise, grey when nobody reported it. A relayed pair
that shares a community (it should have a direct tunnel) is drawn orange.

The relayed edges grow with the square of the number of edges: fine for the
picture of a lab or a site, not meant for a 10,000-node cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from fabmesh.kubectl.cluster import (
    Obj,
    Observed,
    active_connector,
    by_name,
    communities_of,
    name_of,
    read_mesh,
    role_of,
)
from fabmesh.mesh.model import NodeMesh, Role
from fabmesh.mesh.topology import Path, intended_path, shares_community
from fabmesh.mesh.tunnelstatus import TunnelState
from fabmesh.operator import objects as o
from fabmesh.operator.settings import OperatorSettings

SHAPES = {Role.EDGE: "ellipse", Role.CONNECTOR: "hexagon", Role.CLOUD: "box"}
STYLES = {Role.EDGE: "", Role.CONNECTOR: ", style=filled, fillcolor=lightblue", Role.CLOUD: ", style=rounded"}


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_statement(node: Obj, settings: OperatorSettings, indent: str) -> str:
    role = role_of(node, settings)
    if role is None:  # contradicting labels: the operator leaves it out of the mesh
        label = quote(f"{name_of(node)}\ninvalid labels")
        return f"{indent}{quote(name_of(node))} [shape=octagon, color=red, label={label}];"
    communities = communities_of(node, settings)
    lines = [name_of(node), role.value]
    if len(communities) > 1:
        lines.append("communities: " + ", ".join(communities))
    return f"{indent}{quote(name_of(node))} [shape={SHAPES[role]}{STYLES[role]}, label={quote(chr(10).join(lines))}];"


def tunnels(nodes: Sequence[Obj], configmaps: Sequence[Obj], settings: OperatorSettings) -> set[tuple[str, str]]:
    """Unordered pairs (sorted names) with a tunnel in some edge's ConfigMap, to nodes that exist."""
    cms = by_name(configmaps)
    present = {name_of(n) for n in nodes}
    pairs = set()
    for node in nodes:
        if role_of(node, settings) is not Role.EDGE:
            continue
        mesh = read_mesh(cms.get(o.agent_configmap_name(name_of(node))))
        if not isinstance(mesh, NodeMesh):
            continue
        for peer in mesh.peers:
            if peer.name in present and peer.name != name_of(node):
                a, b = sorted((name_of(node), peer.name))
                pairs.add((a, b))
    return pairs


def observed_state(a: str, b: str, observed: Mapping[str, Observed]) -> TunnelState | None:
    """The worse of what ``a`` says of ``b`` and ``b`` of ``a``; None when neither reports the tunnel."""
    states = [t.state for me, other in ((a, b), (b, a)) if me in observed
              for t in observed[me].report.tunnels if t.peer == other]
    if not states:
        return None
    return next((s for s in states if s is not TunnelState.UP), TunnelState.UP)


def _tunnel_style(state: TunnelState | None) -> str:
    if state is None:
        return ""
    if state is TunnelState.UP:
        return " [color=green3, penwidth=2]"
    return f" [color=red, penwidth=2, fontcolor=red, label={quote(state.value)}]"


@dataclass(frozen=True)
class GraphEdge:
    """One line of the picture: a planned tunnel (with what its ends report) or a pair relayed by the connector."""

    a: str
    b: str
    kind: str  # "tunnel" or "relayed"
    state: TunnelState | None = None  # tunnels: the worse of what the two ends report; None: nobody reports it
    via: str | None = None  # relayed: the connector
    instead_of_direct: bool = False  # relayed although the pair shares a community

    def as_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "kind": self.kind, "state": self.state.value if self.state else None,
                "via": self.via, "insteadOfDirect": self.instead_of_direct}


def graph_edges(nodes: Sequence[Obj], configmaps: Sequence[Obj], settings: OperatorSettings,
                observed: Mapping[str, Observed] | None = None) -> list[GraphEdge]:
    """Every edge of the picture, sorted: the planned tunnels, then the relayed pairs (what DOT and JSON draw)."""
    ordered = sorted(nodes, key=name_of)
    direct = tunnels(ordered, configmaps, settings)
    seen = observed or {}
    out = [GraphEdge(a, b, "tunnel", observed_state(a, b, seen)) for a, b in sorted(direct)]
    connector = active_connector(ordered, settings)
    if connector is None:
        return out
    communities = {name_of(n): communities_of(n, settings) for n in ordered}
    roles = {name_of(n): role_of(n, settings) for n in ordered}
    edges = [name for name, role in roles.items() if role is Role.EDGE]
    for a, b in combinations(edges, 2):
        if (a, b) in direct:
            continue
        if shares_community(communities[a], communities[b]):
            # Planned direct but in no ConfigMap (no usable endpoint): relayed instead of direct.
            out.append(GraphEdge(a, b, "relayed", via=name_of(connector), instead_of_direct=True))
        elif intended_path(a, b, roles, communities) is Path.RELAYED:
            out.append(GraphEdge(a, b, "relayed", via=name_of(connector)))
    return out


def _role_name(role: Role | None) -> str:
    return role.value if role is not None else "invalid"


def mesh_json(nodes: Sequence[Obj], configmaps: Sequence[Obj], settings: OperatorSettings,
              observed: Mapping[str, Observed] | None = None) -> dict[str, Any]:
    """``graph --output json``: the nodes (role, communities) and :func:`graph_edges`."""
    return {"version": 1,
            "nodes": [{"name": name_of(n), "role": _role_name(role_of(n, settings)),
                       "communities": list(communities_of(n, settings))} for n in sorted(nodes, key=name_of)],
            "edges": [e.as_json() for e in graph_edges(nodes, configmaps, settings, observed)]}


def mesh_dot(nodes: Sequence[Obj], configmaps: Sequence[Obj], settings: OperatorSettings,
             observed: Mapping[str, Observed] | None = None) -> str:
    """The whole mesh as one undirected DOT graph; the same cluster always gives the same text."""
    ordered = sorted(nodes, key=name_of)
    communities = {name_of(n): communities_of(n, settings) for n in ordered}
    clusters: dict[str, list[Obj]] = {}
    for node in ordered:
        if len(communities[name_of(node)]) == 1:
            clusters.setdefault(communities[name_of(node)][0], []).append(node)
    out = ["graph fabmesh {",
           '  graph [label="fabmesh mesh", labelloc=t, fontname="Helvetica", rankdir=LR];',
           '  node [fontname="Helvetica"];',
           '  edge [fontname="Helvetica", fontsize=10];']
    for community, members in sorted(clusters.items()):
        out.append(f"  subgraph {quote('cluster_' + community)} {{")
        out.append(f"    label={quote('community ' + community)}; style=dashed; color=gray40;")
        out.extend(_node_statement(n, settings, "    ") for n in members)
        out.append("  }")
    out.extend(_node_statement(n, settings, "  ") for n in ordered if len(communities[name_of(n)]) != 1)

    for e in graph_edges(ordered, configmaps, settings, observed):
        if e.kind == "tunnel":
            out.append(f"  {quote(e.a)} -- {quote(e.b)}{_tunnel_style(e.state)};")
        elif e.instead_of_direct:
            out.append(f"  {quote(e.a)} -- {quote(e.b)} [style=dashed, color=orange, fontcolor=orange, "
                       f"label={quote(f'relayed via {e.via}, not direct')}];")
        else:
            out.append(f"  {quote(e.a)} -- {quote(e.b)} [style=dashed, color=gray50, "
                       f"label={quote(f'relayed via {e.via}')}];")
    out.append("}")
    return "\n".join(out) + "\n"
