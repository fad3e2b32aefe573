"""The operator's plumbing: watches, periodic resync, back-off, leader election and health.

Kept apart from the business logic (``reconcile.py`` and ``plan.py``): watches
only mark the world dirty, and one worker runs a full level-triggered pass, so
a missed or reordered event can never leave state behind: the next pass
(at the latest after ``resync_period_s``) sees the whole cluster again.
Events that arrive while a pass waits or runs collapse into one next pass, and
a :class:`Pacer` spaces passes out: a single change is acted on after a short
debounce, but a flapping Node (its kubelet posting status, a label toggled in
a loop) cannot drive more than one full pass per ``MIN_PASS_INTERVAL_S``.

Leader election is ``election.py``'s: only the leader runs passes, and every
write (and every pass) first asks the elector's fence. A leader whose renew has
not succeeded within ``renew_deadline_s`` writes nothing more and exits 1 (as
controller-runtime does); its Pod restarts as a standby. Every API call has a
timeout: a watch is closed by the server after ``WATCH_S`` and by us when the
socket stays silent longer than that, so a silent network stalls nothing for
ever.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from kubernetes import client, watch

from fabmesh.kube.client import Kube
from fabmesh.mesh.names import MANAGED_SELECTOR
from fabmesh.operator.election import LeaseElector, NotLeader
from fabmesh.operator.health import Heartbeats, Limits, judge, serve
from fabmesh.operator.reconcile import Reconciler
from fabmesh.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.2
MIN_PASS_INTERVAL_S = 1.0
MAX_BACKOFF_S = 30.0
WATCH_S = 300  # server-side timeoutSeconds of a watch
WATCH_READ_SLACK_S = 30  # a watch socket silent for WATCH_S + this is dead: reconnect
CONNECT_TIMEOUT_S = 10.0
PASS_STALL_S = 300.0  # liveness: the worker ticks on every write and between passes
FIELD_MANAGER = "fabmesh-operator"


class Pacer:
    """When the next pass may start, given when the last one did (monotonic seconds)."""

    def __init__(self, debounce_s: float = DEBOUNCE_S, min_interval_s: float = MIN_PASS_INTERVAL_S) -> None:
        self.debounce_s = debounce_s
        self.min_interval_s = min_interval_s
        self.last_start: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait, from ``now`` (the first event since the last pass), before the next pass."""
        if self.last_start is None:
            return self.debounce_s
        return max(self.debounce_s, self.last_start + self.min_interval_s - now)

    def started(self, now: float) -> None:
        self.last_start = now


