"""The operator's plumbing: watches, periodic resync, back-off and leader election.

Kept apart from the business logic (``reconcile.py`` and ``plan.py``): watches
only mark the world dirty, and one worker runs a full level-triggered pass, so
a missed or reordered event can never leave state behind: the next pass
(at the latest after ``resync_period_s``) sees the whole cluster again.
Events that arrive while a pass waits or runs collapse into one next pass, and
a :class:`Pacer` spaces passes out: a single change is acted on after a short
debounce, but a flapping Node (its kubelet posting status, a label toggled in
a loop) cannot drive more than one full pass per ``MIN_PASS_INTERVAL_S``.

Leader election uses the ``kubernetes`` package's Lease lock. Only the leader
runs passes; a leader that fails to renew exits (as controller-runtime does),
so it can never write after a standby has taken over; its Pod restarts as a
standby.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from kubernetes import client, watch
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from fabmesh.kube.client import Kube
from fabmesh.mesh.names import MANAGED_SELECTOR
from fabmesh.operator.reconcile import Reconciler
from fabmesh.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.2
MIN_PASS_INTERVAL_S = 1.0
MAX_BACKOFF_S = 30.0


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
    def __init__(self, api: client.ApiClient, settings: OperatorSettings, identity: str | None = None) -> None:
        self.api = api
        self.settings = settings
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.kube = Kube(api)
        self.reconciler = Reconciler(self.kube, settings)
        self.dirty = threading.Event()
        self.stop = threading.Event()
        self.pacer = Pacer()

    # -- watches ---------------------------------------------------------------------------------

    def _watch_forever(self, what: str, list_fn: Callable[..., object], **kwargs: object) -> None:
        while not self.stop.is_set():
            try:
                for _ in watch.Watch().stream(list_fn, timeout_seconds=300, **kwargs):
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
                result = self.reconciler.run_once()
            except Exception as exc:
                log.error("reconcile failed, retrying in %.0fs: %s", backoff, exc)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self.dirty.set()
                continue
            backoff = 1.0
            if result.retry:
                self.dirty.set()
            log.debug("reconcile done in %.3fs edges=%d errors=%d", time.monotonic() - started,
                      len(result.plan.edges), len(result.errors))

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._shutdown())
        election = self.settings.leader_election
        if not election.enabled:
            self.work()
            return 0
        lock = LeaseLock(election.lease_name, self.settings.namespace, self.identity)
        lock.api_instance = client.CoordinationV1Api(self.api)
        config = electionconfig.Config(
            lock=lock, lease_duration=election.lease_duration_s, renew_deadline=election.renew_deadline_s,
            retry_period=election.retry_period_s, onstarted_leading=self._lead,
            onstopped_leading=self._lost_lease)
        log.info("identity=%s waiting for lease %s/%s", self.identity, self.settings.namespace,
                 election.lease_name)
        leaderelection.LeaderElection(config).run()
        return 0

    def _lead(self) -> None:
        log.info("identity=%s action=became-leader", self.identity)
        self.work()

    def _lost_lease(self) -> None:
        if self.stop.is_set():
            os._exit(0)
        log.error("identity=%s lost the lease; exiting so a standby can lead", self.identity)
        os._exit(1)

    def _shutdown(self) -> None:
        log.info("identity=%s action=shutdown", self.identity)
        self.stop.set()
        self.dirty.set()
        os._exit(0)
