"""The lab's topology file: which hosts exist, their roles, communities, NATs and addresses.

Format (YAML; every field but ``name`` and ``role`` has a default)::

    version: 1
    wan_cidr: 198.51.100.0/24        # the shared "internet" bridge
    cloud_pod_cidr: 10.244.0.0/16    # flannel's Network; cloud node i gets 10.244.<i>.0/24
    edge_node_cidr: 192.0.2.0/24     # InternalIPs of edges with a public address (on lo)
    nats:
      - {name: site-1, type: masquerade}   # endpoint-independent mapping (Linux MASQUERADE)
      - {name: site-2, type: symmetric}    # a new random port per destination (--random-fully)
    nodes:
      - {name: connector-1, role: connector}
      - {name: cloud-2, role: cloud}
      - {name: edge-1, role: edge, communities: [a], nat: site-1}
      - {name: edge-4, role: edge}         # no nat: a public address on the WAN

Roles: ``connector`` (a cloud node that terminates tunnels; exactly one),
``cloud``, ``edge``. Only edges sit behind a NAT: a router namespace owns the
NAT's WAN address and every edge behind it has a private address on the NAT's
LAN (``lan_cidr``, default ``172.16.<i+1>.0/24`` for the i-th NAT), which is
also its InternalIP (a NATed edge's kubelet knows no other). Edges behind one
NAT are one site and reach each other on the LAN. Nothing on the WAN can open a
connection to an edge behind a NAT. Errors name the field, e.g.
``nodes[2].communities[0]`` or ``nodes[3].nat``.
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


class NatType(StrEnum):
    MASQUERADE = "masquerade"  # endpoint-independent mapping: the source port is kept where free
    SYMMETRIC = "symmetric"  # --random-fully: every destination sees another source port


_NAME = r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$"


class LabNat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    type: NatType = NatType.MASQUERADE
    lan_cidr: Cidr | None = None  # None: 172.16.<index+1>.0/24


class FieldError(ValueError):
    """A whole-document rule broken by one field: ``load_topology`` reports that field, not the document."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


class LabNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    role: LabRole
    communities: tuple[str, ...] = Field(default=(), description="edge only")
    nat: str | None = Field(default=None, description="edge only: the name of the NAT it sits behind")

    @model_validator(mode="after")
    def _communities_on_edges(self) -> LabNode:
        if self.communities and self.role is not LabRole.EDGE:
            raise ValueError("only edge nodes join communities")
        if self.nat is not None and self.role is not LabRole.EDGE:
            raise ValueError("only edge nodes sit behind a NAT (cloud nodes have public addresses)")
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
    nats: tuple[LabNat, ...] = ()
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
        nat_names = [n.name for n in self.nats]
        for i, nat in enumerate(self.nats):
            if nat_names.index(nat.name) != i:
                raise FieldError(f"nats[{i}].name", f"NAT name {nat.name!r} is used twice")
            if nat.name in names:
                raise FieldError(f"nats[{i}].name", f"NAT name {nat.name!r} is also a node's name")
        taken = {"wan_cidr": self.wan_cidr, "cloud_pod_cidr": self.cloud_pod_cidr,
                 "edge_pod_pool": self.edge_pod_pool, "service_cidr": self.service_cidr,
                 "edge_node_cidr": self.edge_node_cidr}
        for i in range(len(self.nats)):
            lan = ipaddress.ip_network(self.lan_cidr(i))
            for other, cidr in taken.items():
                if lan.overlaps(ipaddress.ip_network(cidr)):
                    raise FieldError(f"nats[{i}].lan_cidr", f"{lan} overlaps {other} {cidr}")
            taken[f"nats[{i}].lan_cidr"] = str(lan)
        for i, node in enumerate(self.nodes):
            if node.nat is not None and node.nat not in nat_names:
                raise FieldError(f"nodes[{i}].nat", f"no NAT named {node.nat!r} in nats (have: {nat_names})")
        for i, nat in enumerate(self.nats):
            behind = sum(1 for n in self.nodes if n.nat == nat.name)
            if behind > ipaddress.ip_network(self.lan_cidr(i)).num_addresses - 3:
                raise FieldError(f"nats[{i}].lan_cidr", f"too small for the {behind} edges behind {nat.name}")
        return self

    def lan_cidr(self, nat_index: int) -> str:
        return self.nats[nat_index].lan_cidr or f"172.16.{nat_index + 1}.0/24"

    def nat_wan_ip(self, nat_index: int) -> str:
        """NAT routers take the WAN addresses after the nodes'."""
        return self.wan_ip(len(self.nodes) + nat_index)

    def wan_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.wan_cidr).network_address + 1 + index)

    def edge_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.edge_node_cidr).network_address + 1 + index)

    def cloud_pod_subnet(self, index: int) -> str:
        return str(list(ipaddress.ip_network(self.cloud_pod_cidr).subnets(new_prefix=24))[index])


# The article's world: the cloud has public addresses, every edge sits behind a NAT. edge-1 and
# edge-2 share a site (one endpoint-independent NAT), edge-3 sits behind a symmetric one.
DEFAULT = Topology(
    nats=(LabNat(name="site-1", type=NatType.MASQUERADE), LabNat(name="site-2", type=NatType.SYMMETRIC)),
    nodes=(
        LabNode(name="connector-1", role=LabRole.CONNECTOR),
        LabNode(name="cloud-2", role=LabRole.CLOUD),
        LabNode(name="edge-1", role=LabRole.EDGE, communities=("a",), nat="site-1"),
        LabNode(name="edge-2", role=LabRole.EDGE, communities=("a", "b"), nat="site-1"),
        LabNode(name="edge-3", role=LabRole.EDGE, nat="site-2"),
    ))


# The default lab plus one edge alone behind an endpoint-independent NAT of its own (site-3), in no
# community: relabelled into community a, edge-4 and edge-1 are a cone-NAT pair on two sites, which
# only hole punching connects directly (the e2e lab, and bench/bench_nat.py's relabel figure).
THREE_SITES = Topology(nats=(*DEFAULT.nats, LabNat(name="site-3", type=NatType.MASQUERADE)),
                       nodes=(*DEFAULT.nodes, LabNode(name="edge-4", role=LabRole.EDGE, nat="site-3")))


# Every kind of edge the NAT work covers, for the e2e lab: THREE_SITES plus edge-5 with a public
# address and no NAT, in community b with edge-2 (behind site-1's cone NAT): a public/NATed pair,
# which hole punching connects directly as well.
ALL_EDGE_KINDS = Topology(nats=THREE_SITES.nats,
                          nodes=(*THREE_SITES.nodes, LabNode(name="edge-5", role=LabRole.EDGE, communities=("b",))))


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
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            raise TopologyError(f"{path}: {cause.field}: {cause}") from exc
        raise TopologyError(f"{path}: {field or '<document>'}: {first['msg']}") from exc
