"""``kubectl fabmesh ping`` from a Pod on a NATed edge, with nothing but a kubeconfig, against the lab's own eyes.

The world of ``test_mesh_kubectl.py``: the API server runs in cloud-2 (not the connector) and reaches
edge kubelets and the nodes' metrics port only through cloud-2's route agent, the connector and the
tunnels. Here two edges sit behind one NAT in one community (a direct tunnel between them), and edge-1
runs a real kubelet whose Pod is on the mesh's pod network (the agent's own CNI config, as a
DaemonSet-style CNI would hand it to kubelet), so its pings cross the tunnels.

``kubectl fabmesh ping`` runs ``ping`` in that Pod through pods/exec and reads the CHILD_SA counters of
edge-1, edge-2 and the connector through ``/api/v1/nodes/NODE:10120/proxy/metrics``. The lab's own
observation (:func:`fabmesh.lab.probe.observe_pair`: a ping between the lab's pods, counters read from
each charon over VICI) is the reference for the path it reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CoreV1Api, RbacAuthorizationV1Api

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import bringup, faults, probe, processes, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import LabNat, LabNode, LabRole, Topology
from fabmesh.mesh.probepath import Observed
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import wait_for
from fabmesh.testenv.images import LocalImages
from fabmesh.testenv.kubenode import KubeNode, NodeLink
from tests.conftest import require_root_tools

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

TOPOLOGY = Topology(nats=(LabNat(name="site-1"),), nodes=(
    LabNode(name="connector-1", role=LabRole.CONNECTOR),
    LabNode(name="cloud-2", role=LabRole.CLOUD),
    LabNode(name="edge-1", role=LabRole.EDGE, communities=("a",), nat="site-1"),
    LabNode(name="edge-2", role=LabRole.EDGE, communities=("a",), nat="site-1")))
EDGE = "edge-1"
POD = "prober"


@dataclass
class PingWorld:
    state: LabState
    control_plane: ControlPlane
    admin: Kube
    settings: Path

    def pod_ip(self, node: str) -> str:
        return next(p.ip for p in self.state.pods if p.node == node)

    def run_plugin(self, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``kubectl fabmesh ARGS`` (admin kubeconfig unless another is given)."""
        return subprocess.run([sys.executable, "-c", "import sys; from fabmesh.cli import kubectl_plugin; "
                               "sys.exit(kubectl_plugin())", *args,
                               "--kubeconfig", str(kubeconfig or self.control_plane.kubeconfig),
                               "--settings", str(self.settings)], capture_output=True, text=True, timeout=120)

    def kubectl_fabmesh_ping(self, src: str, dst: str, kubeconfig: Path | None = None,
                             metrics_timeout: float = 20) -> tuple[int, dict[str, Any]]:
        """``kubectl fabmesh ping SRC DST --output json``: (exit code, report). The metrics timeout is generous:
        on a loaded box a node-proxied scrape through the tunnel can take longer than the default 5 s."""
        done = self.run_plugin("ping", src, dst, "--output", "json", "--metrics-timeout", str(metrics_timeout),
                               kubeconfig=kubeconfig)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)


def _ready(node: dict | None) -> bool:
    conditions = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, node_binaries: Path,
          local_images: LocalImages) -> Iterator[PingWorld]:
    require_root_tools("ip", "iptables-restore", "ipset", "/usr/lib/ipsec/charon", "/usr/lib/cni/bridge")
    directory = tmp_path_factory.mktemp("pinglab")
    node: KubeNode | None = None
    try:
        state, cp = bringup.up_with_control_plane(TOPOLOGY, directory, timeout=120, api_host="cloud-2")
        admin = Kube(load_api_client(str(cp.kubeconfig)))
        edge = state.host(EDGE)
        node = KubeNode(host=processes.host(state, EDGE), name=EDGE, pod_cidr=edge.pod_cidr or "",
                        binaries=node_binaries, images=local_images, bridge_cni=False)
        node.start(cp, NodeLink.inside(cp, directory / "link"))
        # The agent's conflist, as the agent Pod would write it into kubelet's CNI directory.
        shutil.copy(directory / "hosts" / EDGE / "cni" / "10-fabmesh.conflist", node.paths.cni_conf_dir)
        wait_for(lambda: _ready(admin.get("nodes", EDGE)), timeout=180, interval=0.5, what=f"Node {EDGE} Ready")
        world = PingWorld(state, cp, admin, directory / "operator.yaml")
        _start_pod(world, local_images)
        yield world
    finally:
        if node is not None:
            node.stop()
        teardown.down(directory)


def _start_pod(world: PingWorld, images: LocalImages) -> None:
    script = "mkdir -p /opt/bb && /bin/busybox --install -s /opt/bb; sleep 100000"
    world.admin.create("pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": "default"},
        "spec": {"nodeName": EDGE, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": images.busybox, "imagePullPolicy": "Never",
            "env": [{"name": "PATH", "value": "/bin:/opt/bb"}],
            "command": ["/bin/sh", "-c", script]}]}}, namespace="default")
    wait_for(lambda: ((world.admin.get("pods", POD, "default") or {}).get("status") or {}).get("phase")
             == "Running", timeout=120, interval=0.5, what=f"Pod {POD} Running")


def _sent(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(e["host"], e["sa"]) for e in report["evidence"] if e["packets_out"]}


def test_the_probing_pod_is_on_the_mesh_pod_network_of_the_nated_edge(world: PingWorld) -> None:
    pod = world.admin.get("pods", POD, "default") or {}
    assert world.state.host(EDGE).nat == "site-1"
    lab_pod = next(p for p in world.state.pods if p.node == EDGE)
    assert pod["status"]["podIP"] != lab_pod.ip
    assert pod["status"]["podIP"].rsplit(".", 1)[0] == lab_pod.ip.rsplit(".", 1)[0]


