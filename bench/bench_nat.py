"""Edges behind NAT: throughput and latency per path against a hand-made tunnel over the same NAT, the ping
gap when a direct pair is cut and healed, and recovery after a WAN address change.

Brings up the default lab (every edge behind a NAT router; edge-1 and edge-2 on
one site with a direct tunnel, edge-3 behind a symmetric NAT), then, in this order:

* ``paths``: iperf3 (one TCP stream, median of ``--rounds``) and 200 pings at
  10 ms from edge-1's pod over the direct path (to edge-2, on edge-1's LAN), the
  relayed one (to edge-3, through the connector, both ends NATed) and the cloud
  one (to cloud-2's pod: NAT-T to the connector, then flannel's VXLAN), against
  a baseline made in the same run: a host on edge-1's LAN behind the same NAT
  router and a host on the WAN, a pod behind each, one strongSwan tunnel loaded
  by hand over VICI (same charon, backend and proposals, NAT-T). The measuring
  code is ``bench_dataplane``'s.
* ``cut-direct``: a 100 ms ping (``ping -D``) edge-1's pod -> edge-2's pod;
  ``lab cut edge-1 --from edge-2``; the path is observed (SA counters, as
  ``lab status``) every half second until it is relayed; held ``--cut-hold``
  seconds; ``lab heal edge-1``; observed until direct again. Reports the
  largest gap between replies after the cut and after the heal, and how long
  each switch took to be observed.
* ``wan-change``: edge-3's NAT router gets a new WAN address (link down, new
  address, link up, as a 4G reconnect: every mapping is lost), pinging edge-3's
  pod -> cloud-2's pod. Nothing is done by hand: the edge's DPD, sent from the
  new mapping, makes the connector move the IKE_SA and its CHILD_SA to the new
  address. Last, since it moves edge-3.
* ``relabel-direct`` (``--mediation``, on the ``THREE_SITES`` lab instead): edge-4, alone
  behind a cone NAT of its own, is labelled into edge-1's community (site-1); the figure is
  the time from the label patch to the first probe edge-1 pod -> edge-4 pod that the SA
  counters see on the direct edge-1/edge-4 CHILD_SA (the path ``lab status`` reports), hole
  punched with the connector as mediation server. Three rounds (label, measure, unlabel, wait
  for the direct tunnel to go).

Each measurement records the load average (1 min) before and after it.

    KUBEBUILDER_ASSETS=... python -m bench.bench_nat [--seconds 5] [--rounds 3] [--skip-paths] [--skip-cut] [--json]
    KUBEBUILDER_ASSETS=... python -m bench.bench_nat --mediation [--json]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.bench_dataplane import (
    BASELINE_PODS,
    ESP_PROPOSAL,
    IKE_PROPOSAL,
    IPERF_PORT,
    PathSpec,
    iperf,
    iperf_servers,
    lab_paths,
    ping,
)
from fabmesh.kube.client import Kube, load_api_client
from fabmesh.lab import bringup, faults, probe, teardown
from fabmesh.lab import paths as observed_paths
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import DEFAULT, THREE_SITES
from fabmesh.mesh.model import TunnelSettings
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, NatRouter, Network, sh, wait_for

BASELINE_WAN_IP = "198.51.100.241"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _router(state: LabState, name: str) -> NatRouter:
    nat = state.nat(name)
    return NatRouter(name=nat.name, netns=nat.netns, wan_ip=nat.wan_ip, lan_cidr=nat.lan_cidr,
                     symmetric=nat.type == "symmetric")


def _ping(state: LabState, src: str, dst: str, seconds: float) -> subprocess.Popen[str]:
    a = next(p for p in state.pods if p.node == src)
    b = next(p for p in state.pods if p.node == dst)
    return subprocess.Popen(["ip", "netns", "exec", a.netns, "ping", "-D", "-n", "-i", "0.1", "-W", "1",
                             "-c", str(int(seconds * 10)), b.ip], stdout=subprocess.PIPE, text=True)


def _replies(proc: subprocess.Popen[str], stop: bool = False) -> tuple[int, list[float]]:
    """(echo requests sent, reply timestamps); ``stop`` ends the ping first (SIGINT: it prints its summary)."""
    if stop:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    sent = re.search(r"(\d+) packets transmitted", out)
    return (int(sent.group(1)) if sent else 0,
            [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)])


def largest_gap(replies: list[float], start: float, end: float | None = None) -> float:
    """Largest silence between two replies (or the event and the next reply) within [start, end]."""
    times = [start] + [t for t in replies if t >= start and (end is None or t <= end)]
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def _until(state: LabState, src: str, dst: str, path: str, timeout: float) -> float | None:
    """Seconds until one probe from ``src`` to ``dst`` passes and is observed on ``path`` (None: not in time)."""
    start = time.time()
    while time.time() - start < timeout:
        ok, observed, _ = probe.observe_pair(state, src, dst)
        if ok and observed.value == path:
            return round(time.time() - start, 2)
        time.sleep(0.5)
    return None


# --- throughput and latency against a hand-made tunnel over the same NAT ----------------------------------


def _conn(host: Host, remote: str, leaf: KeyPair, ca: KeyPair, peer: str, local_ts: str, remote_ts: str) -> dict:
    return {
        "version": "2", "local_addrs": [host.wan_ip], "remote_addrs": [remote],
        "proposals": [IKE_PROPOSAL], "encap": "yes", "dpd_delay": "10s",
        "local": {"auth": "pubkey", "certs": [leaf.cert_pem], "id": host.name},
        "remote": {"auth": "pubkey", "id": peer, "cacerts": [ca.cert_pem]},
        "children": {peer: {"local_ts": [local_ts], "remote_ts": [remote_ts],
                            "esp_proposals": [ESP_PROPOSAL], "start_action": "none"}},
    }


def nat_baseline(state: LabState, directory: Path) -> tuple[PathSpec, list[Host]]:
    """A host on site-1's LAN (behind edge-1's NAT router) and one on the WAN, a pod behind each, one
    tunnel by hand: the LAN host initiates, the WAN host accepts it from any address (NAT-T)."""
    net = Network(prefix=state.prefix, directory=directory, wan_cidr=state.wan_cidr)
    router = _router(state, "site-1")
    lan_ip = str(ipaddress.ip_network(router.lan_cidr).broadcast_address - 2)
    a = net.add_host_behind_router("bl-edge", router, lan_ip)
    b = net.add_host("bl-cloud", BASELINE_WAN_IP)
    pod_a, pod_b = a.add_pod("p", BASELINE_PODS[0]), b.add_pod("p", BASELINE_PODS[1])
    nets = [str(ipaddress.ip_interface(c).network) for c in BASELINE_PODS]
    now = datetime.datetime.now(datetime.UTC)
    ca = new_ca(now=now)
    for host, remote, peer, local_ts, remote_ts in ((a, b.wan_ip, b.name, nets[0], nets[1]),
                                                     (b, "%any", a.name, nets[1], nets[0])):
        host.start_charon(install_routes=True)
        assert host.charon
        leaf = issue_leaf(ca, name=host.name, addresses=[host.wan_ip], now=now)
        with Charon(host.charon.vici_socket) as charon:
            charon.load_key(leaf.key_pem)
            charon.load_cert(ca.cert_pem, ca=True)
            charon.load_conn(peer, _conn(host, remote, leaf, ca, peer, local_ts, remote_ts))
    assert a.charon and b.charon
    with Charon(a.charon.vici_socket) as charon:
        charon.initiate(b.name, b.name, timeout_ms=15000)
        sa = charon.sas()[b.name]
    if sa.get("nat-local") != "yes":
        raise RuntimeError(f"the baseline tunnel is not NATed: {sa.get('local-host')} -> {sa.get('remote-host')}")
    wait_for(lambda: pod_a.ping(pod_b.ip), timeout=15, what="a ping through the baseline tunnel")
    spec = PathSpec("baseline", "baseline: strongSwan by hand, LAN host behind site-1's NAT -> WAN host",
                    pod_a.netns, pod_b.netns, pod_b.ip, {a.name: a.charon.pid, b.name: b.charon.pid},
                    {a.name: a.netns, b.name: b.netns}, a.charon.vici_socket, b.name)
    return spec, [a, b]


def nat_paths(state: LabState) -> list[PathSpec]:
    """edge-1's direct, relayed and cloud paths (``bench_dataplane``'s specs, cloud-2 as the cloud end)."""
    by_key = {p.key: p for p in lab_paths(state)}
    pod = next(p for p in state.pods if p.node == "cloud-2")
    cloud = replace(by_key["connector"], key="cloud", dst_ns=pod.netns, dst_ip=pod.ip,
                    label="fabmesh cloud (edge-1 -> connector -> VXLAN -> cloud-2 pod)")
    return [by_key["direct"], by_key["relayed"], cloud]


def paths(state: LabState, directory: Path, seconds: int, rounds: int,
          progress: Callable[[str], None]) -> dict[str, Any]:
    load_before = load()
    base, hosts = nat_baseline(state, directory)
    try:
        specs = [base, *nat_paths(state)]
        mbps: dict[str, list[float]] = {s.key: [] for s in specs}
        result: dict[str, Any] = {"load_before": load_before}
        with iperf_servers(specs):
            for spec in specs:  # warm-up: PMTU discovery, ARP, first ESP packets; not counted
                sh("iperf3", "-c", spec.dst_ip, "-p", str(IPERF_PORT), "-t", "1", ns=spec.src_ns, check=False)
            for round_ in range(rounds):
                for spec in specs:
                    run = iperf(spec, seconds)
                    mbps[spec.key].append(round(run.mbps, 1))
                    progress(f"round {round_ + 1}/{rounds} {spec.key:<9} {run.mbps:8.1f} Mbit/s load={load()}")
            pings = {spec.key: ping(spec) for spec in specs}
        base_mbps = sorted(mbps["baseline"])[len(mbps["baseline"]) // 2]
        for spec in specs:
            median = sorted(mbps[spec.key])[len(mbps[spec.key]) // 2]
            result[spec.key] = {"label": spec.label, "runs_mbps": mbps[spec.key], "median_mbps": median,
                                "ratio": round(median / base_mbps, 3), "ping": pings[spec.key],
                                "added_p50_ms": round(pings[spec.key]["p50_ms"] - pings["baseline"]["p50_ms"], 3),
                                "added_p99_ms": round(pings[spec.key]["p99_ms"] - pings["baseline"]["p99_ms"], 3)}
        result["load_after"] = load()
        return result
    finally:
        for host in hosts:
            if host.charon:
                host.charon.stop()  # its namespaces go with the lab's prefix at teardown


# --- fallback and recovery -------------------------------------------------------------------------------


def cut_direct(state: LabState, hold: float) -> dict[str, Any]:
    load_before = load()
    proc = _ping(state, "edge-1", "edge-2", 600)
    time.sleep(3)
    cut_at = time.time()
    faults.cut(state, "edge-1", "edge-2")
    to_relayed = _until(state, "edge-1", "edge-2", "relayed", timeout=120)
    time.sleep(max(0.0, hold - (time.time() - cut_at)))
    during = {(p["src"], p["dst"]): p for p in probe.check(state, wait=10)["pairs"]}[("pod-edge-1", "pod-edge-2")]
    healed_at = time.time()
    faults.heal(state, "edge-1")
    to_direct = _until(state, "edge-1", "edge-2", "direct", timeout=180)
    time.sleep(3)
    sent, replies = _replies(proc, stop=True)
    return {"event": f"lab cut edge-1 --from edge-2, held {hold:.0f} s, then heal; "
                     "ping -i 0.1 edge-1 pod -> edge-2 pod",
            "observed_relayed_after_cut_s": to_relayed,
            "gap_after_cut_s": round(largest_gap(replies, cut_at, healed_at), 2),
            "lab_status_while_cut": {k: during.get(k) for k in ("ok", "path", "intended", "evidence")},
            "observed_direct_after_heal_s": to_direct,
            "gap_after_heal_s": round(largest_gap(replies, healed_at), 2),
            "sent": sent, "replies": len(replies), "load_before": load_before, "load_after": load()}


def wan_change(state: LabState) -> dict[str, Any]:
    load_before = load()
    edge = state.host("edge-3")
    nat = state.nat(edge.nat or "")
    router = _router(state, nat.name)
    proc = _ping(state, "edge-3", "cloud-2", 45)
    time.sleep(5)
    changed = time.time()
    router.set_wan_ip("198.51.100.201", 24)
    nat.wan_ip = router.wan_ip
    state.save()
    sent, replies = _replies(proc)
    after = [t for t in replies if t > changed]
    return {"event": "edge-3 NAT router WAN address change; ping -i 0.1 edge-3 pod -> cloud-2 pod",
            "new_wan_ip": router.wan_ip, "dpd_delay_s": TunnelSettings().dpd_delay_s,
            "recovery_s": round(after[0] - changed, 2) if after else None,
            "largest_gap_s": round(largest_gap(replies, changed), 2), "sent": sent, "replies": len(replies),
            "load_before": load_before, "load_after": load()}


def _observed(state: LabState, src: str, dst: str) -> observed_paths.Observed:
    """One probe from ``src``'s pod to ``dst``'s, and the path the SA counters saw (lab status's rule)."""
    a = next(p for p in state.pods if p.node == src)
    b = next(p for p in state.pods if p.node == dst)
    edges = {h.name for h in state.hosts if h.role == "edge"}
    connector = next(h.name for h in state.hosts if h.role == "connector")
    before = probe.read_counters(state)
    if not probe.ping(a.netns, b.ip):
        return observed_paths.Observed.NONE
    counted = observed_paths.counted(before, probe.read_counters(state))
    return observed_paths.observed_path(src, dst, edges, connector, counted)


def relabel_direct(state: LabState, rounds: int = 3) -> dict[str, Any]:
    kube = Kube(load_api_client(state.kubeconfig))
    label = "community.fabmesh.io/a"
    seconds = []
    for _ in range(rounds):
        assert _observed(state, "edge-1", "edge-4") is observed_paths.Observed.RELAYED
        started = time.monotonic()
        kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {label: ""}}})
        while _observed(state, "edge-1", "edge-4") is not observed_paths.Observed.DIRECT:
            if time.monotonic() - started > 120:
                raise TimeoutError("no direct path edge-1 -> edge-4 within 120 s")
            time.sleep(0.1)
        seconds.append(round(time.monotonic() - started, 2))
        kube.merge_patch("nodes", "edge-4", {"metadata": {"labels": {label: None}}})
        deadline = time.monotonic() + 120
        relayed = observed_paths.Observed.RELAYED
        while _observed(state, "edge-1", "edge-4") is not relayed and time.monotonic() < deadline:
            time.sleep(0.5)
    return {"event": "edge-4 (site-3, cone NAT) labelled into edge-1's community (site-1, cone NAT)",
            "relabel_to_direct_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t per transfer")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per path (the median counts)")
    parser.add_argument("--cut-hold", type=float, default=20.0, help="seconds the direct pair stays cut")
    parser.add_argument("--skip-paths", action="store_true", help="no throughput/latency")
    parser.add_argument("--skip-cut", action="store_true", help="no cut/heal of the direct pair")
    parser.add_argument("--mediation", action="store_true",
                        help="only the time from relabel to a hole-punched direct path (THREE_SITES lab)")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-nat-"))

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"nproc": os.cpu_count(), "load_start": load()}
    try:
        state = bringup.up(THREE_SITES if args.mediation else DEFAULT, directory / "lab", timeout=120)
        probe.check(state, wait=60)
        if args.mediation:
            result["relabel_direct"] = relabel_direct(state)
        else:
            if not args.skip_paths:
                result["paths"] = paths(state, directory / "baseline", args.seconds, args.rounds, progress)
                progress(json.dumps(result["paths"]))
            if not args.skip_cut:
                result["cut_direct"] = cut_direct(state, args.cut_hold)
                progress(json.dumps(result["cut_direct"]))
            result["wan_change"] = wan_change(state)
    finally:
        teardown.down(directory / "lab")
    result["load_end"] = load()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
