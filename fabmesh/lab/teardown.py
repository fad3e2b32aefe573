"""``lab down``: stop what the lab recorded, delete its namespaces and its directory, and say what went.

Only what :class:`LabState` names is touched: the recorded PIDs (their
process groups) and the namespaces carrying the recorded prefix. The node
side (operator, nodesim, charons, agents, connector; with real nodes, kubelets,
kube-proxies and flanneld) is stopped first, all at once, so none of it spends
the grace period retrying a vanished API server. A real node is then removed
from its paths alone (:func:`fabmesh.testenv.kubenode.clean_node`: every
process in its cgroups, its mounts, Pod namespaces and cgroups).
Then the control plane in reverse start order, kube-apiserver before etcd:
signalled together, etcd's graceful stop waits about 7 s for the API server's
watch streams while the API server never finishes without etcd (measured: it
needed SIGKILL after 30 s); one after the other both are gone in about a
second. It works on whatever a failed ``lab up`` left: state is saved as each
part starts.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fabmesh.lab.processes import GRACE_S, Stopped, stop_all
from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import owned_namespaces
from fabmesh.testenv.kubenode import clean_node, node_cgroup_root
from fabmesh.testenv.nodeconfig import NodePaths

log = logging.getLogger("fabmesh.lab")

CONTROL_PLANE = "controlplane"
RUNTIME = "containerd-"  # a real node's containerd: stopped with everything in its node's cgroups


@dataclass(frozen=True)
class Removed:
    prefix: str
    processes: list[Stopped]
    namespaces: list[str]
    directory: Path


def down(directory: Path, grace: float = GRACE_S) -> Removed | None:
    """Remove the lab recorded in ``directory``; None when there is none (nothing is touched then)."""
    state = LabState.load(directory)
    if state is None:
        return None
    node_side = {n: p for n, p in state.pids.items() if not n.startswith((CONTROL_PLANE, RUNTIME))}
    runtimes = {n: p for n, p in state.pids.items() if n.startswith(RUNTIME)}
    control_plane = [(n, p) for n, p in state.pids.items() if n.startswith(CONTROL_PLANE)]
    stopped = stop_all(node_side, grace)
    if state.nodes == "real":  # kubelets are stopped: nothing restarts what this removes
        for h in state.hosts:
            clean_node(NodePaths(directory / "hosts" / h.name / "kube"), node_cgroup_root(h.netns))
    stopped += stop_all(runtimes, grace)  # killed with their node's cgroup: reported as gone
    for name, pid in reversed(control_plane):  # recorded in start order: etcd, then kube-apiserver
        stopped += stop_all({name: pid}, grace)
    for s in stopped:
        log.debug("process=%s pid=%d action=stop outcome=%s seconds=%.2f", s.name, s.pid, s.outcome, s.seconds)
    namespaces = _delete_namespaces(state.prefix)
    shutil.rmtree(directory, ignore_errors=True)
    return Removed(prefix=state.prefix, processes=stopped, namespaces=namespaces, directory=directory)


def _delete_namespaces(prefix: str) -> list[str]:
    """Delete the prefix's namespaces in one ``ip -batch`` (``-force``: go on past one already gone).

    Returns the ones that existed and are gone now.
    """
    if not prefix:  # owned_namespaces("") lists every namespace on the machine
        return []
    present = owned_namespaces(prefix)
    if present:
        script = "".join(f"netns del {ns}\n" for ns in present)
        subprocess.run(["ip", "-force", "-batch", "-"], input=script, text=True, capture_output=True, check=False)
    left = owned_namespaces(prefix) if present else []
    for ns in left:
        log.warning("netns=%s action=delete outcome=still-present", ns)
    return [ns for ns in present if ns not in left]
