"""What a running lab owns, on disk, so ``lab status`` and ``lab down`` work from another process.

``lab down`` stops exactly the PIDs recorded here and deletes exactly the
namespaces with the recorded prefix: never anything found by name alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from fabmesh.mesh.model import Backend

DEFAULT_DIR = Path(os.environ.get("FABMESH_LAB_DIR", "/var/lib/fabmesh-lab"))


class LabHost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: str  # connector | cloud | edge
    netns: str
    wan_ip: str  # the address on its uplink (wan0): private behind a NAT
    node_ip: str
    communities: list[str] = []
    pod_cidr: str | None = None
    nat: str | None = None  # the NAT router it sits behind; None: on the WAN itself

    def public_ip(self, state: LabState) -> str:
        """The address the WAN sees this host's packets come from."""
        return state.nat(self.nat).wan_ip if self.nat else self.wan_ip


class LabNatRouter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    netns: str
    wan_ip: str
    lan_cidr: str
    type: str  # masquerade | symmetric


class LabPod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    node: str
    ip: str
    netns: str


class LabState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 2
    prefix: str
    directory: str
    pids: dict[str, int] = {}
    kubeconfig: str | None = None
    # The API server's host when it runs inside the lab (bringup.up(api_host=...)), and the URL kubelets
    # in the lab dial there; None: on the box's loopback, reachable from the root namespace only.
    api_host: str | None = None
    api_lab_url: str | None = None
    operator_namespace: str = "fabmesh-system"
    backend: Backend = Backend.LIBIPSEC  # the operator's tunnel.backend; every charon the lab starts uses it
    # process: agents, connector and operator as processes, Nodes registered by the lab (bringup.py);
    # real: every host a kubelet + containerd node, fabmesh installed by its Helm chart (realnodes.py).
    nodes: str = "process"
    wan_cidr: str = "198.51.100.0/24"
    nats: list[LabNatRouter] = []
    hosts: list[LabHost] = []
    pods: list[LabPod] = []

    @classmethod
    def path(cls, directory: Path) -> Path:
        return directory / "state.json"

    @classmethod
    def load(cls, directory: Path) -> LabState | None:
        try:
            return cls.model_validate_json(cls.path(directory).read_text())
        except FileNotFoundError:
            return None

    def save(self) -> None:
        path = self.path(Path(self.directory))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2))
        tmp.replace(path)

    def host(self, name: str) -> LabHost:
        return next(h for h in self.hosts if h.name == name)

    def nat(self, name: str) -> LabNatRouter:
        return next(n for n in self.nats if n.name == name)
