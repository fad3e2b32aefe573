"""Reading the cluster's objects for the kubectl plugin (pure): the facts status, doctor and graph share.

Inputs are the API's own JSON as plain dicts. Where a Node stands in the mesh
(role, communities, the active connector) is :mod:`fabmesh.mesh.topology`'s
rule, applied to the Node's labels exactly as the operator applies it.

A user without ``get secrets`` in the namespace still gets certificate dates:
the operator mirrors each edge's expiry in its ``fabmesh.io/status`` annotation
(``cidr=... communities=a,b cert-expires=ISO``), which is used instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fabmesh.mesh import topology
from fabmesh.mesh.model import MeshConfigError, NodeMesh, Role, parse_node_mesh, parse_peer_shard
from fabmesh.mesh.names import POD_CIDR_ANNOTATION, STATUS_ANNOTATION
from fabmesh.mesh.timestamps import parse_time
from fabmesh.mesh.tunnelstatus import NodeReport, config_generation, parse_report
from fabmesh.operator import objects as o
from fabmesh.operator.settings import OperatorSettings
from fabmesh.pki.authority import describe

Obj = dict[str, Any]

SHARD_PREFIX = o.CONNECTOR_SHARD_PREFIX


def name_of(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def labels_of(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def annotations_of(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def by_name(objs: Sequence[Obj]) -> dict[str, Obj]:
    return {name_of(obj): obj for obj in objs}



def role_of(node: Obj, settings: OperatorSettings) -> Role | None:
    """The node's role, or None when its labels contradict each other (the operator leaves it out)."""
    placed = topology.read_labels(labels_of(node), settings.label_keys)
    return None if isinstance(placed, topology.LabelError) else placed.role


def communities_of(node: Obj, settings: OperatorSettings) -> tuple[str, ...]:
    placed = topology.read_labels(labels_of(node), settings.label_keys)
    return () if isinstance(placed, topology.LabelError) else placed.communities


def internal_ip(node: Obj) -> str | None:
    for entry in (node.get("status") or {}).get("addresses") or []:
        if entry.get("type") == "InternalIP" and entry.get("address"):
            return str(entry["address"])
    return None


def pod_cidrs_of(node: Obj) -> tuple[str, ...]:
    """Every pod CIDR a Node records: ``spec.podCIDR(s)`` and the operator's annotation, deduplicated."""
    spec = node.get("spec") or {}
    values = [spec.get("podCIDR"), *(spec.get("podCIDRs") or []), annotations_of(node).get(POD_CIDR_ANNOTATION)]
    return tuple(dict.fromkeys(v for v in values if v))


def active_connector(nodes: Sequence[Obj], settings: OperatorSettings) -> Obj | None:
    connectors = {name_of(n): n for n in nodes if role_of(n, settings) is Role.CONNECTOR}
    name = topology.active_connector({n: created_of(obj) for n, obj in connectors.items()})
    return connectors[name] if name is not None else None


