"""fabmesh's chains next to kube-proxy's: our first-position rules must not skip what kube-proxy does.

kube-proxy is not built in this project yet (issue 13): the chains below are kube-proxy's rules as
its iptables mode (v1.37) writes them, typed in by this test with iptables-restore, not a running
kube-proxy. What they must keep doing with fabmesh's chains jumped to first:

* ``KUBE-FORWARD`` drops packets conntrack calls INVALID (``--ctstate INVALID -j DROP``);
* a packet ``KUBE-MARK-MASQ`` marked (0x4000/0x4000) is masqueraded by ``KUBE-POSTROUTING``.

The node is a namespace with a pod behind ``fmp0`` and a stand-in for libipsec's TUN: a veth named
``ipsec0`` whose far end holds a "remote" pod address, so packets "through the tunnel" are real
forwarded packets on a device of that name. The fabmesh side is what ``desired_state`` plans for a
libipsec edge, applied by the ordinary drivers.
"""

from __future__ import annotations

import datetime
import subprocess
import textwrap
import uuid
from collections.abc import Callable, Iterator

import pytest

from fabmesh.firewall.ipset import IPSets
from fabmesh.firewall.iptables import IPTables
from fabmesh.mesh.model import Backend, LocalNode, NodeMesh, Peer, Role, TunnelSettings
from fabmesh.node.desired import desired_state
from fabmesh.pki.authority import new_ca

pytestmark = pytest.mark.dataplane

POD, GATEWAY, REMOTE_POD, VIP = "10.233.1.2", "10.233.1.1", "10.244.1.5", "10.96.0.10"
MESH_CIDRS = ("10.233.0.0/16", "10.244.0.0/16", "10.96.0.0/12")
KUBE_PROXY_RULES = f"""\
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" \
-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SVC-TEST - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -d {VIP}/32 -p udp -m udp --dport 53 -j KUBE-SVC-TEST
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SVC-TEST -j KUBE-MARK-MASQ
-A KUBE-SVC-TEST -p udp -m udp -j DNAT --to-destination {REMOTE_POD}:53
COMMIT
"""
# Run in the remote namespace: one TCP segment with SYN and FIN set, which conntrack calls INVALID.
SYN_FIN = textwrap.dedent(f"""\
    import socket, struct
    src, dst = socket.inet_aton("{REMOTE_POD}"), socket.inet_aton("{POD}")
    def checksum(data):
        data += b"\\0" * (len(data) % 2)
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF
    header = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 5 << 4, 0x03, 1024, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.bind(("{REMOTE_POD}", 0))
    for _ in range(3):
        s.sendto(header, ("{POD}", 0))
""")


def run(netns: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True,
                          check=check).stdout


def count(netns: str, *match: str) -> Callable[[], int]:
    """A counting rule in raw PREROUTING of ``netns``; returns a reader of its packet count."""
    run(netns, "iptables", "-t", "raw", "-A", "PREROUTING", *match)

    def packets() -> int:
        out = run(netns, "iptables", "-t", "raw", "-S", "PREROUTING", "-v")
        line = next(line for line in out.splitlines() if " ".join(match) in line)
        return int(line.split(" -c ")[1].split()[0])
    return packets


