"""From Kubernetes Node objects (plain JSON dicts) to the facts the planner needs.

Pure. Every problem with one Node becomes an :class:`InvalidNode` naming the
node and the field; the node is left out of the mesh and every other node is
planned as usual. Which role and communities a node has is
:mod:`fabmesh.mesh.topology`'s rule; this module adds addresses and CIDRs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fabmesh.mesh.model import Role
from fabmesh.mesh.names import FLANNEL_KEYS, FLANNEL_PREFIX, POD_CIDR_ANNOTATION
from fabmesh.mesh.topology import LabelError, read_labels
from fabmesh.operator.settings import OperatorSettings


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
    deleting: bool = field(default=False, compare=False)  # metadata.deletionTimestamp is set
    finalizers: tuple[str, ...] = field(default=(), compare=False)
    # Where in the Node the addresses came from, for Events (``status.addresses[i]``).
    internal_field: str = field(default="status.addresses", compare=False)
    external_field: str = field(default="status.addresses", compare=False)

    @property
    def endpoint(self) -> str:
        """Where peers reach this node's IKE daemon."""
        return self.external_ip or self.internal_ip


def _address(node: str, addresses: list[dict[str, Any]], kind: str,
             family: int) -> tuple[str | None, str, InvalidNode | None]:
    """The first address of ``kind`` in the mesh's family, and its field.

    Addresses of the other family are ignored (a dual-stack node lists both; the mesh is single-stack,
    and an IPv6 host route among IPv4 selectors would break every peer that lists it).
    """
    for i, entry in enumerate(addresses):
        if entry.get("type") != kind:
            continue
        raw = entry.get("address", "")
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            return None, "", InvalidNode(node, f"status.addresses[{i}]", f"{kind} {raw!r} is not an IP address")
        if ip.version == family:
            return str(ip), f"status.addresses[{i}]", None
    return None, "status.addresses", None


def read_node(obj: dict[str, Any], settings: OperatorSettings) -> NodeInfo | InvalidNode:
    meta = obj.get("metadata", {})
    name = meta.get("name", "")
    labels: dict[str, str] = meta.get("labels") or {}
    annotations: dict[str, str] = meta.get("annotations") or {}
    placed = read_labels(labels, settings.label_keys)
    if isinstance(placed, LabelError):
        return InvalidNode(name, placed.field, placed.reason)
    role, communities = placed.role, placed.communities
    addresses = (obj.get("status") or {}).get("addresses") or []
    internal, internal_field, error = _address(name, addresses, "InternalIP", settings.family)
    if error:
        return error
    external, external_field, error = _address(name, addresses, "ExternalIP", settings.family)
    if error:
        return error
    if internal is None:
        if role is Role.CLOUD:
            internal = "0.0.0.0"  # a cloud node without an address cannot be routed to; ignore it
        else:
            return InvalidNode(name, "status.addresses",
                               f"no IPv{settings.family} InternalIP (the mesh's family): cannot build a tunnel")
    spec_cidr = (obj.get("spec") or {}).get("podCIDR") or None
    return NodeInfo(
        name=name, role=role, internal_ip=internal, external_ip=external,
        communities=tuple(communities), spec_pod_cidr=spec_cidr,
        pod_cidr_annotation=annotations.get(POD_CIDR_ANNOTATION),
        created=meta.get("creationTimestamp") or "", uid=meta.get("uid", ""),
        resource_version=meta.get("resourceVersion", ""),
        flannel={k: annotations[FLANNEL_PREFIX + k] for k in FLANNEL_KEYS
                 if FLANNEL_PREFIX + k in annotations},
        annotations=annotations, internal_field=internal_field, external_field=external_field,
        deleting=bool(meta.get("deletionTimestamp")), finalizers=tuple(meta.get("finalizers") or ()),
    )
