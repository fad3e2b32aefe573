"""The xfrm bypass driver against a real kernel, each test in its own throwaway namespaces.

Assertions read the namespace back with ``ip xfrm policy list`` (``ip -j xfrm`` prints no JSON) or
send real packets; ``XfrmPolicies.writes`` is only used to prove that a resync with nothing to do
writes nothing. The functional tests stand in for charon with hand-written tunnel policies: with a
template and no SA, a matching packet is dropped (``XfrmOutNoStates``, ``XfrmInTmplMismatch``),
which is what a local packet caught by the connector tunnel's policies would suffer.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from fabmesh.mesh.dataplane import (
    BLOCK_PRIORITY,
    DEFAULT_PRIORITY,
    Direction,
    XfrmAction,
    XfrmPolicy,
    block_policies,
    bypass_policies,
)
from fabmesh.xfrm.driver import PoliciesNotApplied, XfrmPolicies

pytestmark = pytest.mark.dataplane

POD_CIDR = "10.233.1.0/24"
NODE_IP = "192.0.2.10"
EDGE_POOL = "10.233.0.0/16"
# What strongSwan 5.9 gives a routed /16 === /16 child: 2 * 200000 - (16 + 16) * 512 - 1.
CHARON_PRIORITY = "383615"
TO_CONNECTOR = "tmpl src 198.51.100.1 dst 198.51.100.2 proto esp mode tunnel"
FROM_CONNECTOR = "tmpl src 198.51.100.2 dst 198.51.100.1 proto esp mode tunnel"


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


def add_policy(netns: str, spec: str) -> None:
    """``ip xfrm policy add <spec>`` in ``netns``, as a person would type it."""
    ip(netns, "xfrm", "policy", "add", *spec.split())


def observed_policies(netns: str) -> set[str]:
    """Every xfrm policy of the namespace, one line each, whitespace collapsed."""
    found: list[list[str]] = []
    for line in ip(netns, "xfrm", "policy", "list").splitlines():
        if line.strip():
            if line[0].isspace() and found:
                found[-1].extend(line.split())
            else:
                found.append(line.split())
    return {" ".join(words) for words in found}


def bypass_line(src: str, dst: str, direction: str, priority: int = DEFAULT_PRIORITY) -> str:
    return f"src {src} dst {dst} dir {direction} priority {priority} ptype main"


def add_tunnel_policies(netns: str, selector: str = EDGE_POOL) -> None:
    """What charon installs for a tunnel carrying ``selector`` both ways, with templates and no SA."""
    sel = f"src {selector} dst {selector}"
    add_policy(netns, f"{sel} dir out priority {CHARON_PRIORITY} {TO_CONNECTOR}")
    add_policy(netns, f"{sel} dir in priority {CHARON_PRIORITY} {FROM_CONNECTOR}")
    add_policy(netns, f"{sel} dir fwd priority {CHARON_PRIORITY} {FROM_CONNECTOR}")


def xfrm_stat(netns: str, counter: str) -> int:
    argv = ["ip", "netns", "exec", netns, "cat", "/proc/net/xfrm_stat"]
    text = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return next(int(line.split()[1]) for line in text.splitlines() if line.split()[0] == counter)


def pings(netns: str, destination: str) -> bool:
    argv = ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", "-q", destination]
    return subprocess.run(argv, capture_output=True, text=True).returncode == 0


@pytest.fixture
def more_netns() -> Iterator[Callable[[], str]]:
    """Make further empty namespaces (loopback up) on demand; all deleted afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"fmt{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def veth_to(host: str, pod: str, host_end: str) -> None:
    ip(host, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod)
    ip(host, "link", "set", host_end, "up")
    ip(pod, "link", "set", "eth0", "up")


