"""What a real lab node's containerd and kubelet are configured with: pure functions, no side effects.

Several nodes share one Linux box, so every path a kubelet or containerd
would take from ``/var/lib`` or ``/run`` is per node here: containerd's root,
state and socket, kubelet's root dir and pod log dir (``/var/log/pods`` is
otherwise shared), the CNI config dir and host-local IPAM's data dir. The
quirks of this machine, found the hard way:

- cgroup v1 only (cgroup2 is mounted as ``unified`` and unused): kubelet 1.37
  refuses v1 unless ``failCgroupV1: false``; containerd 1.6 has no
  RuntimeConfig CRI call, so kubelet falls back to its own ``cgroupDriver``,
  which must be ``cgroupfs`` (no systemd here). Each node has its own
  ``cgroupRoot``, created beforehand in every v1 hierarchy.
- root lacks CAP_SYS_RESOURCE: without containerd's ``restrict_oom_score_adj``
  every sandbox fails with runc's "can't get final child's PID from pipe: EOF".
- no registry: the sandbox image is a local one and image GC is off, since a
  collected image could never be pulled back.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_BIN_DIR = Path("/usr/lib/cni")
KUBELET_PORT = 10250
# Host-wide sysctls kubelet's container manager sets when they differ (setupKernelTunables), with the
# values it wants. On a shared box they must not change (kernel.panic_on_oops=1 would turn any oops
# into a panic), and protectKernelDefaults would only make kubelet refuse to start: so each node's
# kubelet sees these values in files bind-mounted over /proc/sys in its own mount namespace.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


@dataclass(frozen=True)
class NodePaths:
    """Every per-node path, derived from one directory."""

    directory: Path

    @property
    def containerd_config(self) -> Path:
        return self.directory / "containerd.toml"

    @property
    def containerd_root(self) -> Path:
        return self.directory / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.directory / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.directory / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.directory / "kubelet.yaml"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def pod_logs(self) -> Path:
        return self.directory / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.directory / "cni" / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.directory / "cni" / "ipam"

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    @property
    def kube_proxy_config(self) -> Path:
        return self.directory / "kube-proxy.yaml"

    @property
    def kube_proxy_kubeconfig(self) -> Path:
        return self.directory / "kube-proxy.kubeconfig"

    @property
    def sysctls(self) -> Path:
        return self.directory / "sysctl"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_containerd_config(paths: NodePaths, sandbox_image: str) -> str:
    """containerd 1.6 config (schema version 2) for one node: own root, state, socket, CNI dirs."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    tables: list[tuple[str, dict[str, object]]] = [
        ("", {"version": 2, "root": paths.containerd_root, "state": paths.containerd_state}),
        ("grpc", {"address": paths.containerd_socket}),
        # An unused TCP debug/metrics listener would collide between nodes; none is configured.
        (cri, {"sandbox_image": sandbox_image, "restrict_oom_score_adj": True,
               "stream_server_address": "127.0.0.1", "stream_server_port": "0",
               "enable_selinux": False, "disable_apparmor": True}),
        (f"{cri}.cni", {"bin_dir": CNI_BIN_DIR, "conf_dir": paths.cni_conf_dir, "max_conf_num": 1}),
        (f"{cri}.containerd", {"snapshotter": "overlayfs", "default_runtime_name": "runc"}),
        (f"{cri}.containerd.runtimes.runc", {"runtime_type": "io.containerd.runc.v2"}),
        (f"{cri}.containerd.runtimes.runc.options", {"SystemdCgroup": False}),
    ]
    lines: list[str] = []
    for table, values in tables:
        if table:
            lines.append(f"\n[{table}]")
        lines += [f"  {key} = {_toml_value(value)}" if table else f"{key} = {_toml_value(value)}"
                  for key, value in values.items()]
    return "\n".join(lines) + "\n"


def kubelet_config(paths: NodePaths, *, node_ip: str, cgroup_root: str, client_ca: Path) -> dict[str, Any]:
    """The KubeletConfiguration for one node (serialize with yaml.safe_dump)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "cgroupsPerQOS": True,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "address": node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(paths.pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(paths.pki / "kubelet.key"),
        "serverTLSBootstrap": False,
        "rotateCertificates": False,
        # The API server calls in with a client certificate from the cluster CA; the kubelet asks
        # the API server (SubjectAccessReview) whether that identity may read logs or exec.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(client_ca)}},
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(paths.pod_logs),
        "failSwapOn": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A loaded CI box must not evict the lab's pods for want of disk or memory headroom.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "5s",
        "resolvConf": "",
    }


def kube_proxy_config(paths: NodePaths, *, node_name: str, node_ip: str, cluster_cidr: str,
                      local_bridge: str | None = None) -> dict[str, Any]:
    """kube-proxy in iptables mode inside the node's namespace, touching no host-wide sysctl.

    ``nf_conntrack_max`` exists only in the initial network namespace, so ``maxPerCore: 0``
    (leave it alone); the TCP timeouts are left alone too (0s), and ``oomScoreAdj: 0`` because
    root here may not lower a score (no CAP_SYS_RESOURCE).

    ``local_bridge``: tell local Pod traffic by the bridge it comes in on (``detectLocalMode:
    BridgeInterface``) instead of by ``clusterCIDR``. An edge's Pods live in the edge pod pool,
    outside the cloud's cluster CIDR: by CIDR, kube-proxy would masquerade every Service packet
    they send, and the receiver would see the node's address instead of the Pod's.
    """
    detect: dict[str, Any] = {} if local_bridge is None else {
        "detectLocalMode": "BridgeInterface", "detectLocal": {"bridgeInterface": local_bridge}}
    return {**detect,
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(paths.kube_proxy_kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": node_name,
        "bindAddress": node_ip,
        "clusterCIDR": cluster_cidr,
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "127.0.0.1:10256",
        "oomScoreAdj": 0,
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def kubelet_launcher(paths: NodePaths, *, netns: str, cgroup_procs: list[Path], kubelet: list[str]) -> str:
    """A shell script: join the node's cgroups, then a private mount namespace where /proc/sys shows
    kubelet the values it wants (KUBELET_SYSCTLS), then the host's network namespace, then kubelet.

    The mount namespace keeps the host's propagation (``--propagation unchanged``), so the volumes
    kubelet mounts under its root dir (made a shared mount beforehand) reach containerd and runc;
    ``/`` and ``/proc`` are private here, so the sysctl masks never leave kubelet's namespace.
    """
    masks = " && ".join(f"mount --bind {shlex.quote(str(paths.sysctls / key.replace('/', '.')))} "
                        f"/proc/sys/{key}" for key in sorted(KUBELET_SYSCTLS))
    inner = f"{masks} && exec nsenter --net=/run/netns/{netns} " + " ".join(shlex.quote(a) for a in kubelet)
    joins = " ".join(shlex.quote(str(f)) for f in cgroup_procs)
    return ("#!/bin/sh\nset -e\n"
            f'for f in {joins}; do echo $$ > "$f"; done\n'
            f"exec unshare --mount --propagation unchanged -- sh -c {shlex.quote(inner)}\n")


def bridge_conflist(name: str, bridge: str, pod_cidr: str, ipam_dir: Path) -> dict[str, Any]:
    """A plain bridge + host-local network for a node's pods (fabmesh's own conflist comes later).

    host-local keeps its leases in ``dataDir``: per node, or nodes sharing the default
    ``/var/lib/cni/networks/<name>`` would hand out each other's addresses.
    """
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(ipam_dir), "ranges": [[{"subnet": pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
        ],
    }
