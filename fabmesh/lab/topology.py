"""The lab's topology file: which hosts exist, their roles, communities and addresses.

Format (YAML; every field but ``name`` and ``role`` has a default)::

    version: 1
    wan_cidr: 198.51.100.0/24        # the shared "internet" bridge
    cloud_pod_cidr: 10.244.0.0/16    # flannel's Network; cloud node i gets 10.244.<i>.0/24
    edge_node_cidr: 192.0.2.0/24     # edge InternalIPs (private, behind the edge's WAN address)
    nodes:
      - {name: connector-1, role: connector}
      - {name: cloud-2, role: cloud}
      - {name: edge-1, role: edge, communities: [a]}

Roles: ``connector`` (a cloud node that terminates tunnels; exactly one),
``cloud``, ``edge``. Errors name the field, e.g. ``nodes[2].communities[0]``.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fabmesh.mesh.model import Cidr


class LabRole(StrEnum):
    CONNECTOR = "connector"
    CLOUD = "cloud"
    EDGE = "edge"


class LabNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$")
    role: LabRole
    communities: tuple[str, ...] = Field(default=(), description="edge only")

    @model_validator(mode="after")
    def _communities_on_edges(self) -> LabNode:
        if self.communities and self.role is not LabRole.EDGE:
            raise ValueError("only edge nodes join communities")
        for c in self.communities:
            if not c or len(c) > 63 or not c.replace("-", "").isalnum() or c.lower() != c:
                raise ValueError(f"community {c!r} must be a lowercase DNS label")
        return self


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    wan_cidr: Cidr = "198.51.100.0/24"
    cloud_pod_cidr: Cidr = "10.244.0.0/16"
    edge_pod_pool: Cidr = "10.233.0.0/16"
    service_cidr: Cidr = "10.96.0.0/12"
    edge_node_cidr: Cidr = "192.0.2.0/24"
    nodes: tuple[LabNode, ...]

    @model_validator(mode="after")
    def _shape(self) -> Topology:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        if sum(n.role is LabRole.CONNECTOR for n in self.nodes) != 1:
            raise ValueError("exactly one node must have role connector")
        if len(self.nodes) > 60:
            raise ValueError("at most 60 nodes")
        return self

    def wan_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.wan_cidr).network_address + 1 + index)

    def edge_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.edge_node_cidr).network_address + 1 + index)

    def cloud_pod_subnet(self, index: int) -> str:
        return str(list(ipaddress.ip_network(self.cloud_pod_cidr).subnets(new_prefix=24))[index])


DEFAULT = Topology(nodes=(
    LabNode(name="connector-1", role=LabRole.CONNECTOR),
    LabNode(name="cloud-2", role=LabRole.CLOUD),
    LabNode(name="edge-1", role=LabRole.EDGE, communities=("a",)),
    LabNode(name="edge-2", role=LabRole.EDGE, communities=("a", "b")),
    LabNode(name="edge-3", role=LabRole.EDGE),
))


class TopologyError(ValueError):
    pass


def load_topology(path: Path | None) -> Topology:
    if path is None:
        return DEFAULT
    try:
        data = yaml.safe_load(path.read_text())
        return Topology.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise TopologyError(f"{path}: {field or '<document>'}: {first['msg']}") from exc
