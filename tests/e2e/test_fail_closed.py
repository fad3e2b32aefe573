"""Fail closed: no pod packet leaves a node in clear, no forged cleartext packet reaches a pod.

Both are watched from outside the node under test: a probe namespace of our own on edge-1's side
of the network (its site LAN behind the NAT router, a neighbour there being the closest an
attacker without the tunnel gets; the WAN for an edge without NAT) counts what arrives there (it is
edge-1's default gateway for the leak test, as its router would be) and sends the forged datagrams.
Counters are raw PREROUTING rules, which
see a packet before any filtering. The lab runs the libipsec backend (the kernel one needs ESP in
the kernel); the kernel backend's block policies are proved in tests/dataplane/test_xfrm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import Host, sh, stop_pid, wait_for
from tests.e2e.helpers import (
    add_counter,
    counted,
    established,
    forged_datagrams_delivered,
    lan_probe,
    ping_ok,
    pod,
)

pytestmark = pytest.mark.e2e


def test_forged_cleartext_from_the_wan_with_a_cloud_pod_source_is_not_forwarded_to_an_edge_pod(
        running_lab: LabState) -> None:
    edge, target, forged = running_lab.host("edge-1"), pod(running_lab, "edge-1"), pod(running_lab, "cloud-2")
    with lan_probe(running_lab, "edge-1") as (probe, _):
        delivered = forged_datagrams_delivered(probe, edge, target, forged.ip)
    assert delivered == 0, "a forged cleartext datagram was delivered to edge-1's pod"
    assert ping_ok(pod(running_lab, "cloud-2").netns, target.ip, count=3)  # the real one still gets through


def test_no_pod_packet_leaves_an_edge_in_clear_while_its_charon_is_down_and_restarting(
        running_lab: LabState) -> None:
    edge, src, dst = running_lab.host("edge-1"), pod(running_lab, "edge-1"), pod(running_lab, "cloud-2")
    leaked = [("-s", "10.0.0.0/8"), ("-d", "10.0.0.0/8")]
    with lan_probe(running_lab, "edge-1") as (probe, probe_ip):
        # The probe takes the router's place as edge-1's default gateway: where a packet falls back to
        # without a tunnel.
        old_default = sh("ip", "-n", edge.netns, "route", "show", "default").stdout.split()
        connector = running_lab.host("connector-1").wan_ip  # IKE keeps its way to the connector: ESP only
        if old_default:
            sh("ip", "-n", edge.netns, "route", "add", f"{connector}/32", *old_default[1:])
        sh("ip", "-n", edge.netns, "route", "replace", "default", "via", probe_ip)
        for match in leaked:
            add_counter(probe, *match)
        ping = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-n", "-q", "-i", "0.05", "-W", "1",
                                 dst.ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            old = running_lab.pids["charon-edge-1"]
            os.kill(old, signal.SIGKILL)
            stop_pid(old)
            wait_for(lambda: sh("ip", "-n", edge.netns, "link", "show", "ipsec0", check=False).returncode != 0,
                     timeout=10, what="ipsec0 to go with charon")
            time.sleep(2)  # pods keep sending while the tunnel is gone
            host = Host(name="edge-1", netns=edge.netns, wan_ip=edge.wan_ip,
                        directory=Path(running_lab.directory) / "hosts" / "edge-1")
            running_lab.pids["charon-edge-1"] = host.start_charon().pid
            running_lab.save()
            wait_for(lambda: "connector-1" in established(running_lab, "edge-1"), timeout=40,
                     what="edge-1's tunnel to the connector to come back")
            wait_for(lambda: ping_ok(src.netns, dst.ip), timeout=20, what="edge-1's pod to reach cloud-2's again")
        finally:
            ping.send_signal(signal.SIGINT)
            ping.wait(timeout=10)
            if old_default:
                sh("ip", "-n", edge.netns, "route", "replace", *old_default, check=False)
                sh("ip", "-n", edge.netns, "route", "del", f"{connector}/32", check=False)
            else:
                sh("ip", "-n", edge.netns, "route", "del", "default", "via", probe_ip, check=False)
        assert counted(probe) == 0, sh("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", ns=probe).stdout
