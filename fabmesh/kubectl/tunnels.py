"""What ``kubectl fabmesh tunnels NODE`` shows (pure): the node's reported tunnels with the path each carries.

The path says what a tunnel is for, from the peers' roles: a tunnel to the
connector carries the cloud (and, relayed, every edge outside the node's
communities); a tunnel between two edges is direct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fabmesh.kubectl.cluster import Obj, by_name, role_of
from fabmesh.mesh.model import Role
from fabmesh.mesh.tunnelstatus import NodeReport
from fabmesh.operator.settings import OperatorSettings


@dataclass(frozen=True)
class TunnelRow:
    peer: str
    state: str
    since: str | None
    local: str | None
    remote: str | None
    nat: str  # "local", "remote", "both" or "-"
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    path: str


def _nat(local: bool, remote: bool) -> str:
    return {(True, True): "both", (True, False): "local", (False, True): "remote"}.get((local, remote), "-")


def path_of(node_role: Role | None, peer_role: Role | None) -> str:
    if Role.CONNECTOR in (node_role, peer_role):
        return "cloud (connector)" if node_role is Role.EDGE else "edge"
    return "direct"


def tunnel_rows(node: str, report: NodeReport, nodes: Sequence[Obj], settings: OperatorSettings) -> list[TunnelRow]:
    named = by_name(nodes)
    mine = role_of(named[node], settings) if node in named else None
    return [TunnelRow(peer=t.peer, state=t.state.value, since=t.since, local=t.local_endpoint,
                      remote=t.remote_endpoint, nat=_nat(t.nat_local, t.nat_remote), bytes_in=t.bytes_in,
                      bytes_out=t.bytes_out, packets_in=t.packets_in, packets_out=t.packets_out,
                      path=path_of(mine, role_of(named[t.peer], settings) if t.peer in named else None))
            for t in report.tunnels]
