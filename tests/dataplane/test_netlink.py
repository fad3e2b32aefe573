"""The netlink driver against a real kernel, each test in its own throwaway namespace.

Every assertion reads the namespace back with ``ip -j`` rather than trusting what
the driver says it did; ``Netlink.writes`` is only used to prove that a resync
with nothing to do sends nothing.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabmesh.mesh.dataplane import Route
from fabmesh.netlink.driver import (
    RTPROT_FABMESH,
    Netlink,
    NetlinkError,
    RouteChanges,
    RoutesNotApplied,
)

pytestmark = pytest.mark.dataplane

TABLE = 2620


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True)
    if done.returncode != 0 and "does not exist" in done.stderr:
        return []  # a table the kernel never created is an empty table
    done.check_returncode()
    return json.loads(done.stdout) if done.stdout.strip() else []


def add_device(netns: str, name: str) -> None:
    """A dummy device, up; a veth pair (peer ``<name>p``) on kernels built without the dummy driver."""
    dummy = subprocess.run(["ip", "-n", netns, "link", "add", name, "type", "dummy"], capture_output=True)
    if dummy.returncode != 0:
        ip(netns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        ip(netns, "link", "set", f"{name}p", "up")
    ip(netns, "link", "set", name, "up")


def observed_routes(netns: str, table: int) -> set[str]:
    """Every route of ``table``, both families, as "dst dev=.. via=.. src=.. mtu=.. proto=.."."""
    found = set()
    for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        for r in ip_json(netns, family, "route", "show", "table", str(table)):
            dst = default if r["dst"] == "default" else str(ipaddress.ip_network(r["dst"]))
            mtu = next((m["mtu"] for m in r.get("metrics", []) if "mtu" in m), "-")
            found.add(
                f"{dst} dev={r.get('dev', '-')} via={r.get('gateway', '-')} src={r.get('prefsrc', '-')} "
                f"mtu={mtu} proto={r.get('protocol', 'boot')}"
            )
    return found


@pytest.fixture
def ns(netns: str) -> str:
    """The test namespace with a device ``d0`` carrying 192.0.2.1/24 and 2001:db8:1::1/64."""
    add_device(netns, "d0")
    ip(netns, "addr", "add", "192.0.2.1/24", "dev", "d0")
    ip(netns, "-6", "addr", "add", "2001:db8:1::1/64", "dev", "d0", "nodad")
    return netns


@pytest.fixture
def nl(ns: str) -> Iterator[Netlink]:
    with Netlink(ns) as driver:
        yield driver


OURS = f"proto={RTPROT_FABMESH}"
DESIRED = (
    Route(dst="10.1.0.0/24", dev="d0", table=TABLE, mtu=1400),
    Route(dst="10.2.0.0/16", dev="d0", table=TABLE, gateway="192.0.2.9", src="192.0.2.1"),
    Route(dst="2001:db8:5::/64", dev="d0", table=TABLE, gateway="2001:db8:1::9"),
)
DESIRED_OBSERVED = {
    f"10.1.0.0/24 dev=d0 via=- src=- mtu=1400 {OURS}",
    f"10.2.0.0/16 dev=d0 via=192.0.2.9 src=192.0.2.1 mtu=- {OURS}",
    f"2001:db8:5::/64 dev=d0 via=2001:db8:1::9 src=- mtu=- {OURS}",
}


def test_bridge_is_created_up_with_address_and_mtu_and_a_second_call_writes_nothing(
    ns: str, nl: Netlink
) -> None:
    changes = nl.ensure_bridge("fmbr0", "10.233.1.1/24", mtu=1400)

    (link,) = ip_json(ns, "-d", "link", "show", "fmbr0")
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert link["mtu"] == 1400
    assert "UP" in link["flags"]
    (addrs,) = ip_json(ns, "addr", "show", "dev", "fmbr0")
    assert {(a["local"], a["prefixlen"]) for a in addrs["addr_info"] if a["family"] == "inet"} == {
        ("10.233.1.1", 24)
    }
    assert len(changes) == 4
    assert nl.link_index("fmbr0") == link["ifindex"]

    writes = nl.writes
    assert nl.ensure_bridge("fmbr0", "10.233.1.1/24", mtu=1400) == []
    assert nl.writes == writes
    assert ip_json(ns, "-d", "link", "show", "fmbr0")[0]["mtu"] == 1400


def test_bridge_name_held_by_another_kind_of_link_is_an_error(ns: str, nl: Netlink) -> None:
    with pytest.raises(NetlinkError, match="d0"):
        nl.ensure_bridge("d0", "10.233.1.1/24")
    assert "10.233.1.1" not in ip(ns, "addr", "show", "dev", "d0")


def test_set_routes_installs_routes_and_repeating_it_writes_nothing(ns: str, nl: Netlink) -> None:
    changes = nl.set_routes(TABLE, DESIRED)

    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED
    assert changes == RouteChanges(added=tuple(sorted(DESIRED)))
    assert nl.routes(TABLE) == sorted(DESIRED)

    writes = nl.writes
    assert not nl.set_routes(TABLE, reversed(DESIRED))
    assert nl.writes == writes
    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED


def test_stale_route_is_removed_and_route_with_new_attributes_is_replaced(ns: str, nl: Netlink) -> None:
    add_device(ns, "d1")
    nl.set_routes(TABLE, DESIRED)

    moved = Route(dst="10.1.0.0/24", dev="d1", table=TABLE)
    changes = nl.set_routes(TABLE, [moved, DESIRED[2]])

    assert observed_routes(ns, TABLE) == {
        f"10.1.0.0/24 dev=d1 via=- src=- mtu=- {OURS}",
        f"2001:db8:5::/64 dev=d0 via=2001:db8:1::9 src=- mtu=- {OURS}",
    }
    assert changes.added == (moved,)
    assert set(changes.removed) == {DESIRED[0], DESIRED[1]}


def test_routes_of_another_protocol_in_the_same_table_are_left_alone(ns: str, nl: Netlink) -> None:
    ip(ns, "route", "add", "10.9.0.0/24", "dev", "d0", "table", str(TABLE), "proto", "static")
    ip(ns, "-6", "route", "add", "2001:db8:9::/64", "dev", "d0", "table", str(TABLE))
    foreign = {
        "10.9.0.0/24 dev=d0 via=- src=- mtu=- proto=static",
        "2001:db8:9::/64 dev=d0 via=- src=- mtu=- proto=boot",
    }

    nl.set_routes(TABLE, DESIRED)
    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED | foreign
    assert nl.routes(TABLE) == sorted(DESIRED)

    nl.set_routes(TABLE, [])
    assert observed_routes(ns, TABLE) == foreign


def test_destination_held_by_a_foreign_route_is_reported_not_taken_over(ns: str, nl: Netlink) -> None:
    ip(ns, "route", "add", "10.1.0.0/24", "dev", "d0", "table", str(TABLE), "proto", "static")

    with pytest.raises(RoutesNotApplied, match=r"10\.1\.0\.0/24") as raised:
        nl.set_routes(TABLE, DESIRED)

    assert [f.route for f in raised.value.failures] == [DESIRED[0]]
    assert "protocol 4" in raised.value.failures[0].reason
    assert observed_routes(ns, TABLE) == (
        DESIRED_OBSERVED - {f"10.1.0.0/24 dev=d0 via=- src=- mtu=1400 {OURS}"}
    ) | {"10.1.0.0/24 dev=d0 via=- src=- mtu=- proto=static"}


def recreate_device(netns: str, name: str) -> None:
    ip(netns, "link", "del", name)
    add_device(netns, name)


CHURN_ROUTES = (
    Route(dst="10.3.0.0/24", dev="ipsec0", table=TABLE),
    Route(dst="2001:db8:3::/64", dev="ipsec0", table=TABLE, mtu=1380),
)
CHURN_OBSERVED = {
    f"10.3.0.0/24 dev=ipsec0 via=- src=- mtu=- {OURS}",
    f"2001:db8:3::/64 dev=ipsec0 via=- src=- mtu=1380 {OURS}",
}


@pytest.mark.parametrize(
    "drop",
    [
        pytest.param(
            lambda ns: ip(ns, "route", "del", "10.3.0.0/24", "table", str(TABLE)), id="ip-route-del"
        ),
        pytest.param(
            lambda ns: (ip(ns, "link", "set", "ipsec0", "down"), ip(ns, "link", "set", "ipsec0", "up")),
            id="device-down-and-up",
        ),
        pytest.param(lambda ns: recreate_device(ns, "ipsec0"), id="device-deleted-and-recreated"),
    ],
)
def test_route_the_kernel_dropped_is_readded_on_the_next_set(
    ns: str, nl: Netlink, drop: Callable[[str], object]
) -> None:
    add_device(ns, "ipsec0")
    nl.set_routes(TABLE, [*DESIRED, *CHURN_ROUTES])
    drop(ns)
    assert f"10.3.0.0/24 dev=ipsec0 via=- src=- mtu=- {OURS}" not in observed_routes(ns, TABLE)

    changes = nl.set_routes(TABLE, [*DESIRED, *CHURN_ROUTES])

    assert CHURN_ROUTES[0] in changes.added
    assert not changes.removed
    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED | CHURN_OBSERVED


def test_route_on_a_missing_device_is_named_in_the_error_and_the_others_are_applied(
    ns: str, nl: Netlink
) -> None:
    waiting = Route(dst="10.7.0.0/24", dev="ipsec0", table=TABLE)

    with pytest.raises(NetlinkError, match=r"10\.7\.0\.0/24.*ipsec0") as raised:
        nl.set_routes(TABLE, [*DESIRED, waiting])

    assert isinstance(raised.value, RoutesNotApplied)
    assert [(f.route, f.reason) for f in raised.value.failures] == [
        (waiting, "device 'ipsec0' does not exist")
    ]
    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED

    add_device(ns, "ipsec0")
    assert nl.set_routes(TABLE, [*DESIRED, waiting]).added == (waiting,)
    assert f"10.7.0.0/24 dev=ipsec0 via=- src=- mtu=- {OURS}" in observed_routes(ns, TABLE)


def test_route_moving_to_a_missing_device_keeps_the_old_route(ns: str, nl: Netlink) -> None:
    nl.set_routes(TABLE, DESIRED)

    with pytest.raises(RoutesNotApplied, match="ipsec0"):
        nl.set_routes(TABLE, [Route(dst="10.1.0.0/24", dev="ipsec0", table=TABLE), *DESIRED[1:]])

    assert observed_routes(ns, TABLE) == DESIRED_OBSERVED


def plain_rules(netns: str, table: int) -> list[tuple[int, str, str]]:
    return sorted(
        (r["priority"], r["src"] + ("/" + str(r["srclen"]) if "srclen" in r else ""), r.get("protocol", "-"))
        for r in ip_json(netns, "-4", "rule", "show")
        if r.get("table") == str(table)
    )


def test_ensure_rule_adds_one_rule_once_and_remove_rule_takes_only_ours(ns: str, nl: Netlink) -> None:
    assert nl.ensure_rule(TABLE, 1000) is True
    writes = nl.writes
    assert nl.ensure_rule(TABLE, 1000) is False
    assert nl.writes == writes
    assert plain_rules(ns, TABLE) == [(1000, "all", str(RTPROT_FABMESH))]

    # Put a narrower rule at the same priority: the kernel's delete would match it first
    # unless the driver pins our protocol.
    ip(ns, "rule", "add", "from", "10.0.0.0/8", "lookup", str(TABLE), "pref", "1000")
    assert nl.remove_rule(TABLE, 1000) is True
    assert plain_rules(ns, TABLE) == [(1000, "10.0.0.0/8", "-")]
    assert nl.remove_rule(TABLE, 1000) is False


def test_rule_added_by_hand_counts_as_present_and_is_not_removed(ns: str, nl: Netlink) -> None:
    ip(ns, "rule", "add", "from", "all", "lookup", str(TABLE), "pref", "1000", "proto", "static")

    assert nl.ensure_rule(TABLE, 1000) is False
    assert nl.remove_rule(TABLE, 1000) is False
    assert plain_rules(ns, TABLE) == [(1000, "all", "static")]


def test_missing_namespace_is_an_error_and_is_not_created(netns: str) -> None:
    absent = f"{netns}x"
    with pytest.raises(NetlinkError, match=absent):
        Netlink(absent)
    assert absent not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
