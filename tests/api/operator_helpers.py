"""Arrange Nodes and read back what the operator wrote (shared by the operator's api tests)."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client, watch

from fabmesh.kube.client import Kube
from fabmesh.mesh.model import NodeMesh, parse_node_mesh, parse_peer_shard
from fabmesh.operator import ca_roll
from fabmesh.operator import objects as o
from fabmesh.operator.certs import current_keys
from fabmesh.operator.inventory import read_node
from fabmesh.operator.plan import plan
from fabmesh.testenv.hosts import wait_for
from tests.api.conftest import OperatorEnv

EDGE = "node-role.kubernetes.io/edge"
CONNECTOR = "node-restriction.kubernetes.io/fabmesh-connector"
FLANNEL = {
    "flannel.alpha.coreos.com/backend-type": "vxlan",
    "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:00:01"}',
    "flannel.alpha.coreos.com/public-ip": "198.51.100.1",
}


def node(name: str, ip: str | None, labels: dict[str, str] | None = None,
         annotations: dict[str, str] | None = None, pod_cidr: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
                            "spec": {}, "status": {"addresses": []}}
    if ip:
        body["status"]["addresses"].append({"type": "InternalIP", "address": ip})
    if pod_cidr:
        body["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    return body


def edge(name: str, ip: str, *communities: str, **kwargs: Any) -> dict[str, Any]:
    labels = {EDGE: "", **{f"community.fabmesh.io/{c}": "" for c in communities}}
    return node(name, ip, labels, **kwargs)


def cloud_nodes() -> list[dict[str, Any]]:
    return [node("connector-1", "198.51.100.1", {CONNECTOR: ""}, dict(FLANNEL)),
            node("cloud-2", "198.51.100.2")]


def create_nodes(kube: Kube, nodes: list[dict[str, Any]], workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda n: kube.create("nodes", n), nodes))


def edge_ip(i: int) -> str:
    return f"192.0.{2 + i // 250}.{1 + i % 250}"


def configmaps(env: OperatorEnv) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in env.kube.list("configmaps", env.namespace)}


def secrets(env: OperatorEnv) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in env.kube.list("secrets", env.namespace)}


def pods(env: OperatorEnv) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in env.kube.list("pods", env.namespace)}


def nodes(env: OperatorEnv) -> dict[str, dict[str, Any]]:
    return {n["metadata"]["name"]: n for n in env.kube.list("nodes")}


def mesh_of(cm: dict[str, Any]) -> NodeMesh:
    return parse_node_mesh(cm["data"]["mesh.yaml"])


def secret_text(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def converged(env: OperatorEnv, edges: set[str]) -> bool:
    cms, secs, ps, ns = configmaps(env), secrets(env), pods(env), nodes(env)
    for name in edges:
        if o.agent_configmap_name(name) not in cms or o.tls_secret_name(name) not in secs:
            return False
        if o.agent_pod_name(name) not in ps:
            return False
        annotations = ns[name]["metadata"].get("annotations") or {}
        if "fabmesh.io/status" not in annotations or not ns[name]["spec"].get("podCIDR"):
            return False
    shard_peers = {p.name for name, cm in cms.items() if name.startswith("fabmesh-connector-peers-")
                   for p in parse_peer_shard(cm["data"]["peers.yaml"]).peers}
    return shard_peers == edges


def wait_converged(env: OperatorEnv, edges: set[str], timeout: float = 90) -> None:
    def done() -> bool:
        if env.processes and all(p.poll() is not None for p in env.processes):
            raise AssertionError(f"no operator is running; its log:\n{env.logs()[-4000:]}")
        return converged(env, edges)

    try:
        wait_for(done, timeout=timeout, interval=0.5, what="operator convergence")
    except TimeoutError:
        raise AssertionError(f"operator did not converge; its log:\n{env.logs()[-4000:]}") from None


def desired_from_cluster(env: OperatorEnv) -> dict[str, str]:
    """What plan() says every agent ConfigMap should hold, given the cluster as it is now."""
    infos = [i for i in (read_node(n, env.settings) for n in nodes(env).values()) if not hasattr(i, "reason")]
    cms = configmaps(env)
    recorded = json.loads(cms[o.IPAM_CONFIGMAP]["data"]["allocations.json"])
    stored = secrets(env)
    ca = ca_roll.state_from_secret(stored[o.CA_SECRET]).bundle()
    last_good = {n: cm["data"]["mesh.yaml"] for n in nodes(env)
                 if "mesh.yaml" in (cm := cms.get(o.agent_configmap_name(n)) or {}).get("data", {})}
    edge_names = {n for n, obj in nodes(env).items()
                  if env.settings.edge_label in (obj["metadata"].get("labels") or {})}
    keys = current_keys(stored, [*(i.name for i in infos), *last_good], edge_names)  # type: ignore[attr-defined]
    mesh = plan(infos, env.settings, ca, recorded, last_good, keys)  # type: ignore[arg-type]
    return {o.agent_configmap_name(n): m.to_yaml() for n, m in mesh.edges.items()}


def wait_matches_plan(env: OperatorEnv, timeout: float = 60) -> None:
    """Until every agent ConfigMap holds what plan() makes of the cluster as it is now: the operator
    has seen the latest change (what that plan says is for the caller to check)."""
    def matches() -> bool:
        desired, cms = desired_from_cluster(env), configmaps(env)
        return all(cms.get(name, {}).get("data", {}).get("mesh.yaml") == text for name, text in desired.items())

    wait_for(matches, timeout=timeout, interval=0.5, what="agent ConfigMaps to match the plan")


def resource_versions(env: OperatorEnv) -> dict[str, str]:
    versions = {}
    for kind, items in (("cm", configmaps(env)), ("secret", secrets(env)), ("pod", pods(env)),
                        ("node", nodes(env))):
        for name, obj in items.items():
            versions[f"{kind}/{name}"] = obj["metadata"]["resourceVersion"]
    return versions


def events_for(env: OperatorEnv, name: str) -> list[dict[str, Any]]:
    return [e for e in env.kube.list("events", "default")
            if e["involvedObject"].get("name") == name and e.get("reason") == "FabmeshInvalidNode"]


class WriteRecorder:
    """Every version of the operator's ConfigMaps, from a watch: a write that is overwritten a moment
    later is still seen (polling would miss it). Each entry: (monotonic time, name, object)."""

    def __init__(self, env: OperatorEnv) -> None:
        self.seen: list[tuple[float, str, dict[str, Any]]] = []
        self.error: Exception | None = None
        self._watch = watch.Watch()
        core = client.CoreV1Api(env.kube.api)
        threading.Thread(target=self._run, args=(core, env.namespace), daemon=True, name="recorder").start()

    def _run(self, core: client.CoreV1Api, namespace: str) -> None:
        try:
            for event in self._watch.stream(core.list_namespaced_config_map, namespace, deserialize=False,
                                            timeout_seconds=600, _request_timeout=(5, 620)):
                if event["type"] in ("ADDED", "MODIFIED"):
                    obj = event["object"]
                    self.seen.append((time.monotonic(), obj["metadata"]["name"], obj))
        except Exception as exc:  # noted, not raised: a thread's exception would only be a warning
            self.error = exc

    def stop(self) -> None:
        self._watch.stop()
