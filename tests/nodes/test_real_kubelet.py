"""One real node (containerd 1.6 + runc + kubelet 1.37) on a lab host: it registers Ready and runs a
Pod created through the API with the real CNI bridge plugin, and the box's own namespace gains no
interface, address or route for it. ``kubectl logs`` is not tested here: the API server on the box's
loopback cannot dial a kubelet without a route into the lab, so the Pod's output is read from the log
file kubelet wrote (``test_mesh_kubectl.py`` runs the API server inside the mesh for ``kubectl logs``)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from fabmesh.kube.client import Kube
from fabmesh.testenv import cgroups
from fabmesh.testenv.assets import KUBERNETES_VERSION
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Network, owned_namespaces, unique_prefix, wait_for
from fabmesh.testenv.images import LocalImages
from fabmesh.testenv.kubenode import KubeNode, NodeLink

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

POD_CIDR = "10.244.1.0/24"


def _condition(node: dict, kind: str) -> str | None:
    for condition in node.get("status", {}).get("conditions", []):
        if condition["type"] == kind:
            return condition["status"]
    return None


@pytest.fixture(scope="module")
def node(node_network: tuple[Network, NodeLink], control_plane: ControlPlane, node_binaries: Path,
         local_images: LocalImages, admin: Kube) -> Iterator[KubeNode]:
    net, link = node_network
    host = net.add_host("node-1")
    kube_node = KubeNode(host=host, name="node-1", pod_cidr=POD_CIDR, binaries=node_binaries, images=local_images)
    try:
        started = time.monotonic()
        kube_node.start(control_plane, link)
        wait_for(lambda: (n := admin.get("nodes", "node-1")) is not None and _condition(n, "Ready") == "True",
                 timeout=180, interval=0.5, what="Node node-1 Ready")
        print(f"\n[measure] node start to Ready: {time.monotonic() - started:.1f}s")
        yield kube_node
    finally:
        kube_node.stop()
        admin.delete("nodes", "node-1")


def test_node_registers_ready_with_its_internal_ip(node: KubeNode, admin: Kube,
                                                   control_plane: ControlPlane) -> None:
    observed = admin.get("nodes", "node-1")
    assert observed is not None
    assert _condition(observed, "Ready") == "True"
    addresses = {a["type"]: a["address"] for a in observed["status"]["addresses"]}
    assert addresses["InternalIP"] == node.host.wan_ip
    assert observed["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6.")
    assert observed["status"]["nodeInfo"]["kubeletVersion"] == KUBERNETES_VERSION
    kubectl = control_plane.assets.path("kubectl")  # type: ignore[union-attr]
    table = subprocess.run([str(kubectl), "--kubeconfig", str(control_plane.kubeconfig), "get", "nodes",
                            "--no-headers"], capture_output=True, text=True, check=True).stdout
    assert table.split()[:2] == ["node-1", "Ready"], table


def test_pod_runs_with_real_cni_and_its_output_reaches_the_pod_log(node: KubeNode, admin: Kube,
                                                                    local_images: LocalImages) -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {
            "nodeName": "node-1",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": local_images.busybox, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c",
                            "echo hello-from-$(hostname); ip -4 -o addr show eth0; exec sleep 3600"],
            }],
        },
    }
    started = time.monotonic()
    admin.create("pods", pod, namespace="default")
    try:
        running = wait_for(lambda: (p := admin.get("pods", "hello", "default")) is not None
                           and p.get("status", {}).get("phase") == "Running" and p,
                           timeout=120, interval=0.3, what="Pod hello Running")
        print(f"\n[measure] pod create to Running: {time.monotonic() - started:.1f}s")
        pod_ip = running["status"]["podIP"]
        assert pod_ip.startswith("10.244.1."), running["status"]
        # The sandbox is a real namespace wired by the bridge plugin, on the node's cni0 bridge.
        sandboxes = node.sandbox_netns()
        assert len(sandboxes) == 1 and sandboxes[0].startswith("cni-"), sandboxes
        assert node.host.run("ping", "-c", "1", "-W", "2", pod_ip, check=False).returncode == 0
        bridge = json.loads(node.host.run("ip", "-j", "-4", "addr", "show", "cni0").stdout)
        assert bridge[0]["addr_info"][0]["local"] == "10.244.1.1"

        # What the container printed, from the CRI log kubelet wrote under the node's podLogsDir.
        uid = running["metadata"]["uid"]
        log = node.paths.pod_logs / f"default_hello_{uid}" / "main" / "0.log"
        text = wait_for(lambda: log.is_file() and "hello-from-hello" in (t := log.read_text()) and t,
                        timeout=30, interval=0.3, what=f"{log}")
        assert f"inet {pod_ip}/24" in text, text
    finally:
        admin.delete("pods", "hello", "default", grace_period_s=0)


def _root_namespace() -> tuple[set[str], str, str]:
    """The box's own links (names), addresses and routes, as ``ip`` prints them."""
    links = {link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                                                 text=True, check=True).stdout)}
    addresses = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True,
                            check=True).stdout
    return links, addresses, routes


