"""``lab down`` on what a half-built lab leaves: fast, complete, and only what the state records."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fabmesh.lab import processes, teardown
from fabmesh.lab.processes import Outcome
from fabmesh.lab.state import LabHost, LabState
from fabmesh.testenv.hosts import owned_namespaces, sh, unique_prefix, wait_for
from tests.conftest import live_processes


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [int(proc.name) for proc, fields in live_processes() if int(fields[2]) == pgid]


def test_down_stops_every_recorded_group_in_parallel_and_leaves_unrecorded_sessions_alone(tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    directory.mkdir()
    prefix = unique_prefix("fmt")
    state = LabState(prefix=prefix, directory=str(directory))
    for ns in (f"{prefix}-wan", f"{prefix}-edge-1", f"{prefix}-edge-1-pod"):
        sh("ip", "netns", "add", ns)
    state.hosts.append(LabHost(name="edge-1", role="edge", netns=f"{prefix}-edge-1", wan_ip="192.0.2.1",
                               node_ip="192.0.2.1"))
    state.save()
    stray = subprocess.Popen(["sleep", "60"])  # same session as pytest: never ours to stop
    try:
        charon = processes.start_charon(state, "edge-1")
        # The recorded PID is charon itself, through `ip netns exec` and the shell's exec.
        assert os.readlink(f"/proc/{charon}/exe") == "/usr/lib/ipsec/charon"
        # Ignores SIGTERM, and so does the child it forks: only SIGKILL of the group ends both.
        stubborn = processes.spawn(state, "node-edge-1", ["sh", "-c", "trap '' TERM; sleep 60 & wait"],
                                   netns=f"{prefix}-edge-1")
        wait_for(lambda: len(_group(stubborn)) == 2, timeout=10, what="the stubborn shell and its child")
        processes.spawn(state, "operator", ["sleep", "60"])
        processes.spawn(state, "controlplane-0", ["sleep", "60"])
        processes.spawn(state, "controlplane-1", ["sleep", "60"])
        exited = processes.spawn(state, "nodesim", ["true"])
        wait_for(lambda: _group(exited) == [], timeout=5, what="`true` to exit")
        state.pids["stray"] = stray.pid
        state.save()
        recorded = dict(state.pids)

        started = time.monotonic()
        removed = teardown.down(directory, grace=1.0)
        took = time.monotonic() - started

        assert removed is not None
        outcomes = {p.name: p.outcome for p in removed.processes}
        assert outcomes == {"charon-edge-1": Outcome.TERMINATED, "node-edge-1": Outcome.KILLED,
                            "operator": Outcome.TERMINATED, "controlplane-0": Outcome.TERMINATED,
                            "controlplane-1": Outcome.TERMINATED, "nodesim": Outcome.GONE,
                            "stray": Outcome.NOT_OURS}
        # Rounds (node side, then each control-plane process), each at most the grace period plus SIGKILL.
        assert took < 5, took
        assert list(outcomes)[-2:] == ["controlplane-1", "controlplane-0"]  # reverse start order, last
        for name, pid in recorded.items():
            if name != "stray":
                assert _group(pid) == [], name
        assert stray.poll() is None
        assert sorted(removed.namespaces) == sorted([f"{prefix}-wan", f"{prefix}-edge-1", f"{prefix}-edge-1-pod"])
        assert owned_namespaces(prefix) == []
        assert not directory.exists()
    finally:
        stray.kill()
        stray.wait()
        for ns in owned_namespaces(prefix):
            sh("ip", "netns", "del", ns, check=False)
        leftover = LabState.load(directory)
        if leftover:
            processes.stop_all({n: p for n, p in leftover.pids.items() if n != "stray"}, grace=0.5)


def test_down_with_no_lab_says_so_and_succeeds(tmp_path: Path) -> None:
    assert teardown.down(tmp_path / "nothing") is None
    done = subprocess.run([sys.executable, "-m", "fabmesh.cli", "lab", "--dir", str(tmp_path / "nothing"), "down"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout
