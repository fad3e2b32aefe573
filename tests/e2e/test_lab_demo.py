"""The README's main command: `fabmesh lab up` shows the mesh working, `lab down` leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabmesh.testenv.hosts import owned_namespaces
from tests.conftest import require_root_tools

pytestmark = pytest.mark.e2e


def _fabmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabmesh.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_lab_up_json_reports_a_full_matrix_and_down_removes_everything(tmp_path: Path) -> None:
    require_root_tools("ip", "/usr/lib/ipsec/charon")
    directory = tmp_path / "lab"
    up = _fabmesh("lab", "--dir", str(directory), "up", "--json")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        report = json.loads(up.stdout)
        assert Path(report["kubeconfig"]).exists()
        assert {p["node"] for p in report["pods"]} == {"connector-1", "cloud-2", "edge-1", "edge-2", "edge-3"}
        assert len(report["pairs"]) == 20 and all(p["ok"] for p in report["pairs"])
        paths = {(p["src"], p["dst"]): p["path"] for p in report["pairs"]}
        assert paths[("pod-edge-1", "pod-edge-2")] == "direct"
        assert paths[("pod-edge-1", "pod-edge-3")] == "relayed"
        assert paths[("pod-cloud-2", "pod-edge-3")] == "cloud"
        status = _fabmesh("lab", "--dir", str(directory), "status", "--json", "--wait", "10")
        assert status.returncode == 0 and all(p["ok"] for p in json.loads(status.stdout)["pairs"])
        pids = json.loads((directory / "state.json").read_text())["pids"].values()
    finally:
        down = _fabmesh("lab", "--dir", str(directory), "down")
    assert down.returncode == 0, down.stderr
    assert f"lab {report['prefix']} removed" in down.stdout
    assert owned_namespaces(report["prefix"]) == []
    assert not any(Path(f"/proc/{pid}/exe").exists() for pid in pids)
    assert _fabmesh("lab", "--dir", str(directory), "down").returncode == 0


def test_a_lab_up_that_fails_half_way_is_removed_by_lab_down(tmp_path: Path) -> None:
    require_root_tools("ip", "/usr/lib/ipsec/charon")
    directory = tmp_path / "lab"
    # Too short for any agent to write its CNI config: up fails with the lab half built.
    up = _fabmesh("lab", "--dir", str(directory), "up", "--timeout", "0.5")
    state = json.loads((directory / "state.json").read_text())
    down = _fabmesh("lab", "--dir", str(directory), "down")
    assert up.returncode == 1 and "bring-up failed" in up.stderr, up.stderr[-3000:]
    assert {"controlplane-0", "controlplane-1", "operator", "nodesim", "node-edge-1"} <= set(state["pids"])
    assert down.returncode == 0, down.stderr
    assert f"namespace {state['prefix']}-connector-1-pod: deleted" in down.stdout, down.stdout
    assert owned_namespaces(state["prefix"]) == []
    assert not any(Path(f"/proc/{pid}/exe").exists() for pid in state["pids"].values())
    assert not directory.exists()
