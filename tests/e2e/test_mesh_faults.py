"""Faults: restarts under traffic, a crashed charon, a corrupt config, the API down, relabels, removals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import probe, processes
from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import wait_for
from tests.e2e.helpers import established, ping_ok, pod, vici

pytestmark = pytest.mark.e2e


def _log(state: LabState, name: str) -> Path:
    return Path(state.directory) / "logs" / f"node-{name}.log"


def _start_ping(state: LabState, src: str, dst: str, seconds: float) -> subprocess.Popen[str]:
    count = int(seconds / 0.05)
    return subprocess.Popen(["ip", "netns", "exec", pod(state, src).netns, "ping", "-n", "-q", "-i", "0.05",
                             "-c", str(count), "-W", "1", pod(state, dst).ip],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _loss(proc: subprocess.Popen[str]) -> tuple[int, int]:
    out, _ = proc.communicate(timeout=60)
    sent, received = re.search(r"(\d+) packets transmitted, (\d+) received", out).groups()  # type: ignore[union-attr]
    return int(sent), int(received)


def test_restarting_agent_and_connector_under_traffic_loses_no_packet_and_writes_nothing(
        running_lab: LabState) -> None:
    pings = [_start_ping(running_lab, "edge-1", "cloud-2", 6), _start_ping(running_lab, "edge-1", "edge-2", 6),
             _start_ping(running_lab, "edge-3", "edge-1", 6)]
    server = subprocess.Popen(["ip", "netns", "exec", pod(running_lab, "cloud-2").netns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    client = subprocess.Popen(["ip", "netns", "exec", pod(running_lab, "edge-1").netns, "iperf3", "-c",
                               pod(running_lab, "cloud-2").ip, "-t", "5", "-b", "5M"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    marks = {n: _log(running_lab, n).stat().st_size for n in ("edge-1", "connector-1")}
    processes.restart_node_process(running_lab, "edge-1")
    processes.restart_node_process(running_lab, "connector-1")
    out, _ = client.communicate(timeout=60)
    server.wait(timeout=30)
    assert client.returncode == 0, out
    for proc, pair in zip(pings, ("edge-1->cloud-2", "edge-1->edge-2", "edge-3->edge-1"), strict=True):
        sent, received = _loss(proc)
        assert received == sent, f"{pair}: lost {sent - received} of {sent} packets"
    for name, mark in marks.items():  # the restarted loops found everything in place
        wait_for(lambda n=name: "config loaded" in _log(running_lab, n).read_text()[marks[n]:], timeout=20,
                 what=f"{name} to start its first pass")
        time.sleep(1)
        new = _log(running_lab, name).read_text()[mark:]
        assert " action=" not in new, new


def test_killed_charon_on_an_edge_comes_back_with_its_tunnels_without_intervention(running_lab: LabState) -> None:
    processes.restart_charon(running_lab, "edge-2")
    wait_for(lambda: {"connector-1", "edge-1"} <= established(running_lab, "edge-2"), timeout=30,
             what="edge-2's tunnels to come back")
    assert ping_ok(pod(running_lab, "edge-2").netns, pod(running_lab, "cloud-2").ip, count=3)
    assert ping_ok(pod(running_lab, "edge-1").netns, pod(running_lab, "edge-2").ip, count=3)


def test_corrupt_mesh_yaml_keeps_the_previous_state(running_lab: LabState) -> None:
    nodesim = running_lab.pids["nodesim"]
    os.kill(nodesim, signal.SIGSTOP)  # hold the projection so the corrupt file stays
    mesh = Path(running_lab.directory) / "hosts" / "edge-1" / "mesh" / "mesh.yaml"
    target = mesh.resolve()
    good = target.read_text()
    mark = _log(running_lab, "edge-1").stat().st_size
    try:
        target.write_text("apiVersion: fabmesh.io/v1alpha1\nkind: NodeMesh\nnode: [not, a, node\n")
        wait_for(lambda: "config unusable" in _log(running_lab, "edge-1").read_text()[mark:], timeout=40,
                 what="the agent to notice the corrupt config")
        assert "edge-2" in established(running_lab, "edge-1")
        assert ping_ok(pod(running_lab, "edge-1").netns, pod(running_lab, "cloud-2").ip, count=3)
        assert ping_ok(pod(running_lab, "edge-1").netns, pod(running_lab, "edge-2").ip, count=3)
        assert " action=unload" not in _log(running_lab, "edge-1").read_text()[mark:]
    finally:
        target.write_text(good)
        os.kill(nodesim, signal.SIGCONT)


def test_api_server_down_leaves_the_data_plane_working(running_lab: LabState) -> None:
    frozen = [pid for name, pid in running_lab.pids.items() if name.startswith("controlplane")]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        processes.restart_node_process(running_lab, "edge-3")  # an agent needs no API, even to start
        report = probe.check(running_lab, wait=20)
        assert all(p["ok"] for p in report["pairs"]), [p for p in report["pairs"] if not p["ok"]]
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def test_relabelled_edge_behind_another_nat_is_relayed_when_no_direct_tunnel_can_be_made(
        running_lab: LabState) -> None:
    """edge-3 (symmetric NAT, site-2) joins edge-1's community (site-1): edge-1 loads the mediated
    connection and tries to punch through, which a symmetric NAT defeats. The pair must stay
    reachable through the connector, and ``lab status`` must say so."""
    kube = Kube(load_api_client(running_lab.kubeconfig))
    assert "edge-3" not in established(running_lab, "edge-1")
    kube.merge_patch("nodes", "edge-3", {"metadata": {"labels": {"community.fabmesh.io/a": ""}}})

    def tried() -> bool:
        with vici(running_lab, "edge-1") as charon:
            return "edge-3" in charon.conns() and "edge-3" in charon.sas()

    wait_for(tried, timeout=30, interval=0.2, what="edge-1 to load and initiate the direct connection to edge-3")
    assert ping_ok(pod(running_lab, "edge-1").netns, pod(running_lab, "edge-3").ip, count=3)
    assert "edge-3" not in established(running_lab, "edge-1")
    pairs = {(p["src"], p["dst"]): p for p in probe.check(running_lab, wait=10)["pairs"]}
    for pair in (pairs[("pod-edge-1", "pod-edge-3")], pairs[("pod-edge-3", "pod-edge-1")]):
        assert pair["ok"] and pair["path"] == "relayed" and pair["intended"] == "direct", pair


def test_removed_edge_is_refused_by_the_connector_and_its_peers(running_lab: LabState) -> None:
    kube = Kube(load_api_client(running_lab.kubeconfig))
    kube.delete("nodes", "edge-2")
    wait_for(lambda: "edge-2" not in established(running_lab, "connector-1")
             and "edge-2" not in established(running_lab, "edge-1"), timeout=40, interval=0.5,
             what="the connector and edge-1 to drop edge-2")
    time.sleep(5)  # edge-2 still holds its old config and keeps trying: it must stay refused
    assert "edge-2" not in established(running_lab, "connector-1")
    assert "edge-2" not in established(running_lab, "edge-1")
    assert not ping_ok(pod(running_lab, "edge-2").netns, pod(running_lab, "cloud-2").ip, count=2)