def test_node_link_adds_nothing_to_the_root_namespace(tmp_path: Path, control_plane: ControlPlane,
                                                      admin: Kube) -> None:
    """The relay to the API server must work from the lab WAN while the box's own namespace gains no
    interface, address or route (the project's rule: test networks live in the tests' namespaces)."""
    wan = "203.0.113.208/28"
    before = _root_namespace()
    net = Network(prefix=unique_prefix("fmt"), directory=tmp_path / "net", wan_cidr=wan).create()
    link = NodeLink(network=net, directory=tmp_path / "link")
    try:
        link.start(control_plane)
        host = net.add_host("probe")
        # A client in the lab reaches the API server through the relay (any HTTP status is an answer).
        code = host.run("curl", "-sk", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                        f"{link.server}/version", check=False).stdout
        assert code not in ("", "000"), code
        links, addresses, routes = _root_namespace()
        assert "203.0.113.2" not in addresses and "203.0.113.2" not in routes, (addresses, routes)
        assert links - before[0] == set(), links - before[0]
        assert routes == before[2], routes
        relays = [r.pid for r in link.relays]
        sock = link.socket_path
        assert sock is not None and sock.is_socket()
    finally:
        link.stop()
        net.destroy()
    assert not sock.exists()
    assert all(not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
               for pid in relays), relays


def test_daemonset_pod_is_made_scheduled_and_collected_by_the_real_controllers(node: KubeNode, admin: Kube,
                                                                               local_images: LocalImages) -> None:
    """kube-controller-manager makes the DaemonSet's Pod, kube-scheduler binds it (DaemonSet Pods go
    through the scheduler), kubelet runs it; deleting the DaemonSet lets the garbage collector remove
    the Pod by its owner reference."""
    apps = client.AppsV1Api(admin.api)
    labels = {"app": "probe"}
    daemonset = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "probe", "namespace": "default"},
        "spec": {"selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": local_images.busybox, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"]}]}}},
    }
    apps.create_namespaced_daemon_set("default", daemonset)
    try:
        pod = wait_for(lambda: next((p for p in admin.list("pods", "default", labels="app=probe")
                                     if p.get("status", {}).get("phase") == "Running"), None),
                       timeout=120, interval=0.5, what="DaemonSet probe's Pod Running")
        assert pod["spec"]["nodeName"] == "node-1"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    finally:
        apps.delete_namespaced_daemon_set("probe", "default")
    wait_for(lambda: not admin.list("pods", "default", labels="app=probe"), timeout=120, interval=0.5,
             what="the garbage collector to delete probe's Pod")


