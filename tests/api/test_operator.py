"""The operator against a real kube-apiserver, running as its own process with the chart's RBAC."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from fabmesh.kube.client import ApiError
from fabmesh.mesh.cloud import ActiveConnector, CloudRoutes, parse_cloud_routes
from fabmesh.mesh.model import Peer, Role, parse_peer_shard
from fabmesh.node.desired import desired_state
from fabmesh.operator import ca_roll
from fabmesh.operator import objects as o
from fabmesh.operator.plan import shard_of
from fabmesh.operator.reconcile import Reconciler
from fabmesh.pki.authority import (
    describe,
    issued_by,
    key_matches_cert,
    public_key_b64,
    public_key_sha256,
    verify_leaf,
)
from fabmesh.testenv.controlplane import free_port
from fabmesh.testenv.hosts import stop_pid, wait_for
from tests.api.conftest import OperatorEnv, write_settings
from tests.api.operator_helpers import (
    CONNECTOR,
    EDGE,
    FLANNEL,
    WriteRecorder,
    cloud_nodes,
    configmaps,
    converged,
    create_nodes,
    desired_from_cluster,
    edge,
    edge_ip,
    events_for,
    mesh_of,
    node,
    nodes,
    pods,
    resource_versions,
    secret_text,
    secrets,
    wait_converged,
)
from tests.api.tcp_proxy import FreezableProxy

pytestmark = pytest.mark.api

NOW = datetime.datetime.now(datetime.UTC)


def _burst(count: int) -> list[dict]:
    return [edge(f"edge-{i:03d}", edge_ip(i), f"c{i % 10}") for i in range(count)]


def test_burst_of_200_edges_gets_unique_cidrs_and_certificates_that_verify(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, cloud_nodes())
    env.start()
    create_nodes(env.kube, _burst(200))
    names = {f"edge-{i:03d}" for i in range(200)}
    wait_converged(env, names)

    all_nodes, cms, secs = nodes(env), configmaps(env), secrets(env)
    cidrs = [all_nodes[n]["spec"]["podCIDR"] for n in names]
    assert len(set(cidrs)) == 200
    ca = secret_text(secs[o.CA_SECRET], "tls.crt")
    for name in names:
        meta = all_nodes[name]["metadata"]
        assert meta["annotations"]["fabmesh.io/pod-cidr"] == all_nodes[name]["spec"]["podCIDR"]
        assert meta["annotations"]["flannel.alpha.coreos.com/public-ip"] == "198.51.100.1"
        secret = secs[o.tls_secret_name(name)]
        cert, key = secret_text(secret, "tls.crt"), secret_text(secret, "tls.key")
        verify_leaf(ca, cert, now=datetime.datetime.now(datetime.UTC))
        assert key_matches_cert(cert, key)
        info = describe(cert)
        assert info.common_name == name and name in info.dns_names
        assert all_nodes[name]["status"]["addresses"][0]["address"] in info.ip_addresses
        mesh = mesh_of(cms[o.agent_configmap_name(name)])
        assert mesh.node.pod_cidr == all_nodes[name]["spec"]["podCIDR"]
        assert "PRIVATE KEY" not in cms[o.agent_configmap_name(name)]["data"]["mesh.yaml"]
        community = mesh.node.communities[0]
        expected_peers = {"connector-1"} | {n for n in names if n != name and
                                            f"community.fabmesh.io/{community}" in all_nodes[n]["metadata"]["labels"]}
        assert {p.name for p in mesh.peers} == expected_peers
        assert [p.role for p in mesh.peers if p.name == "connector-1"] == [Role.CONNECTOR]
    connector_secret = secs[o.connector_secret_name("connector-1")]
    assert describe(secret_text(connector_secret, "tls.crt")).common_name == "connector-1"
    assert o.connector_secret_name("cloud-2") not in secs  # an unlabelled cloud node has no key
    # Agent Pods: no API token, only their own ConfigMap and Secret; no key material in any log line.
    for name in names:
        spec = pods(env)[o.agent_pod_name(name)]["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["nodeName"] == name
        mounted = {v.get("configMap", {}).get("name") or v.get("secret", {}).get("secretName")
                   for v in spec["volumes"]} - {None}
        assert mounted == {o.agent_configmap_name(name), o.tls_secret_name(name)}
    assert "PRIVATE KEY" not in env.logs() and "BEGIN" not in env.logs()


def test_sigkill_mid_burst_never_hands_out_a_cidr_twice(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, cloud_nodes())
    first = env.start("op-a")
    burst = threading.Thread(target=create_nodes, args=(env.kube, _burst(200), 4))
    burst.start()
    wait_for(lambda: len([c for c in configmaps(env) if c.startswith("fabmesh-agent-")]) >= 20,
             timeout=60, interval=0.2, what="the operator to be mid-burst")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    burst.join()
    env.start("op-b")
    names = {f"edge-{i:03d}" for i in range(200)}
    wait_converged(env, names)

    all_nodes = nodes(env)
    cidrs = [all_nodes[n]["spec"]["podCIDR"] for n in names]
    assert len(set(cidrs)) == len(cidrs) == 200
    record = configmaps(env)[o.IPAM_CONFIGMAP]["data"]["allocations.json"]
    assert all(all_nodes[n]["spec"]["podCIDR"] in record for n in names)
    # Nothing orphaned, and the end state is exactly what a fresh plan of this cluster says.
    desired = desired_from_cluster(env)
    actual = {k: v["data"]["mesh.yaml"] for k, v in configmaps(env).items() if k.startswith("fabmesh-agent-")}
    assert actual == desired
    assert {k for k in secrets(env) if k.startswith("fabmesh-tls-")} == {o.tls_secret_name(n) for n in names}


def test_resync_with_nothing_changed_writes_nothing(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), *_burst(20)])
    env.start()
    wait_converged(env, {f"edge-{i:03d}" for i in range(20)})
    before = resource_versions(env)
    time.sleep(3 * env.settings.resync_period_s)  # several periodic full resyncs happen here
    assert resource_versions(env) == before
    # And a pass made by a separate process with the same rights sends no write request at all.
    once = subprocess.run([sys.executable, "-m", "fabmesh.cli", "operator", "--once", "--kubeconfig",
                           str(env.kubeconfig), "--config", str(env.settings_file)],
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert json.loads(once.stdout)["writes"] == {}


def test_relabel_into_community_rewrites_only_the_affected_configmaps(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a"),
                            edge("e3", "192.0.2.3"), edge("e4", "192.0.2.4", "b"), edge("e5", "192.0.2.5", "b")])
    env.start()
    wait_converged(env, {"e1", "e2", "e3", "e4", "e5"})
    before = {k: v["metadata"]["resourceVersion"] for k, v in configmaps(env).items()}
    env.kube.merge_patch("nodes", "e3", {"metadata": {"labels": {"community.fabmesh.io/a": ""}}})
    wait_for(lambda: "e3" in {p.name for p in mesh_of(configmaps(env)["fabmesh-agent-e1"]).peers},
             timeout=30, what="e1 to gain e3 as a peer")
    time.sleep(2 * env.settings.resync_period_s)
    after = {k: v["metadata"]["resourceVersion"] for k, v in configmaps(env).items()}
    changed = {k for k in after if before.get(k) != after[k]}
    # e3's connector entry too: with a mediated peer now, it is a mediation client there (unique=no).
    shard = f"fabmesh-connector-peers-{shard_of('e3', env.settings.connector_shards):02d}"
    assert changed == {"fabmesh-agent-e1", "fabmesh-agent-e2", "fabmesh-agent-e3", shard}
    e3 = mesh_of(configmaps(env)["fabmesh-agent-e3"])
    assert {p.name for p in e3.peers} == {"connector-1", "e1", "e2"}
    assert [p.initiate for p in e3.peers if p.name in ("e1", "e2")] == [False, False]


def test_deleted_node_loses_its_objects_and_no_peer_lists_it(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a")])
    env.start()
    wait_converged(env, {"e1", "e2"})
    freed = nodes(env)["e2"]["spec"]["podCIDR"]
    env.kube.delete("nodes", "e2")
    wait_for(lambda: "fabmesh-agent-e2" not in configmaps(env) and "fabmesh-tls-e2" not in secrets(env)
             and o.agent_pod_name("e2") not in pods(env), timeout=30, what="e2's objects to go")
    wait_for(lambda: {p.name for p in mesh_of(configmaps(env)["fabmesh-agent-e1"]).peers} == {"connector-1"},
             timeout=30, what="e1 to forget e2")
    connector_peers = "".join(c["data"].get("peers.yaml", "") for c in configmaps(env).values())
    assert "e2" not in connector_peers
    assert freed not in configmaps(env)[o.IPAM_CONFIGMAP]["data"]["allocations.json"]


def test_standby_takes_over_after_the_leader_is_killed(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
    procs = {"op-a": env.start("op-a")}
    wait_converged(env, {"e1"})
    procs["op-b"] = env.start("op-b")
    lease = env.kube._call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{env.namespace}/leases/"
                                  f"{env.settings.leader_election.lease_name}")
    leader = lease["spec"]["holderIdentity"]
    assert leader == "op-a"
    os.kill(procs[leader].pid, signal.SIGKILL)
    procs[leader].wait()
    create_nodes(env.kube, [edge("e2", "192.0.2.2")])
    wait_converged(env, {"e1", "e2"}, timeout=60)
    lease = env.kube._call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{env.namespace}/leases/"
                                  f"{env.settings.leader_election.lease_name}")
    assert lease["spec"]["holderIdentity"] == "op-b"


def test_changed_agent_pod_spec_deletes_the_old_pod_once_and_creates_the_new_one_when_it_is_gone(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
    first = env.start("op-a")
    wait_converged(env, {"e1"})
    stop_pid(first.pid)
    env.settings = write_settings(env.settings_file, env.namespace, agent_pods={"image": "example.org/fabmesh:new"})
    env.start("op-b")
    # No kubelet confirms the deletion here: the old Pod stays terminating, and every pass sees it.
    wait_for(lambda: pods(env)[o.agent_pod_name("e1")]["metadata"].get("deletionTimestamp"), timeout=30,
             what="the old agent Pod to be deleted")
    time.sleep(3 * env.settings.resync_period_s)
    log = (env.log_dir / "operator-op-b.log").read_text()
    assert log.count("node=e1 action=delete-pod") == 1, log
    assert "action=create-pod" not in log and "replace-pod" not in log, log

    env.kube.delete("pods", o.agent_pod_name("e1"), env.namespace, grace_period_s=0)  # what kubelet would confirm
    def new_pod() -> bool:
        pod = pods(env).get(o.agent_pod_name("e1"))
        return pod is not None and pod["spec"]["containers"][0]["image"] == "example.org/fabmesh:new"

    wait_for(new_pod, timeout=30, what="the new agent Pod")
    time.sleep(env.settings.resync_period_s)
    log = (env.log_dir / "operator-op-b.log").read_text()
    assert log.count("node=e1 action=create-pod") == 1, log


BAD = [
    ("bad-community", edge("bad-community", "192.0.2.10", "Bad_Name"),
     "metadata.labels[community.fabmesh.io/Bad_Name]"),
    ("both-roles", node("both-roles", "192.0.2.11", {EDGE: "", CONNECTOR: ""}),
     "metadata.labels[node-restriction.kubernetes.io/fabmesh-connector]"),
    ("bad-annotation", edge("bad-annotation", "192.0.2.12", annotations={"fabmesh.io/pod-cidr": "ten.dot/24"}),
     "metadata.annotations[fabmesh.io/pod-cidr]"),
    ("outside-pool", edge("outside-pool", "192.0.2.13", pod_cidr="172.31.0.0/24"), "spec.podCIDR"),
    ("no-address", node("no-address", None, {EDGE: ""}), "status.addresses"),
]


def test_each_bad_input_gets_an_event_naming_the_field_and_good_nodes_are_unaffected(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("good-1", "192.0.2.1", "a"), edge("good-2", "192.0.2.2", "a"),
                            edge("dup-first", "192.0.2.3", pod_cidr="10.233.200.0/24")])
    env.start()
    wait_converged(env, {"good-1", "good-2", "dup-first"})
    before = {k: v["metadata"]["resourceVersion"] for k, v in configmaps(env).items() if "good" in k}
    create_nodes(env.kube, [n for _, n, _ in BAD])
    env.kube.create("nodes", edge("dup-second", "192.0.2.4", pod_cidr="10.233.200.0/24"))
    expected = {name: field for name, _, field in BAD} | {"dup-second": "spec.podCIDR"}
    for name, field in expected.items():
        wait_for(lambda n=name: events_for(env, n), timeout=30, what=f"an Event on {name}")
        messages = [e["message"] for e in events_for(env, name)]
        assert any(m.startswith(field) for m in messages), (name, messages)
        assert o.agent_configmap_name(name) not in configmaps(env)
    time.sleep(env.settings.resync_period_s)
    after = {k: v["metadata"]["resourceVersion"] for k, v in configmaps(env).items() if "good" in k}
    assert after == before
    assert converged(env, {"good-1", "good-2", "dup-first"})
    assert nodes(env)["dup-first"]["spec"]["podCIDR"] == "10.233.200.0/24"


def test_exhausted_pool_gets_an_event_and_allocated_nodes_keep_their_cidrs(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.settings = write_settings(env.settings_file, env.namespace, edge_pod_pool="10.233.0.0/23")
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    env.start()
    wait_converged(env, {"e1", "e2"})
    env.kube.create("nodes", edge("e3", "192.0.2.3"))
    wait_for(lambda: events_for(env, "e3"), timeout=30, what="an Event on e3")
    assert events_for(env, "e3")[0]["message"].startswith("pool")
    assert {nodes(env)[n]["spec"]["podCIDR"] for n in ("e1", "e2")} == {"10.233.0.0/24", "10.233.1.0/24"}


def test_leaf_certificates_renew_at_two_thirds_of_their_life_and_the_ca_stays(operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
    first = Reconciler(env.kube, env.settings)
    first.run_once()
    before = secrets(env)
    old_leaf = describe(secret_text(before["fabmesh-tls-e1"], "tls.crt"))
    lifetime = old_leaf.not_after - old_leaf.not_before
    for offset, renewed in ((lifetime * 0.6, False), (lifetime * 0.7, True)):
        later = Reconciler(env.kube, env.settings, clock=lambda o=offset: old_leaf.not_before + o)
        later.run_once()
        leaf = describe(secret_text(secrets(env)["fabmesh-tls-e1"], "tls.crt"))
        assert (leaf.serial != old_leaf.serial) is renewed, f"at {offset} renewed={renewed}"
    after = secrets(env)
    assert secret_text(after[o.CA_SECRET], "tls.crt") == secret_text(before[o.CA_SECRET], "tls.crt")
    verify_leaf(secret_text(after[o.CA_SECRET], "tls.crt"), secret_text(after["fabmesh-tls-e1"], "tls.crt"),
                now=old_leaf.not_before + lifetime * 0.7)


def test_moving_the_connector_label_repoints_every_edge_at_the_new_connectors_vtep(operator_env: OperatorEnv) -> None:
    env = operator_env
    other_vtep = {**FLANNEL, "flannel.alpha.coreos.com/public-ip": "198.51.100.9",
                  "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:09:09"}'}
    create_nodes(env.kube, [*cloud_nodes(), node("cloud-9", "198.51.100.9", {}, other_vtep),
                            edge("e1", "192.0.2.1"), edge("e2", "192.0.2.2")])
    env.start()
    wait_converged(env, {"e1", "e2"})
    env.kube.merge_patch("nodes", "connector-1", {"metadata": {"labels": {CONNECTOR: None}}})
    env.kube.merge_patch("nodes", "cloud-9", {"metadata": {"labels": {CONNECTOR: ""}}})
    wait_for(lambda: all(nodes(env)[n]["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"]
                         == "198.51.100.9" for n in ("e1", "e2")), timeout=30, what="edges re-pointed")
    assert all(nodes(env)[n]["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
               == other_vtep["flannel.alpha.coreos.com/backend-data"] for n in ("e1", "e2"))
    wait_for(lambda: {p.name for p in mesh_of(configmaps(env)["fabmesh-agent-e1"]).peers} == {"cloud-9"},
             timeout=30, what="e1 to peer with the new connector")
    # The new connector has its own key and Pod; the old one's are gone.
    wait_for(lambda: o.connector_secret_name("connector-1") not in secrets(env)
             and o.connector_pod_name("connector-1") not in pods(env), timeout=30,
             what="the old connector's Secret and Pod to be deleted")
    assert describe(secret_text(secrets(env)[o.connector_secret_name("cloud-9")], "tls.crt")).common_name == "cloud-9"
    pod = pods(env)[o.connector_pod_name("cloud-9")]
    assert pod["spec"]["nodeName"] == "cloud-9"
    assert {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v} == {
        o.connector_secret_name("cloud-9")}


def _cloud_routes(env: OperatorEnv) -> CloudRoutes | None:
    cm = configmaps(env).get(o.CLOUD_ROUTES_CONFIGMAP)
    return None if cm is None else parse_cloud_routes(cm["data"]["routes.yaml"])


def test_cloud_routes_name_the_active_connector_and_only_announced_edge_addresses(operator_env: OperatorEnv) -> None:
    env = operator_env
    # e2 claims cloud-2's address: announced nowhere, so no cloud node may route it to the connector.
    create_nodes(env.kube, [*cloud_nodes(), node("cloud-9", "198.51.100.9", {}, dict(FLANNEL)),
                            edge("e1", "192.0.2.1"), edge("e2", "198.51.100.2")])
    env.start()
    wait_converged(env, {"e1", "e2"})
    routes = _cloud_routes(env)
    assert routes is not None and routes.connector == ActiveConnector(name="connector-1", address="198.51.100.1")
    assert routes.subnets == ("192.0.2.1/32",)
    assert routes.no_snat == (env.settings.edge_pod_pool,)
    assert routes.source_cidrs == tuple(env.settings.cloud_pod_cidrs)
    assert configmaps(env)[o.CLOUD_ROUTES_CONFIGMAP]["metadata"]["labels"]["app.kubernetes.io/managed-by"]

    env.kube.merge_patch("nodes", "connector-1", {"metadata": {"labels": {CONNECTOR: None}}})
    env.kube.merge_patch("nodes", "cloud-9", {"metadata": {"labels": {CONNECTOR: ""}}})
    wait_for(lambda: (r := _cloud_routes(env)) is not None and r.connector is not None
             and r.connector.name == "cloud-9", timeout=30, what="routes.yaml re-pointed at cloud-9")
    assert _cloud_routes(env).connector.address == "198.51.100.9"  # type: ignore[union-attr]

    env.kube.merge_patch("nodes", "cloud-9", {"metadata": {"labels": {CONNECTOR: None}}})
    # No connector: the document stays, saying so, and the agents remove their routes.
    wait_for(lambda: (r := _cloud_routes(env)) is not None and r.connector is None, timeout=30,
             what="routes.yaml without a connector")


def _pod_security_verdict(env: OperatorEnv, pod: dict, level: str) -> str:
    """What the API server's PodSecurity admission says about ``pod`` in a namespace enforcing ``level``:
    "" when admitted (a dry run: nothing is created), else its refusal."""
    namespace = f"{env.namespace}-{level}"
    env.kube.create("namespaces", {"metadata": {"name": namespace,
                                                "labels": {"pod-security.kubernetes.io/enforce": level}}})
    try:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod["metadata"]["name"]},
                "spec": pod["spec"]}
        env.kube._call("POST", f"/api/v1/namespaces/{namespace}/pods", body, query={"dryRun": "All"})
        return ""
    except ApiError as exc:
        assert exc.status == 403, exc
        return exc.body
    finally:
        env.kube.delete("namespaces", namespace)


def test_agent_pod_as_stored_is_locked_down_and_only_a_privileged_namespace_admits_it(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    # The operator's namespace labelled as docs/operator.md says it must be.
    env.kube.merge_patch("namespaces", env.namespace,
                         {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}})
    create_nodes(env.kube, cloud_nodes())
    env.start()
    create_nodes(env.kube, [edge("edge-1", edge_ip(1), "c1")])
    wait_converged(env, {"edge-1"})
    pod = pods(env)[o.agent_pod_name("edge-1")]  # as the API server stored it, defaults applied

    spec = pod["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"agent", "strongswan"}
    for name, container in containers.items():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert "privileged" not in context, name
    assert containers["agent"]["resources"] == {"requests": {"cpu": "20m", "memory": "64Mi"},
                                                "limits": {"cpu": "500m", "memory": "256Mi"}}
    assert containers["strongswan"]["resources"] == {"requests": {"cpu": "20m", "memory": "32Mi"},
                                                     "limits": {"cpu": "1", "memory": "256Mi"}}
    assert pod["status"].get("qosClass") == "Burstable"

    # PodSecurity admission, asked with the stored Pod: baseline refuses exactly what the agent's job needs
    # (host network, host paths, NET_ADMIN/NET_RAW) ...
    baseline = _pod_security_verdict(env, pod, "baseline")
    for needed in ("hostNetwork=true", "hostPath volumes", "NET_ADMIN", "NET_RAW"):
        assert needed in baseline, baseline
    # ... and restricted adds only running as root: every other restricted check is already met.
    restricted = _pod_security_verdict(env, pod, "restricted")
    assert "runAsNonRoot != true" in restricted, restricted
    for met in ("allowPrivilegeEscalation", "seccompProfile", "privileged"):
        assert met not in restricted, restricted


def test_a_write_the_api_refuses_for_one_node_spares_the_others_and_stale_objects_still_go(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("b-good", "192.0.2.2", "a"), edge("c-gone", "192.0.2.3")])
    env.start()
    wait_converged(env, {"b-good", "c-gone"})
    # An immutable ConfigMap already holds a-blocked's name: the API server answers 422 to every update.
    blocked = o.configmap(o.agent_configmap_name("a-blocked"), env.namespace, "agent-config",
                          {"mesh.yaml": "not the operator's"}, "a-blocked")
    env.kube.create("configmaps", {**blocked, "immutable": True}, env.namespace)
    # a-blocked sorts first, so today's pass would stop before b-good's update and before the deletions.
    create_nodes(env.kube, [edge("a-blocked", "192.0.2.1", "a")])
    env.kube.delete("nodes", "c-gone")

    wait_for(lambda: "a-blocked" in {p.name for p in mesh_of(configmaps(env)["fabmesh-agent-b-good"]).peers},
             timeout=30, what="b-good to gain a-blocked as a peer")
    wait_for(lambda: o.agent_configmap_name("c-gone") not in configmaps(env)
             and o.tls_secret_name("c-gone") not in secrets(env) and o.agent_pod_name("c-gone") not in pods(env),
             timeout=30, what="c-gone's objects to go")
    wait_for(lambda: events_for(env, "a-blocked"), timeout=30,
             what="a Warning Event on a-blocked")
    [event] = events_for(env, "a-blocked")
    assert event["type"] == "Warning"
    assert event["message"].startswith(f"configmaps/{o.agent_configmap_name('a-blocked')}: "), event["message"]
    assert "422" in event["message"] and "immutable" in event["message"], event["message"]
    # Everything of a-blocked that the API accepts was written; the refused object is left as it was.
    assert o.tls_secret_name("a-blocked") in secrets(env)
    assert "fabmesh.io/status" in nodes(env)["a-blocked"]["metadata"]["annotations"]
    assert configmaps(env)[o.agent_configmap_name("a-blocked")]["data"] == {"mesh.yaml": "not the operator's"}
    assert all(p.poll() is None for p in env.processes)
    assert "node=a-blocked object=configmaps/" in env.logs() and "status=422" in env.logs()


CONNECTOR_NODE = "connector-1"


def _pins(env: OperatorEnv) -> dict[tuple[str, str], str]:
    """(holder, peer) -> the pinned public key, over every agent config and every connector shard."""
    pins = {}
    for name, cm in configmaps(env).items():
        if name.startswith("fabmesh-agent-"):
            mesh = mesh_of(cm)
            pins |= {(mesh.node.name, p.name): p.pubkey for p in mesh.peers}
        elif name.startswith("fabmesh-connector-peers-"):
            pins |= {(CONNECTOR_NODE, p.name): p.pubkey for p in parse_peer_shard(cm["data"]["peers.yaml"]).peers}
    return pins


def _leaf(env: OperatorEnv, node: str) -> str:
    name = o.connector_secret_name(node) if node == CONNECTOR_NODE else o.tls_secret_name(node)
    return secret_text(secrets(env)[name], "tls.crt")


def test_every_peer_pins_the_current_leaf_and_a_revoked_key_is_unpinned_everywhere_in_one_pass(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a")])
    reconciler = Reconciler(env.kube, env.settings)
    reconciler.run_once()
    pins = _pins(env)
    assert set(pins) == {("e1", CONNECTOR_NODE), ("e1", "e2"), ("e2", CONNECTOR_NODE), ("e2", "e1"),
                         (CONNECTOR_NODE, "e1"), (CONNECTOR_NODE, "e2")}
    assert all(key == public_key_b64(_leaf(env, peer)) for (_, peer), key in pins.items())
    old = _leaf(env, "e1")

    # Revocation: a person deletes e1's Secret (its key leaked). One pass: a new key, pinned by every peer.
    env.kube.delete("secrets", o.tls_secret_name("e1"), env.settings.namespace)
    reconciler.run_once()
    new = public_key_b64(_leaf(env, "e1"))
    assert new != public_key_b64(old)
    assert {k: v for k, v in _pins(env).items() if k[1] == "e1"} == {("e2", "e1"): new, (CONNECTOR_NODE, "e1"): new}

    # A Node deleted and made again under the same name before the operator saw it go: a new key too.
    uid = nodes(env)["e2"]["metadata"]["uid"]
    old = _leaf(env, "e2")
    env.kube.delete("nodes", "e2")
    # The flannel finalizer holds e2 for two passes (strip, then release); the pass that releases it still
    # observed e2, so the operator has not seen it go when it comes back.
    wait_for(lambda: reconciler.run_once() is not None and "e2" not in nodes(env), timeout=10, what="e2 to go")
    create_nodes(env.kube, [edge("e2", "192.0.2.2", "a")])
    assert nodes(env)["e2"]["metadata"]["uid"] != uid
    reconciler.run_once()
    assert public_key_sha256(_leaf(env, "e2")) != public_key_sha256(old)
    assert _pins(env)[("e1", "e2")] == public_key_b64(_leaf(env, "e2"))


def test_ca_roll_trusts_the_new_ca_then_reissues_every_leaf_with_its_key_then_drops_the_old_ca(
        operator_env: OperatorEnv) -> None:
    env = operator_env
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a")])
    Reconciler(env.kube, env.settings).run_once()
    old_ca = secret_text(secrets(env)[o.CA_SECRET], "tls.crt")
    keys = {n: public_key_sha256(_leaf(env, n)) for n in ("e1", "e2", CONNECTOR_NODE)}
    pins_before = _pins(env)
    env.kube.merge_patch("secrets", o.CA_SECRET, {"metadata": {"annotations": {ca_roll.ROTATE_ANNOTATION: "yes"}}},
                         env.settings.namespace)
    settle = datetime.timedelta(seconds=env.settings.ca_roll_settle_s)
    start = datetime.datetime.now(datetime.UTC)

    def at(offset: datetime.timedelta) -> ca_roll.CAState:
        Reconciler(env.kube, env.settings, clock=lambda: start + offset).run_once()
        return ca_roll.state_from_secret(secrets(env)[o.CA_SECRET])

    def bundles() -> set[str]:
        return {mesh_of(cm).ca_cert for n, cm in configmaps(env).items() if n.startswith("fabmesh-agent-")} | \
            {secret_text(s, "ca.crt") for n, s in secrets(env).items() if n != o.CA_SECRET}

    trusting = at(datetime.timedelta(0))
    assert trusting.phase is ca_roll.Phase.TRUST_NEXT and trusting.signer.cert_pem == old_ca
    new_ca_pem = trusting.other.cert_pem  # type: ignore[union-attr]
    assert bundles() == {old_ca + new_ca_pem}
    assert all(issued_by(old_ca, _leaf(env, n)) for n in keys)

    assert at(settle / 2).phase is ca_roll.Phase.TRUST_NEXT  # waits for every node to trust the new CA
    signing = at(settle)
    assert signing.phase is ca_roll.Phase.SIGN_NEXT and signing.signer.cert_pem == new_ca_pem
    assert bundles() == {old_ca + new_ca_pem}
    assert all(issued_by(new_ca_pem, _leaf(env, n)) for n in keys)
    assert {n: public_key_sha256(_leaf(env, n)) for n in keys} == keys, "a roll must keep every node's key"
    assert _pins(env) == pins_before, "a roll keeps every key, so it changes no pin"

    assert at(settle * 1.5).phase is ca_roll.Phase.SIGN_NEXT
    done = at(settle * 2)
    assert done.phase is ca_roll.Phase.STABLE and done.other is None
    assert bundles() == {new_ca_pem}
    assert o.unb64(secrets(env)[o.CA_SECRET]["data"]["tls.crt"]) == new_ca_pem


def _lease_holder(env: OperatorEnv) -> str | None:
    lease = env.kube.get("leases", env.settings.leader_election.lease_name, env.namespace)
    return (lease or {}).get("spec", {}).get("holderIdentity")


def _probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, json.loads(response.read())["reason"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["reason"]
    except OSError as exc:
        return 0, str(exc)


def _epoch(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def test_partitioned_leader_stops_writing_and_exits_before_the_standby_takes_over(
        operator_env: OperatorEnv, tmp_path: Path) -> None:
    """No split brain. op-a reaches the API server only through a relay that the test freezes (the
    partition); op-b connects directly. The two run different settings (a rolling upgrade that changes
    the tunnel MTU), so every write says whose it is: mtu 1400 is op-a's, 1380 op-b's."""
    env = operator_env
    election = {"lease_duration_s": 6, "renew_deadline_s": 3, "retry_period_s": 1}
    env.settings = write_settings(env.settings_file, env.namespace, leader_election=election)
    settings_b = tmp_path / "operator-b.yaml"
    write_settings(settings_b, env.namespace, leader_election=election, tunnel={"mtu": 1380})
    server = yaml.safe_load(env.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = FreezableProxy((host, int(port)))
    via_proxy = tmp_path / "kubeconfig-via-proxy"
    via_proxy.write_text(env.kubeconfig.read_text().replace(server, f"https://127.0.0.1:{proxy.port}"))
    via_proxy.chmod(0o600)
    recorder = WriteRecorder(env)
    try:
        create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1")])
        health_a, health_b = free_port(), free_port()
        op_a = env.start("op-a", kubeconfig=via_proxy, health_port=health_a)
        wait_converged(env, {"e1"})
        assert _lease_holder(env) == "op-a"
        op_b = env.start("op-b", settings_file=settings_b, health_port=health_b)
        wait_for(lambda: _probe(health_b, "/readyz") == (200, "standby"), timeout=30, what="op-b ready as standby")
        assert _probe(health_a, "/readyz") == (200, "leader")
        assert _probe(health_a, "/healthz")[0] == 200

        proxy.freeze()
        wait_for(lambda: _lease_holder(env) == "op-b", timeout=30, what="op-b to take the lease")
        takeover, takeover_wall = time.monotonic(), time.time()
        a_exited_before_takeover = op_a.poll() is not None
        wait_for(lambda: mesh_of(configmaps(env)["fabmesh-agent-e1"]).tunnel.mtu == 1380, timeout=30,
                 what="op-b to rewrite e1's config")
        wait_for(lambda: _probe(health_b, "/readyz") == (200, "leader"), timeout=30, what="op-b ready as leader")
        proxy.heal()
        create_nodes(env.kube, [edge("e2", "192.0.2.2")])  # work for both, should both think they lead
        wait_converged(env, {"e1", "e2"}, timeout=60)

        def a_wrote_after_takeover() -> bool:
            return any(t > takeover and mesh_of(obj).tunnel.mtu == 1400
                       for t, name, obj in recorder.seen if name.startswith("fabmesh-agent-"))

        # On the old code op-a's renew hung forever while its worker went on: wait long enough for its
        # stalled requests (30 s timeout) to give up and a pass to run through the healed relay.
        wait_for(lambda: op_a.poll() is not None or a_wrote_after_takeover(), timeout=45,
                 what="op-a to exit or write")
        assert recorder.error is None, f"the write recorder's watch broke: {recorder.error}"
        assert not a_wrote_after_takeover(), "op-a wrote after op-b took over (split brain)"
        # The same from the API server's own record of who wrote: managedFields times are whole seconds.
        late = [(name, entry["time"]) for _, name, obj in recorder.seen
                for entry in obj["metadata"].get("managedFields") or []
                if entry["manager"] == "fabmesh-operator/op-a"
                and _epoch(entry["time"]) >= takeover_wall - 1]
        assert late == [], f"op-a's writes after the takeover: {late}"
        assert op_a.poll() is not None and op_a.returncode != 0, f"op-a did not exit non-zero: {op_a.poll()}"
        assert a_exited_before_takeover, "op-a was still running when op-b took over"
        assert op_b.poll() is None
        assert mesh_of(configmaps(env)["fabmesh-agent-e2"]).tunnel.mtu == 1380
    finally:
        recorder.stop()
        proxy.close()


# -- issue 10: a hostile node or a bad label harms at most that node ---------------------------------

def connector_peers(env: OperatorEnv) -> dict[str, Peer]:
    return {p.name: p for name, cm in configmaps(env).items() if name.startswith("fabmesh-connector-peers-")
            for p in parse_peer_shard(cm["data"]["peers.yaml"]).peers}


def peer_of(env: OperatorEnv, node: str, peer: str) -> Peer | None:
    return next((p for p in mesh_of(configmaps(env)[o.agent_configmap_name(node)]).peers if p.name == peer), None)


def event_fields(env: OperatorEnv, name: str) -> set[str]:
    return {e["message"].split(":")[0] for e in events_for(env, name)}


def test_edges_announce_only_their_own_addresses(operator_env: OperatorEnv) -> None:
    env = operator_env
    with_external = edge("ext-bad", "192.0.2.9", "a")
    with_external["status"]["addresses"].append({"type": "ExternalIP", "address": "10.244.0.9"})
    homes = [edge(f"home-{x}", "192.168.1.10") for x in "ab"]
    create_nodes(env.kube, [*cloud_nodes(), edge("good", "192.0.2.1", "a"), edge("hijack", "10.244.1.5", "a"),
                            edge("api-server", "198.51.100.2"), with_external, *homes])
    env.start()
    names = {"good", "hijack", "api-server", "ext-bad", "home-a", "home-b"}
    wait_converged(env, names)  # every edge is planned: a bad address costs only that address
    wait_for(lambda: all(events_for(env, n) for n in names - {"good"}), timeout=30, what="Events on bad addresses")

    shards = connector_peers(env)
    cidr = {n: nodes(env)[n]["spec"]["podCIDR"] for n in names}
    for name in names - {"good", "ext-bad"}:
        assert shards[name].subnets == (cidr[name],), name  # pod CIDR only, no hijacking /32
    assert shards["good"].subnets == (cidr["good"], "192.0.2.1/32")
    assert shards["ext-bad"].subnets == (cidr["ext-bad"], "192.0.2.9/32")  # only its ExternalIP was refused
    assert peer_of(env, "good", "hijack") is None  # no address its peers may use: relayed by the connector
    assert peer_of(env, "good", "ext-bad").endpoint == "192.0.2.9"  # type: ignore[union-attr]
    assert event_fields(env, "hijack") == {"status.addresses[0]"}
    assert event_fields(env, "ext-bad") == {"status.addresses[1]"}
    assert event_fields(env, "home-a") == event_fields(env, "home-b") == {"status.addresses[0]"}


def test_one_nodes_bad_data_never_reaches_the_others(operator_env: OperatorEnv) -> None:
    env = operator_env
    cloud = cloud_nodes()
    cloud[1]["metadata"]["annotations"] = {"fabmesh.io/pod-cidr": "10.233.0.0/16"}  # a cloud kubelet's claim
    create_nodes(env.kube, [*cloud, edge("e1", "192.0.2.1", "a"), edge("e2", "192.0.2.2", "a"),
                            edge("e3", "192.0.2.3", "a")])
    env.start()
    wait_converged(env, {"e1", "e2", "e3"}, timeout=30)
    before = mesh_of(configmaps(env)["fabmesh-agent-e1"]).peers
    cidr = {n: nodes(env)[n]["spec"]["podCIDR"] for n in ("e1", "e2", "e3")}

    # e2 writes e1's CIDR into its own annotation: an Event, not the CIDR; the annotation is put back.
    env.kube.merge_patch("nodes", "e2", {"metadata": {"annotations": {"fabmesh.io/pod-cidr": cidr["e1"]}}})
    wait_for(lambda: "metadata.annotations[fabmesh.io/pod-cidr]" in event_fields(env, "e2"), timeout=30,
             what="an Event on e2's annotation")
    wait_for(lambda: nodes(env)["e2"]["metadata"]["annotations"]["fabmesh.io/pod-cidr"] == cidr["e2"],
             timeout=30, what="e2's annotation rewritten from the record")

    # e3 turns invalid: it stays in its peers' configs with its last good values until it is deleted.
    env.kube.merge_patch("nodes", "e3", {"metadata": {"labels": {"community.fabmesh.io/Bad_Name": ""}}})
    wait_for(lambda: events_for(env, "e3"), timeout=30, what="an Event on e3")
    time.sleep(2 * env.settings.resync_period_s)
    assert mesh_of(configmaps(env)["fabmesh-agent-e1"]).peers == before
    assert connector_peers(env)["e3"].subnets == (cidr["e3"], "192.0.2.3/32")
    assert cidr["e3"] in configmaps(env)[o.IPAM_CONFIGMAP]["data"]["allocations.json"]
    env.kube.delete("nodes", "e3")
    wait_for(lambda: "e3" not in connector_peers(env) and peer_of(env, "e1", "e3") is None, timeout=30,
             what="e3 to leave every config once deleted")


def test_dual_stack_and_ipv6_addresses_never_break_ipv4_peers(operator_env: OperatorEnv) -> None:
    env = operator_env
    dual = edge("dual", "2001:db8::5", "a")
    dual["status"]["addresses"].append({"type": "InternalIP", "address": "192.0.2.5"})
    create_nodes(env.kube, [*cloud_nodes(), edge("e1", "192.0.2.1", "a"), dual, edge("v6", "2001:db8::6", "a")])
    env.start()
    wait_converged(env, {"e1", "dual"})
    wait_for(lambda: events_for(env, "v6"), timeout=30, what="an Event on the IPv6-only edge")
    assert event_fields(env, "v6") == {"status.addresses"}
    assert connector_peers(env)["dual"].subnets == (nodes(env)["dual"]["spec"]["podCIDR"], "192.0.2.5/32")
    # What the connector and e1 would apply from these configs: every peer planned, none rejected.
    header = mesh_of(configmaps(env)[o.CONNECTOR_CONFIGMAP])
    connector = header.model_copy(update={"peers": tuple(connector_peers(env).values())})
    dual_cidr = nodes(env)["dual"]["spec"]["podCIDR"]
    for mesh, route in ((connector, "192.0.2.5/32"), (mesh_of(configmaps(env)["fabmesh-agent-e1"]), dual_cidr)):
        state = desired_state(mesh, "CERT", uplink="wan0")
        assert state.rejected == () and route in {r.dst for r in state.routes}
