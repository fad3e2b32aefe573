"""Pod-to-pod throughput and latency through the mesh, against a strongSwan tunnel set up by hand, in one run.

The target (DESIGN.md): the mesh's direct path carries >= 0.95 x what a hand-made
strongSwan tunnel carries between the same kind of namespaces with the same
backend, and the connector-relayed path >= 0.9 x. Both sides use
``kernel-libipsec`` (ESP in userspace over a TUN device, ``ipsec0``) and the
proposals of fabmesh's default ``TunnelSettings`` (IKE
aes256gcm16-prfsha256-ecp256, ESP aes256gcm16-ecp256 (its group is used on rekey only), UDP encapsulation
forced).

Everything lives in namespaces this benchmark creates: a baseline WAN with two
hosts, a pod behind each and a charon per host (``install_routes = yes``, the
connection loaded over VICI exactly as ``tests/dataplane/test_strongswan_smoke``
does), and the whole lab (:func:`fabmesh.lab.bringup.up` with the DEFAULT topology).
Both are up at once and the measurements are interleaved round by round
(baseline, direct, via connector, relayed, bare veth; three rounds), so a
change in background load hits every path alike; the median of the three is
reported. Only one transfer runs at a time: libipsec encrypts in charon's
threads, so on a small machine every path is CPU-bound and two transfers at
once would measure the scheduler. For the same reason the report carries the
CPU each charon spent per second of transfer, charon CPU seconds per Gbit
delivered (a cost that survives background load better than Mbit/s), how busy
the machine was, and where packets were lost (``ipsec0`` TUN queue drops, UDP
receive-buffer overflows of charon's ESP-in-UDP socket).

MTU sanity: the pods of the lab have the tunnel MTU (1400) and the agent clamps
TCP MSS to 1360 (mangle ``FABMESH-MSS``); the baseline pods keep the veth
default of 1500 and learn the path MTU of ``ipsec0`` (1400) by ICMP. The
report gives, per path, the MSS iperf3 saw, the pod and ``ipsec0`` MTUs, the
route MTU the sender cached, and the IP fragments created on the WAN hosts
(any fragment means an ESP packet did not fit the WAN's 1500).

    KUBEBUILDER_ASSETS=... python -m bench.bench_dataplane [--seconds 5] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fabmesh.lab import bringup, probe, teardown
from fabmesh.lab.state import LabState
from fabmesh.lab.topology import DEFAULT
from fabmesh.mesh.model import TunnelSettings
from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import Host, Network, owned_namespaces, sh, stop_pid, unique_prefix, wait_for

DIRECT_TARGET = 0.95
RELAYED_TARGET = 0.90
ROUNDS = 3
PINGS = 200
PING_INTERVAL = "0.01"
IPERF_PORT = 5201
TUNNEL = TunnelSettings()
IKE_PROPOSAL = TUNNEL.ike_proposals[0]  # aes256gcm16-prfsha256-ecp256
ESP_PROPOSAL = TUNNEL.esp_proposals[0]  # aes256gcm16-ecp256 (the group is used on rekey only)
BASELINE_WAN = "203.0.113.0/24"
BASELINE_PODS = ("10.10.1.2/24", "10.10.2.2/24")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class PathSpec:
    """One measured path: who sends, who receives, and what to watch on the way."""

    key: str
    label: str
    src_ns: str
    dst_ns: str
    dst_ip: str
    charons: dict[str, int]  # host name -> charon PID, the ones carrying this path
    hosts: dict[str, str]  # host name -> host netns (src first), for MTU and fragment counters
    vici: Path | None = None  # the sender host's VICI socket ...
    conn: str = ""  # ... and the connection its first hop should use (ESP packet proof)


@dataclass
class Run:
    mbps: float
    retransmits: int
    mss: int
    seconds: float
    charon_cpu: dict[str, float]  # CPU seconds per wall second (1.0 = one core)
    machine_busy: float  # share of all cores busy during the transfer
    esp_packets_out: int | None
    drops: dict[str, int]  # where packets were lost on the way (summed over the path's hosts)


@dataclass
class PathResult:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    ping: dict[str, float] = field(default_factory=dict)
    mtu: dict[str, Any] = field(default_factory=dict)

    @property
    def median_mbps(self) -> float:
        return statistics.median(r.mbps for r in self.runs)


# --- probes ---------------------------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def _machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values), idle


def _frag_counters(netns: str) -> dict[str, int]:
    snmp = sh("cat", "/proc/net/snmp", ns=netns).stdout  # /proc/net follows the reader's namespace
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Ip:")]
    ip = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    return {"FragCreates": ip["FragCreates"], "ReasmReqds": ip["ReasmReqds"], "FragFails": ip["FragFails"]}


def _drop_counters(hosts: dict[str, str]) -> dict[str, int]:
    """TUN queue drops on ipsec0 (charon not reading fast enough) and UDP receive-buffer overflows (charon's
    ESP-in-UDP socket), summed over the hosts of a path."""
    totals = {"ipsec0_tx_dropped": 0, "ipsec0_rx_dropped": 0, "udp_rcvbuf_errors": 0}
    for ns in hosts.values():
        done = sh("ip", "-s", "-j", "link", "show", "ipsec0", ns=ns, check=False)
        if done.returncode == 0:
            stats = json.loads(done.stdout)[0]["stats64"]
            totals["ipsec0_tx_dropped"] += stats["tx"]["dropped"]
            totals["ipsec0_rx_dropped"] += stats["rx"]["dropped"]
        lines = [line.split() for line in sh("cat", "/proc/net/snmp", ns=ns).stdout.splitlines()
                 if line.startswith("Udp:")]
        totals["udp_rcvbuf_errors"] += dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))[
            "RcvbufErrors"]
    return totals


def _esp_packets_out(spec: PathSpec) -> int | None:
    if spec.vici is None:
        return None
    with Charon(spec.vici) as charon:
        sa = charon.sas().get(spec.conn, {})
    return sum(int(c["packets-out"]) for c in sa.get("child-sas", {}).values())


def _mtu(netns: str, dev: str) -> int | None:
    done = sh("ip", "-j", "link", "show", dev, ns=netns, check=False)
    return json.loads(done.stdout)[0]["mtu"] if done.returncode == 0 else None


def iperf(spec: PathSpec, seconds: int) -> Run:
    """One single-stream TCP transfer from the source namespace; the receiver's rate counts."""
    charons = {name: _cpu_ticks(pid) for name, pid in spec.charons.items()}
    total0, idle0 = _machine_ticks()
    esp0 = _esp_packets_out(spec)
    drops0 = _drop_counters(spec.hosts)
    start = time.monotonic()
    done = sh("iperf3", "-c", spec.dst_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "--get-server-output",
              ns=spec.src_ns, check=False)
    wall = time.monotonic() - start
    total1, idle1 = _machine_ticks()
    result = json.loads(done.stdout or "{}")
    if done.returncode != 0 or "error" in result:
        raise RuntimeError(f"iperf3 {spec.label}: {result.get('error') or done.stderr.strip()}")
    esp1 = _esp_packets_out(spec)
    drops1 = _drop_counters(spec.hosts)
    end = result["end"]
    return Run(mbps=end["sum_received"]["bits_per_second"] / 1e6, retransmits=end["sum_sent"].get("retransmits", 0),
               mss=result["start"].get("tcp_mss_default", 0), seconds=round(wall, 2),
               charon_cpu={n: round((_cpu_ticks(pid) - charons[n]) / CLK_TCK / wall, 2)
                           for n, pid in spec.charons.items()},
               machine_busy=round(1 - (idle1 - idle0) / max(total1 - total0, 1), 2),
               esp_packets_out=None if esp0 is None or esp1 is None else esp1 - esp0,
               drops={k: drops1[k] - drops0[k] for k in drops0})


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ping(spec: PathSpec) -> dict[str, float]:
    done = sh("ping", "-n", "-i", PING_INTERVAL, "-c", str(PINGS), "-W", "1", spec.dst_ip, ns=spec.src_ns, check=False)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    if not times:
        raise RuntimeError(f"ping {spec.label}: no reply ({done.stdout.strip()[-200:]})")
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "sent": PINGS,
            "lost": PINGS - len(times)}


