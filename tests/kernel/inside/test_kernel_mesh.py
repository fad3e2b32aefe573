"""The mesh on the kernel backend, in a real kernel with ESP: what charon and the agent install, and traffic.

Runs only in the kernel tier's VM (see ``tests/kernel/test_vm.py``), on one mesh built by
:mod:`tests.kernel.inside.mesh` (the operator's planner in-process, real charons, agents, connector
and CNI pods): connector-1 (with a pod on the cloud pod CIDR), edge-1 and edge-2 (community a: a
direct tunnel), edge-3 behind a NAT router (no community: relayed by the connector, ESP in UDP).
Every charon runs ``kernel-netlink`` only, so ESP is the kernel's: observed with ``ip xfrm
state``/``ip xfrm policy`` and their counters, not only over VICI.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabmesh.lab import processes
from fabmesh.lab.state import LabState
from fabmesh.mesh.dataplane import BLOCK_PRIORITY, DEFAULT_PRIORITY
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.testenv.hosts import Host, sh, stop_pid, wait_for
from tests.e2e.helpers import (
    add_counter,
    ask_peer,
    child_packets,
    counted,
    echo_peer_server,
    established,
    forged_datagrams_delivered,
    ping_ok,
    pod,
    wan_probe,
)

pytestmark = pytest.mark.kernel
TABLE = "2620"
PROBE_IP = "198.51.100.200"


@dataclass(frozen=True)
class XfrmEntry:
    """One ``ip xfrm state`` or ``ip xfrm policy`` entry: its header selector and its indented lines."""

    src: str
    dst: str
    lines: tuple[str, ...]

    def has(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)


def _xfrm(netns: str, kind: str, *extra: str) -> list[XfrmEntry]:
    """``ip [-s] xfrm <kind>`` parsed into entries (the text format: iproute2 has no JSON for xfrm)."""
    entries: list[XfrmEntry] = []
    for line in sh("ip", *extra, "xfrm", kind, ns=netns).stdout.splitlines():
        if line.startswith("src "):
            words = line.split()
            entries.append(XfrmEntry(src=words[1], dst=words[3], lines=(line,)))
        elif entries:
            last = entries[-1]
            entries[-1] = XfrmEntry(last.src, last.dst, (*last.lines, line.strip()))
    return entries


def _esp_packets(netns: str, src: str, dst: str) -> int:
    """Packets the kernel counted on its ESP SAs from ``src`` to ``dst`` (tunnel endpoints)."""
    total = 0
    for sa in _xfrm(netns, "state", "-s"):
        if sa.src == src and sa.dst == dst and sa.has(r"proto esp"):
            for line in sa.lines:
                match = re.search(r"(\d+)\(bytes\), (\d+)\(packets\)", line)
                if match:
                    total += int(match.group(2))
                    break
    return total


def _metrics(state: LabState, node: str) -> dict[str, float]:
    """The node process's Prometheus samples, fetched from inside its namespace."""
    host = state.host(node)
    code = (f"import urllib.request; print(urllib.request.urlopen('http://{host.wan_ip}:{DEFAULT_METRICS_PORT}"
            "/metrics', timeout=5).read().decode())")
    text = sh("python3", "-c", code, ns=host.netns).stdout
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _writes(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith("fabmesh_writes{")}


def _log(state: LabState, name: str) -> Path:
    return Path(state.directory) / "logs" / f"node-{name}.log"


def test_lab_paths_direct_relayed_and_cloud(kernel_lab: LabState) -> None:
    assert "edge-2" in established(kernel_lab, "edge-1")
    assert "edge-3" not in established(kernel_lab, "edge-1")
    for src, dst in (("edge-1", "edge-2"), ("edge-1", "edge-3"), ("edge-3", "connector-1"),
                     ("connector-1", "edge-2"), ("connector-1", "edge-1")):
        assert ping_ok(pod(kernel_lab, src).netns, pod(kernel_lab, dst).ip, count=3), f"{src} -> {dst}"


