"""Real Kubernetes nodes in a lab host's namespace: containerd + runc + kubelet, stopped and cleaned by us.

A node is a :class:`fabmesh.testenv.hosts.Host` (a network namespace on the lab
WAN) running its own containerd and kubelet, both entered with
``nsenter --net=/run/netns/<host>``: ``ip netns exec`` would remount ``/sys``
and hide the cgroup v1 mounts from kubelet and runc. Both share the box's
mount and PID namespaces, so every path is per node (see
:mod:`fabmesh.testenv.nodeconfig`) and every process lives in the node's own
cgroup subtree (:mod:`fabmesh.testenv.cgroups`).

The API server listens on the box's loopback, which a namespace cannot reach,
and reaches kubelets at their InternalIP, which the box cannot route to. A
:class:`NodeLink` joins the two: one veth pair from the root namespace into the
WAN bridge's namespace (which the lab created) with one address of the WAN's
TEST-NET range on the root end (its connected route is the only route added to
the box), and a ``socat`` relay on that address to the API server. Kubelets
dial the relay with ``tls-server-name: localhost``, the name on the API
server's certificate.

containerd 1.6 mounts each Pod's network namespace as ``/run/netns/cni-<uuid>``
for the whole box; teardown reads the node's sandboxes from containerd and
deletes exactly those.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fabmesh.pki.authority import issue_leaf
from fabmesh.testenv import cgroups
from fabmesh.testenv.controlplane import SERVICE_CIDR, ControlPlane
from fabmesh.testenv.hosts import Host, Network, sh, stop_pid, wait_for
from fabmesh.testenv.images import LocalImages, import_images
from fabmesh.testenv.nodeconfig import (
    KUBELET_SYSCTLS,
    NodePaths,
    bridge_conflist,
    kube_proxy_config,
    kubelet_config,
    kubelet_launcher,
    render_containerd_config,
)

CONTAINER_LOGS = Path("/var/log/containers")  # kubelet's symlinks; a fixed path in kubelet


class NodeError(RuntimeError):
    """A node failed to start; the message names the node, the component and its log."""


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True)


@dataclass
class NodeLink:
    """The root namespace's one veth into the lab WAN, and a relay from it to the API server."""

    network: Network
    directory: Path
    address: str = ""
    root_if: str = ""
    relay: subprocess.Popen[bytes] | None = None
    server: str = ""

    def start(self, control_plane: ControlPlane) -> NodeLink:
        wan = ipaddress.ip_network(self.network.wan_cidr)
        self.address = str(wan.broadcast_address - 1)
        self.root_if = f"fmk{uuid.uuid4().hex[:8]}"
        peer = f"k{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", peer,
           "netns", self.network.wan_netns)
        sh("ip", "-n", self.network.wan_netns, "link", "set", peer, "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.address}/{wan.prefixlen}", "dev", self.root_if)
        sh("ip", "link", "set", self.root_if, "up")
        api_port = int(control_plane.url.rsplit(":", 1)[1])
        port = api_port  # the same port number on another address: nothing else binds it there
        self.directory.mkdir(parents=True, exist_ok=True)
        self.relay = _spawn(["socat", f"TCP-LISTEN:{port},bind={self.address},fork,reuseaddr",
                             f"TCP:127.0.0.1:{api_port}"], self.directory / "relay.log")
        self.server = f"https://{self.address}:{port}"
        relay = self.relay
        wait_for(lambda: relay.poll() is not None or _listening(self.address, port), timeout=10,
                 what=f"API relay on {self.address}:{port}")
        if relay.poll() is not None:
            raise NodeError(f"API relay on {self.address}:{port} exited ({relay.returncode}); "
                            f"see {self.directory / 'relay.log'}")
        return self

    def stop(self) -> None:
        if self.relay is not None:
            # socat forks a child per connection in the relay's process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.relay.pid, signal.SIGTERM)
            stop_pid(self.relay.pid)
            self.relay = None
        if self.root_if:
            sh("ip", "link", "del", self.root_if, check=False)
            self.root_if = ""


