"""The operator's settings: one pydantic model, read from a YAML file (the Helm chart's values).

Every knob has a default that works on a stock flannel cluster; every one is
documented in ``docs/operator.md`` and in the chart's ``values.yaml``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from fabmesh.mesh import names
from fabmesh.mesh.cloud import DEFAULT_CLOUD_RESYNC_S, DEFAULT_CLOUD_ROUTE_TABLE
from fabmesh.mesh.model import Cidr, NodeSettings, TunnelSettings, error_field
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.mesh.topology import LabelKeys


class LeaderElection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    lease_name: str = "fabmesh-operator"
    # Whole seconds: the Lease object stores leaseDurationSeconds as an integer.
    lease_duration_s: int = Field(default=15, ge=1)
    renew_deadline_s: int = Field(default=10, ge=1)
    retry_period_s: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElection:
        # The leader stops at renew_deadline_s, before a standby may take over at lease_duration_s (the
        # margin covers writes in flight), and gets at least one retry before its deadline.
        if not self.lease_duration_s > self.renew_deadline_s > 1.2 * self.retry_period_s:
            raise ValueError("need lease_duration_s > renew_deadline_s > 1.2 * retry_period_s")
        return self


# A Kubernetes resource quantity (cpu "250m", memory "128Mi"); a bare YAML number is taken as text.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
Quantity = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int | float) else v),
                     Field(pattern=QUANTITY_PATTERN)]
ResourceName = Literal["cpu", "memory", "ephemeral-storage"]


class Resources(BaseModel):
    """A container's requests and limits (the subset of core/v1 ResourceRequirements we set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: dict[ResourceName, Quantity] = {}
    limits: dict[ResourceName, Quantity] = {}

    def to_api(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in (("requests", self.requests), ("limits", self.limits)) if v}


