"""``fabmesh status|doctor|graph`` as a user runs them: a subprocess with the admin kubeconfig, against a
real kube-apiserver that the real operator has reconciled (no kubelet: agent Pods stay Pending)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import wait_for
from tests.api.conftest import OperatorEnv
from tests.api.operator_helpers import cloud_nodes, create_nodes, edge, events_for, nodes, wait_converged

pytestmark = pytest.mark.api

ROOT = Path(__file__).resolve().parents[2]
# kp-edge-3 sits on 127.0.0.1 so that its "agent metrics" can be served by the test itself.
EDGES = {"kp-edge-1": ("192.0.2.61", ("north",)),
         "kp-edge-2": ("192.0.2.62", ("north", "south")),
         "kp-edge-3": ("127.0.0.1", ("south",))}
PEERS = {"kp-edge-1": 2, "kp-edge-2": 3, "kp-edge-3": 2}


def fabmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabmesh.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def cluster_args(env: OperatorEnv, control_plane: ControlPlane) -> list[str]:
    return ["--kubeconfig", str(control_plane.kubeconfig), "--namespace", env.namespace]


def arrange(env: OperatorEnv) -> None:
    create_nodes(env.kube, [*cloud_nodes(), *(edge(n, ip, *cs) for n, (ip, cs) in EDGES.items())])
    env.start()
    wait_converged(env, set(EDGES))


@pytest.fixture
def fake_agent_metrics() -> Iterator[int]:
    """What kp-edge-3's agent would export: its connector tunnel up, its community tunnel down."""
    registry = CollectorRegistry()
    up = Gauge("fabmesh_tunnel_up", "1 when the peer's IKE_SA is established", ["peer"], registry=registry)
    up.labels("connector-1").set(1)
    up.labels("kp-edge-2").set(0)
    server, thread = start_http_server(0, "127.0.0.1", registry=registry)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_status_json_has_a_row_per_node_with_role_cidr_certificate_agent_peers_and_tunnels(
        operator_env: OperatorEnv, control_plane: ControlPlane, fake_agent_metrics: int) -> None:
    env = operator_env
    arrange(env)
    result = fabmesh("status", *cluster_args(env, control_plane), "--json", "--metrics",
                     "--metrics-port", str(fake_agent_metrics), "--metrics-timeout", "1")
    assert result.returncode == 0, result.stderr
    rows: dict[str, dict[str, Any]] = {r["name"]: r for r in json.loads(result.stdout)}

    assert set(rows) == {"connector-1", "cloud-2", *EDGES}
    cluster = nodes(env)
    for name, (_, communities) in EDGES.items():
        row = rows[name]
        assert row["role"] == "edge"
        assert row["pod_cidr"] == cluster[name]["spec"]["podCIDR"]
        assert row["communities"] == list(communities)
        assert row["agent"] == "Pending"  # no kubelet in the api tier
        assert row["peers"] == PEERS[name]
        assert row["cert_expires"] and row["cert_expires"] > cluster[name]["metadata"]["creationTimestamp"]
    assert rows["kp-edge-3"]["tunnels_up"] == 1
    assert rows["kp-edge-1"]["tunnels_up"] is None  # 192.0.2.61 serves no metrics: "-", not an error
    connector = rows["connector-1"]
    assert (connector["role"], connector["peers"], connector["agent"]) == ("connector", 3, None)
    assert connector["cert_expires"]
    assert rows["cloud-2"] == {"name": "cloud-2", "role": "cloud", "pod_cidr": None, "communities": [],
                               "cert_expires": None, "agent": None, "peers": None, "tunnels_up": None,
                               "tunnels_expected": None, "generation_wanted": None, "generation_applied": None,
                               "last_error": None, "status_age_s": None}

    table = fabmesh("status", *cluster_args(env, control_plane))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "POD-CIDR", "COMMUNITIES", "CERT-EXPIRES", "AGENT", "PEERS",
                                "TUNNELS-UP", "GENERATION", "STATUS-AGE", "LAST-ERROR"]
    kp2 = next(line.split() for line in lines if line.startswith("kp-edge-2 "))
    wanted = rows["kp-edge-2"]["generation_wanted"]
    assert kp2[:2] == ["kp-edge-2", "edge"] and kp2[3] == "north,south" and kp2[5:] == [
        "Pending", "3", "-", f"-/{wanted}", "-", "-"]  # no agent has published a TunnelStatus