def mtu_facts(spec: PathSpec) -> dict[str, Any]:
    src_host = next(iter(spec.hosts.values()))
    route = sh("ip", "route", "get", spec.dst_ip, ns=spec.src_ns, check=False).stdout
    cached = re.search(r"\bmtu (\d+)", route)
    clamp = sh("iptables", "-t", "mangle", "-S", "FABMESH-MSS", ns=src_host, check=False)
    mss_rule = re.search(r"--set-mss (\d+)", clamp.stdout)
    return {"pod_mtu": _mtu(spec.src_ns, "eth0"),
            "ipsec0_mtu": {name: _mtu(ns, "ipsec0") for name, ns in spec.hosts.items()},
            "route_mtu_cached": int(cached.group(1)) if cached else None,
            "mss_clamp": int(mss_rule.group(1)) if mss_rule else None}


# --- the two set-ups ------------------------------------------------------------------------------


def _baseline_conn(host: Host, peer: Host, leaf: KeyPair, ca: KeyPair, local_ts: str, remote_ts: str) -> dict:
    return {
        "version": "2",
        "local_addrs": [host.wan_ip], "remote_addrs": [peer.wan_ip],
        "proposals": [IKE_PROPOSAL], "encap": "yes", "dpd_delay": "10s",
        "local": {"auth": "pubkey", "certs": [leaf.cert_pem], "id": host.name},
        "remote": {"auth": "pubkey", "id": peer.name, "cacerts": [ca.cert_pem]},
        "children": {peer.name: {"local_ts": [local_ts], "remote_ts": [remote_ts],
                                 "esp_proposals": [ESP_PROPOSAL], "start_action": "none"}},
    }


