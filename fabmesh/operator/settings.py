"""The operator's settings: one pydantic model, read from a YAML file (the Helm chart's values).

Every knob has a default that works on a stock flannel cluster; every one is
documented in ``docs/operator.md`` and in the chart's ``values.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from fabmesh.mesh import names
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
        # The kubernetes package's elector exits the process on these; say it at load time instead.
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


class AgentPods(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    strongswan_image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # The agent's /metrics port on the node (0: none), and its bind address ("": the node's InternalIP).
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    metrics_address: str = ""
    # An edge agent holds one node's mesh (tens of peers): small. Memory limits stop a leak from
    # taking the node down; charon's CPU limit is generous because with libipsec ESP runs in charon,
    # so its limit caps tunnel throughput.
    resources: Resources = Resources(requests={"cpu": "20m", "memory": "64Mi"},
                                     limits={"cpu": "500m", "memory": "256Mi"})
    strongswan_resources: Resources = Resources(requests={"cpu": "20m", "memory": "32Mi"},
                                                limits={"cpu": "1", "memory": "256Mi"})


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
    cert_lifetime_days: int = Field(default=365, ge=1)
    ca_lifetime_days: int = Field(default=3650, ge=2)
    # How long each step of a CA roll waits for every node to apply the one before (ca_roll.py).
    ca_roll_settle_s: float = Field(default=600.0, ge=0)
    connector_shards: int = Field(default=16, ge=1, le=256)
    resync_period_s: float = Field(default=60.0, gt=0)
    tunnel: TunnelSettings = TunnelSettings()
    node: NodeSettings = NodeSettings()
    agent_pods: AgentPods = AgentPods()
    leader_election: LeaderElection = LeaderElection()

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
        import ipaddress

        pool = ipaddress.ip_network(self.edge_pod_pool)
        if not pool.prefixlen <= self.edge_pod_prefix_len <= pool.max_prefixlen:
            raise ValueError(f"edge_pod_prefix_len {self.edge_pod_prefix_len} does not fit "
                             f"edge_pod_pool {self.edge_pod_pool}")
        for cidr in (*self.cloud_pod_cidrs, self.service_cidr):
            if pool.overlaps(ipaddress.ip_network(cidr)):
                raise ValueError(f"edge_pod_pool {pool} overlaps {cidr}")
        return self


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
