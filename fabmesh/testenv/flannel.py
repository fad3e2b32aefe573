"""Real flanneld (kube subnet manager, vxlan backend) on a lab host, as flannel's DaemonSet runs it on a cloud node.

flanneld is entered into the host's network namespace with ``nsenter --net`` (like kubelet, see
:mod:`fabmesh.testenv.kubenode`), so flannel.1, its routes, neighbours, FDB entries and the
FORWARD rules it adds all live in that namespace. Every path it writes is per host (the subnet
file; flannel's default ``/run/flannel/subnet.env`` is shared by the whole box). It talks to the
API server through the lab's :class:`~fabmesh.testenv.kubenode.NodeLink` with a client
certificate for ``system:flannel``, authorized by the ClusterRole flannel's own manifest ships
(:func:`flannel_rbac`), never as admin.

What flanneld needs from a Node to route its pod CIDR (``pkg/subnet/kube/kube.go``,
``pkg/backend/vxlan/vxlan_network.go`` at the pinned release) is in docs/operator.md,
"Flannel on cloud nodes".
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fabmesh.kube.client import Kube
from fabmesh.testenv.cluster import apply
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Host, stop_pid
from fabmesh.testenv.kubenode import NodeLink

FLANNEL_USER = "system:flannel"


def flannel_rbac() -> list[dict[str, Any]]:
    """The rights upstream's kube-flannel.yml gives flanneld, bound to :data:`FLANNEL_USER` (pure)."""
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "flannel"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                   {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "flannel"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": FLANNEL_USER}]},
    ]


def net_conf(network: str) -> dict[str, Any]:
    """flannel's net-conf.json for an IPv4 vxlan overlay on ``network`` (the cloud pod CIDR)."""
    return {"Network": network, "EnableIPv4": True, "EnableIPv6": False, "Backend": {"Type": "vxlan"}}


@dataclass
class Flanneld:
    """flanneld for the Node ``name`` on ``host``; :meth:`start`, then :meth:`stop` (by PID)."""

    host: Host
    name: str
    binary: Path
    directory: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, control_plane: ControlPlane, link: NodeLink, admin: Kube, network: str) -> Flanneld:
        self.directory.mkdir(parents=True, exist_ok=True)
        for obj in flannel_rbac():
            apply(admin, obj)
        kubeconfig = yaml.safe_load(control_plane.kubeconfig_for_client(FLANNEL_USER, "system:flannel").read_text())
        for cluster in kubeconfig["clusters"]:
            cluster["cluster"]["server"] = link.server
            cluster["cluster"]["tls-server-name"] = "localhost"
        (self.directory / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        (self.directory / "kubeconfig").chmod(0o600)
        (self.directory / "net-conf.json").write_text(json.dumps(net_conf(network)))
        cmd = ["nsenter", f"--net=/run/netns/{self.host.netns}", str(self.binary),
               "--kube-subnet-mgr", "--kubeconfig-file", str(self.directory / "kubeconfig"),
               "--net-config-path", str(self.directory / "net-conf.json"),
               "--subnet-file", str(self.directory / "subnet.env"),
               "--iface", "wan0", "--ip-masq=false", "--v", "2"]
        with open(self.directory / "flanneld.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, env={**os.environ, "NODE_NAME": self.name})
        (self.directory / "flanneld.pid").write_text(str(self.proc.pid))
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"flanneld for node {self.name} exited ({self.proc.returncode}); "
                               f"see {self.directory / 'flanneld.log'}")
        return self

    def stop(self) -> None:
        """flanneld by PID; what it programmed lives in the host's namespace and goes with it."""
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=10)
            self.proc = None
