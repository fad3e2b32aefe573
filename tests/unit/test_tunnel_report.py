"""What a node reports about its tunnels (from list-sas) and when it writes it: the API write budget's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabmesh.mesh.tunnelstatus import NodeReport, TunnelState, config_generation
from fabmesh.node.report import decide, observe, waiting_peers

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
CHILD = {"c": {"state": "INSTALLED", "bytes-in": "100", "bytes-out": "40", "packets-in": "2", "packets-out": "1"}}


def sa(state: str = "ESTABLISHED", children: dict[str, Any] | None = None, tasks: list[str] | None = None,
       **extra: str) -> dict[str, Any]:
    return {"state": state, "established": "60", "local-host": "10.0.0.2", "local-port": "4500",
            "remote-host": "198.51.100.1", "remote-port": "4500", "child-sas": CHILD if children is None else children,
            "tasks-active": tasks or [], **extra}


STATE_CASES = {
    "no-sa-is-down": (None, False, TunnelState.DOWN),
    "connecting": (sa("CONNECTING"), False, TunnelState.CONNECTING),
    "established-without-child-is-connecting": (sa(children={}), False, TunnelState.CONNECTING),
    "established-with-child-is-up": (sa(), False, TunnelState.UP),
    "one-dpd-in-flight-is-still-up": (sa(tasks=["IKE_DPD"]), False, TunnelState.UP),
    "dpd-waiting-on-two-polls-is-unresponsive": (sa(tasks=["IKE_DPD"]), True, TunnelState.UNRESPONSIVE),
    "dpd-answered-since-last-poll-is-up": (sa(), True, TunnelState.UP),
}


@pytest.mark.parametrize(("the_sa", "waited", "state"), STATE_CASES.values(), ids=STATE_CASES.keys())
def test_tunnel_state_from_list_sas(the_sa: dict[str, Any] | None, waited: bool, state: TunnelState) -> None:
    report = observe("edge", ["p"], {"p": the_sa} if the_sa else {}, NOW, None,
                     frozenset({"p"}) if waited else frozenset(), generation="g", last_error="",
                     nat_keepalive_s=20)
    assert report.tunnels[0].state is state


def report_of(sas: dict[str, Any], previous: NodeReport | None = None, now: datetime = NOW,
              peers: tuple[str, ...] = ("conn", "e2"), **kw: Any) -> NodeReport:
    return observe("edge", peers, sas, now, previous, kw.pop("waited", frozenset()), generation="g",
                   last_error=kw.pop("last_error", ""), nat_keepalive_s=20, **kw)


def test_report_carries_endpoints_nat_and_counters_and_counts_up_over_expected() -> None:
    report = report_of({"conn": sa(**{"nat-local": "yes", "initiator": "yes"})})
    conn, e2 = report.tunnels
    assert (conn.local_endpoint, conn.remote_endpoint, conn.nat_local, conn.nat_remote, conn.initiator) == (
        "10.0.0.2:4500", "198.51.100.1:4500", True, False, True)
    assert (conn.bytes_in, conn.bytes_out, conn.packets_in, conn.packets_out) == (100, 40, 2, 1)
    assert conn.since == "2026-12-02T00:59:00Z"  # established 60 s ago
    assert (e2.state, e2.since) == (TunnelState.DOWN, "2026-12-02T01:00:00Z")
    assert (report.tunnels_up, report.tunnels_expected) == (1, 2)


def test_since_holds_while_the_state_holds_and_moves_when_it_changes() -> None:
    first = report_of({})
    later = report_of({}, first, NOW + timedelta(seconds=30))
    assert later.tunnels[1].since == first.tunnels[1].since
    up = report_of({"e2": sa()}, later, NOW + timedelta(seconds=60))
    assert up.tunnels[1].since == "2026-12-02T01:00:00Z"  # established 60 s before this poll


def test_a_connector_lists_only_tunnels_not_up_beyond_the_limit_with_complete_counts() -> None:
    peers = tuple(f"e{i:03d}" for i in range(10))
    report = report_of({p: sa() for p in peers[:8]}, peers=peers, max_listed=5)
    assert [t.peer for t in report.tunnels] == ["e008", "e009"]
    assert (report.tunnels_up, report.tunnels_expected, report.truncated) == (8, 10, True)


def test_waiting_peers_are_those_with_a_dpd_in_flight() -> None:
    assert waiting_peers({"a": sa(tasks=["IKE_DPD"]), "b": sa(tasks=["IKE_REKEY"]), "c": sa()}) == {"a"}


BASE = report_of({"conn": sa(), "e2": sa()})
COUNTERS_ONLY = report_of({"conn": sa(children={"c": {**CHILD["c"], "bytes-in": "999999"}}), "e2": sa()}, BASE)
CHANGED = report_of({"conn": sa()}, BASE)  # e2 went down

DECIDE_CASES = {
    "first-write": (BASE, None, None, 0, True, "first"),
    "unchanged-waits": (BASE, BASE, NOW, 100, False, "unchanged"),
    "counters-only-wait": (COUNTERS_ONLY, BASE, NOW, 100, False, "unchanged"),
    "heartbeat-after-its-period": (COUNTERS_ONLY, BASE, NOW, 300, True, "heartbeat"),
    "change-after-min-interval": (CHANGED, BASE, NOW, 10, True, "changed"),
    "change-inside-min-interval-waits": (CHANGED, BASE, NOW, 3, False, "rate-limited"),
    "error-is-a-change": (report_of({"conn": sa(), "e2": sa()}, BASE, last_error="routes: EPERM"), BASE, NOW, 20,
                          True, "changed"),
    "clock-stepped-back-writes": (CHANGED, BASE, NOW, -3600, True, "changed"),
}


@pytest.mark.parametrize(("report", "written", "written_at", "elapsed", "write", "reason"), DECIDE_CASES.values(),
                         ids=DECIDE_CASES.keys())
def test_decide(report: NodeReport, written: NodeReport | None, written_at: datetime | None, elapsed: float,
                write: bool, reason: str) -> None:
    decision = decide(report, written, written_at, NOW + timedelta(seconds=elapsed), 10, 300)
    assert (decision.write, decision.reason) == (write, reason)


def test_rate_limited_says_when_to_try_again() -> None:
    assert decide(CHANGED, BASE, NOW, NOW + timedelta(seconds=3), 10, 300).retry_in_s == 7


def test_write_rate_of_a_flapping_node_is_bounded_by_the_min_interval() -> None:
    """An hour of a tunnel flapping every poll (5 s): no more than one write per min interval."""
    written, at, writes = None, None, 0
    for i in range(720):
        now = NOW + timedelta(seconds=5 * i)
        report = report_of({"conn": sa()} if i % 2 else {"conn": sa(), "e2": sa()}, written, now)
        if decide(report, written, at, now, 10, 300).write:
            written, at, writes = report, now, writes + 1
    assert writes <= 3600 / 10


def test_config_generation_depends_on_every_file_and_its_name() -> None:
    base = config_generation({"mesh.yaml": "a", "peers-00.yaml": "b"})
    assert base == config_generation({"peers-00.yaml": "b", "mesh.yaml": "a"})
    assert base != config_generation({"mesh.yaml": "a", "peers-01.yaml": "b"})
    assert base != config_generation({"mesh.yaml": "a", "peers-00.yaml": "c"})
    assert base != config_generation({"mesh.yaml": "a"})