def test_ping_to_a_pod_on_a_community_peer_is_direct_as_the_lab_observes(world: PingWorld) -> None:
    assert probe.observe_pair(world.state, EDGE, "edge-2")[:2] == (True, Observed.DIRECT)
    code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("edge-2"))
    assert code == 0, report
    assert report["ok"] and report["received"] == report["transmitted"] == 3, report
    assert report["destination"]["node"] == "edge-2" and report["source"]["node"] == EDGE
    assert report["path"] == report["intended"] == "direct", report
    assert (EDGE, "edge-2") in _sent(report) and ("edge-2", EDGE) in _sent(report), report
    assert report["unread"] == []


def test_ping_to_a_cloud_pod_goes_through_the_connector_as_the_lab_observes(world: PingWorld) -> None:
    assert probe.observe_pair(world.state, EDGE, "cloud-2")[:2] == (True, Observed.CLOUD)
    code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("cloud-2"))
    assert code == 0, report
    assert report["path"] == "cloud" and report["destination"]["node"] == "cloud-2", report
    assert (EDGE, "connector-1") in _sent(report) and (EDGE, "edge-2") not in _sent(report), report


def test_with_the_direct_tunnel_cut_ping_reports_relayed_as_the_lab_observes(world: PingWorld) -> None:
    state = world.state
    faults.cut(state, EDGE, "edge-2")
    try:
        wait_for(lambda: probe.observe_pair(state, EDGE, "edge-2")[:2] == (True, Observed.RELAYED),
                 timeout=60, interval=1, what="the lab to see edge-1 -> edge-2 relayed")
        code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("edge-2"))
        assert code == 0, report
        assert report["path"] == "relayed" and report["intended"] == "direct", report
        assert ("connector-1", "edge-2") in _sent(report) and (EDGE, "edge-2") not in _sent(report), report
    finally:
        faults.heal(state, EDGE)
    wait_for(lambda: probe.observe_pair(state, EDGE, "edge-2")[:2] == (True, Observed.DIRECT),
             timeout=120, interval=1, what="edge-1 -> edge-2 direct again after the heal")


def test_with_the_destination_cut_off_ping_fails_clearly_instead_of_naming_a_path(world: PingWorld) -> None:
    state = world.state
    faults.cut(state, "edge-2")  # edge-2 off the network; edge-1's kubelet still reached through its tunnel
    try:
        wait_for(lambda: not probe.observe_pair(state, EDGE, "edge-2")[0], timeout=30, interval=1,
                 what="the lab to see edge-2 unreachable")
        code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("edge-2"), metrics_timeout=5)
        assert code == 1, report
        assert not report["ok"] and report["received"] == 0 and report["path"] == "none", report
        assert report["reason"] == "no reply to 3 echo requests", report
        assert any(u.startswith("edge-2 ") for u in report["unread"]), report  # its metrics are cut off too
    finally:
        faults.heal(state, "edge-2")
    wait_for(lambda: probe.observe_pair(state, EDGE, "edge-2")[:2] == (True, Observed.DIRECT), timeout=120,
             interval=1, what="edge-1 -> edge-2 direct again after the heal")


# docs/operator.md, "Which way does it go": what a user needs, and nothing else.
PING_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["get", "create"]},
]


def _user_with(world: PingWorld, name: str, rules: list[dict[str, Any]]) -> Path:
    """A ServiceAccount bound to a ClusterRole with just ``rules``; its kubeconfig."""
    admin = world.admin
    admin.create("serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount",
                                     "metadata": {"name": name, "namespace": "default"}}, namespace="default")
    rbac = RbacAuthorizationV1Api(admin.api)
    rbac.create_cluster_role({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                              "metadata": {"name": name}, "rules": rules})
    rbac.create_cluster_role_binding({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "default"}]})
    token = CoreV1Api(admin.api).create_namespaced_service_account_token(
        name, "default", {"spec": {"expirationSeconds": 3600}}).status.token
    return world.control_plane.kubeconfig_for_token(name, token)


def test_the_documented_rbac_is_enough_and_without_nodes_proxy_the_counters_are_refused(world: PingWorld) -> None:
    assert probe.observe_pair(world.state, EDGE, "edge-2")[:2] == (True, Observed.DIRECT)
    kubeconfig = _user_with(world, "fabmesh-ping", PING_RULES)
    code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("edge-2"), kubeconfig=kubeconfig)
    assert code == 0 and report["path"] == "direct" and report["unread"] == [], report
    no_proxy = _user_with(world, "fabmesh-ping-no-proxy", [r for r in PING_RULES if r["resources"] != ["nodes/proxy"]])
    code, report = world.kubectl_fabmesh_ping(POD, world.pod_ip("edge-2"), kubeconfig=no_proxy)
    assert code == 1 and report["path"] == "none" and report["received"] == 3, report
    assert len(report["unread"]) == 3 and all("403" in u for u in report["unread"]), report
    no_exec = _user_with(world, "fabmesh-ping-no-exec", [r for r in PING_RULES if r["resources"] != ["pods/exec"]])
    done = world.run_plugin("ping", POD, world.pod_ip("edge-2"), kubeconfig=no_exec)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fabmesh ping: cannot exec in Pod default/prober: 403 Forbidden: pods \"prober\" "
                                  "is forbidden: User \"system:serviceaccount:default:fabmesh-ping-no-exec\""), \
        done.stderr
