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
        pairs = {(p["src"], p["dst"]): p for p in report["pairs"]}
        assert pairs[("pod-edge-1", "pod-edge-2")]["path"] == "direct"
        assert pairs[("pod-edge-1", "pod-edge-3")]["path"] == "relayed"
        assert pairs[("pod-cloud-2", "pod-edge-3")]["path"] == "cloud"
        assert not any("intended" in p for p in report["pairs"])
        # the path is observed: the SAs that counted the probe are in the report
        sent = {(e["host"], e["sa"]) for e in pairs[("pod-edge-1", "pod-edge-3")]["evidence"] if e["packets_out"]}
        assert {("edge-1", "connector-1"), ("connector-1", "edge-3")} <= sent
        assert ("edge-1", "edge-2") in {(e["host"], e["sa"]) for e in pairs[("pod-edge-1", "pod-edge-2")]["evidence"]}
        status = _fabmesh("lab", "--dir", str(directory), "status", "--json", "--wait", "10")
        assert status.returncode == 0 and all(p["ok"] for p in json.loads(status.stdout)["pairs"])
        edge3 = pairs[("pod-edge-1", "pod-edge-3")]
        ips = {p["name"]: p["ip"] for p in report["pods"]}
        ping = _fabmesh("lab", "--dir", str(directory), "exec", "edge-1", "--", "ping", "-c", "1", "-W", "2",
                        ips[edge3["dst"]])
        assert ping.returncode == 0, ping.stdout + ping.stderr
        failing = _fabmesh("lab", "--dir", str(directory), "exec", "pod-edge-1", "--", "sh", "-c", "exit 3")
        assert failing.returncode == 3
        assert _fabmesh("lab", "--dir", str(directory), "exec", "nope", "--", "true").returncode == 2
        assert _fabmesh("lab", "--dir", str(directory), "cut", "edge-3").returncode == 0
        cut = json.loads(_fabmesh("lab", "--dir", str(directory), "status", "--json").stdout)
        for p in cut["pairs"]:
            assert p["ok"] is ("pod-edge-3" not in (p["src"], p["dst"])), p
        assert _fabmesh("lab", "--dir", str(directory), "heal", "edge-3").returncode == 0
        healed = _fabmesh("lab", "--dir", str(directory), "status", "--json", "--wait", "30")
        assert healed.returncode == 0, healed.stdout[-2000:]
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
