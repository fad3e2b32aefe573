"""api-tier fixtures: one real etcd + kube-apiserver per session, stopped by PID at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from fabmesh.testenv.controlplane import ControlPlane
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
