"""Edges behind NAT: recovery after a WAN address change, and the ping gap when a direct pair is cut and healed.

Brings up the default lab (every edge behind a NAT router; edge-1 and edge-2 on
one site with a direct tunnel, edge-3 behind a symmetric NAT) and pings at
100 ms from one pod to another with timestamps (``ping -D``); the figure is the
largest gap between two replies around the event.

* ``wan-change``: edge-3's NAT router gets a new WAN address (link down, new
  address, link up, as a 4G reconnect: every mapping is lost), pinging
  edge-3's pod -> cloud-2's pod. Nothing is done by hand: the edge's DPD,
  sent from the new mapping, makes the connector move the IKE_SA and its
  CHILD_SA to the new address (NAT-T: the responder follows an authenticated
  message from a peer behind NAT).
* ``cut-direct``: ``lab cut edge-1 --from edge-2`` then ``lab heal edge-1``,
  pinging edge-1's pod -> edge-2's pod; reports the gap after the cut and after
  the heal, and the path ``lab status`` observes in between.

* ``relabel-direct`` (``--mediation``, on the ``THREE_SITES`` lab instead): edge-4, alone
  behind a cone NAT of its own, is labelled into edge-1's community (site-1); the figure is
  the time from the label patch to the first probe edge-1 pod -> edge-4 pod that the SA
  counters see on the direct edge-1/edge-4 CHILD_SA (the path ``lab status`` reports), hole
  punched with the connector as mediation server. Three rounds (label, measure, unlabel, wait
  for the direct tunnel to go).

    KUBEBUILDER_ASSETS=... python -m bench.bench_nat [--json] [--mediation]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import bringup, faults, paths, probe, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import DEFAULT, THREE_SITES
from fabmesh.testenv.hosts import NatRouter


def _ping(state: LabState, src: str, dst: str, seconds: float) -> subprocess.Popen[str]:
    a = next(p for p in state.pods if p.node == src)
    b = next(p for p in state.pods if p.node == dst)
    return subprocess.Popen(["ip", "netns", "exec", a.netns, "ping", "-D", "-n", "-i", "0.1", "-W", "1",
                             "-c", str(int(seconds * 10)), b.ip], stdout=subprocess.PIPE, text=True)


def _replies(proc: subprocess.Popen[str]) -> list[float]:
    out, _ = proc.communicate(timeout=600)
    return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def largest_gap(replies: list[float], start: float, end: float | None = None) -> float:
    """Largest silence between two replies (or the event and the next reply) within [start, end]."""
    times = [start] + [t for t in replies if t >= start and (end is None or t <= end)]
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def wan_change(state: LabState) -> dict[str, Any]:
    edge = state.host("edge-3")
    nat = state.nat(edge.nat or "")
    router = NatRouter(name=nat.name, netns=nat.netns, wan_ip=nat.wan_ip, lan_cidr=nat.lan_cidr,
                       symmetric=nat.type == "symmetric")
    proc = _ping(state, "edge-3", "cloud-2", 45)
    time.sleep(5)
    changed = time.time()
    router.set_wan_ip("198.51.100.201", 24)
    nat.wan_ip = router.wan_ip
    state.save()
    replies = _replies(proc)
    after = [t for t in replies if t > changed]
    return {"event": "edge-3 NAT router WAN address change", "new_wan_ip": router.wan_ip,
            "recovery_s": round(after[0] - changed, 2) if after else None,
            "largest_gap_s": round(largest_gap(replies, changed), 2)}


def cut_direct(state: LabState) -> dict[str, Any]:
    proc = _ping(state, "edge-1", "edge-2", 240)
    time.sleep(5)
    cut_at = time.time()
    faults.cut(state, "edge-1", "edge-2")
    time.sleep(150)
    during = {(p["src"], p["dst"]): p for p in probe.check(state)["pairs"]}[("pod-edge-1", "pod-edge-2")]
    healed_at = time.time()
    faults.heal(state, "edge-1")
    replies = _replies(proc)
    return {"event": "lab cut edge-1 --from edge-2, 150 s, then heal",
            "gap_after_cut_s": round(largest_gap(replies, cut_at, healed_at), 2),
            "path_while_cut": {k: during.get(k) for k in ("ok", "path", "intended")},
            "gap_after_heal_s": round(largest_gap(replies, healed_at), 2)}


def _observed(state: LabState, src: str, dst: str) -> paths.Observed:
    """One probe from ``src``'s pod to ``dst``'s, and the path the SA counters saw (lab status's rule)."""
    a = next(p for p in state.pods if p.node == src)
    b = next(p for p in state.pods if p.node == dst)
    edges = {h.name for h in state.hosts if h.role == "edge"}
    connector = next(h.name for h in state.hosts if h.role == "connector")
    before = probe.read_counters(state)
    if not probe.ping(a.netns, b.ip):
        return paths.Observed.NONE
    return paths.observed_path(src, dst, edges, connector, paths.counted(before, probe.read_counters(state)))


def relabel_direct(state: LabState, rounds: int = 3) -> dict[str, Any]:
    kube = Kube(load_api_client(state.kubeconfig))
    label = "community.fabmesh.io/a"
    seconds = []
    for _ in range(rounds):
        assert _observed(state, "edge-1", "edge-4") is paths.Observed.RELAYED
        started = time.monotonic()
        kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {label: ""}}})
        while _observed(state, "edge-1", "edge-4") is not paths.Observed.DIRECT:
            if time.monotonic() - started > 120:
                raise TimeoutError("no direct path edge-1 -> edge-4 within 120 s")
            time.sleep(0.1)
        seconds.append(round(time.monotonic() - started, 2))
        kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {label: None}}})
        deadline = time.monotonic() + 120
        while _observed(state, "edge-1", "edge-4") is not paths.Observed.RELAYED and time.monotonic() < deadline:
            time.sleep(0.5)
    return {"event": "edge-4 (site-3, cone NAT) labelled into edge-1's community (site-1, cone NAT)",
            "relabel_to_direct_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-cut", action="store_true", help="only the WAN address change")
    parser.add_argument("--mediation", action="store_true",
                        help="only the time from relabel to a hole-punched direct path (THREE_SITES lab)")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-nat-"))
    try:
        state = bringup.up(THREE_SITES if args.mediation else DEFAULT, directory, timeout=120)
        probe.check(state, wait=60)
        if args.mediation:
            result: dict[str, Any] = {"relabel_direct": relabel_direct(state)}
        else:
            result = {"wan_change": wan_change(state)}
        if not args.skip_cut and not args.mediation:
            result["cut_direct"] = cut_direct(state)
    finally:
        teardown.down(directory)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
