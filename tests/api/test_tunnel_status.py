"""TunnelStatus against a real kube-apiserver: the operator (with the chart's RBAC) gives each node an identity
that may write its own status object and nothing else; the node loop's writer writes on change only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.mesh.tunnelstatus import PLURAL, NodeReport, Tunnel, TunnelState, parse_report
from fabmesh.node.status_writer import StatusTarget, StatusWriter
from fabmesh.operator import objects as o
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import cloud_nodes, create_nodes, edge, wait_converged

pytestmark = pytest.mark.api

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
