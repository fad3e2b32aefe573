"""What ``fabmesh status`` shows (pure): one row per Node, and the tunnels up per agent from its metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from fabmesh.kubectl import cluster
from fabmesh.kubectl.cluster import Obj, name_of, role_of
from fabmesh.mesh.model import NodeMesh, Role
from fabmesh.mesh.timestamps import format_time
from fabmesh.operator import objects as o
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import PKIError

TUNNEL_UP_METRIC = "fabmesh_tunnel_up"


def count_tunnels_up(metrics_text: str) -> int:
    """Peers whose ``fabmesh_tunnel_up`` is 1 in an agent's Prometheus text; ValueError if it is not that."""
    up = 0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == TUNNEL_UP_METRIC:
            up += sum(1 for sample in family.samples if sample.name == TUNNEL_UP_METRIC and sample.value == 1)
    return up


def metrics_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def metrics_targets(nodes: Sequence[Obj], settings: OperatorSettings, port: int) -> dict[str, str]:
    """Node -> metrics URL for every node that runs the node loop (edges and the active connector)."""
    connector = cluster.active_connector(nodes, settings)
    targets = {}
    for node in nodes:
        ip = cluster.internal_ip(node)
        runs_loop = role_of(node, settings) is Role.EDGE or node is connector
        if ip and runs_loop:
            targets[name_of(node)] = metrics_url(ip, port)
    return targets



@dataclass(frozen=True)
class StatusRow:
    name: str
    role: Role | None  # None: labels that contradict each other (the operator leaves the node out)
    pod_cidr: str | None
    communities: tuple[str, ...]
    cert_expires: str | None
    agent: str | None
    peers: int | None
    tunnels_up: int | None
    tunnels_expected: int | None = None  # from the node's TunnelStatus
    generation_wanted: str | None = None  # digest of the node's ConfigMaps
    generation_applied: str | None = None  # what the node reports it applied
    last_error: str | None = None
    status_age_s: int | None = None  # seconds since the node last wrote its TunnelStatus (API server's clock)


def _cert_expires(node: Obj, secret_name: str | None, secrets: Mapping[str, Obj] | None) -> str | None:
    if secret_name is None:
        return None
    if secrets is None:  # not allowed to read Secrets: the operator's annotation says the same
        moment = cluster.annotated_cert_expiry(node)
        return format_time(moment) if moment else None
    secret = secrets.get(secret_name)
    if secret is None:
        return None
    try:
        return format_time(cluster.cert_not_after(secret))
    except (ValueError, PKIError):
        return "unreadable"


def status_rows(nodes: Sequence[Obj], configmaps: Sequence[Obj], secrets: Sequence[Obj] | None,
                pods: Sequence[Obj], settings: OperatorSettings,
                tunnels_up: Mapping[str, int] | None = None,
                observed: Mapping[str, cluster.Observed] | None = None,
                server_now: datetime | None = None) -> list[StatusRow]:
    """One row per Node, sorted by name; ``secrets`` None means they could not be read.

    ``observed`` are the nodes' TunnelStatus reports: tunnels up and expected, generation applied and
    last error come from there (``tunnels_up``, from metrics, only fills in for a node without one).
    """
    cms = cluster.by_name(configmaps)
    secs = cluster.by_name(secrets) if secrets is not None else None
    agents = cluster.agent_pods_by_node(pods)
    connector = cluster.active_connector(nodes, settings)
    rows = []
    for node in sorted(nodes, key=name_of):
        name, role = name_of(node), role_of(node, settings)
        peers: int | None = None
        if role is Role.EDGE:
            mesh = cluster.read_mesh(cms.get(o.agent_configmap_name(name)))
            peers = len(mesh.peers) if isinstance(mesh, NodeMesh) else None
        elif node is connector:
            peers = cluster.connector_peer_count(cms)
        pod = agents.get(name)
        cidrs = cluster.pod_cidrs_of(node)
        seen = (observed or {}).get(name)
        wanted, _ = cluster.wanted_generation(node, settings, cms, node is connector)
        up = (tunnels_up or {}).get(name)
        age = None
        if seen is not None:
            up = seen.report.tunnels_up
            if seen.server_time is not None and server_now is not None:
                age = max(0, int((server_now - seen.server_time).total_seconds()))
        rows.append(StatusRow(
            name=name, role=role, pod_cidr=cidrs[0] if cidrs else None,
            communities=cluster.communities_of(node, settings),
            cert_expires=_cert_expires(node, cluster.cert_secret_name(node, settings), secs),
            agent=cluster.pod_phase(pod) if pod is not None and role is Role.EDGE else None,
            peers=peers, tunnels_up=up, tunnels_expected=seen.report.tunnels_expected if seen else None,
            generation_wanted=wanted, generation_applied=seen.report.config_generation if seen else None,
            last_error=(seen.report.last_error or None) if seen else None, status_age_s=age))
    return rows


