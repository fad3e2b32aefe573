"""TunnelStatus against a real kube-apiserver: the operator (with the chart's RBAC) gives each node an identity
that may write its own status object and nothing else; the node loop's writer writes on change only."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.mesh.tunnelstatus import PLURAL, NodeReport, Tunnel, TunnelState, config_generation, parse_report
from fabmesh.node.status_writer import StatusTarget, StatusWriter
from fabmesh.operator import objects as o
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import cloud_nodes, create_nodes, edge, wait_converged

pytestmark = pytest.mark.api

ROOT = Path(__file__).resolve().parents[2]
EDGES = {"ts-edge-1": "192.0.2.71", "ts-edge-2": "192.0.2.72"}


def node_token(env: OperatorEnv, node: str) -> str:
    """What kubelet projects into the node's Pod: a short-lived token of its ServiceAccount (TokenRequest)."""
    return env.kube._call("POST", f"/api/v1/namespaces/{env.namespace}/serviceaccounts/"
                          f"{o.node_account_name(node)}/token",
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                           "spec": {"audiences": ["https://kubernetes.default.svc"],
                                    "expirationSeconds": 600}})["status"]["token"]


def arrange(env: OperatorEnv) -> None:
    create_nodes(env.kube, [*cloud_nodes(), *(edge(n, ip, "north") for n, ip in EDGES.items())])
    env.start()
    wait_converged(env, set(EDGES))
    wait_for(lambda: all(env.kube.get(PLURAL, n, env.namespace) for n in EDGES), timeout=30,
             what="the operator to create each edge's TunnelStatus")


def report(state: TunnelState = TunnelState.UP, bytes_in: int = 0, at: str = "2026-12-02T01:00:00Z") -> NodeReport:
    return NodeReport(role="edge", config_generation="abc", tunnels_expected=1,
                      tunnels_up=1 if state is TunnelState.UP else 0, written_at=at,
                      tunnels=(Tunnel(peer="connector-1", state=state, bytes_in=bytes_in),))


