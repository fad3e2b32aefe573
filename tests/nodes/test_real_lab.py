"""``fabmesh lab up --nodes real``: the lab where every host is a real node and fabmesh came by ``helm install``.

One lab for the module (:func:`fabmesh.lab.realnodes.up`), the smallest topology that shows every
part: connector-1 and cloud-2 (the API server, kube-controller-manager and kube-scheduler run in
cloud-2's namespace) on the WAN, edge-1 (community ``factory``) and edge-2 (none) behind one NAT.
Every host runs kubelet + containerd and kube-proxy; flanneld runs on the two cloud hosts only; the
operator, the route agent, the connector and the agents run as Pods from the image built here.

What is observed: every Node Ready; the matrix Pods, created through the API, reach each other by
the path the labels call for (the SA counters of the Pods' charons); a ClusterIP Service with its
endpoint on an edge, reached from a cloud Pod, and the reverse, through kube-proxy's rules, the
server seeing the client Pod's own address; a headless Service whose EndpointSlice holds the Pod's
address, reachable at it; ``kubectl fabmesh doctor`` with no FAIL; ``kubectl logs`` of the operator
and of an edge Pod (the API server reaches the edge's kubelet through the mesh); a relabel that
puts both edges in one community turns their relayed path direct (the agent Pods read their
ConfigMaps as the real kubelet projects them); and ``lab down`` leaves no node behind.

Clients run in the matrix Pods' network namespaces (the host's curl, entered with ``nsenter``): the
packets are the Pod's, with its address, through its node's kube-proxy rules.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import probe, realnodes, teardown
from fabmesh.lab.state import LabPod, LabState
from fabmesh.lab.topology import LabNat, LabNode, LabRole, Topology
from fabmesh.mesh.names import COMMUNITY_LABEL_PREFIX
from fabmesh.testenv import cgroups
from fabmesh.testenv.hosts import owned_namespaces, wait_for
from fabmesh.testenv.images import LocalImages
from fabmesh.testenv.kubenode import node_cgroup_root
from fabmesh.testenv.realcluster import NAMESPACE, node_ready
from tests.conftest import require_root_tools

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

TOPOLOGY = Topology(nats=(LabNat(name="site-1"),), nodes=(
    LabNode(name="connector-1", role=LabRole.CONNECTOR),
    LabNode(name="cloud-2", role=LabRole.CLOUD),
    LabNode(name="edge-1", role=LabRole.EDGE, communities=("factory",), nat="site-1"),
    LabNode(name="edge-2", role=LabRole.EDGE, nat="site-1")))
KUBECTL_TIMEOUT = "--request-timeout=15s"
# A busybox httpd whose CGI answers with the address the request came from ($REMOTE_ADDR).
WHOAMI = ("mkdir -p /opt/bb /www/cgi-bin && /bin/busybox --install -s /opt/bb && "
          "printf '#!/bin/sh\\necho Content-type: text/plain\\necho\\necho $REMOTE_ADDR\\n' > /www/cgi-bin/ip && "
          "chmod +x /www/cgi-bin/ip && exec /opt/bb/httpd -f -p 8080 -h /www")


@dataclass
class RealLab:
    state: LabState
    directory: Path
    admin: Kube
    kubectl_path: Path
    images: LocalImages

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.kubectl_path), "--kubeconfig", str(self.state.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout)

    def pod(self, node: str) -> LabPod:
        return next(p for p in self.state.pods if p.node == node)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, node_binaries: Path, local_images: LocalImages,
        flanneld_binary: Path) -> Iterator[RealLab]:
    require_root_tools("ip", "iptables-restore", "ipset", "curl", "findmnt", "unshare")
    for tool in ("mmdebstrap", "buildah"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: scripts/install-deps.sh installs it")
    directory = tmp_path_factory.mktemp("reallab")
    started = time.monotonic()
    try:
        state = realnodes.up(TOPOLOGY, directory, timeout=300)
        print(f"\n[measure] realnodes.up (4 real nodes, helm install, matrix Pods, tunnels): "
              f"{time.monotonic() - started:.1f}s")
        pids = realnodes.lab_processes(state)
        print(f"\n[measure] the lab's processes: {len(pids)}, RSS sum {realnodes.rss_mib(pids):.0f} MiB")
        assert state.kubeconfig
        admin = Kube(load_api_client(state.kubeconfig))
        yield RealLab(state=state, directory=directory, admin=admin, kubectl_path=node_binaries / "kubectl",
                      images=local_images)
    finally:
        teardown.down(directory)


def test_every_node_is_a_ready_kubelet(lab: RealLab) -> None:
    for h in lab.state.hosts:
        assert node_ready(lab.admin, h.name), h.name
        node = lab.admin.get("nodes", h.name)
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")  # type: ignore[index]
    listed = lab.kubectl("get", "nodes", "--no-headers", KUBECTL_TIMEOUT)
    assert listed.returncode == 0, listed.stderr
    statuses = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()}
    assert set(statuses) == {h.name for h in lab.state.hosts}
    assert all(s.split(",")[0] == "Ready" for s in statuses.values()), statuses


def test_fabmesh_runs_as_pods_of_the_helm_release(lab: RealLab) -> None:
    pods = {p["metadata"]["name"]: p for p in lab.admin.list("pods", NAMESPACE)}
    operator = [p for n, p in pods.items() if n.startswith("fabmesh-operator-")]
    assert len(operator) == 1 and operator[0]["spec"]["nodeName"] == "cloud-2", sorted(pods)
    route_agents = [p["spec"]["nodeName"] for n, p in pods.items() if n.startswith("fabmesh-cloud-agent-")]
    assert route_agents == ["cloud-2"]
    assert pods["fabmesh-connector-connector-1"]["spec"]["nodeName"] == "connector-1"
    for edge in ("edge-1", "edge-2"):
        assert pods[f"fabmesh-agent-{edge}"]["spec"]["nodeName"] == edge
    for pod in pods.values():
        assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            assert container["imagePullPolicy"] == "Never" and container["image"].startswith("fabmesh.local/")
    release = lab.admin.list("secrets", NAMESPACE, labels="owner=helm,name=fabmesh")
    assert [s["metadata"]["labels"]["status"] for s in release] == ["deployed"]
    # No process of the lab's own runs fabmesh: it is all in Pods.
    assert not [n for n in lab.state.pids if n.startswith(("operator", "node-", "charon", "nodesim"))], lab.state.pids


def test_matrix_pods_are_api_pods_and_reach_each_other_by_the_intended_path(lab: RealLab) -> None:
    for pod in lab.state.pods:
        api = lab.admin.get("pods", pod.name, realnodes.POD_NAMESPACE)
        assert api is not None and api["status"]["podIP"] == pod.ip and api["spec"]["nodeName"] == pod.node
    report = probe.check(lab.state, wait=60)
    failing = [(p["src"], p["dst"]) for p in report["pairs"] if not p["ok"]]
    assert not failing, failing
    assert len(report["pairs"]) == len(lab.state.pods) * (len(lab.state.pods) - 1)
    wrong = [(p["src"], p["dst"], p["path"], p["intended"]) for p in report["pairs"] if "intended" in p]
    assert not wrong, wrong


def _whoami_pod(name: str, node: str, image: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never", "command": ["sh", "-c", WHOAMI],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}


def _service(name: str, headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def _curl(netns: str, url: str) -> str | None:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "curl", "-s", "--max-time", "3", url],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _serve(lab: RealLab, name: str, node: str, headless: bool = False) -> tuple[str, str]:
    """A whoami Pod on ``node`` behind a Service; returns (the Pod's IP, the Service's ClusterIP or None)."""
    lab.admin.create("pods", _whoami_pod(name, node, lab.images.busybox), namespace="default")
    lab.admin.create("services", _service(name, headless), namespace="default")
    pod = wait_for(lambda: (p := lab.admin.get("pods", name, "default")) and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])) and p,
        timeout=120, interval=0.5, what=f"Pod {name} Ready")
    service = lab.admin.get("services", name, "default")
    return pod["status"]["podIP"], service["spec"]["clusterIP"]  # type: ignore[index]


def _seen_as(netns: str, url: str) -> str:
    """What the whoami server saw the request come from (``[::ffff:a.b.c.d]`` from busybox: the IPv4 part)."""
    answer = wait_for(lambda: _curl(netns, url), timeout=60, interval=1, what=f"an answer from {url}")
    return answer.strip("[]").removeprefix("::ffff:")


@pytest.mark.parametrize(("server_node", "client_node"), [("edge-1", "cloud-2"), ("cloud-2", "edge-2")],
                         ids=["edge-endpoint-from-cloud-pod", "cloud-endpoint-from-edge-pod"])
def test_cluster_ip_service_through_kube_proxy_keeps_the_client_pod_address(lab: RealLab, server_node: str,
                                                                           client_node: str) -> None:
    name = f"whoami-{server_node}"
    _, cluster_ip = _serve(lab, name, server_node)
    client = lab.pod(client_node)
    # kube-proxy's own rules on the client's node: the ClusterIP is DNATed in its nat table.
    def rules() -> str:
        return subprocess.run(["ip", "netns", "exec", lab.state.host(client_node).netns, "iptables-save", "-t",
                               "nat"], capture_output=True, text=True).stdout

    wait_for(lambda: f"-d {cluster_ip}/32" in rules(), timeout=60, interval=0.5,
             what=f"kube-proxy's rule for {cluster_ip} on {client_node}")
    assert _seen_as(client.netns, f"http://{cluster_ip}/cgi-bin/ip") == client.ip


def test_headless_service_slice_holds_the_pod_address_and_it_answers_there(lab: RealLab) -> None:
    pod_ip, cluster_ip = _serve(lab, "whoami-headless", "edge-2", headless=True)
    assert cluster_ip == "None"
    def listed() -> list[dict[str, Any]]:
        return lab.admin._call("GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                               query={"labelSelector": "kubernetes.io/service-name=whoami-headless"})["items"]

    slices = wait_for(lambda: [s for s in listed() if any(e.get("addresses") for e in s.get("endpoints") or [])],
                      timeout=60, interval=0.5, what="the headless Service's EndpointSlice")
    addresses = {a for s in slices for e in s["endpoints"] for a in e["addresses"]}
    assert addresses == {pod_ip}
    client = lab.pod("connector-1")
    assert _seen_as(client.netns, f"http://{pod_ip}:8080/cgi-bin/ip") == client.ip


def test_kubectl_fabmesh_doctor_has_no_fail(lab: RealLab) -> None:
    def doctor() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl-fabmesh", "doctor", "--namespace", NAMESPACE], capture_output=True,
                              text=True, timeout=120, env={**_env(), "KUBECONFIG": str(lab.state.kubeconfig)})

    done = doctor()
    failing = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert not failing and "\n0 FAIL," in done.stdout, done.stdout + done.stderr


def _env() -> dict[str, str]:
    import os
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def test_kubectl_logs_of_the_operator_and_of_an_edge_pod(lab: RealLab) -> None:
    operator = lab.kubectl("-n", NAMESPACE, "logs", "deploy/fabmesh-operator", KUBECTL_TIMEOUT)
    assert operator.returncode == 0 and "fabmesh.operator" in operator.stdout, operator.stderr
    edge = lab.kubectl("logs", "pod-edge-1", KUBECTL_TIMEOUT)
    assert edge.returncode == 0 and "hello-from-edge-1" in edge.stdout, edge.stderr


def test_relabel_turns_the_relayed_edge_pair_direct_through_the_agent_pods(lab: RealLab) -> None:
    ok, path, _ = probe.observe_pair(lab.state, "edge-1", "edge-2")
    assert ok and path.value == "relayed", path
    started = time.monotonic()
    lab.admin.merge_patch("nodes", "edge-2", {"metadata": {"labels": {f"{COMMUNITY_LABEL_PREFIX}factory": ""}}})
    try:
        def direct() -> bool:
            ok, path, _ = probe.observe_pair(lab.state, "edge-1", "edge-2")
            return ok and path.value == "direct"

        wait_for(direct, timeout=180, interval=0.5, what="edge-1 -> edge-2 direct after the relabel")
        print(f"\n[measure] relabel to an observed direct path (agent Pods, real kubelet projection): "
              f"{time.monotonic() - started:.1f}s")
    finally:
        lab.admin.merge_patch("nodes", "edge-2", {"metadata": {"labels": {f"{COMMUNITY_LABEL_PREFIX}factory": None}}})


def test_lab_down_leaves_no_node_behind(lab: RealLab) -> None:
    """Runs last: it removes the lab."""
    state = lab.state
    removed = teardown.down(lab.directory)
    assert removed is not None
    assert owned_namespaces(state.prefix) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(lab.directory) not in mounts
    for h in state.hosts:
        for hierarchy in cgroups.v1_hierarchies():
            assert not (hierarchy / node_cgroup_root(h.netns).strip("/")).exists(), (h.name, hierarchy)
    alive = {name: pid for name, pid in state.pids.items() if _state(pid) not in ("", "Z")}
    assert not alive, alive


def _state(pid: int) -> str:
    """A process's state letter (Z: a zombie its parent has not reaped); "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
