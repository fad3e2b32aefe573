"""The route agent's loop on a cloud node: read ``routes.yaml``, observe the node, plan, apply, repeat.

A pass runs when the projected ConfigMap changes (kubelet's ``..data`` swap: a new connector, a new
edge), every ``settings.resync_period_s`` as a safety net (routes the kernel dropped with a device
come back), and after ``RETRY_S`` while a step failed.

Unlike the node agents, stopping (SIGTERM) removes everything this agent wrote: its routes, its
rule, its chain and its set. Nothing else would: a DaemonSet deleted by ``helm uninstall`` runs no
hook on the node, and routes left behind would keep sending edge-bound traffic to a connector that
may no longer be one. A restart costs a second of edge reachability from this node, never a
tunnel. A missing or malformed ``routes.yaml`` keeps the last good state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fabmesh.cloudagent.plan import CloudState, cloud_state, idle_state
from fabmesh.mesh.cloud import DEFAULT_CLOUD_ROUTE_TABLE, CloudRoutes, parse_cloud_routes
from fabmesh.mesh.model import MeshConfigError
from fabmesh.netlink.driver import Netlink
from fabmesh.node.apply import CloudApplier
from fabmesh.node.config import fingerprint

log = logging.getLogger(__name__)
RETRY_S = 2.0
POLL_S = 0.5
ROUTES_FILE = "routes.yaml"


@dataclass(frozen=True)
class CloudLoopOptions:
    config_dir: Path
    node_name: str | None = None  # the node it runs on: it stays idle where that is the active connector


class CloudLoop:
    def __init__(self, options: CloudLoopOptions) -> None:
        self.options = options
        self.stop = threading.Event()
        self.last_good: CloudRoutes | None = None
        self.applier = CloudApplier(options.node_name or "-")
        self.gateway: str | None = None  # the connector routed via, as last logged
        self.notes: tuple[str, ...] = ()
        self.config_error: str | None = None  # as last logged: a ConfigMap not written yet is logged once

    def _read(self) -> CloudRoutes | None:
        path = self.options.config_dir / ROUTES_FILE
        try:
            config = parse_cloud_routes(path.read_text(), str(path))
        except (OSError, MeshConfigError) as exc:
            problem = f"{path}: {exc}" if isinstance(exc, OSError) else str(exc)
            if problem != self.config_error:
                log.error("config unusable, keeping the last good state: %s", problem)
                self.config_error = problem
            return self.last_good
        if self.config_error is not None:
            log.info("config usable again: %s", path)
            self.config_error = None
        self.last_good = config
        return config

    def plan(self, config: CloudRoutes) -> CloudState:
        """Observe the node (its addresses, the device towards the connector) and plan from them."""
        with Netlink(None) as nl:
            addresses = frozenset(nl.addresses())
            device = nl.device_towards(config.connector.address) if config.connector else None
        return cloud_state(config, node_name=self.options.node_name, local_addresses=addresses, device=device)

    def run_pass(self) -> bool:
        config = self._read()
        if config is None:
            return False
        state = self.plan(config)
        self._report(state)
        return self.applier.apply(state).ok

    def _report(self, state: CloudState) -> None:
        """One line when the connector routed via changes, one per new note; nothing while unchanged."""
        node = self.options.node_name or "-"
        if state.gateway != self.gateway:
            log.info("node=%s action=route-via connector=%s routes=%d", node, state.gateway or "none",
                     len(state.routes))
            self.gateway = state.gateway
        for note in sorted(set(state.notes) - set(self.notes)):
            log.info("node=%s %s", node, note)
        self.notes = state.notes

    def clean_up(self) -> bool:
        """Remove every route, rule, chain and set of this agent; True when all went."""
        table = self.last_good.settings.route_table if self.last_good else DEFAULT_CLOUD_ROUTE_TABLE
        report = self.applier.apply(idle_state(table))
        log.info("node=%s stopping: removed what the route agent wrote (%d changes%s)", self.options.node_name or "-",
                 len(report.changes), "" if report.ok else f", errors: {'; '.join(report.errors)}")
        return report.ok

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        while not self.stop.is_set():
            files = fingerprint(self.options.config_dir)
            try:
                ok = self.run_pass()
            except Exception:
                log.exception("route agent pass failed; retrying")
                ok = False
            period = self.last_good.settings.resync_period_s if self.last_good else RETRY_S
            self._wait(files, period if ok else RETRY_S)
        return 0 if self.clean_up() else 1

    def _wait(self, files: object, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            if fingerprint(self.options.config_dir) != files:
                return
            self.stop.wait(POLL_S)