# -- plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnets", "pairs"),
    [
        pytest.param([], set(), id="nothing-local"),
        pytest.param([POD_CIDR], {(POD_CIDR, POD_CIDR)}, id="pod-cidr-to-itself"),
        pytest.param(
            [POD_CIDR, NODE_IP],
            {
                (POD_CIDR, POD_CIDR),
                (POD_CIDR, "192.0.2.10/32"),
                ("192.0.2.10/32", POD_CIDR),
                ("192.0.2.10/32", "192.0.2.10/32"),
            },
            id="pod-cidr-and-node-ip-every-ordered-pair",
        ),
        pytest.param([POD_CIDR, "10.233.1.1/32"], {(POD_CIDR, POD_CIDR)}, id="gateway-inside-pod-cidr-merged"),
        pytest.param(["10.233.1.0/25", "10.233.1.128/25"], {(POD_CIDR, POD_CIDR)}, id="adjacent-halves-merged"),
        pytest.param(
            [POD_CIDR, "FD00:233:1::/64"],
            {(POD_CIDR, POD_CIDR), ("fd00:233:1::/64", "fd00:233:1::/64")},
            id="dual-stack-never-crosses-families",
        ),
    ],
)
def test_bypass_policies_cover_every_ordered_pair_of_local_subnets_in_every_direction(
    subnets: list[str], pairs: set[tuple[str, str]]
) -> None:
    policies = bypass_policies(subnets, priority=7)

    assert policies == {XfrmPolicy(s, d, direction, 7) for s, d in pairs for direction in Direction}
    assert len(policies) == 3 * len(pairs)


def test_bypass_policy_is_canonical_and_refuses_what_could_not_be_recognised_as_ours() -> None:
    policy = XfrmPolicy("10.1.0.7", "10.2.0.0/16", "out", 5)  # type: ignore[arg-type]
    assert (policy.src, policy.dst, policy.direction) == ("10.1.0.7/32", "10.2.0.0/16", Direction.OUT)
    assert XfrmPolicy("FD00:0::1", "fd00::/64", Direction.IN).src == "fd00::1/128"
    with pytest.raises(ValueError, match="families"):
        XfrmPolicy("10.1.0.0/24", "fd00::/64", Direction.IN)
    with pytest.raises(ValueError, match="priority 0"):
        XfrmPolicy("10.1.0.0/24", "10.1.0.0/24", Direction.IN, 0)
    with pytest.raises(ValueError):
        XfrmPolicy("10.1.0.1/24", "10.1.0.0/24", Direction.IN)


# -- reconciler ----------------------------------------------------------------------------------


def test_set_installs_the_bypass_policies_and_repeating_it_writes_nothing(netns: str) -> None:
    xp = XfrmPolicies(netns)
    desired = bypass_policies([POD_CIDR, NODE_IP])

    changes = xp.set(desired)

    assert observed_policies(netns) == {
        bypass_line(s, d, direction)
        for s in (POD_CIDR, "192.0.2.10/32")
        for d in (POD_CIDR, "192.0.2.10/32")
        for direction in ("out", "in", "fwd")
    }
    assert len(changes) == 12
    assert xp.writes == 12
    assert xp.list() == desired

    assert xp.set(sorted(desired, reverse=True)) == []
    assert xp.writes == 12
    assert XfrmPolicies(netns).set(desired) == []  # a restarted agent compares equal too


def test_stale_bypass_is_removed_and_a_new_priority_is_written_in_place(netns: str) -> None:
    xp = XfrmPolicies(netns)
    xp.set(bypass_policies([POD_CIDR, NODE_IP]))

    changes = xp.set(bypass_policies([POD_CIDR], priority=9))

    assert observed_policies(netns) == {bypass_line(POD_CIDR, POD_CIDR, d, 9) for d in ("out", "in", "fwd")}
    assert sum(c.startswith("action=update-") for c in changes) == 3
    assert sum(c.startswith("action=delete-") for c in changes) == 9
    assert set(xp.set([])) == {
        f"action=delete-xfrm-bypass dir={d} src={POD_CIDR} dst={POD_CIDR} priority=9" for d in ("out", "in", "fwd")
    }
    assert observed_policies(netns) == set()


def test_policies_fabmesh_does_not_own_are_left_alone(netns: str) -> None:
    add_policy(netns, f"src 10.0.0.0/8 dst 10.1.0.0/16 dir out {TO_CONNECTOR}")
    # Shaped like ours but outside the band, or with a mark, or blocking, or carrying a template.
    add_policy(netns, "src 10.9.0.0/24 dst 10.9.0.0/24 dir out")
    add_policy(netns, "src 10.8.0.0/24 dst 10.8.0.0/24 dir out priority 5 mark 0x10 mask 0xff")
    add_policy(netns, "src 10.7.0.0/24 dst 10.7.0.0/24 dir fwd priority 5 action block")
    add_policy(netns, f"src 10.6.0.0/24 dst 10.6.0.0/24 dir in priority 5 {FROM_CONNECTOR}")
    foreign = observed_policies(netns)
    assert len(foreign) == 5
    xp = XfrmPolicies(netns)

    assert xp.list() == set()
    xp.set(bypass_policies([POD_CIDR]))
    assert observed_policies(netns) == foreign | {bypass_line(POD_CIDR, POD_CIDR, d) for d in ("out", "in", "fwd")}
    assert xp.list() == bypass_policies([POD_CIDR])

    xp.set([])
    assert observed_policies(netns) == foreign
    assert any("tmpl src 198.51.100.1 dst 198.51.100.2 proto esp" in line for line in observed_policies(netns))


