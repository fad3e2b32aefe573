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


def test_lab_up_reports_every_pair_reachable_and_down_removes_everything(tmp_path: Path) -> None:
    require_root_tools("ip", "/usr/lib/ipsec/charon")
    lab = tmp_path / "lab"
    up = _fabmesh("lab", "--dir", str(lab), "up", "--json")
    try:
        assert up.returncode == 0, up.stderr
        report = json.loads(up.stdout)
        assert {p["name"] for p in report["pods"]} == {"pod-a", "pod-b"}
        assert report["pairs"] and all(p["ok"] for p in report["pairs"])
        status = _fabmesh("lab", "--dir", str(lab), "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["pairs"] == report["pairs"]
        pids = json.loads((lab / "state.json").read_text())["pids"].values()
    finally:
        down = _fabmesh("lab", "--dir", str(lab), "down")
    assert down.returncode == 0, down.stderr
    assert owned_namespaces(report["prefix"]) == []
    assert not any(Path(f"/proc/{pid}/exe").exists() for pid in pids)
    again = _fabmesh("lab", "--dir", str(lab), "down")
    assert again.returncode == 0
