"""``fabmesh lab up --nodes real``: every lab host a real Kubernetes node, fabmesh installed by its Helm chart.

What a cluster has before fabmesh is all the lab itself runs: etcd, kube-apiserver (inside a cloud
host, ``api_host``, so it reaches edge kubelets through the mesh as on a real cloud node),
kube-controller-manager and kube-scheduler; on every host a kubelet with its own containerd
(:class:`~fabmesh.testenv.kubenode.KubeNode`) and kube-proxy; real flanneld on the cloud hosts
only. Then ``helm install charts/fabmesh`` with the product image built here (imported into every
node's containerd, ``pullPolicy=Never``): the operator Deployment, the route agent DaemonSet and
the agent and connector Pods the operator creates all run as Pods. The matrix pods are busybox
Pods created through the API. Everything started is recorded in :class:`LabState` as it runs;
:func:`fabmesh.lab.teardown.down` stops kubelets and kube-proxies by PID, then removes each node
with :func:`~fabmesh.testenv.kubenode.clean_node` (its cgroups, mounts, Pod namespaces).

Placement as an admin would set it: the edges carry the edge label (and their communities), the
connector the connector label; edges and the connector are cordoned, so the scheduler puts the
operator on a plain cloud node (the operator pins its own Pods with ``nodeName``; the matrix Pods
name theirs too). Cloud Nodes get ``spec.podCIDR`` from the topology (kube-controller-manager's
allocator stays off: the topology's addressing is the lab's).

Each node has its own CNI config directory; the agent Pods' hostPath names one path for all of them
(``operator.settings.node.cni_conf_dir``), which each node's containerd sees as its own directory
(``KubeNode(shared_cni_dir=...)``, a bind mount in containerd's mount namespace).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import bringup, probe
from fabmesh.lab.bringup import Progress, cloud_conflist
from fabmesh.lab.processes import host as lab_host
from fabmesh.lab.state import LabPod, LabState
from fabmesh.lab.topology import Topology
from fabmesh.mesh import names
from fabmesh.mesh.model import Backend
from fabmesh.testenv.assets import ensure_node_assets
from fabmesh.testenv.cluster import CHART
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import unique_prefix, wait_for
from fabmesh.testenv.images import LocalImages, ensure_local_images
from fabmesh.testenv.kubenode import KubeNode, NodeLink, shared_dir_stays_private
from fabmesh.testenv.product_image import ProductImage, ensure_product_image
from fabmesh.testenv.realcluster import NAMESPACE, install_values, node_ready, publish_api_endpoint

CLOUD_BRIDGE = "cni0"  # the bridge of the cloud conflist (flannel's name)
EDGE_BRIDGE = "fabmesh0"  # the chart's default operator.settings.node.bridge
POD_NAMESPACE = "default"


def _quiet(_: str) -> None:
    pass


def default_api_host(topology: Topology) -> str:
    """The first cloud host that is not the connector: where the API server runs."""
    for node in topology.nodes:
        if node.role.value == "cloud":
            return node.name
    raise ValueError("topology: --nodes real needs a cloud node that is not the connector for the API server")


def up(topology: Topology, directory: Path, progress: Progress = _quiet, timeout: float = 300,
       api_host: str | None = None) -> LabState:
    """Build the real-node lab in ``directory`` and wait for every tunnel; raises on the first step that fails."""
    progress("building or finding kubelet and friends, the test images and the product image (cached)")
    binaries = ensure_node_assets()
    images = ensure_local_images()
    product = ensure_product_image()
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    shared_cni = directory / "cni"
    shared_cni.mkdir(exist_ok=True)
    if not shared_dir_stays_private(shared_cni):
        raise RuntimeError(f"lab directory {directory}: its mount is not private, so the per-node CNI bind "
                           "mount would leak to the whole box; use a --dir on a private mount")
    state = LabState(prefix=unique_prefix("fmlab"), directory=str(directory), backend=Backend.LIBIPSEC,
                     nodes="real")
    state.save()
    progress("creating hosts (network namespaces)")
    net = bringup._create_hosts(state, topology, directory / "hosts")
    for h in state.hosts:  # kubelet's --node-ip: the host's own address (an edge on the WAN too)
        h.node_ip = h.wan_ip
    api_host = api_host or default_api_host(topology)
    host = state.host(api_host)
    if host.role != "cloud":
        raise ValueError(f"api_host {api_host}: must be a cloud host that is not the connector, not a {host.role}")
    progress(f"starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler in {api_host}")
    cp = bringup._start_control_plane(state, directory / "controlplane", timeout, host, service_accounts=True)
    try:
        cp.start_controllers(binaries)
    finally:
        state.pids.update({f"controlplane-{i}": pid for i, pid in enumerate(cp.pids)})
        state.save()
    admin = Kube(load_api_client(str(cp.kubeconfig)))
    link = NodeLink.inside(cp, directory / "link")
    progress(f"starting {len(state.hosts)} nodes (containerd + kubelet, images imported)")
    nodes = _start_nodes(state, cp, link, binaries, images, product, shared_cni)
    _place_nodes(admin, state, timeout)
    progress("starting kube-proxy on every node")
    for h in state.hosts:
        nodes[h.name].start_kube_proxy(cp, link, cluster_cidr=topology.cloud_pod_cidr,
                                       local_bridge=EDGE_BRIDGE if h.role == "edge" else CLOUD_BRIDGE)
        state.pids[f"kube-proxy-{h.name}"] = nodes[h.name].processes["kube-proxy"].pid
        state.save()
    publish_api_endpoint(admin, host.wan_ip, int(cp.lab_url.rsplit(":", 1)[1]))
    progress("starting flanneld on the cloud hosts")
    bringup._start_flannel(state, cp, admin, net, topology.cloud_pod_cidr, directory, timeout)
    progress("helm install charts/fabmesh")
    _helm_install(cp, directory, product, topology, shared_cni)
    progress("waiting for the operator, the connector and the agent Pods, and every Node Ready")
    _wait_fabmesh(admin, state, timeout)
    progress("creating the matrix Pods through the API")
    _add_pods(admin, state, nodes, images, timeout)
    progress("waiting for every tunnel")
    probe.wait_tunnels(state, timeout)
    return state


def _start_nodes(state: LabState, cp: ControlPlane, link: NodeLink, binaries: Path, images: LocalImages,
                 product: ProductImage, shared_cni: Path) -> dict[str, KubeNode]:
    """Every host's containerd and kubelet, started side by side (importing the images dominates)."""
    nodes: dict[str, KubeNode] = {}
    for h in state.hosts:
        edge = h.role == "edge"
        node = KubeNode(host=lab_host(state, h.name), name=h.name, pod_cidr=h.pod_cidr or "", binaries=binaries,
                        images=images, archives=(product.archive,), bridge_cni=False,
                        shared_cni_dir=shared_cni if edge else None)
        if not edge:  # flannel's conflist; on edges the agent Pod writes fabmesh's
            cloud_conflist(node.paths.cni_conf_dir / "10-flannel.conflist", h.pod_cidr or "", node.paths.ipam_dir)
        nodes[h.name] = node

    def start(node: KubeNode) -> None:
        try:
            node.start(cp, link)
        finally:
            for component, proc in node.processes.items():
                state.pids[f"{component}-{node.name}"] = proc.pid

    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        results = [pool.submit(start, n) for n in nodes.values()]
    try:
        for result in results:
            result.result()
    finally:
        state.save()
    return nodes


