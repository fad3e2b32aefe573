"""Publish the node's :class:`NodeReport` to its own ``TunnelStatus`` object: the thin edge.

The identity is a projected ServiceAccount token in a file (kubelet rewrites it
before it expires, so it is read again whenever the file changes); its Role
allows get/update/patch of this one object's ``status`` and nothing else, so
the writer never creates, lists or reads anything else. Whether to write is
:func:`fabmesh.node.report.decide`'s call; a refused or failed write is logged
once per distinct reason and retried at the next poll (the data plane never
waits for the API).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client
from urllib3.exceptions import HTTPError as Urllib3Error

from fabmesh.kube.client import ApiError, Kube
from fabmesh.mesh.timestamps import parse_time
from fabmesh.mesh.tunnelstatus import PLURAL, NodeReport, parse_report
from fabmesh.node.report import decide

log = logging.getLogger(__name__)
IN_CLUSTER_TOKEN = Path("/var/run/secrets/fabmesh.io/status/token")
IN_CLUSTER_CA = Path("/var/run/secrets/fabmesh.io/status/ca.crt")


@dataclass(frozen=True)
class StatusTarget:
    server: str  # https://host:port of the API server
    token_file: Path
    ca_file: Path | None
    namespace: str
    name: str = ""  # the node's name, the object's ("": the node loop fills it in from mesh.yaml)


def in_cluster_server() -> str | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"



class StatusWriter:
    def __init__(self, target: StatusTarget, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.target = target
        self.clock = clock
        self.written: NodeReport | None = None
        self.written_at: datetime | None = None
        self._loaded = False
        self._kube: Kube | None = None
        self._token_mark: tuple[float, int] | None = None
        self._last_problem = ""
        self._min_interval, self._heartbeat = 10.0, 300.0  # NodeSettings' defaults until set_limits

    def _client(self) -> Kube:
        st = self.target.token_file.stat()
        mark = (st.st_mtime, st.st_ino)
        if self._kube is None or mark != self._token_mark:
            configuration = client.Configuration()
            configuration.host = self.target.server
            configuration.api_key = {"authorization": "Bearer " + self.target.token_file.read_text().strip()}
            if self.target.ca_file is not None:
                configuration.ssl_ca_cert = str(self.target.ca_file)
            configuration.retries = False
            self._kube = Kube(client.ApiClient(configuration), timeout=10.0)
            self._token_mark = mark
        return self._kube

    def publish(self, report: NodeReport) -> bool:
        """Write ``report`` if :func:`decide` says so; True when it was written."""
        t = self.target
        try:
            kube = self._client()
            if not self._loaded:  # after a restart: what this node wrote last, so an unchanged report waits
                self.written = parse_report(kube.get(PLURAL, t.name, t.namespace, sub="status"))
                self.written_at = parse_time(self.written.written_at) if self.written else None
                self._loaded = True
            decision = decide(report, self.written, self.written_at, self.clock(),
                              self._min_interval, self._heartbeat)
            if not decision.write:
                return False
            kube.merge_patch(PLURAL, t.name, {"status": report.to_api()}, t.namespace, sub="status")
        except (ApiError, OSError, Urllib3Error) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:300]
            if problem != self._last_problem:
                log.warning("node=%s action=write-status object=%s/%s/%s failed: %s", t.name, PLURAL, t.namespace,
                            t.name, problem)
                self._last_problem = problem
            return False
        if self._last_problem:
            log.info("node=%s action=write-status writing again after: %s", t.name, self._last_problem)
            self._last_problem = ""
        if self.written is None or self.written.key() != report.key():
            log.info("node=%s action=write-status reason=%s tunnels-up=%d/%d generation=%s", t.name,
                     decision.reason, report.tunnels_up, report.tunnels_expected, report.config_generation)
        self.written, self.written_at = report, parse_time(report.written_at)
        return True

    def set_limits(self, min_interval_s: float, heartbeat_s: float) -> None:
        """From mesh.yaml's settings, which may change while the loop runs."""
        self._min_interval, self._heartbeat = min_interval_s, heartbeat_s
