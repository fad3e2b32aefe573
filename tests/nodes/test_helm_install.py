"""fabmesh installed by its own Helm chart onto real nodes, with the image built here from the Dockerfile.

Three real nodes (kubelet + containerd) on a lab WAN, placed as the lab places them: ``cloud-1``
(runs the operator), ``conn-1`` (labelled connector) on the WAN, and ``edge-1`` behind a NAT
router. ``helm install charts/fabmesh`` with ``image.pullPolicy=Never`` and the product image
imported into every node (``fabmesh.testenv.product_image``); nothing is ever pulled. Then what
the chart and the operator make is observed in the API and on the nodes: the operator Pod Running
on the cloud node under its ServiceAccount (its projected token, the chart's RBAC) and holding its
Lease; the edge's ConfigMap and Secret; the connector and agent Pods the operator creates, Running
with the host network of their node.

What a cluster has before fabmesh, and the test gives it: kube-proxy on the cloud node (the
operator reaches the API server at the ``kubernetes`` Service's ClusterIP); that Service's
EndpointSlice naming the API relay on the WAN (the API server's own reconciler is off, as it
listens on the box's loopback); a route in the WAN namespace back to the cloud node's pod range,
as a cloud VPC routes pod CIDRs; the flannel annotations on the connector, as flanneld writes them
(no flanneld here yet); and the connector and edge cordoned, so the scheduler puts the operator on
the cloud node (the operator pins its own Pods with ``nodeName``).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabmesh.kube.client import Kube
from fabmesh.mesh.names import CONNECTOR_LABEL, EDGE_LABEL, FLANNEL_FINALIZER, FLANNEL_PREFIX, MANAGED_SELECTOR
from fabmesh.operator.objects import (
    agent_configmap_name,
    agent_pod_name,
    connector_pod_name,
    connector_secret_name,
    tls_secret_name,
)
from fabmesh.testenv.cluster import CHART
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import Network, wait_for
from fabmesh.testenv.images import LocalImages
from fabmesh.testenv.kubenode import KubeNode, NodeLink
from fabmesh.testenv.product_image import ProductImage, ensure_product_image
from fabmesh.testenv.realcluster import install_values, node_ready, publish_api_endpoint
from tests.api.test_chart import Helm

pytestmark = [pytest.mark.e2e, pytest.mark.nodes]

NAMESPACE = "fabmesh-system"
CLOUD_POD_CIDR = "10.244.1.0/24"
CONNECTOR_POD_CIDR = "10.244.2.0/24"
EDGE_LAN = "192.168.77.0/24"


@pytest.fixture(scope="module")
def product_image() -> ProductImage:
    for tool in ("mmdebstrap", "buildah"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: scripts/install-deps.sh installs it")
    started = time.monotonic()
    image = ensure_product_image()
    print(f"\n[measure] product image (cached or built): {time.monotonic() - started:.1f}s")
    return image


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory, node_binaries: Path) -> Iterator[ControlPlane]:
    """This module's control plane keeps ServiceAccount admission on: the chart's Pods need tokens."""
    cp = ControlPlane(directory=tmp_path_factory.mktemp("controlplane"), service_accounts=True)
    try:
        cp.start()
        cp.start_controllers(node_binaries)
        yield cp
    finally:
        cp.stop()


_ready = node_ready


@dataclass
class Cluster:
    cloud: KubeNode
    connector: KubeNode
    edge: KubeNode


@pytest.fixture(scope="module")
def cluster(node_network: tuple[Network, NodeLink], control_plane: ControlPlane, node_binaries: Path,
            local_images: LocalImages, product_image: ProductImage, admin: Kube) -> Iterator[Cluster]:
    net, link = node_network
    wan = ipaddress.ip_network(net.wan_cidr)
    router = net.add_nat_router("home", str(wan.network_address + 10), EDGE_LAN)
    hosts = {"cloud-1": net.add_host("cloud-1"), "conn-1": net.add_host("conn-1"),
             "edge-1": net.add_host_behind_router("edge-1", router, str(ipaddress.ip_network(EDGE_LAN)[2]))}
    archives = (product_image.archive,)
    nodes = Cluster(
        cloud=KubeNode(host=hosts["cloud-1"], name="cloud-1", pod_cidr=CLOUD_POD_CIDR, binaries=node_binaries,
                       images=local_images, archives=archives),
        connector=KubeNode(host=hosts["conn-1"], name="conn-1", pod_cidr=CONNECTOR_POD_CIDR,
                           binaries=node_binaries, images=local_images, archives=archives),
        # No conflist: fabmesh's agent Pod writes the edge's.
        edge=KubeNode(host=hosts["edge-1"], name="edge-1", pod_cidr="10.233.0.0/24", binaries=node_binaries,
                      images=local_images, archives=archives, bridge_cni=False))
    started: list[KubeNode] = []
    try:
        began = time.monotonic()
        for node in (nodes.cloud, nodes.connector, nodes.edge):
            node.start(control_plane, link)
            started.append(node)
        wait_for(lambda: _ready(admin, "cloud-1") and _ready(admin, "conn-1"), timeout=240, interval=0.5,
                 what="cloud-1 and conn-1 Ready")
        # The edge registers too, but stays NotReady until the agent Pod writes its conflist.
        wait_for(lambda: admin.get("nodes", "edge-1"), timeout=120, interval=0.5, what="Node edge-1 registered")
        print(f"\n[measure] three nodes started (product image imported) to cloud nodes Ready: "
              f"{time.monotonic() - began:.1f}s")
        nodes.cloud.start_kube_proxy(control_plane, link, cluster_cidr="10.244.0.0/16")
        # The kubernetes Service's endpoint: the API relay on the WAN (its own reconciler is off).
        publish_api_endpoint(admin, link.address, int(link.server.rsplit(":", 1)[1]))
        # The WAN routes the cloud node's pod range to it, as a VPC route table does.
        subprocess.run(["ip", "-n", net.wan_netns, "route", "replace", CLOUD_POD_CIDR, "via",
                        hosts["cloud-1"].wan_ip], check=True)
        admin.merge_patch("nodes", "conn-1", {
            "metadata": {"labels": {CONNECTOR_LABEL: ""}, "annotations": {
                FLANNEL_PREFIX + "backend-type": "vxlan", FLANNEL_PREFIX + "public-ip": hosts["conn-1"].wan_ip,
                FLANNEL_PREFIX + "backend-data": json.dumps({"VNI": 1, "VtepMAC": "0e:fa:b0:00:00:02"})}},
            "spec": {"unschedulable": True}})
        admin.merge_patch("nodes", "edge-1", {"metadata": {"labels": {EDGE_LABEL: ""}},
                                              "spec": {"unschedulable": True}})
        yield nodes
    finally:
        for node in reversed(started):
            node.stop()
        for name in ("cloud-1", "conn-1", "edge-1"):
            admin.delete("nodes", name)


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    assert control_plane.assets is not None
    return Helm(control_plane.assets.helm, tmp_path_factory.mktemp("helm"), control_plane.kubeconfig)


@pytest.fixture(scope="module")
def release(cluster: Cluster, helm: Helm, product_image: ProductImage) -> Iterator[float]:
    """``helm install`` with the built image; yields the install's start time (monotonic)."""
    started = time.monotonic()
    done = helm.cluster("install", "fabmesh", str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                        *install_values(product_image, str(cluster.edge.paths.cni_conf_dir)))
    assert done.returncode == 0, done.stdout + done.stderr
    yield started
    if helm.cluster("status", "fabmesh", "--namespace", NAMESPACE).returncode == 0:
        helm.cluster("uninstall", "fabmesh", "--namespace", NAMESPACE, "--wait", "--timeout", "60s")


