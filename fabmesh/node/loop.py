"""The node loop shared by the edge agent and the connector: observe files, plan, apply, repeat.

A pass runs when the mounted config changes (kubelet's ``..data`` swap), when
charon's VICI socket is recreated (charon restarted and lost everything), every
``resync_period_s`` as a safety net, and after ``RETRY_S`` while something is
not right yet (a failed step, an initiator without an IKE_SA).

Between passes an edge checks its direct tunnels every ``LIVENESS_S``
(``fabmesh/node/liveness.py``): one whose DPD went unanswered for
``tunnel.direct_dpd_timeout_s`` is terminated, so its pair is relayed through the
connector at once, and a pass follows (the initiator makes the tunnel again).

A connector started with ``--node-name`` is a standby while ``mesh.yaml`` names
another node (the operator writes the active connector's name there): it loads
nothing, and if it was the active connector earlier in this process it
unloads its tunnels and routes, so edges and cloud routes follow the new one.

A missing or malformed config keeps the last good state: it is logged, counted
in ``fabmesh_config_errors_total``, and nothing is torn down. Stopping the loop
(SIGTERM) leaves the data plane as it is, so restarting the agent loses no
packet. Only an uninstall removes it: the hook annotates the Pod with
``fabmesh.io/teardown``, seen here through the downward API file
(``--teardown-file``, ``fabmesh/node/teardown.py``); every pass then removes
everything instead of applying, and the token goes into the TunnelStatus once
nothing is left.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from fabmesh.mesh.model import Backend, MeshConfigError, NodeSettings, Role
from fabmesh.mesh.tunnelstatus import NodeReport
from fabmesh.netlink.driver import Netlink
from fabmesh.node.apply import NodeApplier
from fabmesh.node.cni import render_conflist
from fabmesh.node.config import NodeConfig, fingerprint, load, mesh_node_name
from fabmesh.node.desired import desired_state
from fabmesh.node.liveness import DirectLiveness
from fabmesh.node.metrics import Metrics, serve
from fabmesh.node.report import observe, waiting_peers
from fabmesh.node.status_writer import StatusTarget, StatusWriter
from fabmesh.node.teardown import plan_teardown, requested
from fabmesh.node.tunnels import is_direct
from fabmesh.strongswan.driver import Charon, ViciError

log = logging.getLogger(__name__)
RETRY_S = 2.0
POLL_S = 0.5
LIVENESS_S = 1.0


@dataclass(frozen=True)
class NodeLoopOptions:
    config_dir: Path
    tls_dir: Path
    vici_socket: Path
    state_dir: Path
    cni_conf_dir: Path | None = None  # None: from mesh.yaml settings; the connector has none
    ipam_data_dir: str | None = None
    uplink: str | None = None
    metrics_address: str | None = None  # None: the node's own address (mesh.yaml node.address)
    metrics_port: int = 0  # 0: no metrics server (the CLI defaults to DEFAULT_METRICS_PORT)
    node_name: str | None = None  # a connector's own node: it stands by while mesh.yaml names another
    status: StatusTarget | None = None  # where to publish the TunnelStatus; None: nowhere
    charon_conf: Path | None = None  # charon's strongswan.conf; None: next to the VICI socket
    teardown_file: Path | None = None  # the Pod's annotations (downward API); None: never torn down
    # After a teardown, write its token here and exit 0 (kubelet reports it as the container's
    # termination message); None: stay up, idle
    termination_log: Path | None = None


class NodeLoop:
    def __init__(self, options: NodeLoopOptions) -> None:
        self.options = options
        self.metrics = Metrics(self._list_ike_sas)
        self.stop = threading.Event()
        self.last_good: NodeConfig | None = None
        self.applier: NodeApplier | None = None
        self.healthy = False
        self.metrics_tried = False
        self.rejected: frozenset[str] = frozenset()  # peers left out by desired_state, as last logged
        self.standby_for: str | None = None  # the active connector's name while this one stands by
        self.liveness = DirectLiveness(timeout_s=0)
        self.status_writer = StatusWriter(options.status) if options.status else None
        self.report: NodeReport | None = None  # the last report built (its ``since`` values carry over)
        self.waited: frozenset[str] = frozenset()  # peers whose SA waited for a DPD answer at the last poll
        self.last_error = ""
        self.next_status = 0.0  # monotonic time of the next status poll
        self.torn_down: str | None = None  # the teardown token everything was removed for

    def _cni_path(self, config: NodeConfig) -> Path | None:
        if config.mesh.node.pod_cidr is None:
            return None
        directory = self.options.cni_conf_dir or Path(config.mesh.settings.cni_conf_dir)
        return directory / config.mesh.settings.cni_conf_name

    def _read(self) -> NodeConfig | None:
        try:
            config = load(self.options.config_dir, self.options.tls_dir)
        except MeshConfigError as exc:
            self.metrics.config_errors.inc()
            log.error("config unusable, keeping the last good state: %s", exc)
            self.last_error = f"config unusable, last good state kept: {exc}"
            return self.last_good
        self.last_error = ""
        if self.last_good is None or config != self.last_good:
            log.info("node=%s config loaded peers=%d", config.mesh.node.name, len(config.mesh.peers))
        self.last_good = config
        return config

    def _observe_sas(self) -> dict[str, dict]:
        try:
            with Charon(self.options.vici_socket, timeout=5) as charon:
                return charon.sas()
        except ViciError:
            return {}

    def _list_ike_sas(self) -> list[tuple[str, dict]]:
        """Every IKE_SA for a scrape of ``fabmesh_sa_packets`` (the metrics server's thread: its own session)."""
        try:
            with Charon(self.options.vici_socket, timeout=5) as charon:
                return charon.ike_sas()
        except ViciError:
            return []

    def _active_elsewhere(self) -> str | None:
        """The active connector's name when it is not this node (``--node-name``); else None."""
        if self.options.node_name is None:
            return None
        try:
            active = mesh_node_name(self.options.config_dir)
        except MeshConfigError:
            return None  # the full read reports it and keeps the last good state
        return active if active != self.options.node_name else None

    def _stand_by(self, active: str) -> bool:
        """Run no tunnels; after a demotion in this process, unload what the active role loaded."""
        if self.standby_for != active:
            log.info("node=%s standby active-connector=%s: running no tunnels", self.options.node_name, active)
            self.standby_for = active
        if self.options.metrics_address:
            self._serve_metrics(None)
        if self.applier is None or self.last_good is None:
            return True
        idle = self.last_good.mesh.model_copy(update={"peers": ()})
        state = desired_state(idle, self.last_good.cert_pem, uplink=self._uplink(self.last_good),
                              ike_remotes=frozenset())
        report = self.applier.apply(state, self.last_good.creds)
        self.metrics.export_peers((), self._observe_sas())  # drops the series of the unloaded peers
        self.last_error = "; ".join(report.errors)
        return report.ok

    def _teardown_token(self) -> str | None:
        if self.options.teardown_file is None:
            return None
        try:
            return requested(self.options.teardown_file.read_text())
        except OSError:
            return None

    def tear_down(self, token: str) -> bool:
        """Remove everything this node's loop programs (an uninstall); True when nothing is left."""
        config = self.last_good
        if config is None:
            try:
                config = load(self.options.config_dir, self.options.tls_dir)
            except MeshConfigError:
                config = None
        settings = config.mesh.settings if config else NodeSettings()
        edge = config is not None and config.mesh.node.pod_cidr is not None
        anchors: tuple[str, ...] = ()
        if config is not None and config.mesh.tunnel.backend is Backend.LIBIPSEC:
            anchors = desired_state(config.mesh, config.cert_pem, ike_remotes=frozenset()).anchors
        cni_dir = str(self.options.cni_conf_dir) if self.options.cni_conf_dir else None
        plan = plan_teardown(settings, edge=edge, cni_conf_dir=cni_dir, anchor_subnets=anchors)
        if self.applier is None:
            name = self.options.node_name or (config.mesh.node.name if config else "")
            self.applier = NodeApplier(name, self.options.vici_socket, self.options.state_dir, None)
        if self.torn_down != token:
            log.info("node=%s action=teardown token=%s: uninstall, removing everything fabmesh programmed",
                     self.applier.node, token)
        report = self.applier.teardown(plan)
        self.last_error = "; ".join(report.errors)
        if report.ok and self.torn_down != token:
            log.info("node=%s action=teardown-done token=%s changes=%d", self.applier.node, token,
                     len(report.changes))
            self.torn_down = token
            self.next_status = 0.0  # report it at once
        return report.ok

    def run_pass(self) -> bool:
        """One observe-plan-apply pass; True when the node is fully as desired."""
        token = self._teardown_token()
        if token is not None:
            return self.tear_down(token)
        if self.torn_down is not None:
            log.info("node=%s teardown annotation gone: applying the mesh again", self.options.node_name or "")
            self.torn_down = None
        active = self._active_elsewhere()
        if active is not None:
            return self._stand_by(active)
        if self.standby_for is not None:
            log.info("node=%s active connector now: loading the mesh", self.options.node_name)
            self.standby_for = None
        config = self._read()
        self._serve_metrics(config)
        if config is None:
            return False
        started = time.monotonic()
        if self.applier is None:
            self.applier = NodeApplier(config.mesh.node.name, self.options.vici_socket, self.options.state_dir,
                                       self._cni_path(config))
        sas = self._observe_sas()
        # A mediated IKE_SA waiting for its connectivity checks has no peer address yet ("%any").
        remotes = frozenset(a for sa in sas.values() if _is_ip(a := sa.get("remote-host", "")))
        conflist = render_conflist(config.mesh, self.options.ipam_data_dir) if config.mesh.node.pod_cidr else None
        state = desired_state(config.mesh, config.cert_pem, uplink=self._uplink(config), conflist=conflist,
                              ike_remotes=remotes)
        self._report_rejected(config.mesh.node.name, state.rejected)
        report = self.applier.apply(state, config.creds)
        if self.last_error == "":
            self.last_error = "; ".join(report.errors)
        sas = self._observe_sas()
        self._export(config, sas)
        # A mediated pair that cannot punch through (a symmetric NAT) is relayed, which is healthy.
        mediated = {p.name for p in config.mesh.peers if p.mediated_by}
        missing = [p for p in state.initiators - mediated if sas.get(p, {}).get("state") != "ESTABLISHED"]
        self.healthy = report.ok and not missing
        self.metrics.passes.labels("ok" if report.ok else "error").inc()
        self.metrics.duration.observe(time.monotonic() - started)
        return self.healthy

    def publish_status(self) -> None:
        """Poll charon and hand the report to the writer, which decides whether it is worth a write."""
        settings = self.last_good.mesh.settings if self.last_good else NodeSettings()
        self.next_status = time.monotonic() + settings.status_poll_s
        if self.status_writer is None:
            return
        self.status_writer.set_limits(settings.status_min_interval_s, settings.status_heartbeat_s)
        sas = self._observe_sas()
        standby = self.standby_for is not None or self.torn_down is not None
        config = self.last_good
        peers = [] if standby or config is None else [p.name for p in config.mesh.peers]
        if config is None and self.options.node_name is None:
            return  # an edge learns its name from mesh.yaml: nothing to name the object by yet
        name = self.options.node_name or (config.mesh.node.name if config else "")
        if self.status_writer.target.name != name:
            self.status_writer.target = replace(self.status_writer.target, name=name)
        role = config.mesh.node.role.value if config else "connector"
        self.report = observe(role, peers, sas, datetime.now(UTC), self.report, self.waited,
                              generation=config.generation if config else None,
                              last_error=self.last_error if not standby else "",
                              nat_keepalive_s=self._keepalive())
        if self.torn_down is not None:
            self.report = self.report.model_copy(update={"teardown": self.torn_down})
        self.waited = waiting_peers(sas)
        self.status_writer.publish(self.report)

    def _keepalive(self) -> int | None:
        """charon's NAT-T keepalive interval, from the strongswan.conf it runs with (next to its socket)."""
        try:
            text = (self.options.charon_conf or self.options.vici_socket.parent / "strongswan.conf").read_text()
        except OSError:
            return None
        found = re.search(r"^\s*keep_alive\s*=\s*(\d+)s?\s*$", text, re.M)
        return int(found.group(1)) if found else None

    def _serve_metrics(self, config: NodeConfig | None) -> None:
        """Once, as soon as the address is known (``--metrics-address``, else the first usable mesh.yaml).

        A bind failure is logged by ``serve`` and not retried: the loop runs on without metrics.
        """
        address = self.options.metrics_address or (config.mesh.node.address if config else None)
        if self.metrics_tried or not self.options.metrics_port or address is None:
            return
        self.metrics_tried = True
        serve(self.metrics.registry, address, self.options.metrics_port)

    def _report_rejected(self, node: str, notes: tuple[str, ...]) -> None:
        """One WARNING per peer newly left out, one INFO when it is back; nothing while unchanged."""
        for note in sorted(set(notes) - self.rejected):
            log.warning("node=%s action=reject-peer %s", node, note)
        for note in sorted(self.rejected - set(notes)):
            log.info("node=%s action=accept-peer no longer rejected: %s", node, note)
        self.rejected = frozenset(notes)

    def _uplink(self, config: NodeConfig) -> str | None:
        """``--uplink``, else the device the kernel routes towards the first peer (or the internet)."""
        if self.options.uplink or config.mesh.tunnel.backend is Backend.LIBIPSEC:
            return self.options.uplink
        targets = [p.endpoint for p in config.mesh.peers if p.endpoint] + ["1.1.1.1"]
        with Netlink(None) as nl:
            return next((dev for dev in (nl.device_towards(t) for t in targets) if dev), None)

    def _export(self, config: NodeConfig, sas: dict[str, dict]) -> None:
        assert self.applier
        for resource, count in self.applier.writes().items():
            self.metrics.writes.labels(resource).set(count)
        self.metrics.export_peers((p.name for p in config.mesh.peers), sas)

    def remove_dead_direct(self) -> bool:
        """Terminate the direct tunnels whose DPD went unanswered too long; True when one was."""
        mesh = self.last_good.mesh if self.last_good else None
        if mesh is None or mesh.node.role is not Role.EDGE or not mesh.tunnel.direct_dpd_timeout_s:
            return False
        direct = {p.name for p in mesh.peers if is_direct(mesh, p)}
        if not direct:
            return False
        self.liveness.timeout_s = mesh.tunnel.direct_dpd_timeout_s
        try:
            with Charon(self.options.vici_socket, timeout=5) as charon:
                dead = self.liveness.observe(time.monotonic(), charon.ike_sas(), direct)
                for tunnel in dead:
                    charon.terminate_ike(tunnel.peer, ike_id=tunnel.ike_id)
                    self.metrics.direct_removed.inc()
                    log.warning("node=%s action=terminate-dead-direct peer=%s ike_id=%s dpd_unanswered=%.1fs: "
                                "relayed through the connector until the direct tunnel is back",
                                mesh.node.name, tunnel.peer, tunnel.ike_id, tunnel.unanswered_s)
        except ViciError as exc:
            log.debug("direct tunnel liveness check skipped: %s", exc)
            return False
        return bool(dead)

    def _publish_guarded(self) -> None:
        try:
            self.publish_status()
        except Exception:  # the status is a report: it never stops the data plane's loop
            log.exception("publishing the tunnel status failed; trying again at the next poll")

    def _exit_torn_down(self, token: str, termination_log: Path) -> int:
        """The answer the uninstall hook reads whatever the node can reach: kubelet's own report of this
        container's termination message. The TunnelStatus may never arrive: an edge's only way to the API
        is often the connector tunnel that the teardown has just removed."""
        try:
            termination_log.write_text(token)
        except OSError as exc:
            log.error("teardown done but %s not writable: %s", termination_log, exc)
            return 1
        log.info("teardown token=%s done: exiting (nothing left to run until the Pod is deleted)", token)
        return 0

    def _watched(self) -> list[Path]:
        """The directories whose change starts a pass at once: config, TLS, the Pod's annotations."""
        extra = [self.options.teardown_file.parent] if self.options.teardown_file else []
        return [self.options.config_dir, self.options.tls_dir, *extra]

    def _socket_mark(self) -> tuple[int, float] | None:
        try:
            st = self.options.vici_socket.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_ctime)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        while not self.stop.is_set():
            files = fingerprint(*self._watched())
            socket_mark = self._socket_mark()
            try:
                ok = self.run_pass()
            except Exception as exc:
                log.exception("reconcile pass failed; retrying")
                self.last_error = f"reconcile pass failed: {exc}"
                ok = False
            self._publish_guarded()
            if self.torn_down is not None and self.options.termination_log is not None:
                return self._exit_torn_down(self.torn_down, self.options.termination_log)
            period = self.last_good.mesh.settings.resync_period_s if self.last_good else RETRY_S
            deadline = time.monotonic() + (period if ok else RETRY_S)
            next_check = time.monotonic() + LIVENESS_S
            while not self.stop.is_set() and time.monotonic() < deadline:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + LIVENESS_S
                    if self.remove_dead_direct():
                        break
                if fingerprint(*self._watched()) != files:
                    break
                if self._socket_mark() != socket_mark:
                    break
                if time.monotonic() >= self.next_status:
                    self._publish_guarded()
                self.stop.wait(POLL_S)
        log.info("stopping; the data plane is left as it is")
        return 0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
