"""kubectl on a Pod of a NATed edge, through the mesh: the API server runs on a cloud node that is not the
connector (``ControlPlane(netns=...)`` via ``bringup.up_with_control_plane(api_host="cloud-2")``), and
reaches the edge's real kubelet (``KubeNode``) only through cloud-2's route agent, the connector and the
edge's tunnel. ``kubectl logs``, ``exec``, ``port-forward``, ``cp`` and the kubelet's resource metrics
and stats (what metrics-server and ``kubectl top`` read) all work; with the route agent stopped, or the
tunnel cut, they fail, and they come back when it is restarted or healed.

The edge's kubelet dials the API server at cloud-2's WAN address (through its NAT, as an edge dials a
public API endpoint); the API server dials the kubelet at the edge's InternalIP, its private LAN address,
which only the mesh routes. The Pod uses the node's plain bridge conflist (``KubeNode``): what is
tested is the API server -> kubelet path, not the Pod's network.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import bringup, faults, processes, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import LabNat, LabNode, LabRole, Topology
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import stop_pid, wait_for
from fabmesh.testenv.images import LocalImages
from fabmesh.testenv.kubenode import KubeNode, NodeLink
from tests.conftest import require_root_tools

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

TOPOLOGY = Topology(nats=(LabNat(name="site-1"),), nodes=(
    LabNode(name="connector-1", role=LabRole.CONNECTOR),
    LabNode(name="cloud-2", role=LabRole.CLOUD),
    LabNode(name="edge-1", role=LabRole.EDGE, nat="site-1")))
EDGE = "edge-1"
POD = "debug-me"
# The Pod's own bridge network (KubeNode's conflist), apart from the mesh's edge pool.
POD_CIDR = "10.99.1.0/24"
TIMEOUT = "--request-timeout=10s"


@dataclass
class MeshCluster:
    state: LabState
    control_plane: ControlPlane
    node: KubeNode
    admin: Kube

    def kubectl(self, *args: str, timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        kubectl = self.control_plane.assets.path("kubectl")  # type: ignore[union-attr]
        return subprocess.run([str(kubectl), "--kubeconfig", str(self.control_plane.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout, input=stdin)


def _ready(node: dict | None) -> bool:
    conditions = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, node_binaries: Path,
            local_images: LocalImages) -> Iterator[MeshCluster]:
    require_root_tools("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon", "/usr/lib/cni/bridge")
    directory = tmp_path_factory.mktemp("meshlab")
    node: KubeNode | None = None
    try:
        state, cp = bringup.up_with_control_plane(TOPOLOGY, directory, timeout=120, api_host="cloud-2")
        admin = Kube(load_api_client(str(cp.kubeconfig)))
        node = KubeNode(host=processes.host(state, EDGE), name=EDGE, pod_cidr=POD_CIDR, binaries=node_binaries,
                        images=local_images)
        node.start(cp, NodeLink.inside(cp, directory / "link"))
        wait_for(lambda: _ready(admin.get("nodes", EDGE)), timeout=180, interval=0.5, what=f"Node {EDGE} Ready")
        mesh = MeshCluster(state, cp, node, admin)
        _start_pod(mesh, local_images)
        yield mesh
    finally:
        if node is not None:
            node.stop()
        teardown.down(directory)


def _start_pod(mesh: MeshCluster, images: LocalImages) -> None:
    # busybox applets for kubectl cp (tar) in their own directory; a one-connection-at-a-time server for
    # port-forward; a line for kubectl logs.
    script = ("mkdir -p /opt/bb && /bin/busybox --install -s /opt/bb; echo hello-from-the-edge; "
              "while true; do echo forwarded-from-the-edge | nc -l -p 8080; done")
    mesh.admin.create("pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": "default"},
        "spec": {"nodeName": EDGE, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": images.busybox, "imagePullPolicy": "Never",
            "env": [{"name": "PATH", "value": "/bin:/opt/bb"}],
            "command": ["/bin/sh", "-c", script]}]}}, namespace="default")
    wait_for(lambda: ((mesh.admin.get("pods", POD, "default") or {}).get("status") or {}).get("phase") == "Running",
             timeout=120, interval=0.5, what=f"Pod {POD} Running")


def _logs_work(mesh: MeshCluster) -> bool:
    done = mesh.kubectl("logs", POD, TIMEOUT)
    return done.returncode == 0 and "hello-from-the-edge" in done.stdout


def test_the_api_server_runs_on_a_cloud_node_that_is_not_the_connector_and_the_edge_is_nated(
        cluster: MeshCluster) -> None:
    state = cluster.state
    assert state.api_host == "cloud-2" and state.host("cloud-2").role == "cloud"
    edge = state.host(EDGE)
    assert edge.nat == "site-1"
    node = cluster.admin.get("nodes", EDGE)
    assert {a["type"]: a["address"] for a in node["status"]["addresses"]}["InternalIP"] == edge.node_ip  # type: ignore[index]
    # cloud-2 reaches the edge's address only through the route agent's route, via the connector.
    route = json.loads(processes.host(state, "cloud-2").run("ip", "-j", "route", "get", edge.node_ip).stdout)[0]
    assert route["gateway"] == state.host("connector-1").wan_ip and route["table"] == "2621", route


def test_kubectl_logs(cluster: MeshCluster) -> None:
    assert wait_for(lambda: _logs_work(cluster), timeout=60, interval=1, what="kubectl logs through the mesh")


def test_kubectl_exec_non_interactive(cluster: MeshCluster) -> None:
    done = cluster.kubectl("exec", POD, TIMEOUT, "--", "sh", "-c", "echo exec-on-$(hostname)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"exec-on-{POD}"


def test_kubectl_exec_with_stdin(cluster: MeshCluster) -> None:
    done = cluster.kubectl("exec", "-i", POD, TIMEOUT, "--", "sh", "-c", "read line; echo got-$line",
                           stdin="through-the-tunnel\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "got-through-the-tunnel"


def test_kubectl_exec_interactive_with_a_tty(cluster: MeshCluster) -> None:
    # script(1) gives kubectl a terminal, as a person's shell would: -t needs one on kubectl's side.
    kubectl = cluster.control_plane.assets.path("kubectl")  # type: ignore[union-attr]
    command = (f"{kubectl} --kubeconfig {cluster.control_plane.kubeconfig} exec -it {POD} {TIMEOUT} -- "
               "sh -c 'tty; echo interactive-$((6*7))'")
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interactive-42" in done.stdout and "/dev/pts/" in done.stdout, done.stdout


def test_kubectl_port_forward(cluster: MeshCluster) -> None:
    kubectl = cluster.control_plane.assets.path("kubectl")  # type: ignore[union-attr]
    forward = subprocess.Popen([str(kubectl), "--kubeconfig", str(cluster.control_plane.kubeconfig), "port-forward",
                                POD, "--address", "127.0.0.1", ":8080"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8080"
        match = re.search(r"127\.0\.0\.1:(\d+) -> 8080", line)
        assert match, line
        received = b""
        with socket.create_connection(("127.0.0.1", int(match[1])), timeout=20) as sock:
            while b"forwarded-from-the-edge" not in received and (chunk := sock.recv(1024)):
                received += chunk
    finally:
        stop_pid(forward.pid)
    assert b"forwarded-from-the-edge" in received


def test_kubectl_cp_both_ways(cluster: MeshCluster, tmp_path: Path) -> None:
    source = tmp_path / "to-edge.txt"
    source.write_text("copied-into-the-edge\n")
    up = cluster.kubectl("cp", str(source), f"default/{POD}:/tmp/to-edge.txt", TIMEOUT)
    assert up.returncode == 0, up.stderr
    seen = cluster.kubectl("exec", POD, TIMEOUT, "--", "cat", "/tmp/to-edge.txt")
    assert seen.stdout == "copied-into-the-edge\n", seen.stderr
    back = tmp_path / "from-edge.txt"
    down = cluster.kubectl("cp", f"default/{POD}:/tmp/to-edge.txt", str(back), TIMEOUT)
    assert down.returncode == 0, down.stderr
    assert back.read_text() == "copied-into-the-edge\n"


def test_kubelet_resource_metrics_and_stats_as_metrics_server_reads_them(cluster: MeshCluster) -> None:
    metrics = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{EDGE}/proxy/metrics/resource", TIMEOUT)
    assert metrics.returncode == 0, metrics.stderr
    assert "node_cpu_usage_seconds_total" in metrics.stdout or "scrape_error 0" in metrics.stdout, metrics.stdout[:500]
    summary = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{EDGE}/proxy/stats/summary", TIMEOUT)
    assert summary.returncode == 0, summary.stderr
    stats = json.loads(summary.stdout)
    assert stats["node"]["nodeName"] == EDGE
    assert POD in {p["podRef"]["name"] for p in stats.get("pods", [])}


def test_without_the_route_agent_kubectl_logs_fails_and_it_comes_back_with_it(cluster: MeshCluster) -> None:
    state = cluster.state
    assert _logs_work(cluster)
    stop_pid(state.pids["node-cloud-2"])  # SIGTERM: the agent removes its routes
    try:
        failed = cluster.kubectl("logs", POD, TIMEOUT)
        assert failed.returncode != 0 and "hello-from-the-edge" not in failed.stdout
        assert cluster.kubectl("exec", POD, TIMEOUT, "--", "true").returncode != 0
    finally:
        processes.start_node_process(state, "cloud-2")
    assert wait_for(lambda: _logs_work(cluster), timeout=60, interval=1, what="kubectl logs after the agent restart")


def test_with_the_tunnel_cut_kubectl_logs_fails_and_heals(cluster: MeshCluster) -> None:
    state = cluster.state
    assert _logs_work(cluster)
    # Only edge-1 <-> connector-1: the kubelet still reaches the API server on cloud-2 (the Node stays Ready).
    faults.cut(state, EDGE, "connector-1")
    try:
        started = time.monotonic()
        failed = cluster.kubectl("logs", POD, "--request-timeout=8s", timeout=60)
        assert failed.returncode != 0 and "hello-from-the-edge" not in failed.stdout
        print(f"\n[measure] kubectl logs with the tunnel cut failed after {time.monotonic() - started:.1f}s")
    finally:
        faults.heal(state, EDGE)
    assert wait_for(lambda: _logs_work(cluster), timeout=120, interval=2, what="kubectl logs after heal")
