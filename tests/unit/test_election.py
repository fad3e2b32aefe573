"""The leader-election decisions and the write fence, as tables (no API server)."""

from __future__ import annotations

import threading
import time

import pytest
import urllib3

from fabmesh.operator.election import Action, LeaseElector, LeaseView, NotLeader, decide, view, write_budget
from fabmesh.operator.health import Heartbeats, Limits, judge
from fabmesh.operator.settings import LeaderElection

ME, OTHER = "op-a", "op-b"


def lease(holder: str, duration: float = 15) -> LeaseView:
    return LeaseView(holder=holder, duration_s=duration, resource_version="7")


DECIDE = [
    ("no-lease-yet", None, 0, Action.CREATE),
    ("ours-renews", lease(ME), 0, Action.RENEW),
    ("ours-even-if-unchanged-long", lease(ME), 100, Action.RENEW),
    ("other-live-waits", lease(OTHER), 14.9, Action.WAIT),
    ("other-expired-on-our-clock", lease(OTHER), 15, Action.ACQUIRE),
    ("other-expired-its-own-duration", lease(OTHER, duration=5), 5, Action.ACQUIRE),
    ("other-long-duration-still-live", lease(OTHER, duration=60), 30, Action.WAIT),
    ("released-holder-empty", lease(""), 0, Action.ACQUIRE),
]


@pytest.mark.parametrize(("lease_", "unchanged_for", "expected"), [row[1:] for row in DECIDE],
                         ids=[row[0] for row in DECIDE])
def test_decide(lease_: LeaseView | None, unchanged_for: float, expected: Action) -> None:
    assert decide(lease_, ME, unchanged_for) is expected


VIEW = [
    ("absent", None, None),
    ("holder-and-duration", {"metadata": {"resourceVersion": "3"},
                             "spec": {"holderIdentity": OTHER, "leaseDurationSeconds": 6}}, lease(OTHER, 6)),
    ("empty-spec-is-free", {"metadata": {"resourceVersion": "3"}, "spec": {}}, lease("", 15)),
]


@pytest.mark.parametrize(("obj", "expected"), [row[1:] for row in VIEW], ids=[row[0] for row in VIEW])
def test_view(obj: dict | None, expected: LeaseView | None) -> None:
    got = view(obj, 15)
    assert got == (expected if expected is None else LeaseView(expected.holder, expected.duration_s, "3"))


SETTINGS = LeaderElection(lease_duration_s=15, renew_deadline_s=10, retry_period_s=2)
FENCE = [
    ("never-renewed", None, 100.0, None),
    ("just-renewed-may-take-until-lease-expiry", 100.0, 100.0, 15.0),
    ("mid-term", 100.0, 106.0, 9.0),
    ("just-before-deadline-keeps-the-margin", 100.0, 109.9, 5.1),
    ("at-deadline-refused", 100.0, 110.0, None),
    ("long-after-refused", 100.0, 500.0, None),
]


@pytest.mark.parametrize(("renewed_at", "now", "expected"), [row[1:] for row in FENCE],
                         ids=[row[0] for row in FENCE])
def test_write_budget(renewed_at: float | None, now: float, expected: float | None) -> None:
    got = write_budget(renewed_at, now, SETTINGS)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_the_fence_closes_before_any_standby_can_take_over() -> None:
    """Whatever the timing, a write allowed at t ends (by its timeout) before renewed_at + lease_duration."""
    for tenth in range(0, 200):
        now = 100.0 + tenth / 10
        budget = write_budget(100.0, now, SETTINGS)
        if budget is not None:
            assert now + budget <= 100.0 + SETTINGS.lease_duration_s
            assert now < 100.0 + SETTINGS.renew_deadline_s


LIMITS = Limits(elector_stall_s=30, contact_s=15, worker_stall_s=360)
HEALTH = [
    ("starting", Heartbeats(), LIMITS, (False, False)),
    ("standby-reaching-api", Heartbeats(elector=99, contact=99), LIMITS, (True, True)),
    ("standby-api-unreachable", Heartbeats(elector=99, contact=80), LIMITS, (True, False)),
    ("standby-loop-stalled", Heartbeats(elector=60, contact=60), LIMITS, (False, False)),
    ("leader-not-synced", Heartbeats(elector=99, contact=99, worker=99, leading=True), LIMITS, (True, False)),
    ("leader-synced", Heartbeats(elector=99, contact=99, worker=99, synced=98, leading=True), LIMITS,
     (True, True)),
    ("leader-worker-stalled", Heartbeats(elector=99, worker=-300, synced=-300, leading=True), LIMITS,
     (False, False)),
    ("no-election-leader", Heartbeats(worker=99, synced=99, leading=True),
     Limits(elector_stall_s=None, contact_s=15, worker_stall_s=360), (True, True)),
]


@pytest.mark.parametrize(("beats", "limits", "expected"), [row[1:] for row in HEALTH],
                         ids=[row[0] for row in HEALTH])
def test_judge(beats: Heartbeats, limits: Limits, expected: tuple[bool, bool]) -> None:
    verdict = judge(beats, limits, now=100.0)
    assert (verdict.live, verdict.ready) == expected, verdict.reason


class FlakyLeases:
    """A Lease store that answers until ``broken`` is set, then fails the way urllib3 does."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0
        self.broken = False

    def get(self, kind: str, name: str, namespace: str, timeout: float) -> dict | None:
        if self.broken:
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        return self.lease

    def _store(self, body: dict) -> dict:
        self.version += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        return self.lease

    def create(self, kind: str, body: dict, namespace: str, timeout: float) -> dict:
        return self._store(body)

    def replace(self, kind: str, body: dict, namespace: str, timeout: float) -> dict:
        return self._store(body)


def test_a_urllib3_error_during_renew_is_a_failed_renew_and_the_leader_gives_up_by_its_deadline() -> None:
    settings = LeaderElection(lease_duration_s=3, renew_deadline_s=2, retry_period_s=1)
    store = FlakyLeases()
    elector = LeaseElector(store, "ns", ME, settings)  # type: ignore[arg-type]
    stop = threading.Event()
    assert elector.acquire(stop)
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == ME
    elector.write_budget()  # leading: writes allowed
    store.broken = True
    started = time.monotonic()
    elector.hold(stop)  # returns, never raises
    assert time.monotonic() - started < settings.renew_deadline_s + 0.5
    with pytest.raises(NotLeader):
        elector.write_budget()


def test_a_leader_that_sees_another_holder_stops_at_once() -> None:
    settings = LeaderElection(lease_duration_s=3, renew_deadline_s=2, retry_period_s=1)
    store = FlakyLeases()
    elector = LeaseElector(store, "ns", ME, settings)  # type: ignore[arg-type]
    assert elector.acquire(threading.Event())
    assert store.lease is not None
    store._store({**store.lease, "spec": {**store.lease["spec"], "holderIdentity": OTHER}})
    elector.hold(threading.Event())
    with pytest.raises(NotLeader):
        elector.write_budget()