def _place_nodes(admin: Kube, state: LabState, timeout: float) -> None:
    """Labels, cloud pod CIDRs and cordons on the Nodes the kubelets registered; cloud Nodes Ready."""
    for h in state.hosts:
        wait_for(lambda n=h.name: admin.get("nodes", n), timeout=timeout, interval=0.5,
                 what=f"Node {h.name} registered by its kubelet")
        labels: dict[str, str] = {}
        patch: dict[str, Any] = {"metadata": {"labels": labels}}
        if h.role == "edge":
            labels[names.EDGE_LABEL] = ""
            labels.update({f"{names.COMMUNITY_LABEL_PREFIX}{c}": "" for c in h.communities})
        elif h.role == "connector":
            labels[names.CONNECTOR_LABEL] = ""
        if h.role != "edge":
            patch["spec"] = {"podCIDR": h.pod_cidr, "podCIDRs": [h.pod_cidr]}
        if h.role != "cloud":
            patch.setdefault("spec", {})["unschedulable"] = True
        admin.merge_patch("nodes", h.name, patch)
    for h in state.hosts:
        if h.role != "edge":
            wait_for(lambda n=h.name: node_ready(admin, n), timeout=timeout, interval=0.5, what=f"Node {h.name} Ready")


def helm_env(directory: Path) -> dict[str, str]:
    """helm's config, cache and data under the lab directory, out of the user's home."""
    home = directory / "helm"
    return {**os.environ, "KUBECACHEDIR": str(home / "kube-cache"),
            **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}


