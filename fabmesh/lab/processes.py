"""The lab's processes: start them recorded by PID in :class:`LabState`, restart one, stop many at once.

Every process the lab starts is a session leader (``start_new_session=True``),
so its PID is also its process-group ID. charon is started as ``ip netns exec
NS sh -c 'mount --bind ... /run && exec charon'``: ``ip netns exec`` and the
shell's last ``exec`` both replace themselves, so the recorded PID is charon's
own. Stopping signals the whole group, which also catches any child a process
left behind. A PID is only signalled while it is still a session leader: a
recorded PID that was reused by something else (after a reboot, say) is left
alone, never killed by name or guess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fabmesh.lab.apiproxy import SERVER as API_SERVER
from fabmesh.lab.state import LabState
from fabmesh.mesh.model import Backend, NodeSettings
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.testenv.hosts import Host, stop_pid

GRACE_S = 3.0


def spawn(state: LabState, name: str, argv: list[str], netns: str | None = None) -> int:
    """Start ``argv`` (in ``netns`` if given) logging to ``logs/<name>.log``; record and return its PID."""
    logs = Path(state.directory) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = (["ip", "netns", "exec", netns] if netns else []) + argv
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state.pids[name] = proc.pid
    state.save()
    return proc.pid


def fabmesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabmesh.cli", *args]


def host(state: LabState, name: str) -> Host:
    """The :class:`Host` handle of a recorded lab host (its namespace and directory)."""
    h = state.host(name)
    return Host(name=h.name, netns=h.netns, wan_ip=h.wan_ip, directory=Path(state.directory) / "hosts" / h.name)


def start_node_process(state: LabState, name: str) -> int:
    """Start the agent (edge), connector or route agent (other cloud hosts) of one host; returns its PID."""
    h = state.host(name)
    base = Path(state.directory) / "hosts" / name
    if h.role == "cloud":
        # As the chart's DaemonSet: the projected fabmesh-cloud-routes ConfigMap, no credentials.
        return spawn(state, f"node-{name}", fabmesh_argv("cloud-agent", "--config-dir", str(base / "cloud"),
                                                         "--node-name", name), h.netns)
    common = ["--config-dir", str(base / "mesh"), "--tls-dir", str(base / "tls"),
              "--vici-socket", str(base / "run" / "charon.vici"), "--state-dir", str(base / "state"),
              "--metrics-port", str(DEFAULT_METRICS_PORT), "--metrics-address", h.wan_ip,
              "--charon-conf", str(base / "strongswan.conf")]
    if state.kubeconfig:  # a lab without Kubernetes (the kernel tier's) has no API to report to
        # The node identity's token as kubelet would project it (nodesim), over the lab's API path.
        common += ["--status-token-file", str(base / "status" / "token"), "--status-server", API_SERVER,
                   "--status-ca-file", str(Path(state.directory) / "controlplane" / "pki" / "ca.crt"),
                   "--status-namespace", state.operator_namespace]
    if state.backend is Backend.KERNEL:
        # Kernel ESP routes tunnel traffic into the uplink. A connector's peers have no endpoint (it
        # accepts them from anywhere) and lab hosts on the WAN have no default route, so it cannot be
        # guessed there: named, as the operator's connector_pods.uplink does.
        common += ["--uplink", "wan0"]
    if h.role == "connector":
        # As the operator's connector Pod does: it stands by while mesh.yaml names another connector.
        return spawn(state, f"node-{name}", fabmesh_argv("connector", *common, "--node-name", name), h.netns)
    return spawn(state, f"node-{name}", fabmesh_argv("agent", *common, "--cni-conf-dir", str(base / "cni"),
                                                     "--ipam-data-dir", str(base / "ipam")), h.netns)


def start_charon(state: LabState, name: str) -> int:
    """Start one host's charon; record and return its PID."""
    # The agents' pod bridge, as the operator's strongswan container ignores it (strongswan/conf.py).
    pid = host(state, name).start_charon(backend=state.backend, ignore_interfaces=(NodeSettings().bridge,)).pid
    state.pids[f"charon-{name}"] = pid
    state.save()
    return pid


def restart_node_process(state: LabState, name: str) -> int:
    """Stop the agent/connector by PID (SIGTERM: it leaves the data plane alone) and start it again."""
    stop_pid(state.pids[f"node-{name}"])
    return start_node_process(state, name)


def restart_charon(state: LabState, name: str) -> int:
    """Kill charon (SIGKILL, as a crash) and start a fresh one, as kubelet restarts a container."""
    old = state.pids[f"charon-{name}"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(old, signal.SIGKILL)
    stop_pid(old)
    return start_charon(state, name)


class Outcome(StrEnum):
    TERMINATED = "terminated"  # exited within the grace period after SIGTERM
    KILLED = "killed"  # still there after the grace period: SIGKILL
    GONE = "gone"  # not running when we came to stop it
    NOT_OURS = "not-ours"  # the PID runs, but not as the session we started: left alone


@dataclass(frozen=True)
class Stopped:
    name: str
    pid: int
    outcome: Outcome
    seconds: float


def _session_leader(pid: int) -> bool | None:
    """True if ``pid`` runs as its own session's leader, False if it runs otherwise, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state, session = fields[0], int(fields[3])
    if state in ("Z", "X"):
        _reap(pid)
        return None
    return session == pid


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (the lab brought up in this process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_all(pids: dict[str, int], grace: float = GRACE_S) -> list[Stopped]:
    """SIGTERM every recorded process group at once, wait up to ``grace`` for all, SIGKILL the rest.

    Returns one :class:`Stopped` per name, in the order given.
    """
    started = time.monotonic()
    outcome: dict[str, Outcome] = {}
    took: dict[str, float] = {}
    waiting: dict[str, int] = {}
    for name, pid in pids.items():
        leader = _session_leader(pid)
        if leader is None:
            outcome[name] = Outcome.GONE
        elif not leader:
            outcome[name] = Outcome.NOT_OURS
        else:
            _signal_group(pid, signal.SIGTERM)
            waiting[name] = pid
    deadline = started + grace
    while waiting:
        for name, pid in list(waiting.items()):
            if _session_leader(pid) is None:
                outcome[name], took[name] = Outcome.TERMINATED, time.monotonic() - started
                del waiting[name]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for name, pid in waiting.items():
        _signal_group(pid, signal.SIGKILL)
        outcome[name] = Outcome.KILLED
    if waiting:
        # SIGKILL cannot be caught; only a process stuck in the kernel (D state) outlives this.
        with contextlib.suppress(TimeoutError):
            _wait_gone(list(waiting.values()), timeout=2.0)
        for name in waiting:
            took[name] = time.monotonic() - started
    for name, pid in pids.items():
        if outcome[name] in (Outcome.TERMINATED, Outcome.KILLED):
            # Whatever the leader left in its group (a child it forked) goes too.
            _signal_group(pid, signal.SIGKILL)
    return [Stopped(name, pid, outcome[name], round(took.get(name, 0.0), 2)) for name, pid in pids.items()]


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_session_leader(pid) is not None for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pids {pids} still present after SIGKILL")
        time.sleep(0.05)
