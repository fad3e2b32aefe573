"""From Kubernetes Node objects (plain JSON dicts) to the facts the planner needs.

Pure. Every problem with one Node becomes an :class:`InvalidNode` naming the
node and the field; the node is left out of the mesh and every other node is
planned as usual.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from fabmesh.mesh.model import Role
from fabmesh.operator.settings import OperatorSettings

POD_CIDR_ANNOTATION = "fabmesh.io/pod-cidr"
STATUS_ANNOTATION = "fabmesh.io/status"
FLANNEL_PREFIX = "flannel.alpha.coreos.com/"
FLANNEL_KEYS = ("backend-type", "backend-data", "public-ip")

_COMMUNITY = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class InvalidNode:
    node: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"node={self.node} field={self.field}: {self.reason}"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    role: Role
    internal_ip: str
    external_ip: str | None
    communities: tuple[str, ...]
    spec_pod_cidr: str | None
    pod_cidr_annotation: str | None
    created: str
    uid: str
    resource_version: str
    flannel: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def endpoint(self) -> str:
        """Where peers reach this node's IKE daemon."""
        return self.external_ip or self.internal_ip


def _address(node: str, addresses: list[dict[str, Any]], kind: str) -> tuple[str | None, InvalidNode | None]:
    for i, entry in enumerate(addresses):
        if entry.get("type") != kind:
            continue
        raw = entry.get("address", "")
        try:
            return str(ipaddress.ip_address(raw)), None
        except ValueError:
            return None, InvalidNode(node, f"status.addresses[{i}]", f"{kind} {raw!r} is not an IP address")
    return None, None


def read_node(obj: dict[str, Any], settings: OperatorSettings) -> NodeInfo | InvalidNode:
    meta = obj.get("metadata", {})
    name = meta.get("name", "")
    labels: dict[str, str] = meta.get("labels") or {}
    annotations: dict[str, str] = meta.get("annotations") or {}
    is_edge = settings.edge_label in labels
    is_connector = settings.connector_label in labels
    if is_edge and is_connector:
        return InvalidNode(name, f"metadata.labels[{settings.connector_label}]",
                           f"a node cannot be both edge ({settings.edge_label}) and connector")
    role = Role.EDGE if is_edge else Role.CONNECTOR if is_connector else Role.CLOUD
    communities = []
    for key in sorted(labels):
        if not key.startswith(settings.community_label_prefix):
            continue
        community = key[len(settings.community_label_prefix):]
        if not _COMMUNITY.match(community):
            return InvalidNode(name, f"metadata.labels[{key}]",
                               f"community name {community!r} must be a lowercase DNS label")
        communities.append(community)
    if communities and role is not Role.EDGE:
        # Only edges form communities: the labels are ignored here, silently (no error, no Event).
        communities = []
    addresses = (obj.get("status") or {}).get("addresses") or []
    internal, error = _address(name, addresses, "InternalIP")
    if error:
        return error
    external, error = _address(name, addresses, "ExternalIP")
    if error:
        return error
    if internal is None:
        if role is Role.CLOUD:
            internal = "0.0.0.0"  # a cloud node without an address cannot be routed to; ignore it
        else:
            return InvalidNode(name, "status.addresses", "no InternalIP: cannot build a tunnel")
    spec_cidr = (obj.get("spec") or {}).get("podCIDR") or None
    return NodeInfo(
        name=name, role=role, internal_ip=internal, external_ip=external,
        communities=tuple(communities), spec_pod_cidr=spec_cidr,
        pod_cidr_annotation=annotations.get(POD_CIDR_ANNOTATION),
        created=meta.get("creationTimestamp") or "", uid=meta.get("uid", ""),
        resource_version=meta.get("resourceVersion", ""),
        flannel={k: annotations[FLANNEL_PREFIX + k] for k in FLANNEL_KEYS
                 if FLANNEL_PREFIX + k in annotations},
        annotations=annotations,
    )
