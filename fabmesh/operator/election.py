"""Leader election on a ``coordination.k8s.io/v1`` Lease, and the fence every write passes.

Why not the ``kubernetes`` package's elector: its Lease GET has no timeout and it
catches only ``ApiException``, so a urllib3 error during a renew escapes its loop
and a silent network blocks it for ever; either way ``onstopped_leading`` never
runs and the process goes on reconciling after a standby took over (split brain).

The rules are client-go's:

- a candidate takes the Lease when it has no holder, or when the record has not
  changed for ``leaseDurationSeconds`` *as seen on the candidate's own clock* (two
  hosts' clocks differ, so ``renewTime`` is never compared with ours);
- every write is a compare-and-swap on ``metadata.resourceVersion``: of two
  candidates one wins, the other gets 409;
- the leader renews every ``retry_period_s``; when no renew has succeeded for
  ``renew_deadline_s`` it has lost. A standby waits ``lease_duration_s`` after it
  last saw the record change, so a leader that stops at its renew deadline stops
  before anybody can take over.

The fence: :meth:`LeaseElector.write_budget` is asked before every write. It
refuses once the last successful renew is ``renew_deadline_s`` old, and otherwise
says how long the write may take so that it lands before a standby could take
over (the time between the deadline and the lease duration is that margin). A
request the network delivers later than its client gave up on it cannot be
fenced by any Lease elector (the API has no fencing tokens); the margin is all
there is, as in client-go.

:func:`decide` and :func:`write_budget` are the decisions, pure and
table-tested; :class:`LeaseElector` does the I/O.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fabmesh.kube.client import ApiError, Kube
from fabmesh.operator.settings import LeaderElection

log = logging.getLogger(__name__)
Clock = Callable[[], float]


class NotLeader(Exception):
    """Raised by the fence: this process may not write any more; it must exit."""


class Action(StrEnum):
    CREATE = "create"  # there is no Lease yet
    ACQUIRE = "acquire"  # free or expired: take it over
    RENEW = "renew"  # ours: renew it
    WAIT = "wait"  # another holder's, still live


@dataclass(frozen=True)
class LeaseView:
    """What a decision needs from a Lease."""

    holder: str
    duration_s: float
    resource_version: str


def view(lease: dict[str, Any] | None, default_duration_s: float) -> LeaseView | None:
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    return LeaseView(holder=spec.get("holderIdentity") or "",
                     duration_s=float(spec.get("leaseDurationSeconds") or default_duration_s),
                     resource_version=lease["metadata"]["resourceVersion"])


def decide(lease: LeaseView | None, identity: str, unchanged_for_s: float) -> Action:
    """What ``identity`` should do, given the Lease and how long (on our clock) it has looked the same."""
    if lease is None:
        return Action.CREATE
    if lease.holder == identity:
        return Action.RENEW
    if not lease.holder or unchanged_for_s >= lease.duration_s:
        return Action.ACQUIRE
    return Action.WAIT


def write_budget(renewed_at: float | None, now: float, settings: LeaderElection) -> float | None:
    """Seconds a write started ``now`` may take, or None when the leader must stop writing.

    ``renewed_at`` is when the last successful renew *started*: the API stored it
    later, and a standby saw it later still, so no standby can take over before
    ``renewed_at + lease_duration_s``.
    """
    if renewed_at is None or now - renewed_at >= settings.renew_deadline_s:
        return None
    return renewed_at + settings.lease_duration_s - now


def _micro_time(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Acquire, renew and fence on one Lease; every call is bounded by the time left before the deadline."""

    def __init__(self, kube: Kube, namespace: str, identity: str, settings: LeaderElection,
                 clock: Clock = time.monotonic) -> None:
        self.kube, self.ns, self.identity, self.settings, self.clock = kube, namespace, identity, settings, clock
        self.renewed_at: float | None = None  # start of the last successful acquire or renew
        self.contact_at: float | None = None  # last time the API answered us (readiness)
        self.holder: str | None = None  # as last observed
        self._observed: tuple[str, float] | None = None  # (resourceVersion, when we first saw it)

    @property
    def leading(self) -> bool:
        return write_budget(self.renewed_at, self.clock(), self.settings) is not None

    def write_budget(self) -> float:
        """The fence, asked before every write: seconds the write may take, or :class:`NotLeader`."""
        budget = write_budget(self.renewed_at, self.clock(), self.settings)
        if budget is None:
            raise NotLeader(f"identity={self.identity}: no renew of lease {self.ns}/{self.settings.lease_name} "
                            f"in {self.settings.renew_deadline_s}s")
        return budget

    def try_once(self, deadline: float) -> bool:
        """One acquire-or-renew attempt; True when we hold the Lease afterwards. Raises on any failure."""
        started = self.clock()

        def timeout() -> float:
            left = deadline - self.clock()
            if left <= 0:
                raise TimeoutError("renew deadline passed")
            return left

        name = self.settings.lease_name
        current = self.kube.get("leases", name, self.ns, timeout=timeout())
        self.contact_at = self.clock()
        lease = view(current, self.settings.lease_duration_s)
        if lease is not None and (self._observed is None or self._observed[0] != lease.resource_version):
            self._observed = (lease.resource_version, self.contact_at)
        unchanged_for = self.contact_at - self._observed[1] if self._observed else 0.0
        self.holder = lease.holder if lease else None
        action = decide(lease, self.identity, unchanged_for)
        if action is Action.WAIT:
            return False
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        spec = dict((current or {}).get("spec") or {})
        if action is not Action.RENEW:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (current is not None)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self.settings.lease_duration_s,
                    renewTime=now)
        try:
            if current is None:
                self.kube.create("leases", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                            "metadata": {"name": name, "namespace": self.ns}, "spec": spec},
                                 self.ns, timeout=timeout())
            else:
                metadata = {k: v for k, v in current["metadata"].items() if k != "managedFields"}
                body = {**current, "metadata": metadata, "spec": spec}  # resourceVersion: compare-and-swap
                self.kube.replace("leases", body, self.ns, timeout=timeout())
        except ApiError as exc:
            if exc.conflict:  # another candidate wrote first: the next attempt sees its record
                return False
            raise
        if action is not Action.RENEW:
            log.info("identity=%s action=%s-lease lease=%s/%s previous=%s", self.identity, action.value,
                     self.ns, name, self.holder or "-")
        self.renewed_at = started
        self.holder = self.identity
        return True

    def acquire(self, stop: threading.Event, tick: Callable[[], None] = lambda: None) -> bool:
        """Stand by until we hold the Lease (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            tick()
            try:
                if self.try_once(self.clock() + self.settings.renew_deadline_s):
                    return True
            except Exception as exc:  # a standby that cannot reach the API just keeps trying
                log.warning("identity=%s lease=%s/%s read failed: %s", self.identity, self.ns,
                            self.settings.lease_name, exc)
            stop.wait(self.settings.retry_period_s)
        return False

    def hold(self, stop: threading.Event, tick: Callable[[], None] = lambda: None) -> None:
        """Renew every retry period; return when leadership is lost (or ``stop`` is set).

        Any exception in a renew counts as a failed renew; none escapes.
        """
        while True:
            assert self.renewed_at is not None
            deadline = self.renewed_at + self.settings.renew_deadline_s
            if stop.wait(min(self.settings.retry_period_s, max(0.0, deadline - self.clock()))):
                return
            tick()
            if self.clock() >= deadline:
                return
            try:
                if self.try_once(deadline):
                    continue
            except Exception as exc:
                log.warning("identity=%s renew of lease %s/%s failed: %s", self.identity, self.ns,
                            self.settings.lease_name, exc)
                continue
            if self.holder not in (None, self.identity):
                log.error("identity=%s lease %s/%s is held by %s", self.identity, self.ns,
                          self.settings.lease_name, self.holder)
                self.renewed_at = None  # the fence closes now, not at the deadline
                return