def test_charon_installed_kernel_esp_sas_and_policies_with_the_pod_selectors(kernel_lab: LabState) -> None:
    e1, e2, conn = (kernel_lab.host(n) for n in ("edge-1", "edge-2", "connector-1"))
    states = _xfrm(e1.netns, "state")
    for peer in (e2, conn):
        for src, dst in ((e1.wan_ip, peer.wan_ip), (peer.wan_ip, e1.wan_ip)):
            sas = [s for s in states if s.src == src and s.dst == dst]
            assert sas, f"no SA {src} -> {dst} in edge-1:\n" + "\n".join("\n".join(s.lines) for s in states)
            assert all(s.has(r"proto esp spi 0x[0-9a-f]+ .*mode tunnel") for s in sas), sas
            assert all(s.has(r"^aead rfc4106\(gcm\(aes\)\)") for s in sas), sas  # aes*gcm16, the default

    policies = _xfrm(e1.netns, "policy")

    def charon_policy(src: str, dst: str, direction: str, tunnel_src: str, tunnel_dst: str) -> bool:
        return any(p.src == src and p.dst == dst and p.has(rf"^dir {direction} priority \d+")
                   and p.has(rf"^tmpl src {tunnel_src} dst {tunnel_dst}$") and p.has(r"proto esp .*mode tunnel")
                   for p in policies)

    dump = "\n".join("\n".join(p.lines) for p in policies)
    assert e1.pod_cidr and e2.pod_cidr
    assert charon_policy(e1.pod_cidr, e2.pod_cidr, "out", e1.wan_ip, e2.wan_ip), dump
    assert charon_policy(e2.pod_cidr, e1.pod_cidr, "in", e2.wan_ip, e1.wan_ip), dump
    assert charon_policy(e2.pod_cidr, e1.pod_cidr, "fwd", e2.wan_ip, e1.wan_ip), dump
    assert charon_policy(e1.pod_cidr, "10.244.0.0/16", "out", e1.wan_ip, conn.wan_ip), dump
    assert charon_policy("10.244.0.0/16", e1.pod_cidr, "fwd", conn.wan_ip, e1.wan_ip), dump


def test_the_edge_behind_nat_gets_kernel_esp_in_udp_with_the_connector(kernel_lab: LabState) -> None:
    e3, conn = kernel_lab.host("edge-3"), kernel_lab.host("connector-1")
    public = e3.public_ip(kernel_lab)
    assert public != e3.wan_ip
    for netns, src, dst in ((e3.netns, e3.wan_ip, conn.wan_ip), (e3.netns, conn.wan_ip, e3.wan_ip),
                            (conn.netns, public, conn.wan_ip), (conn.netns, conn.wan_ip, public)):
        sas = [s for s in _xfrm(netns, "state") if s.src == src and s.dst == dst]
        assert sas, f"no SA {src} -> {dst} in {netns}"
        assert all(s.has(r"^encap type espinudp sport \d+ dport \d+") for s in sas), sas


def test_agent_routes_into_the_uplink_and_writes_bypass_and_block_policies(kernel_lab: LabState) -> None:
    e1, e2 = kernel_lab.host("edge-1"), kernel_lab.host("edge-2")
    routes = {r.split()[0]: r for r in sh("ip", "route", "show", "table", TABLE, ns=e1.netns).stdout.splitlines()}
    assert e2.pod_cidr and e1.pod_cidr
    assert "dev wan0" in routes[e2.pod_cidr] and "10.244.0.0/16" in routes, routes  # kernel ESP: the uplink
    assert "dev fabmesh0" in routes[e1.pod_cidr], routes
    assert sh("ip", "link", "show", "ipsec0", ns=e1.netns, check=False).returncode != 0, "a TUN on kernel ESP"

    policies = _xfrm(e1.netns, "policy")
    bypass = {(p.src, p.dst, d) for p in policies for d in ("out", "in", "fwd")
              if p.has(rf"^dir {d} priority {DEFAULT_PRIORITY} ") and not p.has("^tmpl")}
    local = (e1.pod_cidr, f"{e1.node_ip}/32")
    for a in local:
        for b in local:
            for d in ("out", "in", "fwd"):
                assert (a, b, d) in bypass or a == b == f"{e1.node_ip}/32", (a, b, d, sorted(bypass))
    blocks = [p for p in policies if p.has(rf"action block priority {BLOCK_PRIORITY}")]
    assert any(p.src == e1.pod_cidr and p.dst == e2.pod_cidr and p.has("^dir out") for p in blocks), \
        "\n".join("\n".join(p.lines) for p in policies)