@pytest.fixture
def node() -> Iterator[dict[str, str]]:
    """Namespaces ``node``, ``pod`` and ``remote`` wired as described in the module docstring."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"fmt{tag}{role[0]}" for role in ("node", "pod", "remote")}
    for name in names.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
        run(name, "ip", "link", "set", "lo", "up")
    try:
        n, p, r = names["node"], names["pod"], names["remote"]
        run(n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run(n, "ip", "link", "add", "fmp0", "type", "veth", "peer", "name", "eth0", "netns", p)
        run(n, "ip", "link", "add", "ipsec0", "type", "veth", "peer", "name", "eth0", "netns", r)
        run(n, "ip", "addr", "add", f"{GATEWAY}/24", "dev", "fmp0")
        for dev in ("fmp0", "ipsec0"):
            run(n, "ip", "link", "set", dev, "up")
        run(n, "ip", "route", "add", "10.244.0.0/16", "dev", "ipsec0", "src", GATEWAY)
        run(p, "ip", "addr", "add", f"{POD}/24", "dev", "eth0")
        run(p, "ip", "link", "set", "eth0", "up")
        run(p, "ip", "route", "add", "default", "via", GATEWAY)
        run(r, "ip", "addr", "add", f"{REMOTE_POD}/16", "dev", "eth0")
        run(r, "ip", "link", "set", "eth0", "up")
        run(r, "ip", "route", "add", "10.233.0.0/16", "via", GATEWAY, "dev", "eth0", "onlink")
        run(n, "iptables-restore", "--noflush", stdin=KUBE_PROXY_RULES)
        _apply_fabmesh(n)
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def _apply_fabmesh(netns: str) -> None:
    """What the agent writes for a libipsec edge whose connector tunnel carries the mesh CIDRs."""
    mesh = NodeMesh(
        node=LocalNode(name="edge-1", role=Role.EDGE, address="192.0.2.1", endpoint="198.51.100.1",
                       pod_cidr="10.233.1.0/24"),
        local_subnets=("10.233.1.0/24", "192.0.2.1/32"), mesh_cidrs=MESH_CIDRS,
        peers=(Peer(name="connector-1", role=Role.CONNECTOR, endpoint="198.51.100.250", subnets=MESH_CIDRS,
                    initiate=True),),
        caCert=new_ca(now=datetime.datetime.now(datetime.UTC)).cert_pem,
        tunnel=TunnelSettings(backend=Backend.LIBIPSEC))
    state = desired_state(mesh, "CERT")
    IPSets(netns).set(state.ipsets, prefix="FABMESH-")
    IPTables(netns, 4).set(state.chains, state.jumps, prefix="FABMESH-")
    save = run(netns, "iptables-save")
    for table, chain, ours in (("filter", "FORWARD", "FABMESH-FORWARD"), ("nat", "POSTROUTING", "FABMESH-POSTROUTING")):
        first = next(line for line in save.split(f"*{table}")[1].splitlines() if line.startswith(f"-A {chain} "))
        assert first.endswith(f"-j {ours}"), f"fabmesh's jump is not first in {table}/{chain}: {first}"


def test_an_invalid_packet_from_the_tunnel_is_still_dropped_by_kube_proxys_forward_chain(
        node: dict[str, str]) -> None:
    pod, remote = node["pod"], node["remote"]
    delivered = count(pod, "-p", "tcp", "-m", "tcp", "--dport", "8080")
    udp = count(pod, "-p", "udp", "-m", "udp", "--dport", "9")
    run(remote, "socat", "-u", "-", f"UDP:{POD}:9,bind={REMOTE_POD}", stdin="hello\n")
    assert udp() == 1, "a valid packet from the tunnel should reach the pod"

    run(remote, "python3", "-c", SYN_FIN)

    assert delivered() == 0, "an INVALID packet skipped KUBE-FORWARD's drop"


def test_a_packet_kube_proxy_marked_for_masquerade_is_still_masqueraded_into_the_tunnel(
        node: dict[str, str]) -> None:
    pod, remote = node["pod"], node["remote"]
    as_pod = count(remote, "-s", f"{POD}/32", "-p", "udp", "-m", "udp", "--dport", "53")
    as_node = count(remote, "-s", f"{GATEWAY}/32", "-p", "udp", "-m", "udp", "--dport", "53")

    run(pod, "socat", "-u", "-", f"UDP:{VIP}:53", stdin="query\n")

    assert (as_node(), as_pod()) == (1, 0), "the marked packet left without kube-proxy's MASQUERADE"
    direct = count(remote, "-s", f"{POD}/32", "-p", "udp", "-m", "udp", "--dport", "54")
    run(pod, "socat", "-u", "-", f"UDP:{REMOTE_POD}:54", stdin="direct\n")
    assert direct() == 1, "unmarked pod traffic into the tunnel must keep the pod's source address"