def baseline_paths(net: Network) -> list[PathSpec]:
    """Two hosts, a pod behind each, one tunnel loaded and initiated over VICI by hand."""
    now = datetime.datetime.now(datetime.UTC)
    ca = new_ca(now=now)
    a, b = net.add_host("a"), net.add_host("b")
    pod_a, pod_b = a.add_pod("p", BASELINE_PODS[0]), b.add_pod("p", BASELINE_PODS[1])
    nets = [str(ipaddress.ip_interface(c).network) for c in BASELINE_PODS]
    for host, peer, local_ts, remote_ts in ((a, b, nets[0], nets[1]), (b, a, nets[1], nets[0])):
        host.start_charon(install_routes=True)
        assert host.charon
        leaf = issue_leaf(ca, name=host.name, addresses=[host.wan_ip], now=now)
        with Charon(host.charon.vici_socket) as charon:
            charon.load_key(leaf.key_pem)
            charon.load_cert(ca.cert_pem, ca=True)
            charon.load_conn(peer.name, _baseline_conn(host, peer, leaf, ca, local_ts, remote_ts))
    assert a.charon and b.charon
    with Charon(a.charon.vici_socket) as charon:
        charon.initiate("b", "b", timeout_ms=15000)
    wait_for(lambda: pod_a.ping(pod_b.ip), timeout=15, what="a ping through the baseline tunnel")
    charons = {"a": a.charon.pid, "b": b.charon.pid}
    return [
        PathSpec("baseline", "baseline (strongSwan by hand)", pod_a.netns, pod_b.netns, pod_b.ip, charons,
                 {"a": a.netns, "b": b.netns}, a.charon.vici_socket, "b"),
        PathSpec("veth", "bare veth host-to-host (no IPsec)", a.netns, b.netns, b.wan_ip, {},
                 {"a": a.netns, "b": b.netns}),
    ]


def lab_paths(state: LabState) -> list[PathSpec]:
    pods = {p.node: p for p in state.pods}
    netns = {h.name: h.netns for h in state.hosts}

    def spec(key: str, label: str, dst: str, via: list[str], conn: str) -> PathSpec:
        names = ["edge-1", *via]
        return PathSpec(key, label, pods["edge-1"].netns, pods[dst].netns, pods[dst].ip,
                        {n: state.pids[f"charon-{n}"] for n in names}, {n: netns[n] for n in names},
                        Path(state.directory) / "hosts" / "edge-1" / "run" / "charon.vici", conn)

    return [
        spec("direct", "fabmesh direct (edge-1 -> edge-2)", "edge-2", ["edge-2"], "edge-2"),
        spec("connector", "fabmesh via connector (edge-1 -> connector-1 pod)", "connector-1", ["connector-1"],
             "connector-1"),
        spec("relayed", "fabmesh relayed (edge-1 -> connector -> edge-3)", "edge-3", ["connector-1", "edge-3"],
             "connector-1"),
    ]