class OperatorLoop:
    def __init__(self, api: client.ApiClient, settings: OperatorSettings, identity: str | None = None,
                 field_manager: str = FIELD_MANAGER, health: tuple[str, int] | None = None) -> None:
        self.api = api
        self.settings = settings
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.health = health
        election = settings.leader_election
        self.elector = (LeaseElector(Kube(api, field_manager=field_manager), settings.namespace, self.identity,
                                     election)
                        if election.enabled else None)
        self.kube = Kube(api, field_manager=field_manager, write_guard=self._fence)
        self.reconciler = Reconciler(self.kube, settings)
        self.beats = Heartbeats()
        self.limits = Limits(
            elector_stall_s=(election.lease_duration_s + election.renew_deadline_s + election.retry_period_s
                             if self.elector else None),
            contact_s=election.lease_duration_s,
            worker_stall_s=settings.resync_period_s + PASS_STALL_S)
        self.dirty = threading.Event()
        self.stop = threading.Event()
        self.pacer = Pacer()

    def _fence(self) -> float:
        """Asked before every write: the worker is alive, and may write for this many seconds."""
        self.beats.worker = time.monotonic()
        return self.elector.write_budget() if self.elector else math.inf

    # -- watches ---------------------------------------------------------------------------------

    def _watch_forever(self, what: str, list_fn: Callable[..., object], **kwargs: object) -> None:
        while not self.stop.is_set():
            try:
                for _ in watch.Watch().stream(list_fn, timeout_seconds=WATCH_S,
                                              _request_timeout=(CONNECT_TIMEOUT_S, WATCH_S + WATCH_READ_SLACK_S),
                                              **kwargs):
                    self.dirty.set()
                    if self.stop.is_set():
                        return
            except Exception as exc:  # the watch restarts; the resync covers the gap
                log.warning("watch=%s restarting after error: %s", what, exc)
                self.stop.wait(2.0)

    def _start_watches(self) -> None:
        core = client.CoreV1Api(self.api)
        ns = self.settings.namespace
        selector = MANAGED_SELECTOR
        for what, fn, kwargs in (
            ("nodes", core.list_node, {}),
            ("configmaps", core.list_namespaced_config_map, {"namespace": ns, "label_selector": selector}),
            ("secrets", core.list_namespaced_secret, {"namespace": ns, "label_selector": selector}),
            ("pods", core.list_namespaced_pod, {"namespace": ns, "label_selector": selector}),
        ):
            threading.Thread(target=self._watch_forever, args=(what, fn), kwargs=kwargs, daemon=True,
                             name=f"watch-{what}").start()

    # -- the worker ------------------------------------------------------------------------------

    def work(self) -> None:
        self._start_watches()
        backoff = 1.0
        self.dirty.set()
        while not self.stop.is_set():
            self.beats.worker = time.monotonic()
            self.dirty.wait(timeout=self.settings.resync_period_s)
            if self.stop.is_set():
                return
            self.stop.wait(self.pacer.delay(time.monotonic()))  # a burst of events collapses into one pass
            if self.stop.is_set():
                return
            self.dirty.clear()
            started = time.monotonic()
            self.pacer.started(started)
            try:
                self._fence()  # a pass starts only under a fresh lease; each write checks again
                result = self.reconciler.run_once()
            except NotLeader as exc:
                self._exit_lost(str(exc))
            except Exception as exc:
                log.error("reconcile failed, retrying in %.0fs: %s", backoff, exc)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self.dirty.set()
                continue
            backoff = 1.0
            self.beats.synced = time.monotonic()
            if result.retry:
                self.dirty.set()
            log.debug("reconcile done in %.3fs edges=%d errors=%d", time.monotonic() - started,
                      len(result.plan.edges), len(result.errors))

    def _work_or_exit(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # the worker must never die quietly while the lease is renewed
            self._exit_lost(f"worker died: {exc!r}")

    # -- the process -----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._shutdown())
        if self.health is not None:
            serve(*self.health, lambda: judge(self.beats, self.limits, time.monotonic()))
        if self.elector is None:
            self.beats.leading = True
            self.work()
            return 0
        election = self.settings.leader_election
        log.info("identity=%s waiting for lease %s/%s", self.identity, self.settings.namespace,
                 election.lease_name)
        if not self.elector.acquire(self.stop, self._elector_tick):
            return 0
        self.beats.leading = True
        log.info("identity=%s action=became-leader", self.identity)
        threading.Thread(target=self._work_or_exit, daemon=True, name="worker").start()
        self.elector.hold(self.stop, self._elector_tick)
        if self.stop.is_set():
            return 0
        self._exit_lost(f"no renew of lease {self.settings.namespace}/{election.lease_name} "
                        f"within {election.renew_deadline_s}s")
        return 1

    def _elector_tick(self) -> None:
        assert self.elector is not None
        self.beats.elector = time.monotonic()
        self.beats.contact = self.elector.contact_at

    def _exit_lost(self, why: str) -> None:
        if self.stop.is_set():
            os._exit(0)
        # os._exit, not sys.exit: a worker thread may be blocked in a request; nothing may outlive this line.
        log.error("identity=%s action=exit lost leadership (%s); a standby takes over", self.identity, why)
        os._exit(1)

    def _shutdown(self) -> None:
        log.info("identity=%s action=shutdown", self.identity)
        self.stop.set()
        self.dirty.set()
        os._exit(0)