def test_selector_held_by_a_foreign_tunnel_policy_is_reported_not_taken_over(netns: str) -> None:
    add_policy(netns, f"src {POD_CIDR} dst {POD_CIDR} dir out priority {CHARON_PRIORITY} {TO_CONNECTOR}")
    xp = XfrmPolicies(netns)

    with pytest.raises(PoliciesNotApplied, match="does not own") as raised:
        xp.set(bypass_policies([POD_CIDR]))

    assert [f.policy.direction for f in raised.value.failures] == [Direction.OUT]
    assert len(raised.value.changes) == 2
    assert xp.list() == {XfrmPolicy(POD_CIDR, POD_CIDR, d) for d in (Direction.IN, Direction.FWD)}
    held = [line for line in observed_policies(netns) if "dir out" in line]
    assert len(held) == 1 and "tmpl" in held[0] and f"priority {CHARON_PRIORITY}" in held[0]


def test_bypass_written_with_host_bits_is_replaced_by_the_canonical_one(netns: str) -> None:
    add_policy(netns, f"src 10.233.1.1/24 dst {POD_CIDR} dir out priority 5")
    xp = XfrmPolicies(netns)
    out = XfrmPolicy(POD_CIDR, POD_CIDR, Direction.OUT)

    assert xp.list() == {out}
    assert xp.set([out]) == [f"action=add-xfrm-bypass {out}", f"action=delete-xfrm-bypass {out}"]
    assert observed_policies(netns) == {bypass_line(POD_CIDR, POD_CIDR, "out")}
    assert xp.set([out]) == []


def test_missing_namespace_is_an_error_naming_it() -> None:
    with pytest.raises(RuntimeError, match="fmtmissing"):
        XfrmPolicies("fmtmissing0").list()


# -- packets -------------------------------------------------------------------------------------


def test_host_reaches_a_local_pod_through_the_edge_pool_tunnel_only_with_the_bypass(
    netns: str, more_netns: Callable[[], str]
) -> None:
    host, pod = netns, more_netns()
    veth_to(host, pod, "fmv0")
    ip(host, "addr", "add", "10.233.1.1/24", "dev", "fmv0")
    ip(host, "route", "add", EDGE_POOL, "dev", "fmv0")  # the connector's tunnel would carry the rest
    ip(pod, "addr", "add", "10.233.1.2/24", "dev", "eth0")
    assert pings(host, "10.233.1.2")
    add_tunnel_policies(host)

    assert not pings(host, "10.233.1.2"), "the edge-pool tunnel policy swallows local traffic"
    assert xfrm_stat(host, "XfrmOutNoStates") > 0

    XfrmPolicies(host).set(bypass_policies([POD_CIDR]))
    assert pings(host, "10.233.1.2")

    # A remote pod in the pool still meets the tunnel's policy, not the bypass.
    before = xfrm_stat(host, "XfrmOutNoStates")
    assert not pings(host, "10.233.2.5")
    assert xfrm_stat(host, "XfrmOutNoStates") > before

    XfrmPolicies(host).set([])
    assert not pings(host, "10.233.1.2")


def test_pod_to_pod_routed_through_the_host_needs_the_fwd_and_out_bypass(
    netns: str, more_netns: Callable[[], str]
) -> None:
    host, pod_a, pod_b = netns, more_netns(), more_netns()
    subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    for pod, device, address in ((pod_a, "fmva", "10.233.1.2"), (pod_b, "fmvb", "10.233.1.3")):
        # Point-to-point pods, as with per-pod routes instead of a bridge: the host routes between them.
        veth_to(host, pod, device)
        ip(host, "addr", "add", "10.233.1.1/32", "dev", device)
        ip(host, "route", "add", f"{address}/32", "dev", device)
        ip(pod, "addr", "add", f"{address}/32", "dev", "eth0")
        ip(pod, "route", "add", "10.233.1.1/32", "dev", "eth0")
        ip(pod, "route", "add", "default", "via", "10.233.1.1", "dev", "eth0")
    assert pings(pod_a, "10.233.1.3")
    add_tunnel_policies(host)
    assert not pings(pod_a, "10.233.1.3")

    bypass = bypass_policies([POD_CIDR])
    XfrmPolicies(host).set(p for p in bypass if p.direction is not Direction.FWD)
    assert not pings(pod_a, "10.233.1.3"), "without fwd the tunnel's fwd policy drops forwarded packets"

    XfrmPolicies(host).set(bypass)
    assert pings(pod_a, "10.233.1.3")


