"""``routes.yaml``: what the operator tells every cloud node's route agent (``fabmesh cloud-agent``).

One document for all cloud nodes (one ConfigMap, ``fabmesh-cloud-routes``): the active connector's
name and its address on the cloud network, the subnets that live behind it (edge node addresses,
and the edge pod pool when the cloud CNI does not route it already), what must never be SNATed
besides them (the edge pod pool, which flannel routes), and the cloud pod CIDRs, in which a
cloud node looks for the source address it sends from. Nothing here is secret, nothing is
per node: the agent needs no credentials and the operator one write per change, whatever the
number of cloud nodes. Strict and versioned like ``mesh.yaml`` (:mod:`fabmesh.mesh.model`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fabmesh.mesh.model import API_VERSION, DNS1123, IP, Cidr, _Model, _parse, dump_yaml

DEFAULT_CLOUD_ROUTE_TABLE = 2621
DEFAULT_CLOUD_RESYNC_S = 30


class ActiveConnector(_Model):
    name: DNS1123
    address: IP  # its InternalIP: the next hop on the cloud network


class CloudRouteSettings(_Model):
    """Where the route agent writes: its own table (not the node agents' 2620), behind its own rule."""

    route_table: int = Field(default=DEFAULT_CLOUD_ROUTE_TABLE, ge=1, le=2**31 - 1)
    resync_period_s: int = Field(default=DEFAULT_CLOUD_RESYNC_S, ge=1)


class CloudRoutes(_Model):
    """The whole of ``routes.yaml``."""

    api_version: Literal["fabmesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["CloudRoutes"] = "CloudRoutes"
    connector: ActiveConnector | None = None  # None: no connector, so no route (the agent removes its own)
    subnets: tuple[Cidr, ...] = ()  # routed via the connector, sorted
    # Never SNATed on the way out of a cloud node besides ``subnets`` (which never are): the edge pod pool,
    # which flannel routes and whose MASQUERADE rule would rewrite a cloud pod's address. Sorted. Not a
    # second copy of ``subnets``: at 10,000 edges those are ~170 KB of the ConfigMap's 1 MiB.
    no_snat: tuple[Cidr, ...] = ()
    source_cidrs: tuple[Cidr, ...] = ()  # a local address inside one of these is the routes' source
    settings: CloudRouteSettings = CloudRouteSettings()

    def to_yaml(self) -> str:
        return dump_yaml(self)


def parse_cloud_routes(text: str, source: str = "routes.yaml") -> CloudRoutes:
    """Raise ``MeshConfigError`` naming ``source`` and the field on anything unusable."""
    return _parse(CloudRoutes, text, source)