def test_cluster_ip_service_reaches_its_pod_through_kube_proxys_rules(node: KubeNode, admin: Kube,
                                                                     control_plane: ControlPlane,
                                                                     node_network: tuple[Network, NodeLink],
                                                                     local_images: LocalImages) -> None:
    """The real kube-proxy (iptables mode) in the node's namespace programs a ClusterIP Service whose
    endpoint (from the real EndpointSlice controller) is a Pod the scheduler placed on the node."""
    _, link = node_network
    node.start_kube_proxy(control_plane, link, cluster_cidr="10.244.0.0/16")
    labels = {"app": "web"}
    admin.create("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": labels},
                          "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                              "name": "main", "image": local_images.busybox, "imagePullPolicy": "Never",
                              "command": ["sh", "-c", "echo hello-from-web > /tmp/index.html; "
                                                      "exec busybox httpd -f -p 8080 -h /tmp"]}]}},
                 namespace="default")
    service = admin.create("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                        "spec": {"selector": labels,
                                                 "ports": [{"port": 80, "targetPort": 8080}]}},
                           namespace="default")
    cluster_ip = service["spec"]["clusterIP"]
    try:
        def fetch() -> str:
            # Not ``wget -T``: busybox 1.35's wget segfaults with it; the subprocess timeout bounds it.
            try:
                done = subprocess.run(["nsenter", f"--net=/run/netns/{node.host.netns}", "busybox", "wget", "-q",
                                       "-O-", f"http://{cluster_ip}/index.html"],
                                      capture_output=True, text=True, timeout=5)
            except subprocess.TimeoutExpired:
                return ""
            return done.stdout if done.returncode == 0 else ""

        try:
            body = wait_for(fetch, timeout=120, interval=0.5, what=f"http://{cluster_ip}/ via kube-proxy")
        except TimeoutError:
            pod = admin.get("pods", "web", "default") or {}
            slices = admin._call("GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices")
            placed = pod.get("spec", {}).get("nodeName")
            raise AssertionError(f"no answer from {cluster_ip}: pod spec.nodeName={placed} "
                                 f"status={pod.get('status')} slices={slices.get('items')}") from None
        assert body == "hello-from-web\n"
        rules = node.host.run("iptables-save", "-t", "nat").stdout
        assert f"-d {cluster_ip}/32" in rules and "KUBE-SVC-" in rules, rules
    finally:
        admin.delete("services", "web", "default")
        admin.delete("pods", "web", "default", grace_period_s=0)


def test_stop_leaves_no_process_cgroup_mount_or_namespace(node_network: tuple[Network, NodeLink],
                                                        control_plane: ControlPlane, node_binaries: Path,
                                                        local_images: LocalImages, admin: Kube) -> None:
    """A node stopped with a Pod still running (no graceful deletion) must leave nothing behind."""
    net, link = node_network
    host = net.add_host("node-2")
    kube_node = KubeNode(host=host, name="node-2", pod_cidr="10.244.2.0/24", binaries=node_binaries,
                         images=local_images)
    try:
        kube_node.start(control_plane, link)
        wait_for(lambda: (n := admin.get("nodes", "node-2")) is not None and _condition(n, "Ready") == "True",
                 timeout=180, interval=0.5, what="Node node-2 Ready")
        admin.create("pods", {"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": "left-running", "namespace": "default"},
                              "spec": {"nodeName": "node-2", "containers": [{
                                  "name": "main", "image": local_images.busybox, "imagePullPolicy": "Never",
                                  "command": ["sleep", "3600"]}]}}, namespace="default")
        wait_for(lambda: (p := admin.get("pods", "left-running", "default")) is not None
                 and p.get("status", {}).get("phase") == "Running", timeout=120, interval=0.3,
                 what="Pod left-running Running")
        sandboxes = kube_node.sandbox_netns()
        assert sandboxes and cgroups.pids(kube_node.cgroup_root)
    finally:
        kube_node.stop()
        admin.delete("pods", "left-running", "default", grace_period_s=0)
        admin.delete("nodes", "node-2")
    assert cgroups.pids(kube_node.cgroup_root) == set()
    assert not any((h / kube_node.cgroup_root.strip("/")).exists() for h in cgroups.all_hierarchies())
    assert not set(sandboxes) & set(owned_namespaces(""))
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(kube_node.paths.directory) not in mounts