def test_pod_traffic_is_carried_by_kernel_esp_direct_and_relayed(kernel_lab: LabState) -> None:
    e1, e2, e3, conn = (kernel_lab.host(n) for n in ("edge-1", "edge-2", "edge-3", "connector-1"))
    direct_before = _esp_packets(e1.netns, e1.wan_ip, e2.wan_ip)
    relay_in_before = _esp_packets(conn.netns, e1.wan_ip, conn.wan_ip)
    relay_out_before = _esp_packets(conn.netns, conn.wan_ip, e3.public_ip(kernel_lab))
    via_connector = child_packets(kernel_lab, "connector-1")
    assert ping_ok(pod(kernel_lab, "edge-1").netns, pod(kernel_lab, "edge-2").ip, count=10)
    assert _esp_packets(e1.netns, e1.wan_ip, e2.wan_ip) - direct_before >= 10
    after = child_packets(kernel_lab, "connector-1")
    for edge in ("edge-1", "edge-2"):
        assert after[edge] == via_connector[edge], f"direct traffic crossed the connector via {edge}"
    assert ping_ok(pod(kernel_lab, "edge-1").netns, pod(kernel_lab, "edge-3").ip, count=10)
    assert _esp_packets(conn.netns, e1.wan_ip, conn.wan_ip) - relay_in_before >= 10
    assert _esp_packets(conn.netns, conn.wan_ip, e3.public_ip(kernel_lab)) - relay_out_before >= 10


@pytest.mark.parametrize("src,dst", [("edge-1", "edge-2"), ("edge-1", "edge-3"), ("edge-2", "connector-1"),
                                     ("connector-1", "edge-3"), ("edge-3", "edge-1")])
def test_the_receiving_pod_sees_the_senders_pod_ip(kernel_lab: LabState, src: str, dst: str) -> None:
    client, server = pod(kernel_lab, src), pod(kernel_lab, dst)
    with echo_peer_server(server.netns, 8080):
        assert ask_peer(client.netns, server.ip, 8080) == client.ip


def test_a_resync_with_nothing_changed_writes_nothing(kernel_lab: LabState) -> None:
    for node in ("edge-1", "connector-1"):
        before = _metrics(kernel_lab, node)
        passes = before.get('fabmesh_reconcile_total{result="ok"}', 0)
        mark = _log(kernel_lab, node).stat().st_size
        wait_for(lambda n=node, p=passes: _metrics(kernel_lab, n).get('fabmesh_reconcile_total{result="ok"}', 0)
                 >= p + 1, timeout=60, interval=1, what=f"{node}'s next resync pass")
        assert _writes(_metrics(kernel_lab, node)) == _writes(before), node
        assert " action=" not in _log(kernel_lab, node).read_text()[mark:]