def _helm_install(cp: ControlPlane, directory: Path, product: ProductImage, topology: Topology,
                  shared_cni: Path) -> None:
    assert cp.assets is not None
    settings = "operator.settings."
    done = subprocess.run([
        str(cp.assets.helm), "install", "fabmesh", str(CHART), "--namespace", NAMESPACE, "--create-namespace",
        "--kubeconfig", str(cp.kubeconfig), *install_values(product, str(shared_cni)),
        "--set", f"{settings}edge_pod_pool={topology.edge_pod_pool}",
        "--set", f"{settings}cloud_pod_cidrs={{{topology.cloud_pod_cidr}}}",
        "--set", f"{settings}service_cidr={topology.service_cidr}",
        "--set", f"{settings}resync_period_s=10",
        # A lab is watched by a person: tunnel state in the API within seconds (docs/operator.md, Debugging).
        "--set", f"{settings}node.status_poll_s=2", "--set", f"{settings}node.status_min_interval_s=2",
    ], capture_output=True, text=True, env=helm_env(directory), timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"helm install charts/fabmesh failed: {done.stdout}{done.stderr}")


def _running(pod: dict[str, Any] | None) -> bool:
    status = (pod or {}).get("status") or {}
    ready = status.get("containerStatuses") or []
    return status.get("phase") == "Running" and bool(ready) and all(s.get("ready") for s in ready)


def _wait_fabmesh(admin: Kube, state: LabState, timeout: float) -> None:
    from fabmesh.operator.objects import agent_pod_name, connector_pod_name

    wait_for(lambda: any(_running(p) for p in admin.list("pods", NAMESPACE,
                                                         labels="app.kubernetes.io/component=operator")),
             timeout=timeout, interval=1, what=f"the operator Pod Running and Ready (kubectl -n {NAMESPACE} get pods)")
    for h in state.hosts:
        naming = {"edge": agent_pod_name, "connector": connector_pod_name}.get(h.role)
        if naming is not None:
            pod = naming(h.name)
            wait_for(lambda n=pod: _running(admin.get("pods", n, NAMESPACE)), timeout=timeout, interval=1,
                     what=f"Pod {NAMESPACE}/{pod} Running and Ready")
    for h in state.hosts:
        wait_for(lambda n=h.name: node_ready(admin, n), timeout=timeout, interval=1,
                 what=f"Node {h.name} Ready (an edge: once its agent Pod wrote the conflist)")


def matrix_pod(name: str, node: str, image: str) -> dict[str, Any]:
    """A busybox Pod pinned to ``node``: it logs one line (``kubectl logs``) and sleeps."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": POD_NAMESPACE, "labels": {"fabmesh.io/lab-pod": node}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", f"echo hello-from-{node}; exec sleep 2147483647"]}]}}


def pod_netns(node: KubeNode, ip: str) -> str | None:
    """The sandbox namespace (``cni-*``) on ``node`` holding ``ip``; None if none does (yet)."""
    for ns in node.sandbox_netns():
        addresses = subprocess.run(["ip", "-n", ns, "-o", "-4", "addr", "show"], capture_output=True,
                                   text=True).stdout
        if f" {ip}/" in addresses:
            return ns
    return None


def _add_pods(admin: Kube, state: LabState, nodes: dict[str, KubeNode], images: LocalImages,
              timeout: float) -> None:
    for h in state.hosts:
        admin.create("pods", matrix_pod(f"pod-{h.name}", h.name, images.busybox), namespace=POD_NAMESPACE)
    for h in state.hosts:
        name = f"pod-{h.name}"
        pod = wait_for(lambda n=name: (p := admin.get("pods", n, POD_NAMESPACE)) and _running(p) and p,
                       timeout=timeout, interval=0.5, what=f"Pod {name} Running")
        ip = pod["status"]["podIP"]
        netns = wait_for(lambda n=nodes[h.name], i=ip: pod_netns(n, i), timeout=30, interval=0.5,
                         what=f"the sandbox of Pod {name} ({ip}) on {h.name}")
        state.pods.append(LabPod(name=name, node=h.name, ip=ip, netns=netns))
        if h.role == "edge":
            h.pod_cidr = str(ipaddress.ip_network(f"{ip}/24", strict=False))
        state.save()


def lab_processes(state: LabState) -> set[int]:
    """Every process of the lab: what it recorded (control plane, flanneld, kubelets, kube-proxies), their
    children, and everything in its nodes' cgroups (containerd, shims, every container)."""
    from fabmesh.testenv import cgroups
    from fabmesh.testenv.kubenode import node_cgroup_root

    found = {pid for pid in state.pids.values() if Path(f"/proc/{pid}").exists()}
    for h in state.hosts:
        found |= cgroups.pids(node_cgroup_root(h.netns))
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def rss_mib(pids: set[int]) -> float:
    """Sum of the processes' resident set sizes (VmRSS; shared pages count once per process)."""
    total_kib = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kib / 1024