def created_of(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("creationTimestamp") or ""


def parse_status_annotation(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def annotated_cert_expiry(node: Obj) -> datetime | None:
    """The edge's certificate expiry as the operator mirrors it in the status annotation."""
    return parse_time(parse_status_annotation(annotations_of(node).get(STATUS_ANNOTATION, "")).get("cert-expires"))


def read_mesh(configmap: Obj | None) -> NodeMesh | MeshConfigError | None:
    """An edge's ``mesh.yaml``: the model, the reason it cannot be read, or None when there is none."""
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get("mesh.yaml")
    if text is None:
        return MeshConfigError(name_of(configmap), "data", "no mesh.yaml key")
    try:
        return parse_node_mesh(text, name_of(configmap))
    except MeshConfigError as exc:
        return exc


def connector_peer_count(configmaps: Mapping[str, Obj]) -> int | None:
    """Peers across the connector's shards; None when no shard exists or one cannot be read."""
    shards = [cm for name, cm in configmaps.items() if name.startswith(SHARD_PREFIX)]
    if not shards:
        return None
    try:
        return sum(len(parse_peer_shard((cm.get("data") or {}).get("peers.yaml", ""), name_of(cm)).peers)
                   for cm in shards)
    except MeshConfigError:
        return None


def cert_secret_name(node: Obj, settings: OperatorSettings) -> str | None:
    """The Secret holding the node's leaf: every edge and every connector (active or standby) has one."""
    role = role_of(node, settings)
    if role is Role.EDGE:
        return o.tls_secret_name(name_of(node))
    if role is Role.CONNECTOR:
        return o.connector_secret_name(name_of(node))
    return None


def cert_not_after(secret: Obj) -> datetime:
    """The expiry of the Secret's ``tls.crt``; ValueError (or PKIError) when it is not readable."""
    raw = (secret.get("data") or {}).get("tls.crt")
    if not raw:
        raise ValueError("no tls.crt")
    try:
        pem = base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"tls.crt is not base64: {exc}") from exc
    return describe(pem).not_after




def agent_pods_by_node(pods: Sequence[Obj]) -> dict[str, Obj]:
    found: dict[str, Obj] = {}
    for pod in pods:
        node = labels_of(pod).get(o.NODE_LABEL) or (pod.get("spec") or {}).get("nodeName")
        if node and labels_of(pod).get(o.KIND_LABEL, "agent") == "agent":
            found[node] = pod
    return found


def pod_phase(pod: Obj) -> str:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    return (pod.get("status") or {}).get("phase") or "Unknown"



@dataclass(frozen=True)
class Observed:
    """A node's TunnelStatus as read: its report and the API server's time of the last status write."""

    report: NodeReport
    server_time: datetime | None  # from metadata.managedFields (the API server's clock)


def _written_by_server(obj: Obj) -> datetime | None:
    times = [parse_time(m.get("time")) for m in (obj.get("metadata") or {}).get("managedFields") or []
             if m.get("subresource") == "status"]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def last_write(obj: Obj) -> datetime | None:
    """When the API server last recorded a write of ``obj`` (any manager), from ``managedFields``."""
    times = [parse_time(m.get("time")) for m in (obj.get("metadata") or {}).get("managedFields") or []]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def observed_by_node(statuses: Sequence[Obj] | None) -> dict[str, Observed]:
    """TunnelStatus objects by node name; those without a readable status are left out."""
    found = {}
    for obj in statuses or []:
        report = parse_report(obj)
        if report is not None:
            found[name_of(obj)] = Observed(report, _written_by_server(obj))
    return found


def wanted_generation(node: Obj, settings: OperatorSettings, configmaps: Mapping[str, Obj],
                      is_active_connector: bool) -> tuple[str | None, datetime | None]:
    """The generation the node should apply (digest of its ConfigMaps' files), and when they were last written."""
    role = role_of(node, settings)
    if role is Role.EDGE:
        cm = configmaps.get(o.agent_configmap_name(name_of(node)))
        if cm is None or "mesh.yaml" not in (cm.get("data") or {}):
            return None, None
        return config_generation({"mesh.yaml": cm["data"]["mesh.yaml"]}), last_write(cm)
    if role is Role.CONNECTOR and is_active_connector:
        header = configmaps.get(o.CONNECTOR_CONFIGMAP)
        if header is None or "mesh.yaml" not in (header.get("data") or {}):
            return None, None
        files = {"mesh.yaml": header["data"]["mesh.yaml"]}
        written = [last_write(header)]
        for name, cm in configmaps.items():
            if name.startswith(SHARD_PREFIX) and "peers.yaml" in (cm.get("data") or {}):
                files[f"peers-{name.rsplit('-', 1)[1]}.yaml"] = cm["data"]["peers.yaml"]
                written.append(last_write(cm))
        known = [w for w in written if w is not None]
        return config_generation(files), max(known) if known else None
    return None, None