def test_restarting_agent_and_connector_under_traffic_loses_no_packet(kernel_lab: LabState) -> None:
    pings = [subprocess.Popen(["ip", "netns", "exec", pod(kernel_lab, src).netns, "ping", "-n", "-q", "-i", "0.1",
                               "-c", "80", "-W", "2", pod(kernel_lab, dst).ip],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src, dst in (("edge-1", "connector-1"), ("edge-1", "edge-2"), ("edge-3", "edge-1"))]
    time.sleep(1)
    marks = {n: _log(kernel_lab, n).stat().st_size for n in ("edge-1", "connector-1")}
    processes.restart_node_process(kernel_lab, "edge-1")
    processes.restart_node_process(kernel_lab, "connector-1")
    for proc in pings:
        out, _ = proc.communicate(timeout=120)
        sent, received = re.search(r"(\d+) packets transmitted, (\d+) received", out).groups()  # type: ignore[union-attr]
        assert received == sent, f"lost {int(sent) - int(received)} of {sent}: {out}"
    # Generous: a new Python process under software emulation on a loaded 2-core host has taken over a minute.
    for name, mark in marks.items():
        wait_for(lambda n=name, m=mark: "config loaded" in _log(kernel_lab, n).read_text()[m:], timeout=180,
                 what=f"{name} to start its first pass")
    time.sleep(3)
    for name, mark in marks.items():
        new = _log(kernel_lab, name).read_text()[mark:]
        assert " action=" not in new, new


def test_forged_cleartext_from_the_wan_is_not_forwarded_to_an_edge_pod(kernel_lab: LabState) -> None:
    edge, target, forged = kernel_lab.host("edge-1"), pod(kernel_lab, "edge-1"), pod(kernel_lab, "connector-1")
    with wan_probe(kernel_lab, PROBE_IP) as probe:
        delivered = forged_datagrams_delivered(probe, edge, target, forged.ip)
    assert delivered == 0, "a forged cleartext datagram was delivered to edge-1's pod"
    assert ping_ok(pod(kernel_lab, "connector-1").netns, target.ip, count=3)


def _delete_charons_policies_and_sas(netns: str) -> int:
    """What a dead charon leaves undone on a real crash: its SAs and tunnel policies gone (fabmesh's stay)."""
    removed = 0
    for policy in _xfrm(netns, "policy"):
        direction = next((line.split()[1] for line in policy.lines if line.startswith("dir ")), None)
        if direction in ("out", "in", "fwd") and policy.has("^tmpl "):
            sh("ip", "xfrm", "policy", "delete", "src", policy.src, "dst", policy.dst, "dir", direction, ns=netns,
               check=False)
            removed += 1
    sh("ip", "xfrm", "state", "flush", ns=netns)
    return removed


def test_no_pod_packet_leaves_an_edge_in_clear_while_its_charon_is_down_and_restarting(
        kernel_lab: LabState) -> None:
    edge, src, dst = kernel_lab.host("edge-1"), pod(kernel_lab, "edge-1"), pod(kernel_lab, "connector-1")
    leaked = [("-s", "10.0.0.0/8"), ("-d", "10.0.0.0/8")]
    with wan_probe(kernel_lab, PROBE_IP) as probe:
        had_default = bool(sh("ip", "-n", edge.netns, "route", "show", "default").stdout.strip())
        if not had_default:  # a real edge's router: where a packet falls back to without a tunnel
            sh("ip", "-n", edge.netns, "route", "add", "default", "via", PROBE_IP)
        for match in leaked:
            add_counter(probe, *match)
        ping = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-n", "-q", "-i", "0.1", "-W", "1",
                                 dst.ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            old = kernel_lab.pids["charon-edge-1"]
            os.kill(old, signal.SIGKILL)
            stop_pid(old)
            assert _delete_charons_policies_and_sas(edge.netns) > 0
            time.sleep(3)  # pods keep sending while the tunnel is gone
            assert not ping_ok(src.netns, dst.ip)
            host = Host(name="edge-1", netns=edge.netns, wan_ip=edge.wan_ip,
                        directory=Path(kernel_lab.directory) / "hosts" / "edge-1")
            kernel_lab.pids["charon-edge-1"] = host.start_charon(backend=kernel_lab.backend).pid
            kernel_lab.save()
            wait_for(lambda: "connector-1" in established(kernel_lab, "edge-1"), timeout=90,
                     what="edge-1's tunnel to the connector to come back")
            wait_for(lambda: ping_ok(src.netns, dst.ip), timeout=60, what="edge-1's pod to reach connector-1's again")
        finally:
            ping.send_signal(signal.SIGINT)
            ping.wait(timeout=10)
            if not had_default:
                sh("ip", "-n", edge.netns, "route", "del", "default", "via", PROBE_IP, check=False)
        assert counted(probe) == 0, sh("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", ns=probe).stdout