def _running(admin: Kube, name: str) -> dict | None:
    pod = admin.get("pods", name, NAMESPACE)
    if pod is None or pod.get("status", {}).get("phase") != "Running":
        return None
    statuses = pod["status"].get("containerStatuses") or []
    return pod if statuses and all(s.get("ready") for s in statuses) else None


def _diagnose(admin: Kube, cluster: Cluster, name: str) -> str:
    pod = admin.get("pods", name, NAMESPACE) or {}
    events = [f"{e.get('reason')}: {e.get('message')}" for e in admin.list("events", NAMESPACE)
              if e.get("involvedObject", {}).get("name") == name]
    logs = {}
    for node in (cluster.cloud, cluster.connector, cluster.edge):
        for log in sorted(node.paths.pod_logs.glob(f"{NAMESPACE}_{name}_*/*/*.log")):
            logs[str(log.relative_to(node.paths.pod_logs))] = log.read_text()[-1500:]
    return f"pod {name}: status={pod.get('status')} events={events} logs={logs}"


def test_operator_pod_runs_on_the_cloud_node_under_its_service_account(cluster: Cluster, release: float,
                                                                       admin: Kube) -> None:
    def operator_pod() -> dict | None:
        pods = admin.list("pods", NAMESPACE, labels="app.kubernetes.io/component=operator")
        return next((p for p in pods if _running(admin, p["metadata"]["name"])), None)

    try:
        pod = wait_for(operator_pod, timeout=240, interval=1, what="the operator Pod Running and Ready")
    except TimeoutError:
        pods = admin.list("pods", NAMESPACE, labels="app.kubernetes.io/component=operator")
        raise AssertionError("; ".join(_diagnose(admin, cluster, p["metadata"]["name"]) for p in pods)) from None
    print(f"\n[measure] helm install to operator Ready: {time.monotonic() - release:.1f}s")
    assert pod["spec"]["nodeName"] == "cloud-1"
    assert pod["spec"]["serviceAccountName"] == "fabmesh-operator"
    assert any(v.get("projected") and v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(CLOUD_POD_CIDR)
    lease = wait_for(lambda: admin.get("leases", "fabmesh-operator", NAMESPACE), timeout=60, interval=1,
                     what="the operator's Lease")
    assert lease["spec"]["holderIdentity"].startswith(pod["metadata"]["name"]), lease["spec"]


def test_operator_writes_the_edges_config_and_secret(cluster: Cluster, release: float, admin: Kube) -> None:
    configmap = wait_for(lambda: admin.get("configmaps", agent_configmap_name("edge-1"), NAMESPACE), timeout=240,
                         interval=1, what="the edge's ConfigMap")
    secret = wait_for(lambda: admin.get("secrets", tls_secret_name("edge-1"), NAMESPACE), timeout=60,
                      interval=1, what="the edge's Secret")
    assert configmap["data"], configmap
    assert secret["data"], sorted(secret)
    wait_for(lambda: admin.get("secrets", connector_secret_name("conn-1"), NAMESPACE), timeout=60, interval=1,
             what="the connector's Secret")


@pytest.mark.parametrize(("pod_name", "node_name"), [(connector_pod_name("conn-1"), "conn-1"),
                                                     (agent_pod_name("edge-1"), "edge-1")],
                         ids=["connector", "agent"])
def test_operator_made_pods_run_with_the_host_network_of_their_node(cluster: Cluster, release: float,
                                                                     admin: Kube, pod_name: str,
                                                                     node_name: str) -> None:
    try:
        pod = wait_for(lambda: _running(admin, pod_name), timeout=300, interval=1, what=f"Pod {pod_name} Ready")
    except TimeoutError:
        raise AssertionError(_diagnose(admin, cluster, pod_name)) from None
    print(f"\n[measure] helm install to {pod_name} Ready: {time.monotonic() - release:.1f}s")
    assert pod["spec"]["nodeName"] == node_name
    assert pod["spec"]["hostNetwork"] is True
    node = {"conn-1": cluster.connector, "edge-1": cluster.edge}[node_name]
    assert pod["status"]["podIP"] == node.host.wan_ip
    # The sandbox is the node's own namespace: containerd made no cni-* namespace for it.
    assert not [ns for ns in node.sandbox_netns() if ns.startswith("cni-")]
    # charon's libipsec TUN device lives in the node's namespace (made once charon has started).
    def links() -> list[str]:
        return [link["ifname"] for link in json.loads(node.host.run("ip", "-j", "link", "show").stdout)]

    try:
        wait_for(lambda: any(name.startswith("ipsec") for name in links()), timeout=60, interval=0.5,
                 what=f"charon's ipsec0 in {node.host.netns}")
    except TimeoutError:
        raise AssertionError(f"links {links()}; {_diagnose(admin, cluster, pod_name)}") from None


def test_agent_pod_writes_the_edges_cni_config_and_the_edge_turns_ready(cluster: Cluster, release: float,
                                                                        admin: Kube) -> None:
    conflist = cluster.edge.paths.cni_conf_dir / "10-fabmesh.conflist"
    wait_for(conflist.exists, timeout=300, interval=1, what=f"{conflist} written by the agent Pod")
    wait_for(lambda: _ready(admin, "edge-1"), timeout=120, interval=1, what="edge-1 Ready")


def _pod_netns(node: KubeNode, ip: str) -> str:
    """The sandbox namespace (``cni-*``) of the Pod with ``ip`` on ``node``."""
    for ns in node.sandbox_netns():
        addresses = subprocess.run(["ip", "-n", ns, "-o", "-4", "addr", "show"], capture_output=True,
                                   text=True).stdout
        if f" {ip}/" in addresses:
            return ns
    raise AssertionError(f"no sandbox namespace on {node.name} holds {ip}: {node.sandbox_netns()}")


def _ping(netns: str, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", dst],
                          capture_output=True).returncode == 0


def _pod(name: str, node: str, image: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}


EDGE_POOL = "10.233.0.0/16"  # the chart's default operator.settings.edge_pod_pool


@dataclass
class Workload:
    edge_ip: str
    cloud_ip: str
    edge_ns: str  # the Pods' sandbox namespaces, to ping from (no kubectl exec here)
    cloud_ns: str


@pytest.fixture(scope="module")
def workload(cluster: Cluster, release: float, admin: Kube, local_images: LocalImages) -> Iterator[Workload]:
    """A Pod on the edge (fabmesh's conflist, written by the agent Pod) and one on the cloud node.

    No flanneld runs yet, so the cloud side routes as flannel's host-gw backend would, with the
    FabEdge trick: the cloud node sends the edge pool to the connector, and the connector sends the
    cloud node's pod range to it.
    """
    cluster.cloud.host.run("ip", "route", "replace", EDGE_POOL, "via", cluster.connector.host.wan_ip)
    cluster.connector.host.run("ip", "route", "replace", CLOUD_POD_CIDR, "via", cluster.cloud.host.wan_ip)
    wait_for(lambda: _ready(admin, "edge-1"), timeout=300, interval=1, what="edge-1 Ready")
    for name, node in (("edge-pod", "edge-1"), ("cloud-pod", "cloud-1")):
        admin.create("pods", _pod(name, node, local_images.busybox), namespace="default")
    try:
        def ip_of(name: str) -> str | None:
            pod = admin.get("pods", name, "default") or {}
            return pod.get("status", {}).get("podIP") if pod.get("status", {}).get("phase") == "Running" else None

        edge_ip = wait_for(lambda: ip_of("edge-pod"), timeout=120, interval=0.5, what="edge-pod Running")
        cloud_ip = wait_for(lambda: ip_of("cloud-pod"), timeout=120, interval=0.5, what="cloud-pod Running")
        assert ipaddress.ip_address(edge_ip) in ipaddress.ip_network(EDGE_POOL), edge_ip
        yield Workload(edge_ip=edge_ip, cloud_ip=cloud_ip, edge_ns=_pod_netns(cluster.edge, edge_ip),
                       cloud_ns=_pod_netns(cluster.cloud, cloud_ip))
    finally:
        for name in ("edge-pod", "cloud-pod"):
            admin.delete("pods", name, "default", grace_period_s=0)


def _wait_for_ping(cluster: Cluster, admin: Kube, workload: Workload, what: str) -> float:
    """Seconds until the edge Pod's ping reaches the cloud Pod; on timeout, the edge's links and routes."""
    started = time.monotonic()
    try:
        wait_for(lambda: _ping(workload.edge_ns, workload.cloud_ip), timeout=180, interval=1,
                 what=f"{what}: edge-pod {workload.edge_ip} -> cloud-pod {workload.cloud_ip}")
    except TimeoutError:
        links = cluster.edge.host.run("ip", "-o", "link", "show", check=False).stdout
        routes = cluster.edge.host.run("ip", "route", "show", "table", "all", check=False).stdout
        raise AssertionError(f"{what}: edge links: {links}\nedge routes: {routes}\n"
                             f"{_diagnose(admin, cluster, agent_pod_name('edge-1'))}") from None
    return time.monotonic() - started


def test_edge_pod_and_cloud_pod_talk_through_the_tunnel_of_the_agent_pod(cluster: Cluster, admin: Kube,
                                                                         workload: Workload) -> None:
    """Both ways, through the IPsec tunnel between the agent Pod's and the connector Pod's charons."""
    took = _wait_for_ping(cluster, admin, workload, "first ping")
    print(f"\n[measure] edge pod Running to first ping through the tunnel: {took:.1f}s")
    assert _ping(workload.cloud_ns, workload.edge_ip), f"cloud-pod {workload.cloud_ip} -> edge-pod {workload.edge_ip}"
    # What the node components complained about while running as Pods (capabilities, sysctls).
    for node in (cluster.connector, cluster.edge):
        for log in sorted(node.paths.pod_logs.glob(f"{NAMESPACE}_*/*/*.log")):
            complaints = sorted({line.split(" ", 3)[-1][:200] for line in log.read_text().splitlines()
                                 if " WARNING " in line or " ERROR " in line})
            print(f"\n[observed] {log.parent.parent.name.split('_')[1]}/{log.parent.name}: {complaints[:6]}")


def test_deleted_agent_pod_is_recreated_by_the_operator_and_traffic_resumes(cluster: Cluster, admin: Kube,
                                                                            workload: Workload) -> None:
    _wait_for_ping(cluster, admin, workload, "before the delete")
    name = agent_pod_name("edge-1")
    old_uid = admin.get("pods", name, NAMESPACE)["metadata"]["uid"]  # type: ignore[index]
    started = time.monotonic()
    admin.delete("pods", name, NAMESPACE)
    try:
        wait_for(lambda: (p := _running(admin, name)) is not None and p["metadata"]["uid"] != old_uid,
                 timeout=240, interval=1, what=f"a new {name} Ready")
    except TimeoutError:
        raise AssertionError(_diagnose(admin, cluster, name)) from None
    recreated = time.monotonic() - started
    took = _wait_for_ping(cluster, admin, workload, "after the agent Pod was recreated")
    print(f"\n[measure] agent Pod deleted to its successor Ready: {recreated:.1f}s; then to a ping: {took:.1f}s")
    assert _ping(workload.cloud_ns, workload.edge_ip)


def test_helm_upgrade_rolls_the_operator_and_the_agent_and_traffic_resumes(
        cluster: Cluster, admin: Kube, helm: Helm, product_image: ProductImage, workload: Workload) -> None:
    """A changed agent setting: the chart's settings hash rolls the operator Deployment, the new
    operator replaces the agent Pod (its spec hash changed), and the edge reaches the cloud again.
    The ping runs through the whole rollout; how many replies were lost is printed, not asserted
    (with libipsec the TUN device goes with the old charon)."""
    _wait_for_ping(cluster, admin, workload, "before the upgrade")
    operator_pods = {p["metadata"]["uid"] for p in admin.list("pods", NAMESPACE,
                                                              labels="app.kubernetes.io/component=operator")}
    agent = agent_pod_name("edge-1")
    old_agent = admin.get("pods", agent, NAMESPACE)["metadata"]["uid"]  # type: ignore[index]
    ping = subprocess.Popen(["ip", "netns", "exec", workload.edge_ns, "ping", "-n", "-i", "0.2", "-W", "1",
                             workload.cloud_ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    try:
        done = helm.cluster("upgrade", "fabmesh", str(CHART), "--namespace", NAMESPACE, "--reuse-values",
                            "--set", "operator.settings.agent_pods.resources.limits.memory=300Mi")
        assert done.returncode == 0, done.stdout + done.stderr

        def rolled() -> bool:
            pods = admin.list("pods", NAMESPACE, labels="app.kubernetes.io/component=operator")
            new = [p for p in pods if p["metadata"]["uid"] not in operator_pods]
            return len(pods) == 1 and bool(new) and _running(admin, new[0]["metadata"]["name"]) is not None

        try:
            wait_for(rolled, timeout=240, interval=1, what="the operator Deployment rolled out")
            pod = wait_for(lambda: (p := _running(admin, agent)) is not None
                           and p["metadata"]["uid"] != old_agent and p, timeout=240, interval=1,
                           what=f"a new {agent} Ready")
        except TimeoutError:
            raise AssertionError(_diagnose(admin, cluster, agent)) from None
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["memory"] == "300Mi", limits
        rolled_s = time.monotonic() - started
        took = _wait_for_ping(cluster, admin, workload, "after the upgrade")
        time.sleep(2)
    finally:
        ping.send_signal(2)  # SIGINT: ping prints its summary
        out = ping.communicate(timeout=10)[0]
    summary = next((line for line in out.splitlines() if "packets transmitted" in line), out[-300:])
    print(f"\n[measure] helm upgrade to the new agent Pod Ready: {rolled_s:.1f}s; then to a ping: {took:.1f}s; "
          f"ping every 0.2 s through it: {summary}")
    assert _ping(workload.cloud_ns, workload.edge_ip)


def _uninstall_with_hook_log(helm: Helm, cluster: Cluster, timeout_s: float) -> tuple[subprocess.CompletedProcess[str],
                                                                                      str]:
    """``helm uninstall --wait``, and the pre-delete hook Job's log as the cloud node's kubelet wrote it (the Job
    and its Pod are deleted once it succeeds, so the log is read while it runs)."""
    proc = subprocess.Popen([str(helm.binary), "uninstall", "fabmesh", "--namespace", NAMESPACE, "--wait",
                             "--timeout", f"{timeout_s:.0f}s", "--kubeconfig", str(helm.kubeconfig)],
                            env=helm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s + 30
    while proc.poll() is None and time.monotonic() < deadline:
        for log in cluster.cloud.paths.pod_logs.glob(f"{NAMESPACE}_fabmesh-release-*/*/*.log"):
            try:
                logs[log.name] = log.read_text()
            except OSError:
                continue
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "".join(logs.values())


def test_helm_uninstall_removes_the_charts_objects(cluster: Cluster, release: float, helm: Helm,
                                                  admin: Kube) -> None:
    """Runs last in this module: it uninstalls the release; its pre-delete hook asks both nodes to tear down,
    and both answer, as kubelet reports their node loops' exit (neither node reaches the ``kubernetes``
    Service here, and the edge's way to it would be the tunnel it has just removed)."""
    started = time.monotonic()
    done, hook_log = _uninstall_with_hook_log(helm, cluster, timeout_s=300)
    took = time.monotonic() - started
    print(f"\n[observed] the pre-delete hook's log:\n{hook_log}")
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"\n[measure] helm uninstall --wait (pre-delete hook: fence, node teardown, deletes, release): {took:.1f}s")
    for node in ("edge-1", "conn-1"):
        assert f"node={node} teardown done" in hook_log, hook_log
    apps = admin._call("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments")["items"]
    assert apps == []
    wait_for(lambda: not admin.list("pods", NAMESPACE, labels="app.kubernetes.io/component=operator"),
             timeout=120, interval=1, what="the operator Pod gone")
    assert admin.get("configmaps", "fabmesh-operator-settings", NAMESPACE) is None
    assert admin.get("serviceaccounts", "fabmesh-operator", NAMESPACE) is None


FABMESH_CHAINS = ("FABMESH-", "FMCLOUD-")  # the agent's and connector's prefix; the route agent's
FABMESH_TABLES = ("2620", "2621")  # operator.settings.node.route_table and cloud_agent.route_table


def _left_on_node(node: KubeNode) -> dict[str, object]:
    """Everything fabmesh may program on a node, observed in its network namespace; empty values: none left."""
    def out(*args: str) -> str:
        done = node.host.run(*args, check=False)
        return done.stdout if done.returncode == 0 else ""

    charons = []
    for pid in out("ip", "netns", "pids", node.host.netns).split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "charon":
                charons.append(pid)
        except OSError:
            continue
    links = [link["ifname"] for link in json.loads(out("ip", "-j", "link", "show") or "[]")]
    return {
        "iptables": [line for line in out("iptables-save").splitlines() if any(p in line for p in FABMESH_CHAINS)],
        "ipsets": [name for name in out("ipset", "list", "-n").split() if name.startswith(FABMESH_CHAINS)],
        "rules": [line for line in out("ip", "rule", "show").splitlines()
                  if any(f"lookup {t}" in line for t in FABMESH_TABLES)],
        "routes": {t: out("ip", "route", "show", "table", t).strip() for t in FABMESH_TABLES
                   if out("ip", "route", "show", "table", t).strip()},
        "links": [name for name in links if name == "fabmesh0" or name.startswith("ipsec")],
        # operator.settings.node.cni_conf_name (10-fabmesh-lab.conflist on the cloud nodes is the test's own bridge)
        "conflist": [str(p) for p in node.paths.cni_conf_dir.glob("10-fabmesh.conflist")],
        "xfrm": out("ip", "xfrm", "policy", "show").strip(),
        "charon": charons,
    }


def test_helm_uninstall_removes_what_the_operator_created(cluster: Cluster, release: float, admin: Kube) -> None:
    """After the uninstall above (its pre-delete hook): nothing fabmesh made is left in the API or on any node.

    The earlier tests saw the edge's conflist, bridge and tunnel and the connector's ipsec0 (so this test
    fails if the hook does nothing). The namespace stays (Helm never deletes one made by --create-namespace):
    it holds only what Kubernetes puts in every namespace, and deleting it by hand, as docs/operator.md says,
    completes at once.
    """
    kinds = ("pods", "configmaps", "secrets", "serviceaccounts", "roles", "rolebindings")
    managed = {kind: [o["metadata"]["name"] for o in admin.list(kind, NAMESPACE, labels=MANAGED_SELECTOR)]
               for kind in kinds}
    print(f"\n[observed] managed objects left right after helm uninstall: {managed}")
    assert {k: v for k, v in managed.items() if k != "pods"} == {k: [] for k in kinds if k != "pods"}
    # Pods are deleted by the hook; their kubelets take the grace period to confirm.
    wait_for(lambda: not admin.list("pods", NAMESPACE), timeout=120, interval=1, what="every Pod in the namespace gone")
    assert admin.get("leases", "fabmesh-operator", NAMESPACE) is None
    wait_for(lambda: not admin._call("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                     query={"fieldSelector": "metadata.name=tunnelstatuses.fabmesh.io"})["items"],
             timeout=60, interval=1, what="the TunnelStatus CRD gone")
    for kind, path in (("ClusterRole", "/apis/rbac.authorization.k8s.io/v1/clusterroles"),
                       ("ClusterRoleBinding", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"),
                       ("Role in default", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles")):
        names = [o["metadata"]["name"] for o in admin._call("GET", path)["items"]]
        assert not [n for n in names if n.startswith("fabmesh")], (kind, names)
    for name in ("cloud-1", "conn-1", "edge-1"):
        meta = admin.get("nodes", name)["metadata"]  # type: ignore[index]
        assert FLANNEL_FINALIZER not in (meta.get("finalizers") or ()), (name, meta.get("finalizers"))
        ours = [k for k in meta.get("annotations") or {} if k.startswith("fabmesh.io/")]
        assert ours == [], (name, ours)
    edge_flannel = [k for k in admin.get("nodes", "edge-1")["metadata"].get("annotations") or {}  # type: ignore[index]
                    if k.startswith(FLANNEL_PREFIX)]
    assert edge_flannel == [], edge_flannel  # copied there by the operator; conn-1's are flanneld's own

    nodes = {"cloud-1": cluster.cloud, "conn-1": cluster.connector, "edge-1": cluster.edge}
    left = {name: {k: v for k, v in _left_on_node(node).items() if v} for name, node in nodes.items()}
    print(f"\n[observed] left on the nodes right after the Pods went: {left}")
    # The route agent's DaemonSet Pod cleans up on SIGTERM, after Helm deletes the DaemonSet: allow it the time.
    try:
        wait_for(lambda: not any(v for node in nodes.values() for v in _left_on_node(node).values()), timeout=90,
             interval=1,
                 what="nothing of fabmesh left on any node")
    except TimeoutError:
        clean = {name: {k: v for k, v in _left_on_node(node).items() if v} for name, node in nodes.items()}
        raise AssertionError(f"left on the nodes: {clean}") from None

    # The namespace: only what Kubernetes makes in every namespace; deleting it by hand is immediate.
    assert [o["metadata"]["name"] for o in admin.list("configmaps", NAMESPACE)] == ["kube-root-ca.crt"]
    assert [o["metadata"]["name"] for o in admin.list("secrets", NAMESPACE)] == []
    assert [o["metadata"]["name"] for o in admin.list("serviceaccounts", NAMESPACE)] in ([], ["default"])
    assert admin.list("leases", NAMESPACE) == []
    admin.delete("namespaces", NAMESPACE)
    wait_for(lambda: admin.get("namespaces", NAMESPACE) is None, timeout=60, interval=1,
             what=f"namespace {NAMESPACE} deleted")