@dataclass
class KubeNode:
    """One real node on ``host``; :meth:`start` then :meth:`stop` (idempotent, by PID and cgroup)."""

    host: Host
    name: str
    pod_cidr: str
    binaries: Path
    images: LocalImages
    paths: NodePaths = field(init=False)
    cgroup_root: str = field(init=False)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = NodePaths(self.host.directory / "kube")
        self.cgroup_root = f"/fabmesh-{self.host.netns}"

    def start(self, control_plane: ControlPlane, link: NodeLink) -> KubeNode:
        """containerd (images imported), then kubelet; returns once both run (Ready is the caller's wait)."""
        self._write_files(control_plane, link)
        cgroups.create(self.cgroup_root)
        try:
            self._start_containerd()
            import_images(self.images, self.paths.containerd_socket)
            self._start_kubelet()
        except Exception:
            self.stop()
            raise
        return self

    def _write_files(self, control_plane: ControlPlane, link: NodeLink) -> None:
        p = self.paths
        for directory in (p.containerd_root, p.containerd_state, p.kubelet_root, p.pod_logs,
                          p.cni_conf_dir, p.ipam_dir, p.pki, p.sysctls):
            directory.mkdir(parents=True, exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            (p.sysctls / key.replace("/", ".")).write_text(value + "\n")
        assert control_plane.ca is not None, "start the control plane first"
        serving = issue_leaf(control_plane.ca, name=self.name, addresses=[self.host.wan_ip],
                             now=datetime.datetime.now(datetime.UTC))
        (p.pki / "kubelet.crt").write_text(serving.cert_pem)
        (p.pki / "kubelet.key").write_text(serving.key_pem)
        (p.pki / "kubelet.key").chmod(0o600)
        (p.pki / "ca.crt").write_text(control_plane.ca_pem)
        kubeconfig = yaml.safe_load(control_plane.kubeconfig_for_node(self.name).read_text())
        for cluster in kubeconfig["clusters"]:
            cluster["cluster"]["server"] = link.server
            cluster["cluster"]["tls-server-name"] = "localhost"
        p.kubeconfig.write_text(yaml.safe_dump(kubeconfig))
        p.kubeconfig.chmod(0o600)
        p.containerd_config.write_text(render_containerd_config(p, self.images.pause))
        p.kubelet_config.write_text(yaml.safe_dump(kubelet_config(
            p, node_ip=self.host.wan_ip, cgroup_root=self.cgroup_root, client_ca=p.pki / "ca.crt")))
        conflist = bridge_conflist("fabmesh-lab", "cni0", self.pod_cidr, p.ipam_dir)
        (p.cni_conf_dir / "10-fabmesh-lab.conflist").write_text(json.dumps(conflist, indent=2))

    def _in_node(self, component: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Run ``cmd`` in the host's network namespace and in the node's ``<root>/runtime`` cgroup."""
        joins = " ".join(shlex.quote(str(f)) for f in cgroups.join_files(self.cgroup_root))
        script = f'for f in {joins}; do echo $$ > "$f"; done; exec "$@"'
        proc = _spawn(["sh", "-c", script, "sh", "nsenter", f"--net=/run/netns/{self.host.netns}", *cmd],
                      self.paths.directory / f"{component}.log")
        self.processes[component] = proc
        (self.paths.directory / f"{component}.pid").write_text(str(proc.pid))
        return proc

    def _start_containerd(self) -> None:
        proc = self._in_node("containerd", ["containerd", "--config", str(self.paths.containerd_config)])
        sock = self.paths.containerd_socket
        wait_for(lambda: proc.poll() is not None or _ctr_ok(sock), timeout=60, interval=0.2,
                 what=f"containerd on node {self.name}")
        if proc.poll() is not None:
            raise NodeError(f"node {self.name}: containerd exited ({proc.returncode}); "
                            f"see {self.paths.directory / 'containerd.log'}")

    def _start_kubelet(self) -> None:
        p = self.paths
        # Volumes kubelet mounts in its own mount namespace must reach runc in the host's.
        sh("mount", "--bind", str(p.kubelet_root), str(p.kubelet_root))
        sh("mount", "--make-shared", str(p.kubelet_root))
        launcher = p.directory / "kubelet.sh"
        launcher.write_text(kubelet_launcher(
            p, netns=self.host.netns, cgroup_procs=cgroups.join_files(self.cgroup_root),
            kubelet=[str(self.binaries / "kubelet"), "--config", str(p.kubelet_config),
                     "--kubeconfig", str(p.kubeconfig), "--root-dir", str(p.kubelet_root),
                     "--cert-dir", str(p.pki), "--hostname-override", self.name,
                     "--node-ip", self.host.wan_ip, "--v", "2"]))
        launcher.chmod(0o755)
        proc = _spawn(["/bin/sh", str(launcher)], p.directory / "kubelet.log")
        self.processes["kubelet"] = proc
        (p.directory / "kubelet.pid").write_text(str(proc.pid))
        time.sleep(0.5)
        if proc.poll() is not None:
            raise NodeError(f"node {self.name}: kubelet exited ({proc.returncode}); "
                            f"see {p.directory / 'kubelet.log'}")

    def start_kube_proxy(self, control_plane: ControlPlane, link: NodeLink, cluster_cidr: str) -> None:
        """kube-proxy (iptables mode) in the node's namespace, as ``system:kube-proxy``.

        Locally generated packets are routed before the nat OUTPUT chain rewrites them, so a
        ClusterIP needs a route to exist at all: a real node has a default route, a lab host only
        its WAN subnet, so the Service range is routed to ``wan0`` (DNAT then reroutes to the Pod).
        """
        p = self.paths
        kubeconfig = yaml.safe_load(control_plane.kubeconfig_for_client("system:kube-proxy",
                                                                         "system:node-proxiers").read_text())
        for cluster in kubeconfig["clusters"]:
            cluster["cluster"]["server"] = link.server
            cluster["cluster"]["tls-server-name"] = "localhost"
        p.kube_proxy_kubeconfig.write_text(yaml.safe_dump(kubeconfig))
        p.kube_proxy_kubeconfig.chmod(0o600)
        p.kube_proxy_config.write_text(yaml.safe_dump(kube_proxy_config(
            p, node_name=self.name, node_ip=self.host.wan_ip, cluster_cidr=cluster_cidr)))
        self.host.run("ip", "route", "replace", SERVICE_CIDR, "dev", "wan0")
        proc = self._in_node("kube-proxy", [str(self.binaries / "kube-proxy"), "--config", str(p.kube_proxy_config),
                                            "--v", "2"])
        time.sleep(0.5)
        if proc.poll() is not None:
            raise NodeError(f"node {self.name}: kube-proxy exited ({proc.returncode}); "
                            f"see {p.directory / 'kube-proxy.log'}")

    def sandbox_netns(self) -> list[str]:
        """Names under /run/netns of this node's Pod sandboxes, read from its containerd."""
        sock = self.paths.containerd_socket
        if not sock.exists():
            return []
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io", "containers"]
        listing = subprocess.run([*ctr, "ls", "-q"], capture_output=True, text=True)
        found = []
        for container in listing.stdout.split():
            info = subprocess.run([*ctr, "info", container], capture_output=True, text=True)
            if info.returncode != 0:
                continue
            spec = json.loads(info.stdout).get("Spec") or {}
            for ns in (spec.get("linux") or {}).get("namespaces") or []:
                path = ns.get("path") or ""
                if ns.get("type") == "network" and Path(path).parent.name == "netns":
                    found.append(Path(path).name)
        return sorted(set(found))

    def stop(self) -> None:
        """kubelet by PID; then every process in the node's cgroups (containers, shims, containerd);
        then the mounts under the node's directory, its Pod namespaces, cgroups and log symlinks."""
        for component in ("kube-proxy", "kubelet"):
            if component in self.processes:
                stop_pid(self.processes[component].pid, timeout=10)
        netns = self.sandbox_netns()
        cgroups.kill_all(self.cgroup_root)
        for proc in self.processes.values():
            stop_pid(proc.pid, timeout=5)
        self.processes.clear()
        _unmount_under(self.paths.directory)
        for name in netns:
            sh("ip", "netns", "del", name, check=False)
        cgroups.remove(self.cgroup_root)
        if CONTAINER_LOGS.is_dir():
            for link in CONTAINER_LOGS.iterdir():
                with contextlib.suppress(OSError):
                    if link.is_symlink() and str(os.readlink(link)).startswith(str(self.paths.pod_logs)):
                        link.unlink()


def _listening(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def _ctr_ok(sock: Path) -> bool:
    if not sock.exists():
        return False
    return subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True).returncode == 0


def _unmount_under(directory: Path) -> None:
    """Unmount everything containerd and kubelet mounted below ``directory``, deepest first."""
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
