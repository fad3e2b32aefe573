"""Real Kubernetes nodes in a lab host's namespace: containerd + runc + kubelet, stopped and cleaned by us.

A node is a :class:`fabmesh.testenv.hosts.Host` (a network namespace on the lab
WAN) running its own containerd and kubelet, both entered with
``nsenter --net=/run/netns/<host>``: ``ip netns exec`` would remount ``/sys``
and hide the cgroup v1 mounts from kubelet and runc. Both share the box's
mount and PID namespaces, so every path is per node (see
:mod:`fabmesh.testenv.nodeconfig`) and every process lives in the node's own
cgroup subtree (:mod:`fabmesh.testenv.cgroups`).

The API server listens on the box's loopback, which a namespace cannot reach,
and the box itself gets no interface, address or route for the lab: a
:class:`NodeLink` relays the API server through a unix socket instead (files
are shared across network namespaces). One ``socat`` in the root namespace
joins ``<link dir>/api.sock`` to ``127.0.0.1:<port>``; a second, in the WAN
bridge's namespace (which the lab created), listens on an address of the WAN
on ``br0`` and connects to that socket. Kubelets dial it with
``tls-server-name: localhost``, the name on the API server's certificate. The
way back (the API server dialling a kubelet for ``kubectl logs`` or ``exec``)
would need the box to route to the lab, so it is not offered here: it needs
the API server inside the mesh's network (issue 14).

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
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fabmesh.pki.authority import issue_leaf
from fabmesh.testenv import cgroups
from fabmesh.testenv.controlplane import SERVICE_CIDR, ControlPlane
from fabmesh.testenv.hosts import Host, Network, sh, stop_pid, vici_ready, wait_for
from fabmesh.testenv.images import LocalImages, import_archive, import_images
from fabmesh.testenv.nodeconfig import (
    KUBELET_SYSCTLS,
    NodePaths,
    bridge_conflist,
    kube_proxy_config,
    kubelet_config,
    kubelet_launcher,
    render_containerd_config,
)

UNIX_PATH_MAX = 108  # sun_path, NUL included
CONTAINER_LOGS = Path("/var/log/containers")  # kubelet's symlinks; a fixed path in kubelet
HOST_LOCAL_DIR = Path("/var/lib/cni/networks")  # host-local IPAM's leases when a conflist names no dataDir


class NodeError(RuntimeError):
    """A node failed to start; the message names the node, the component and its log."""


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True)


@dataclass
class NodeLink:
    """The API server relayed into the lab WAN over loopback and a unix socket; nothing in the root namespace.

    When the API server already runs inside the lab (``ControlPlane(netns=...)``), :meth:`inside` makes a
    link with nothing to relay: kubelets dial its ``lab_url``.
    """

    network: Network | None
    directory: Path
    address: str = ""
    socket_path: Path | None = None
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: str = ""

    @classmethod
    def inside(cls, control_plane: ControlPlane, directory: Path) -> NodeLink:
        """The link to an API server running in a lab host's namespace: its own address there, no relay."""
        if not control_plane.lab_url:
            raise NodeError("NodeLink.inside: the control plane does not run inside the lab (no netns)")
        return cls(network=None, directory=directory, address=control_plane.host_address or "",
                   server=control_plane.lab_url)

    def start(self, control_plane: ControlPlane) -> NodeLink:
        assert self.network is not None, "a relay needs the WAN to listen on"
        wan = ipaddress.ip_network(self.network.wan_cidr)
        self.address = str(wan.broadcast_address - 1)
        api_port = int(control_plane.url.rsplit(":", 1)[1])
        self.directory.mkdir(parents=True, exist_ok=True)
        sock = self.directory / "api.sock"
        if len(str(sock)) >= UNIX_PATH_MAX:
            raise NodeError(f"NodeLink directory {self.directory}: socket path {sock} is longer than "
                            f"{UNIX_PATH_MAX - 1} bytes")
        self.socket_path = sock
        try:
            # Root namespace: the unix socket to the API server on loopback.
            root = _spawn(["socat", f"UNIX-LISTEN:{sock},fork,unlink-early,mode=600", f"TCP:127.0.0.1:{api_port}"],
                          self.directory / "relay-root.log")
            self.relays.append(root)
            wait_for(lambda: root.poll() is not None or vici_ready(sock), timeout=10,
                     what=f"API relay socket {sock}")
            self._check(root, "root", sock)
            # WAN namespace: an address on the bridge, and TCP on it to the unix socket.
            wan_ns = self.network.wan_netns
            sh("ip", "-n", wan_ns, "addr", "add", f"{self.address}/{wan.prefixlen}", "dev", "br0")
            sh("ip", "-n", wan_ns, "link", "set", "lo", "up")  # the readiness probe dials from inside
            port = api_port  # any port: the WAN namespace binds nothing else
            inside = _spawn(["nsenter", f"--net=/run/netns/{wan_ns}", "socat",
                             f"TCP-LISTEN:{port},bind={self.address},fork,reuseaddr", f"UNIX-CONNECT:{sock}"],
                            self.directory / "relay-wan.log")
            self.relays.append(inside)
            self.server = f"https://{self.address}:{port}"
            wait_for(lambda: inside.poll() is not None or _healthz_in(wan_ns, self.server), timeout=10,
                     what=f"API relay on {self.address}:{port} in {wan_ns}")
            self._check(inside, "WAN", sock)
        except Exception:
            self.stop()
            raise
        return self

    def _check(self, relay: subprocess.Popen[bytes], side: str, sock: Path) -> None:
        if relay.poll() is not None:
            name = "relay-root.log" if side == "root" else "relay-wan.log"
            raise NodeError(f"NodeLink {side} relay ({sock}) exited ({relay.returncode}); "
                            f"see {self.directory / name}")

    def stop(self) -> None:
        """Both relays by PID (and the children socat forked per connection), then the socket file."""
        for relay in reversed(self.relays):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(relay.pid, signal.SIGTERM)
            stop_pid(relay.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(relay.pid, signal.SIGKILL)
        self.relays.clear()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self.socket_path = None


@dataclass
class KubeNode:
    """One real node on ``host``; :meth:`start` then :meth:`stop` (idempotent, by PID and cgroup)."""

    host: Host
    name: str
    pod_cidr: str
    binaries: Path
    images: LocalImages
    # More OCI archives to import at start (the product image, fabmesh.testenv.product_image).
    archives: tuple[Path, ...] = ()
    # False: no conflist is written, the node stays NotReady until a network plugin writes one
    # (on an edge, fabmesh's agent Pod does, as a DaemonSet-style CNI would).
    bridge_cni: bool = True
    # A path that containerd, and so every container, sees the node's own CNI config directory at
    # (a bind mount in containerd's private mount namespace): a hostPath naming it is the same string
    # on every node, as on real machines, while each node keeps its own directory. None: no mount.
    shared_cni_dir: Path | None = None
    paths: NodePaths = field(init=False)
    cgroup_root: str = field(init=False)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = NodePaths(self.host.directory / "kube")
        self.cgroup_root = node_cgroup_root(self.host.netns)

    def start(self, control_plane: ControlPlane, link: NodeLink) -> KubeNode:
        """containerd (images imported), then kubelet; returns once both run (Ready is the caller's wait)."""
        self._write_files(control_plane, link)
        cgroups.create(self.cgroup_root)
        try:
            # Volumes kubelet mounts in its own mount namespace (Secrets are tmpfs) must reach runc in
            # containerd's: shared before containerd starts, so a private namespace of its own
            # (shared_cni_dir) is in the same peer group too.
            sh("mount", "--bind", str(self.paths.kubelet_root), str(self.paths.kubelet_root))
            sh("mount", "--make-shared", str(self.paths.kubelet_root))
            self._start_containerd()
            import_images(self.images, self.paths.containerd_socket)
            for archive in self.archives:
                import_archive(archive, self.paths.containerd_socket)
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
        if self.bridge_cni:
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
        cmd = ["containerd", "--config", str(self.paths.containerd_config)]
        if self.shared_cni_dir is not None:
            cmd = shared_dir_argv(self.paths.cni_conf_dir, self.shared_cni_dir, cmd)
        proc = self._in_node("containerd", cmd)
        sock = self.paths.containerd_socket
        wait_for(lambda: proc.poll() is not None or _ctr_ok(sock), timeout=60, interval=0.2,
                 what=f"containerd on node {self.name}")
        if proc.poll() is not None:
            raise NodeError(f"node {self.name}: containerd exited ({proc.returncode}); "
                            f"see {self.paths.directory / 'containerd.log'}")

    def _start_kubelet(self) -> None:
        p = self.paths
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

    def start_kube_proxy(self, control_plane: ControlPlane, link: NodeLink, cluster_cidr: str,
                         local_bridge: str | None = None) -> None:
        """kube-proxy (iptables mode) in the node's namespace, as ``system:kube-proxy``.

        ``local_bridge``: the Pods' bridge, by which kube-proxy tells local Pod traffic
        (:func:`fabmesh.testenv.nodeconfig.kube_proxy_config`); None: by ``cluster_cidr``.

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
            p, node_name=self.name, node_ip=self.host.wan_ip, cluster_cidr=cluster_cidr,
            local_bridge=local_bridge)))
        self.host.run("ip", "route", "replace", SERVICE_CIDR, "dev", "wan0")
        proc = self._in_node("kube-proxy", [str(self.binaries / "kube-proxy"), "--config", str(p.kube_proxy_config),
                                            "--v", "2"])
        time.sleep(0.5)
        if proc.poll() is not None:
            raise NodeError(f"node {self.name}: kube-proxy exited ({proc.returncode}); "
                            f"see {p.directory / 'kube-proxy.log'}")

    def sandbox_netns(self) -> list[str]:
        """Names under /run/netns of this node's Pod sandboxes, read from its containerd."""
        return self.sandboxes_of(self.paths.containerd_socket)

    @staticmethod
    def sandboxes_of(sock: Path) -> list[str]:
        """Names under /run/netns of the Pod sandboxes of the containerd at ``sock``."""
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
        def reap() -> None:  # our own children, killed with the cgroup: wait for them
            for proc in self.processes.values():
                stop_pid(proc.pid, timeout=5)
            self.processes.clear()

        clean_node(self.paths, self.cgroup_root, after_kill=reap)


def node_cgroup_root(netns: str) -> str:
    """The cgroup (in every v1 hierarchy) a node on the host namespace ``netns`` runs in."""
    return f"/fabmesh-{netns}"


def clean_node(paths: NodePaths, cgroup_root: str, after_kill: Callable[[], None] | None = None) -> None:
    """Remove what a node's runtime left, from its paths alone (``lab down`` runs in another process):
    its Pod namespaces (read from its containerd while it runs), every process in its cgroups
    (containers, shims, containerd), the mounts under its directory, its cgroups and log symlinks.
    Stop kubelet first, or it starts what this kills again."""
    netns = KubeNode.sandboxes_of(paths.containerd_socket)
    containers = _containers(paths.containerd_socket)
    cgroups.kill_all(cgroup_root)
    release_leases(containers)
    if after_kill is not None:
        after_kill()
    _unmount_under(paths.directory)
    for name in netns:
        sh("ip", "netns", "del", name, check=False)
    cgroups.remove(cgroup_root)
    if CONTAINER_LOGS.is_dir():
        for link in CONTAINER_LOGS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and str(os.readlink(link)).startswith(str(paths.pod_logs)):
                    link.unlink()


def _containers(sock: Path) -> set[str]:
    if not sock.exists():
        return set()
    listing = subprocess.run(["ctr", "--address", str(sock), "-n", "k8s.io", "containers", "ls", "-q"],
                             capture_output=True, text=True)
    return set(listing.stdout.split())


def release_leases(containers: set[str], networks: Path = HOST_LOCAL_DIR) -> list[Path]:
    """Delete host-local IPAM leases held by ``containers`` (a lease file holds its container's ID).

    Killing a node skips CNI DEL, and a conflist without ``dataDir`` (fabmesh's, on edges) keeps its
    leases in the box-wide ``/var/lib/cni/networks/<name>``: every run would leak its Pods'
    addresses there until the range is exhausted. Only files naming one of ``containers`` go.
    """
    removed: list[Path] = []
    if not containers or not networks.is_dir():
        return removed
    for lease in networks.glob("*/*"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if lease.is_file() and lease.read_text().split("\n", 1)[0].strip() in containers:
                lease.unlink()
                removed.append(lease)
    return removed


def shared_dir_argv(own: Path, shared: Path, cmd: list[str]) -> list[str]:
    """``cmd`` in a new mount namespace where ``own`` is also seen at ``shared``.

    Propagation is kept (``--propagation unchanged``): the Pod namespaces containerd mounts under
    the shared ``/run/netns`` and the volumes kubelet mounts under its shared root dir still cross.
    The bind itself stays private as long as the mount holding ``shared`` is private in the box
    (here ``/``, checked by :func:`shared_dir_stays_private`)."""
    inner = f"mount --bind {shlex.quote(str(own))} {shlex.quote(str(shared))} && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", inner, "sh", *cmd]


def shared_dir_stays_private(shared: Path) -> bool:
    """Whether a bind mount at ``shared`` in a child mount namespace stays there (its mount is private)."""
    done = subprocess.run(["findmnt", "-n", "-o", "PROPAGATION", "-T", str(shared)], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "private"


def _healthz_in(netns: str, server: str) -> bool:
    """The whole chain answers: an HTTPS reply (any status) from the API server, dialled from ``netns``."""
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "curl", "-sk", "--max-time", "2",
                           "-o", "/dev/null", "-w", "%{http_code}", f"{server}/healthz"],
                          capture_output=True, text=True)
    return done.stdout.strip() not in ("", "000")


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