def test_doctor_passes_a_healthy_mesh_then_fails_naming_an_overlapping_pod_cidr(
        operator_env: OperatorEnv, control_plane: ControlPlane) -> None:
    env = operator_env
    arrange(env)
    healthy = fabmesh("doctor", *cluster_args(env, control_plane), "--no-agent-pods")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "FAIL " not in healthy.stdout
    for check in ("connector", "operator-leader", "pod-cidrs", "certificates", "edge-configmaps",
                  "flannel-annotations", "flannel-release", "clock-skew", "invalid-node-events"):
        assert f"PASS  {check} " in healthy.stdout, healthy.stdout
    assert "WARN  agents-running" in healthy.stdout and "is Pending" in healthy.stdout

    taken = nodes(env)["kp-edge-1"]["spec"]["podCIDR"]
    create_nodes(env.kube, [edge("kp-edge-4", "192.0.2.64", "north", pod_cidr=taken)])
    broken = fabmesh("doctor", *cluster_args(env, control_plane), "--no-agent-pods")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    overlap = [line for line in broken.stdout.splitlines() if line.startswith("FAIL  pod-cidrs")]
    assert overlap == [f"FAIL  pod-cidrs            kp-edge-1 {taken} overlaps kp-edge-4 {taken}"], broken.stdout
    assert "fix: spec.podCIDR is immutable: re-create kp-edge-4 " in broken.stdout

    wait_for(lambda: events_for(env, "kp-edge-4"), timeout=30, what="the operator's event about kp-edge-4")
    listed = fabmesh("doctor", *cluster_args(env, control_plane), "--no-agent-pods", "--json")
    assert listed.returncode == 1
    events = [c for c in json.loads(listed.stdout) if c["name"] == "invalid-node-events"]
    assert any(c["status"] == "WARN" and c["message"].startswith("kp-edge-4: spec.podCIDR") for c in events), events


def test_graph_draws_community_clusters_tunnels_and_relayed_pairs(
        operator_env: OperatorEnv, control_plane: ControlPlane, tmp_path: Path) -> None:
    env = operator_env
    arrange(env)
    result = fabmesh("graph", *cluster_args(env, control_plane))
    assert result.returncode == 0, result.stderr
    dot = result.stdout
    assert dot.startswith("graph fabmesh {")
    assert 'subgraph "cluster_north" {' in dot and 'subgraph "cluster_south" {' in dot
    north = dot.split('subgraph "cluster_north" {')[1].split("  }")[0]
    assert '"kp-edge-1" [shape=ellipse' in north and "kp-edge-2" not in north
    assert dot.count('"kp-edge-2" [shape=') == 1 and "communities: north, south" in dot
    assert '"connector-1" -- "kp-edge-1";' in dot and '"kp-edge-1" -- "kp-edge-2";' in dot
    assert '"kp-edge-1" -- "kp-edge-3" [style=dashed, color=gray50, label="relayed via connector-1"];' in dot

    no_dot = fabmesh("graph", *cluster_args(env, control_plane), "--output", str(tmp_path / "mesh.svg"),
                     env={"PATH": str(tmp_path)})
    assert no_dot.returncode == 2
    assert "`dot` binary" in no_dot.stderr and not (tmp_path / "mesh.svg").exists()


@pytest.mark.parametrize("name", ["status", "doctor", "graph"])
def test_every_subcommand_has_a_real_help(name: str) -> None:
    result = fabmesh(name, "--help")
    assert result.returncode == 0
    assert f"usage: fabmesh {name}" in result.stdout and "--kubeconfig" in result.stdout
    assert "not built yet" not in result.stdout
    plugin = subprocess.run([sys.executable, "-c", "import sys; from fabmesh.cli import kubectl_plugin; "
                             f"sys.exit(kubectl_plugin(['{name}', '--help']))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert plugin.returncode == 0 and "--kubeconfig" in plugin.stdout