class NodePods(BaseModel):
    """What the Pods the operator runs on nodes share: images, metrics, resources (agent and connector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    strongswan_image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The /metrics port on the node (0: none), and its bind address ("": the node's InternalIP).
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_address: str = ""
    resources: Resources = Resources()
    strongswan_resources: Resources = Resources()
    # Lifetime of the projected token the node loop writes its TunnelStatus with (kubelet renews it at
    # 80%); 600 is the API server's minimum.
    status_token_expiration_s: int = Field(default=600, ge=600, le=86400)
    # The API server URL the node loop writes its TunnelStatus to ("": the in-cluster Service, from
    # KUBERNETES_SERVICE_HOST). An edge reaches that ClusterIP only through its connector tunnel; name the
    # API server's own address so an edge can still report while that tunnel is down.
    status_server: str = Field(default="", pattern=r"^(https://\S+)?$")


class AgentPods(NodePods):
    # An edge agent holds one node's mesh (tens of peers): small. Memory limits stop a leak from
    # taking the node down; charon's CPU limit is generous because with libipsec ESP runs in charon,
    # so its limit caps tunnel throughput.
    resources: Resources = Resources(requests={"cpu": "20m", "memory": "64Mi"},
                                     limits={"cpu": "500m", "memory": "256Mi"})
    strongswan_resources: Resources = Resources(requests={"cpu": "20m", "memory": "32Mi"},
                                                limits={"cpu": "1", "memory": "256Mi"})


class ConnectorPods(NodePods):
    # The connector holds every edge's peer entry and charon one IKE_SA per edge (~140 MiB at 2,000
    # tunnels with libipsec, docs/performance.md): raise the memory limits for larger meshes.
    resources: Resources = Resources(requests={"cpu": "100m", "memory": "128Mi"},
                                     limits={"cpu": "1", "memory": "512Mi"})
    strongswan_resources: Resources = Resources(requests={"cpu": "100m", "memory": "128Mi"},
                                                limits={"cpu": "2", "memory": "1Gi"})
    # Device IKE leaves by (e.g. eth0), passed as --uplink; "": the device the kernel routes to peers.
    uplink: str = Field(default="", max_length=15, pattern=r"^[^/\s]*$")


class CloudAgent(BaseModel):
    """What the route agent on cloud nodes (``fabmesh cloud-agent``, the chart's DaemonSet) is told to route.

    Edge node addresses are always routed via the connector. The edge pod pool is routed too only when
    ``route_edge_pod_cidrs``: with flannel, cloud nodes already send edge pod CIDRs to the connector
    (the operator gives edge Nodes the connector's flannel annotations), and a second route would
    compete with flannel's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    route_edge_pod_cidrs: bool = False  # true when the cloud CNI is not flannel (calico, cilium, ...)
    route_table: int = Field(default=DEFAULT_CLOUD_ROUTE_TABLE, ge=1, le=2**31 - 1)
    resync_period_s: int = Field(default=DEFAULT_CLOUD_RESYNC_S, ge=1)


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "fabmesh-system"
    edge_label: str = names.EDGE_LABEL
    connector_label: str = names.CONNECTOR_LABEL
    community_label_prefix: str = names.COMMUNITY_LABEL_PREFIX
    edge_pod_pool: Cidr = "10.233.0.0/16"
    edge_pod_prefix_len: int = Field(default=24, ge=8, le=128)
    cloud_pod_cidrs: tuple[Cidr, ...] = ("10.244.0.0/16",)
    service_cidr: Cidr = "10.96.0.0/12"
    # Extra cloud host ranges the connector tunnel carries (e.g. hosts that reach edge kubelets from their
    # own address). Empty adds none: a cloud node reaches edges from its flannel.1 address, in cloud_pod_cidrs.
    cloud_node_cidrs: tuple[Cidr, ...] = ()
    # Where edge node addresses may live: an edge's InternalIP is announced to the mesh (a /32 on the
    # connector and its peers, for kubelet) only inside these. Empty = any address that is not globally
    # routable (private, CGNAT, ULA, documentation ranges). Mesh ranges and other nodes' addresses are
    # refused either way (fabmesh/operator/addresses.py).
    edge_node_cidrs: tuple[Cidr, ...] = ()
    cert_lifetime_days: int = Field(default=365, ge=1)
    ca_lifetime_days: int = Field(default=3650, ge=2)
    # How long each step of a CA roll waits for every node to apply the one before (ca_roll.py).
    ca_roll_settle_s: float = Field(default=600.0, ge=0)
    connector_shards: int = Field(default=16, ge=1, le=256)
    # Hole punching: a community pair where either edge has no ExternalIP (behind NAT) gets its direct
    # tunnel through the active connector acting as strongSwan mediation server; the pair is relayed
    # through the connector while no direct tunnel can be made. False: such pairs dial the peer's
    # endpoint (its InternalIP), which reaches only edges on the same LAN.
    hole_punching: bool = True
    resync_period_s: float = Field(default=60.0, gt=0)
    tunnel: TunnelSettings = TunnelSettings()
    node: NodeSettings = NodeSettings()
    agent_pods: AgentPods = AgentPods()
    connector_pods: ConnectorPods = ConnectorPods()
    leader_election: LeaderElection = LeaderElection()
    cloud_agent: CloudAgent = CloudAgent()

    @field_validator("connector_label")
    @classmethod
    def _kubelet_proof(cls, key: str) -> str:
        namespace = key.split("/", 1)[0] if "/" in key else ""
        if namespace != names.KUBELET_PROOF_NAMESPACE and not namespace.endswith("." + names.KUBELET_PROOF_NAMESPACE):
            raise ValueError(f"{key!r} is a label a kubelet may set on its own Node: a compromised node could make "
                             f"itself the connector; use one under {names.KUBELET_PROOF_NAMESPACE}/ "
                             f"(default {names.CONNECTOR_LABEL})")
        return key

    @property
    def label_keys(self) -> LabelKeys:
        return LabelKeys(self.edge_label, self.connector_label, self.community_label_prefix)

    @model_validator(mode="after")
    def _pool_fits_prefix(self) -> OperatorSettings:
        pool = ipaddress.ip_network(self.edge_pod_pool)
        if not pool.prefixlen <= self.edge_pod_prefix_len <= pool.max_prefixlen:
            raise ValueError(f"edge_pod_prefix_len {self.edge_pod_prefix_len} does not fit "
                             f"edge_pod_pool {self.edge_pod_pool}")
        for cidr in (*self.cloud_pod_cidrs, self.service_cidr):
            if pool.overlaps(ipaddress.ip_network(cidr)):
                raise ValueError(f"edge_pod_pool {pool} overlaps {cidr}")
        if pool.version != 4:
            # The node side programs IPv4 only (iptables, inet ipsets, the IPv4 forwarding sysctl).
            raise ValueError(f"edge_pod_pool {pool} is IPv6: fabmesh meshes are IPv4 only for now")
        # The mesh is single-stack, in the pool's family: a range of the other family would put
        # selectors and routes of two families into one tunnel, which no peer can apply.
        for key in ("cloud_pod_cidrs", "service_cidr", "cloud_node_cidrs", "edge_node_cidrs"):
            value = getattr(self, key)
            for cidr in (value,) if isinstance(value, str) else value:
                if ipaddress.ip_network(cidr).version != pool.version:
                    raise ValueError(f"{key} {cidr} is not IPv{pool.version} like edge_pod_pool {pool}")
        if self.cloud_agent.route_table == self.node.route_table:
            raise ValueError(f"cloud_agent.route_table {self.cloud_agent.route_table} is node.route_table: the "
                             "route agent and the connector would delete each other's routes")
        return self

    @property
    def family(self) -> int:
        """The mesh's IP version (4 or 6): the edge pod pool's."""
        return ipaddress.ip_network(self.edge_pod_pool).version


class SettingsError(ValueError):
    pass


def load_settings(path: Path | None) -> OperatorSettings:
    if path is None:
        return OperatorSettings()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return OperatorSettings.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SettingsError(f"{path}: {error_field(first['loc'])}: {first['msg']}") from exc