def test_a_node_identity_writes_its_own_status_and_nothing_else(
        operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    env = operator_env
    arrange(env)
    own, other = "ts-edge-1", "ts-edge-2"
    agent = Kube(load_api_client(str(control_plane.kubeconfig_for_token(f"ts-{env.namespace}",
                                                                          node_token(env, own), env.namespace))))

    agent.merge_patch(PLURAL, own, {"status": report().to_api()}, env.namespace, sub="status")
    assert parse_report(env.kube.get(PLURAL, own, env.namespace)) == report()

    refused = {
        "patch another node's status": lambda: agent.merge_patch(
            PLURAL, other, {"status": report().to_api()}, env.namespace, sub="status"),
        "patch its own object's spec or labels": lambda: agent.merge_patch(
            PLURAL, own, {"metadata": {"labels": {"x": "y"}}}, env.namespace),
        "create a status object": lambda: agent.create(PLURAL, o.tunnel_status("ts-new", "", env.namespace, "edge"),
                                                       env.namespace),
        "delete its status object": lambda: agent.delete(PLURAL, own, env.namespace),
        "list status objects": lambda: agent.list(PLURAL, env.namespace),
        "list secrets": lambda: agent.list("secrets", env.namespace),
        "read its own Secret": lambda: agent.get("secrets", o.tls_secret_name(own), env.namespace),
        "read its ConfigMap": lambda: agent.get("configmaps", o.agent_configmap_name(own), env.namespace),
    }
    for what, call in refused.items():
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 403, f"{what}: {caught.value}"
    assert parse_report(env.kube.get(PLURAL, other, env.namespace)) is None  # untouched


def test_the_writer_writes_a_change_once_and_not_the_counters(
        operator_env: OperatorEnv, control_plane: ControlPlane, tmp_path: Path) -> None:
    env = operator_env
    arrange(env)
    token = tmp_path / "token"
    token.write_text(node_token(env, "ts-edge-1"))
    ca = tmp_path / "ca.crt"
    ca.write_text(control_plane.ca_pem)
    now = [datetime(2026, 12, 2, 1, 0, tzinfo=UTC)]
    writer = StatusWriter(StatusTarget(control_plane.url, token, ca, env.namespace, "ts-edge-1"), clock=lambda: now[0])

    def rv() -> str:
        return env.kube.get(PLURAL, "ts-edge-1", env.namespace)["metadata"]["resourceVersion"]

    assert writer.publish(report())
    first = rv()
    now[0] += timedelta(seconds=30)
    assert not writer.publish(report(bytes_in=12345))  # counters alone: no write
    assert rv() == first
    down = report(TunnelState.DOWN, at="2026-12-02T01:00:30Z")
    assert writer.publish(down)
    assert parse_report(env.kube.get(PLURAL, "ts-edge-1", env.namespace)) == down

    restarted = StatusWriter(StatusTarget(control_plane.url, token, ca, env.namespace, "ts-edge-1"),
                             clock=lambda: now[0] + timedelta(seconds=5))
    assert not restarted.publish(down)  # after a restart, an unchanged report is not rewritten


def fabmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabmesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_plugin_commands_read_what_each_node_wrote_with_its_own_identity(
        operator_env: OperatorEnv, control_plane: ControlPlane, tmp_path: Path) -> None:
    env = operator_env
    arrange(env)
    agents = {n: Kube(load_api_client(str(control_plane.kubeconfig_for_token(f"ts-{n}-{env.namespace}",
                                                                               node_token(env, n), env.namespace))))
              for n in EDGES}
    cm = env.kube.get("configmaps", o.agent_configmap_name("ts-edge-1"), env.namespace)
    current = config_generation({"mesh.yaml": cm["data"]["mesh.yaml"]})
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    healthy = NodeReport(role="edge", config_generation=current, tunnels_expected=2, tunnels_up=2, written_at=now,
                         tunnels=(Tunnel(peer="connector-1", state=TunnelState.UP, bytes_in=7, packets_in=1),
                                  Tunnel(peer="ts-edge-2", state=TunnelState.UP)))
    cut = NodeReport(role="edge", config_generation="000000000000", tunnels_expected=2, tunnels_up=1,
                     written_at=now, last_error="routes: EPERM",
                     tunnels=(Tunnel(peer="connector-1", state=TunnelState.UP, nat_local=True),
                              Tunnel(peer="ts-edge-1", state=TunnelState.UNRESPONSIVE, since=now,
                                     remote_endpoint="192.0.2.71:4500")))
    for name, report_ in (("ts-edge-1", healthy), ("ts-edge-2", cut)):
        agents[name].merge_patch(PLURAL, name, {"status": report_.to_api()}, env.namespace, sub="status")
    args = ["--kubeconfig", str(control_plane.kubeconfig), "--namespace", env.namespace]

    out = fabmesh("status", "--json", *args)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert (rows["ts-edge-1"]["tunnels_up"], rows["ts-edge-1"]["tunnels_expected"]) == (2, 2)
    assert rows["ts-edge-1"]["generation_applied"] == rows["ts-edge-1"]["generation_wanted"] == current
    assert (rows["ts-edge-2"]["tunnels_up"], rows["ts-edge-2"]["last_error"]) == (1, "routes: EPERM")
    assert rows["ts-edge-2"]["generation_applied"] != rows["ts-edge-2"]["generation_wanted"]
    assert 0 <= rows["ts-edge-2"]["status_age_s"] < 120

    out = fabmesh("tunnels", "ts-edge-2", "--output", "json", *args)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert [(t["peer"], t["state"]) for t in shown["tunnels"]] == [("connector-1", "up"), ("ts-edge-1", "unresponsive")]
    assert shown["paths"] == {"connector-1": "cloud (connector)", "ts-edge-1": "direct"}
    table = fabmesh("tunnels", "ts-edge-2", *args)
    assert "unresponsive" in table.stdout and "192.0.2.71:4500" in table.stdout, table.stdout

    out = fabmesh("doctor", "--json", "--no-agent-pods", *args)
    assert out.returncode == 1, out.stdout + out.stderr
    found = {(c["name"], c["status"], c["message"]) for c in json.loads(out.stdout) if c["status"] != "PASS"}
    assert ("tunnels-up", "FAIL", f"ts-edge-2: tunnel to ts-edge-1 is unresponsive since {now}") in found
    assert ("tunnels-up", "FAIL", "ts-edge-2: routes: EPERM") in found
    # Its ConfigMap was written just now: kubelet may still be projecting it, so no lag is claimed yet.
    assert not any(name == "config-generation" for name, _, _ in found)

    screen = tmp_path / "watch.out"
    with screen.open("w") as out:
        watch = subprocess.Popen([sys.executable, "-m", "fabmesh.cli", "status", "--watch", "--interval", "0.5",
                                  *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: screen.read_text().count("ts-edge-2 ") >= 2, timeout=60, what="two --watch refreshes")
    finally:
        watch.terminate()
        watch.wait(timeout=30)
    assert screen.read_text().count("Every 0.5s: kubectl fabmesh status") >= 2

    graph = fabmesh("graph", *args)
    assert '"ts-edge-1" -- "ts-edge-2" [color=red, penwidth=2, fontcolor=red, label="unresponsive"];' in graph.stdout


def test_a_deleted_node_loses_its_identity_and_status_object(operator_env: OperatorEnv) -> None:
    env = operator_env
    arrange(env)
    gone = "ts-edge-2"
    objects = [("serviceaccounts", o.node_account_name(gone)), ("roles", o.status_role_name(gone)),
               ("rolebindings", o.status_role_name(gone)), (PLURAL, gone)]
    assert all(env.kube.get(kind, name, env.namespace) for kind, name in objects)
    env.kube.delete("nodes", gone)
    wait_for(lambda: not any(env.kube.get(kind, name, env.namespace) for kind, name in objects), timeout=60,
             what=f"{gone}'s ServiceAccount, Role, RoleBinding and TunnelStatus to be deleted")
    assert env.kube.get(PLURAL, "ts-edge-1", env.namespace)  # the other node keeps its own
