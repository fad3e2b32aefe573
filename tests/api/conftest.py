"""api-tier fixtures: one real etcd + kube-apiserver per session, stopped by PID at the end."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.operator.settings import OperatorSettings
from fabmesh.testenv.cluster import install_operator_rbac, spawn_operator
from fabmesh.testenv.controlplane import ControlPlane
from fabmesh.testenv.hosts import stop_pid
from tests.conftest import require_root_tools


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_root_tools("go")
    cp = ControlPlane(directory=tmp_path_factory.mktemp("controlplane"))
    try:
        yield cp.start()
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> client.ApiClient:
    """An admin ApiClient (system:masters) for arranging and inspecting state."""
    return config.new_client_from_config(config_file=str(control_plane.kubeconfig))


# -- the operator under test: its own namespace, the chart's RBAC, a real process ----------------

@dataclass
class OperatorEnv:
    namespace: str
    kubeconfig: Path
    settings_file: Path
    settings: OperatorSettings
    kube: Kube  # admin, for arranging and inspecting
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, identity: str = "op-1", kubeconfig: Path | None = None,
              settings_file: Path | None = None, health_port: int = 0) -> subprocess.Popen[bytes]:
        proc = spawn_operator(kubeconfig or self.kubeconfig, settings_file or self.settings_file, identity,
                              self.log_dir, health_port)
        self.processes.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("*.log")))


def write_settings(path: Path, namespace: str, **overrides: object) -> OperatorSettings:
    data = {
        "namespace": namespace,
        "resync_period_s": 2,
        "leader_election": {"lease_duration_s": 4, "renew_deadline_s": 3, "retry_period_s": 1},
        **overrides,
    }
    path.write_text(yaml.safe_dump(data))
    return OperatorSettings.model_validate(data)


@pytest.fixture
def operator_env(control_plane: ControlPlane, tmp_path: Path) -> Iterator[OperatorEnv]:
    admin = Kube(load_api_client(str(control_plane.kubeconfig)))
    namespace = f"fm-{uuid.uuid4().hex[:6]}"
    kubeconfig = install_operator_rbac(control_plane, admin, namespace)
    settings_file = tmp_path / "operator.yaml"
    env = OperatorEnv(namespace=namespace, kubeconfig=kubeconfig, settings_file=settings_file,
                      settings=write_settings(settings_file, namespace), kube=admin,
                      log_dir=tmp_path / "logs")
    try:
        yield env
    finally:
        for proc in env.processes:
            stop_pid(proc.pid)
        for node in admin.list("nodes"):  # Nodes are cluster-wide: leave none for the next test
            if node["metadata"].get("finalizers"):  # the operator is stopped: nobody else would release them
                admin.merge_patch("nodes", node["metadata"]["name"], {"metadata": {"finalizers": None}})
            admin.delete("nodes", node["metadata"]["name"])
