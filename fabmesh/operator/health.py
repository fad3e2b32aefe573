"""The operator's liveness and readiness, over HTTP, for the kubelet's probes.

Liveness says "restart me": a loop stopped turning (a thread died or hangs on
something without a timeout). Readiness says "I am doing my job": a standby is
ready while it reaches the API server, a leader once it has completed a pass.
Neither probe touches the API itself: a probe that calls the API server turns
an API outage into a restart storm of every replica.

:func:`judge` decides from heartbeats (pure); :func:`serve` only answers.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)
DEFAULT_PORT = 8095  # not 8080/8081 (apps, controller-runtime probes) nor 9100 (node exporter, our connector)


@dataclass
class Heartbeats:
    """Monotonic times the loops last showed life; None = never."""

    elector: float | None = None  # the election loop turned (standby or leader)
    contact: float | None = None  # the API server last answered the elector
    worker: float | None = None  # the leader's worker loop turned
    synced: float | None = None  # the leader's last completed pass
    leading: bool = False


@dataclass(frozen=True)
class Limits:
    elector_stall_s: float | None  # the election loop turns every retry period; None = no election
    contact_s: float  # a standby that has not reached the API for this long is not ready
    worker_stall_s: float  # a pass plus the resync wait


@dataclass(frozen=True)
class Verdict:
    live: bool
    ready: bool
    reason: str


def judge(beats: Heartbeats, limits: Limits, now: float) -> Verdict:
    def fresh(t: float | None, limit: float) -> bool:
        return t is not None and now - t < limit

    if limits.elector_stall_s is not None and not fresh(beats.elector, limits.elector_stall_s):
        return Verdict(False, False, "election loop stalled")
    if beats.leading and not fresh(beats.worker, limits.worker_stall_s):
        return Verdict(False, False, "worker loop stalled")
    if beats.leading:
        return Verdict(True, beats.synced is not None, "leader" if beats.synced else "leader, not synced yet")
    if not fresh(beats.contact, limits.contact_s):
        return Verdict(True, False, "standby, API server unreachable")
    return Verdict(True, True, "standby")


def serve(address: str, port: int, verdict: Callable[[], Verdict]) -> ThreadingHTTPServer:
    """Answer ``/healthz`` (liveness) and ``/readyz`` (readiness) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            v = verdict()
            ok = {"/healthz": v.live, "/readyz": v.ready}.get(self.path.split("?")[0])
            if ok is None:
                self.send_error(404)
                return
            body = json.dumps({"live": v.live, "ready": v.ready, "reason": v.reason}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:  # one line per probe is noise for a person on call
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()
    log.info("health address=%s port=%d paths=/healthz,/readyz", address, server.server_address[1])
    return server
