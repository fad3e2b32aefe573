"""The operator's settings: one pydantic model, read from a YAML file (the Helm chart's values).

Every knob has a default that works on a stock flannel cluster; every one is
documented in ``docs/operator.md`` and in the chart's ``values.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fabmesh.mesh.model import Cidr, NodeSettings, TunnelSettings


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


class AgentPods(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    strongswan_image: str = "ghcr.io/fabmesh/fabmesh:0.1.0"
    image_pull_policy: str = "IfNotPresent"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "fabmesh-system"
    edge_label: str = "node-role.kubernetes.io/edge"
    connector_label: str = "fabmesh.io/connector"
    community_label_prefix: str = "community.fabmesh.io/"
    edge_pod_pool: Cidr = "10.233.0.0/16"
    edge_pod_prefix_len: int = Field(default=24, ge=8, le=128)
    cloud_pod_cidrs: tuple[Cidr, ...] = ("10.244.0.0/16",)
    service_cidr: Cidr = "10.96.0.0/12"
    # Cloud hosts that must reach edge node addresses (kubelet :10250); empty = each cloud node's /32.
    cloud_node_cidrs: tuple[Cidr, ...] = ()
    cert_lifetime_days: int = Field(default=365, ge=1)
    ca_lifetime_days: int = Field(default=3650, ge=2)
    connector_shards: int = Field(default=16, ge=1, le=256)
    resync_period_s: float = Field(default=60.0, gt=0)
    tunnel: TunnelSettings = TunnelSettings()
    node: NodeSettings = NodeSettings()
    agent_pods: AgentPods = AgentPods()
    leader_election: LeaderElection = LeaderElection()

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
        field = ".".join(str(p) for p in first["loc"]) or "<document>"
        raise SettingsError(f"{path}: {field}: {first['msg']}") from exc