# -- block policies (fail closed) ------------------------------------------------------------------

CLOUD_PODS = "10.244.0.0/16"


def _arrived(netns: str) -> int:
    """Packets for the cloud pods counted on arrival in ``netns`` (raw PREROUTING, before anything drops them)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x",
                          "-n"], check=True, capture_output=True, text=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.strip())


def test_block_policies_are_written_listed_and_a_resync_writes_nothing(netns: str) -> None:
    ip(netns, "link", "add", "fmw0", "type", "veth", "peer", "name", "fmw1")
    desired = block_policies([([POD_CIDR, NODE_IP], [CLOUD_PODS])], dev="fmw0") | bypass_policies([POD_CIDR])
    xp = XfrmPolicies(netns)

    xp.set(desired)

    assert {line for line in observed_policies(netns) if "block" in line} == {
        f"src {s} dst {CLOUD_PODS} dev fmw0 dir {d} action block priority {BLOCK_PRIORITY} ptype main"
        for s in (POD_CIDR, "192.0.2.10/32") for d in ("out", "fwd")
    }
    assert xp.list() == desired
    writes = xp.writes
    assert XfrmPolicies(netns).set(desired) == [] and xp.set(desired) == [] and xp.writes == writes
    assert all(c.startswith("action=delete-xfrm-block") for c in xp.set(bypass_policies([POD_CIDR])))
    with pytest.raises(ValueError, match="block"):
        XfrmPolicy(POD_CIDR, CLOUD_PODS, Direction.OUT, DEFAULT_PRIORITY, XfrmAction.BLOCK)


def test_without_a_tunnel_policy_the_block_drops_what_the_route_would_send_out_in_clear(
    netns: str, more_netns: Callable[[], str]
) -> None:
    host, wan, pod = netns, more_netns(), more_netns()
    subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    ip(host, "link", "add", "fmw0", "type", "veth", "peer", "name", "eth0", "netns", wan)
    ip(host, "addr", "add", "198.51.100.1/24", "dev", "fmw0")
    ip(host, "link", "set", "fmw0", "up")
    ip(wan, "addr", "add", "198.51.100.2/24", "dev", "eth0")
    ip(wan, "link", "set", "eth0", "up")
    subprocess.run(["ip", "netns", "exec", wan, "iptables", "-t", "raw", "-A", "PREROUTING", "-d", CLOUD_PODS],
                   check=True)
    veth_to(host, pod, "fmp0")
    ip(host, "addr", "add", "10.233.1.1/24", "dev", "fmp0")
    ip(pod, "addr", "add", "10.233.1.2/24", "dev", "eth0")
    ip(pod, "route", "add", "default", "via", "10.233.1.1")
    # What table 2620 does with kernel ESP: the cloud pods go out of the uplink, the xfrm policy encrypts them.
    ip(host, "route", "add", CLOUD_PODS, "via", "198.51.100.2", "src", "10.233.1.1")

    def sent(netns: str, source: str) -> int:
        before = _arrived(wan)
        subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", source,
                        "10.244.1.5"], capture_output=True)
        return _arrived(wan) - before

    # No tunnel policy (its CHILD_SA is down): in clear, from the host and forwarded from the pod.
    assert sent(host, "10.233.1.1") == 2 and sent(pod, "10.233.1.2") == 2

    XfrmPolicies(host).set(block_policies([([POD_CIDR], [CLOUD_PODS])], dev="fmw0"))
    blocked = xfrm_stat(host, "XfrmOutPolBlock")
    assert sent(host, "10.233.1.1") == 0 and sent(pod, "10.233.1.2") == 0
    assert xfrm_stat(host, "XfrmOutPolBlock") > blocked

    # charon's policies (out and outbound fwd, at its priority, same addresses: the block's device keeps
    # them from replacing it) override the block while the SA is up. No ESP here, so they stand in
    # without a template: packets then leave as the tunnel would take them.
    for direction in ("out", "fwd"):
        add_policy(host, f"src {POD_CIDR} dst {CLOUD_PODS} dir {direction} priority {CHARON_PRIORITY}")
    assert sent(host, "10.233.1.1") == 2 and sent(pod, "10.233.1.2") == 2