@contextlib.contextmanager
def iperf_servers(paths: list[PathSpec]) -> Iterator[None]:
    """One ``iperf3 -s`` per receiving namespace, stopped by PID."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns in dict.fromkeys(p.dst_ns for p in paths):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-p", str(IPERF_PORT)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
            wait_for(lambda ns=ns: f":{IPERF_PORT} " in sh("ss", "-lnt", ns=ns).stdout, timeout=10,
                     what=f"iperf3 listening in {ns}")
        yield
    finally:
        for proc in procs:
            stop_pid(proc.pid)


def _charon_version(spec: PathSpec) -> str:
    if spec.vici is None:
        return "?"
    with Charon(spec.vici) as charon:
        v = charon.version()
        sa = charon.sas().get(spec.conn, {})
    child = next(iter(sa.get("child-sas", {}).values()), {})
    return (f"{v.get('daemon')} {v.get('version')}; IKE {sa.get('encr-alg')}-{sa.get('encr-keysize')}/"
            f"{sa.get('prf-alg')}/{sa.get('dh-group')}, ESP {child.get('encr-alg')}-{child.get('encr-keysize')}, "
            f"UDP encap {child.get('encap', 'no')}")


# --- the run --------------------------------------------------------------------------------------


def measure(seconds: int, rounds: int, progress: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fabmesh-bench-dp-"))
    lab_dir = work / "lab"
    net = Network(prefix=unique_prefix("fmbdp"), directory=work / "baseline", wan_cidr=BASELINE_WAN)
    facts: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release(),
                             "iperf3": sh("iperf3", "--version").stdout.split("\n")[0],
                             "loadavg_start": os.getloadavg(), "seconds": seconds, "rounds": rounds}
    try:
        progress("baseline: two hosts, two pods, a tunnel loaded by hand")
        net.create()
        base = baseline_paths(net)
        progress("fabmesh: bringing up the lab (DEFAULT topology)")
        state = bringup.up(DEFAULT, lab_dir, progress=lambda m: progress(f"  lab: {m}"), timeout=120)
        report = probe.check(state, wait=60)
        failing = [p for p in report["pairs"] if not p["ok"]]
        if failing:
            raise RuntimeError(f"lab pods do not all reach each other: {failing}")
        paths = [base[0], *lab_paths(state), base[1]]
        facts["baseline_sa"] = _charon_version(paths[0])
        facts["fabmesh_sa"] = _charon_version(paths[1])
        results = {p.key: PathResult(p.key, p.label) for p in paths}
        with iperf_servers(paths):
            for spec in paths:  # warm-up: PMTU discovery, ARP, first ESP packets; not counted
                sh("iperf3", "-c", spec.dst_ip, "-p", str(IPERF_PORT), "-t", "1", ns=spec.src_ns, check=False)
            for round_ in range(rounds):
                for spec in paths:
                    run = iperf(spec, seconds)
                    results[spec.key].runs.append(run)
                    progress(f"round {round_ + 1}/{rounds} {spec.key:<10} {run.mbps:8.1f} Mbit/s "
                             f"mss={run.mss} retr={run.retransmits} charon_cpu={run.charon_cpu} "
                             f"busy={run.machine_busy} drops={run.drops}")
            for spec in paths:
                frag0 = {n: _frag_counters(ns) for n, ns in spec.hosts.items()}
                results[spec.key].ping = ping(spec)
                sh("iperf3", "-c", spec.dst_ip, "-p", str(IPERF_PORT), "-t", "2", ns=spec.src_ns, check=False)
                frag1 = {n: _frag_counters(ns) for n, ns in spec.hosts.items()}
                results[spec.key].mtu = mtu_facts(spec) | {
                    "ip_fragments": {n: {k: frag1[n][k] - frag0[n][k] for k in frag0[n]} for n in spec.hosts}}
                progress(f"ping {spec.key:<10} p50={results[spec.key].ping['p50_ms']:.3f} ms "
                         f"p99={results[spec.key].ping['p99_ms']:.3f} ms")
        facts["loadavg_end"] = os.getloadavg()
        return {"facts": facts, "paths": results}
    finally:
        progress("tearing down (teardown.down, network destroy)")
        lab_state = LabState.load(lab_dir)
        try:
            teardown.down(lab_dir)
        finally:
            net.destroy()
            shutil.rmtree(work, ignore_errors=True)
        prefixes = [net.prefix] + ([lab_state.prefix] if lab_state else [])
        left = [ns for prefix in prefixes for ns in owned_namespaces(prefix)]
        progress(f"namespaces left behind with prefixes {prefixes}: {left or 'none'}")


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, PathResult] = raw["paths"]
    base = paths["baseline"]
    out: dict[str, Any] = {"facts": raw["facts"], "paths": {}, "ratios": {}, "targets": {}}
    for key, r in paths.items():
        cores = [sum(x.charon_cpu.values()) for x in r.runs]
        out["paths"][key] = {
            "label": r.label, "median_mbps": round(r.median_mbps, 1),
            "runs_mbps": [round(x.mbps, 1) for x in r.runs], "ping": r.ping, "mtu": r.mtu,
            "mss": r.runs[0].mss,
            "median_retransmits": statistics.median(x.retransmits for x in r.runs),
            "median_udp_rcvbuf_drops": statistics.median(x.drops["udp_rcvbuf_errors"] for x in r.runs),
            # Load-robust cost figure: charon CPU seconds spent per Gbit delivered (all charons on the path).
            "charon_cores": round(statistics.median(cores), 2),
            "charon_cpu_s_per_gbit": round(statistics.median(c / (x.mbps / 1000) for c, x in zip(cores, r.runs,
                                                                                                 strict=True)), 2),
            "runs": [asdict(x) for x in r.runs]}
        if key not in ("baseline", "veth"):
            out["ratios"][key] = round(r.median_mbps / base.median_mbps, 3)
            out["paths"][key]["added_p50_ms"] = round(r.ping["p50_ms"] - base.ping["p50_ms"], 3)
            out["paths"][key]["added_p99_ms"] = round(r.ping["p99_ms"] - base.ping["p99_ms"], 3)
    out["targets"] = {"direct >= 0.95": out["ratios"]["direct"] >= DIRECT_TARGET,
                      "relayed >= 0.90": out["ratios"]["relayed"] >= RELAYED_TARGET}
    return out


def render(summary: dict[str, Any]) -> str:
    f = summary["facts"]
    lines = [f"nproc={f['nproc']} kernel={f['kernel']} {f['iperf3']}; {f['rounds']} rounds x {f['seconds']} s, "
             f"one transfer at a time; loadavg start={f['loadavg_start'][0]:.2f} end={f['loadavg_end'][0]:.2f}",
             f"baseline SA: {f['baseline_sa']}", f"fabmesh SA:  {f['fabmesh_sa']}", "",
             f"{'path':<10} {'median Mbit/s':>13} {'runs':>24} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'+p50':>7} {'+p99':>7} {'lost':>4}"]
    for key, p in summary["paths"].items():
        runs = " / ".join(f"{x:.0f}" for x in p["runs_mbps"])
        lines.append(f"{key:<10} {p['median_mbps']:>13.1f} {runs:>24} {summary['ratios'].get(key, '-'):>6} "
                     f"{p['ping']['p50_ms']:>7.3f} {p['ping']['p99_ms']:>7.3f} {p.get('added_p50_ms', '-'):>7} "
                     f"{p.get('added_p99_ms', '-'):>7} {p['ping']['lost']:>4}")
    lines += ["", f"{'path':<10} {'MSS':>5} {'pod MTU':>7} {'ipsec0':>6} {'rt MTU':>6} {'clamp':>5} {'WAN frags':>9} "
              f"{'retrans':>7} {'rcvbuf drops':>12} {'charon cores':>12} {'CPU-s/Gbit':>10}"]
    for key, p in summary["paths"].items():
        m = p["mtu"]
        ipsec0 = "/".join(sorted({str(v) for v in m["ipsec0_mtu"].values()}))
        frags = sum(sum(c.values()) for c in m["ip_fragments"].values())
        lines.append(f"{key:<10} {p['mss']:>5} {m['pod_mtu'] or '-':>7} {ipsec0:>6} {m['route_mtu_cached'] or '-':>6} "
                     f"{m['mss_clamp'] or '-':>5} {frags:>9} {p['median_retransmits']:>7} "
                     f"{p['median_udp_rcvbuf_drops']:>12} {p['charon_cores']:>12} {p['charon_cpu_s_per_gbit']:>10}")
    lines.append("")
    lines.extend(f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in summary["targets"].items())
    return "\n".join(lines)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t per transfer")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="transfers per path (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, charon)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP unwind like Ctrl-C so the finally block stops every PID and deletes every namespace.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    summary = summarise(measure(args.seconds, args.rounds, lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
