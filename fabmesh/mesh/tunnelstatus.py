"""A node's observed tunnel state as it is published in the API: the ``TunnelStatus`` object (pure).

One object per node that runs the node loop (each edge, each connector), in the
fabmesh namespace, named after the node. The operator creates it (empty) with
a ServiceAccount and a Role that may only get/update/patch that one object's
``status`` subresource; the node's own agent or connector fills ``status``.
The writer (``fabmesh/node/status_writer.py``) is a thin edge: what to write
and whether to write now are decided here and in ``fabmesh/node/report.py``.

Why a CRD and not a ConfigMap or a Lease: a Role can name one object by
``resourceNames`` either way, but only a CRD has a ``status`` subresource (the
agent cannot touch labels, owner references or the spec), printer columns (so
``kubectl get tunnelstatuses`` is useful by itself) and a schema the API server
enforces. Why namespaced: a Role (not a ClusterRole) can then grant it, and
deleting the namespace removes every status with fabmesh.

The config generation is a digest of the files the node applies (``mesh.yaml``
plus the connector's shards), so the wanted one is computed from the
ConfigMaps by the same function, with nothing new to write on the operator side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

GROUP = "fabmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TunnelStatus"
PLURAL = "tunnelstatuses"
SUBRESOURCE = f"{PLURAL}/status"
# A connector's object lists at most this many tunnels: 10,000 edges would not fit etcd's 1.5 MiB object
# limit. Beyond it only tunnels that are not up are listed (the counts are always complete).
MAX_LISTED_TUNNELS = 500


class TunnelState(StrEnum):
    UP = "up"  # IKE_SA established, a CHILD_SA installed, the peer answers
    CONNECTING = "connecting"  # an IKE_SA is being set up, or established without a CHILD_SA yet
    UNRESPONSIVE = "unresponsive"  # established, but a liveness check (DPD) has gone unanswered across polls
    DOWN = "down"  # no IKE_SA at all


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Tunnel(_Model):
    """One peer of the node, as charon reports it (counters are the CHILD_SAs' sums)."""

    peer: str
    state: TunnelState
    since: str | None = None  # ISO time of the last state change (established time when up)
    local_endpoint: str | None = Field(default=None, alias="localEndpoint")  # host:port
    remote_endpoint: str | None = Field(default=None, alias="remoteEndpoint")
    nat_local: bool = Field(default=False, alias="natLocal")  # this node is behind a NAT
    nat_remote: bool = Field(default=False, alias="natRemote")  # the peer is behind a NAT
    initiator: bool = False
    bytes_in: int = Field(default=0, alias="bytesIn")
    bytes_out: int = Field(default=0, alias="bytesOut")
    packets_in: int = Field(default=0, alias="packetsIn")
    packets_out: int = Field(default=0, alias="packetsOut")

    def key(self) -> tuple[object, ...]:
        """What makes a change worth a write: never the counters, never ``since`` (derived each poll)."""
        return (self.peer, self.state, self.local_endpoint, self.remote_endpoint, self.nat_local, self.nat_remote)


class NodeReport(_Model):
    """The ``status`` of a ``TunnelStatus`` object."""

    role: str
    config_generation: str | None = Field(default=None, alias="configGeneration")
    last_error: str = Field(default="", alias="lastError")
    tunnels_expected: int = Field(default=0, alias="tunnelsExpected")
    tunnels_up: int = Field(default=0, alias="tunnelsUp")
    nat_keepalive_s: int | None = Field(default=None, alias="natKeepaliveSeconds")  # charon's keep_alive
    tunnels: tuple[Tunnel, ...] = ()
    truncated: bool = False  # some tunnels that are up are not listed (MAX_LISTED_TUNNELS)
    written_at: str | None = Field(default=None, alias="writtenAt")  # the writer's clock
    # The uninstall token (fabmesh/node/teardown.py) this node has removed everything for; None: running.
    teardown: str | None = Field(default=None, max_length=64)

    def key(self) -> tuple[object, ...]:
        return (self.role, self.config_generation, self.last_error, self.tunnels_expected, self.tunnels_up,
                self.nat_keepalive_s, tuple(t.key() for t in self.tunnels), self.teardown)

    def to_api(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_report(obj: Mapping[str, object] | None) -> NodeReport | None:
    """A ``TunnelStatus`` object's ``status``; None when it has none yet or it is not readable."""
    status = (obj or {}).get("status")
    if not isinstance(status, Mapping) or not status.get("role"):
        return None
    try:
        return NodeReport.model_validate(status)
    except ValueError:
        return None


def config_generation(files: Mapping[str, str]) -> str:
    """The generation of a node's config: a digest of its files by name (``mesh.yaml``, ``peers-NN.yaml``).

    Empty shards count: the operator writes every shard, and kubelet projects every one.
    """
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name].encode())
    return digest.hexdigest()[:12]
