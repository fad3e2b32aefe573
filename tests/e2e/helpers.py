"""Traffic and observation helpers for the e2e tier (all inside the lab's namespaces)."""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from fabmesh.lab import probe
from fabmesh.lab.state import LabHost, LabPod, LabState
from fabmesh.strongswan.driver import Charon
from fabmesh.testenv.hosts import sh, stop_pid, wait_for


def pod(state: LabState, node: str) -> LabPod:
    return next(p for p in state.pods if p.node == node)


def vici(state: LabState, node: str) -> Charon:
    return Charon(Path(state.directory) / "hosts" / node / "run" / "charon.vici")


def child_packets(state: LabState, node: str) -> dict[str, tuple[int, int]]:
    """Connection name -> (ESP packets in, out) summed over its CHILD_SAs, read over VICI."""
    with vici(state, node) as charon:
        sas = charon.sas()
    return {name: (sum(int(c["packets-in"]) for c in sa.get("child-sas", {}).values()),
                   sum(int(c["packets-out"]) for c in sa.get("child-sas", {}).values()))
            for name, sa in sas.items()}


def established(state: LabState, node: str) -> set[str]:
    with vici(state, node) as charon:
        return {name for name, sa in charon.sas().items()
                if sa.get("state") == "ESTABLISHED" and sa.get("child-sas")}


def ping_ok(netns: str, ip: str, count: int = 1) -> bool:
    return sh("ping", "-n", "-q", "-c", str(count), "-W", "1", ip, ns=netns, check=False).returncode == 0


@contextlib.contextmanager
def echo_peer_server(netns: str, port: int, proto: str = "tcp", bind: str | None = None) -> Iterator[None]:
    """A server that answers every request with the address it sees the client at."""
    listen = f"{proto.upper()}-LISTEN:{port},fork,reuseaddr" if proto == "tcp" else f"UDP-RECVFROM:{port},fork"
    if bind:
        listen += f",bind={bind}"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "socat", listen, "SYSTEM:echo $SOCAT_PEERADDR"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        sh("sh", "-c", f"for i in $(seq 50); do ss -lnu -lnt | grep -q ':{port} ' && exit 0; sleep 0.1; done; exit 1",
           ns=netns)
        yield
    finally:
        stop_pid(proc.pid)


def ask_peer(netns: str, ip: str, port: int, proto: str = "tcp") -> str:
    """Connect and return what the echo server says the client's address is ('' on failure).

    Asked up to three times: a datagram may be lost, and on a loaded 2-core machine userspace
    ESP can stall a first SYN past the connect timeout; neither is a mesh failure (lost packets
    are what the fault tests count).
    """
    target = f"TCP:{ip}:{port},connect-timeout=3" if proto == "tcp" else f"UDP:{ip}:{port}"
    for _ in range(3):
        done = subprocess.run(["ip", "netns", "exec", netns, "socat", "-t", "1", "-T", "2", "-", target],
                              input="hello\n", capture_output=True, text=True, timeout=15)
        if done.stdout.strip():
            return done.stdout.strip()
    return ""


@contextlib.contextmanager
def wan_probe(state: LabState, address: str = "198.51.100.200") -> Iterator[str]:
    """A namespace of our own on the lab's WAN bridge (another machine on the internet); yields its name.

    It counts what reaches it (raw PREROUTING counters, see ``probe_counter``) and can send forged packets.
    """
    netns = f"{state.prefix}-probe"
    wan = f"{state.prefix}-wan"
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", "wprobe0", "netns", wan)
        sh("ip", "-n", wan, "link", "set", "wprobe0", "master", "br0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        yield netns
    finally:
        sh("ip", "netns", "del", netns, check=False)


@contextlib.contextmanager
def lan_probe(state: LabState, host: str) -> Iterator[tuple[str, str]]:
    """A namespace of our own on ``host``'s side of the network: its site LAN when it sits behind a NAT
    router (a neighbour on the same LAN, the closest an attacker without the tunnel gets), else the
    WAN. Yields (namespace, its address)."""
    h = state.host(host)
    if h.nat is None:
        with wan_probe(state) as netns:
            yield netns, "198.51.100.200"
        return
    router = state.nat(h.nat)
    lan = ipaddress.ip_network(router.lan_cidr)
    address = str(lan.broadcast_address - 1)  # the LAN's last host address: the lab hands out the first ones
    netns = f"{state.prefix}-lprobe"
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", "lprobe0", "netns",
           router.netns)
        sh("ip", "-n", router.netns, "link", "set", "lprobe0", "master", "lan0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/{lan.prefixlen}", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        yield netns, address
    finally:
        sh("ip", "netns", "del", netns, check=False)


def add_counter(netns: str, *match: str) -> None:
    """A rule in raw PREROUTING that only counts the packets matching ``match`` (before any filter)."""
    sh("iptables", "-t", "raw", "-I", "PREROUTING", *match, ns=netns)


def remove_counter(netns: str, *match: str) -> None:
    sh("iptables", "-t", "raw", "-D", "PREROUTING", *match, ns=netns, check=False)


def counted(netns: str) -> int:
    """Packets counted by every raw PREROUTING rule of ``netns`` (only our counters live there)."""
    out = sh("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n", ns=netns).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())


def forged_datagrams_delivered(probe: str, edge: LabHost, target: LabPod, forged_src: str, count: int = 5) -> int:
    """Send ``count`` cleartext UDP datagrams claiming ``forged_src`` from ``probe`` to ``target`` by way of
    ``edge``'s uplink address; once ``edge`` has seen them arrive, how many reached the pod.

    Counted before any filter (raw PREROUTING) on both: the edge must see them, or the test proves nothing.
    """
    arrived = ("-i", "wan0", "-s", forged_src, "-p", "udp", "--dport", "9")
    delivered = ("-s", forged_src, "-p", "udp", "--dport", "9")
    sh("ip", "-n", probe, "addr", "add", f"{forged_src}/32", "dev", "lo")
    sh("ip", "-n", probe, "route", "add", f"{target.ip}/32", "via", edge.wan_ip)
    add_counter(edge.netns, *arrived)
    add_counter(target.netns, *delivered)
    try:
        for _ in range(count):
            subprocess.run(["ip", "netns", "exec", probe, "socat", "-u", "-", f"UDP:{target.ip}:9,bind={forged_src}"],
                           input="forged\n", text=True, check=True)
        wait_for(lambda: counted(edge.netns) >= count, timeout=10, what=f"the forged datagrams to reach {edge.name}")
        time.sleep(1)  # time to be forwarded, were they to be
        return counted(target.netns)
    finally:
        remove_counter(edge.netns, *arrived)
        remove_counter(target.netns, *delivered)



def observed_path(state: LabState, src: str, dst: str) -> tuple[bool, str]:
    """One ping from ``src``'s pod to ``dst``'s, and the path the SA counters saw it take (as ``lab status``)."""
    ok, path, _ = probe.observe_pair(state, src, dst)
    return ok, path.value
