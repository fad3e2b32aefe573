"""Live tunnel state through the API: a cut edge shows in ``kubectl fabmesh status`` and ``doctor`` and clears
after ``heal``; each node process writes its TunnelStatus with its own node identity (lab: nodesim's token)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabmesh.lab import faults
from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import wait_for

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def plugin(state: LabState, *args: str) -> subprocess.CompletedProcess[str]:
    assert state.kubeconfig
    return subprocess.run([sys.executable, "-m", "fabmesh.cli", *args, "--kubeconfig", state.kubeconfig,
                           "--namespace", state.operator_namespace], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def rows(state: LabState) -> dict[str, dict[str, Any]]:
    out = plugin(state, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)}


def doctor_fails(state: LabState) -> list[str]:
    out = plugin(state, "doctor", "--json", "--no-agent-pods")
    return [c["message"] for c in json.loads(out.stdout) if c["name"] == "tunnels-up" and c["status"] == "FAIL"]


def all_up(state: LabState) -> bool:
    loop_nodes = [r for r in rows(state).values() if r["role"] in ("edge", "connector") and r["peers"]]
    return bool(loop_nodes) and all(r["tunnels_expected"] and r["tunnels_up"] == r["tunnels_expected"]
                                    and r["generation_applied"] == r["generation_wanted"] for r in loop_nodes)


def test_a_cut_edge_shows_in_status_and_doctor_and_clears_after_heal(running_lab: LabState) -> None:
    lab = running_lab
    wait_for(lambda: all_up(lab), timeout=60, interval=1, what="every node to report all its tunnels up")
    assert doctor_fails(lab) == []
    tunnels = plugin(lab, "tunnels", "edge-3", "--output", "json")
    assert tunnels.returncode == 0, tunnels.stderr
    assert {t["peer"]: t["state"] for t in json.loads(tunnels.stdout)["tunnels"]} == {
        "connector-1": "up"}

    faults.cut(lab, "edge-3")
    try:
        def cut_seen() -> bool:
            row = rows(lab)["edge-3"]
            return row["tunnels_up"] < row["tunnels_expected"] and any(m.startswith("edge-3: tunnel to")
                                                                       for m in doctor_fails(lab))
        wait_for(cut_seen, timeout=30, interval=1, what="the cut of edge-3 in status and doctor")
    finally:
        faults.heal(lab, "edge-3")
    wait_for(lambda: all_up(lab) and doctor_fails(lab) == [], timeout=120, interval=2,
             what="edge-3's tunnels to be reported up again after heal")
