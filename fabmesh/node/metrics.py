"""The node loop's Prometheus metrics: the series, the per-peer export, and a server that never kills the loop.

Why a server that may fail quietly: the agent and the connector run on the host
network, where the port can already be taken (an exporter, a second copy of us)
or the address missing. Metrics are a convenience; the tunnels are the product.
So a bind failure is logged once (address, port, errno) and the data plane runs
on without metrics, instead of crash-looping the Pod on ``EADDRINUSE``.

Why per-peer series are removed: a ``Gauge`` keeps every label set it has ever
seen, so a peer deleted from ``mesh.yaml`` would report its last value (often
``fabmesh_tunnel_up 1``) for the life of the process.

Why ``fabmesh_sa_packets_total`` is read at scrape time and not set by a pass:
``kubectl fabmesh ping`` brackets a probe of a few seconds with two scrapes
(through the API server's node proxy) and names the path from the CHILD_SAs
whose counters moved, so the counters must be charon's of that moment. One
series per CHILD_SA (``child`` is charon's unique id and inbound SPI, as in
:mod:`fabmesh.mesh.probepath`): a rekey starts a new series from zero instead
of making a per-peer sum go backwards. The cost is one ``list-sas`` per scrape.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from fabmesh.mesh.probepath import child_packets

log = logging.getLogger(__name__)
DIRECTIONS = ("in", "out")


SA_PACKETS_METRIC = "fabmesh_sa_packets"  # the text exposition adds ``_total``

# Every IKE_SA as charon lists it now: (connection name, IKE_SA); raises nothing (empty when charon is away).
IkeSas = Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]


class SaPackets(Collector):
    """``fabmesh_sa_packets_total{peer,child,direction}``, read from charon at each scrape."""

    def __init__(self, ike_sas: IkeSas) -> None:
        self.ike_sas = ike_sas

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for peer, child, packets_in, packets_out in child_packets(self.ike_sas()):
            family.add_metric([peer, child, "in"], packets_in)
            family.add_metric([peer, child, "out"], packets_out)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(SA_PACKETS_METRIC, "Packets through one CHILD_SA as charon counts them now "
                                   "(read at scrape time)", labels=["peer", "child", "direction"])


class Metrics:
    def __init__(self, ike_sas: IkeSas | None = None) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter("fabmesh_reconcile_total", "Reconcile passes by result", ["result"],
                              registry=self.registry)
        self.duration = Histogram("fabmesh_reconcile_duration_seconds", "Reconcile pass duration",
                                  registry=self.registry)
        self.config_errors = Counter("fabmesh_config_errors_total",
                                     "Mounted configs that could not be used (last good state kept)",
                                     registry=self.registry)
        self.writes = Gauge("fabmesh_writes", "Writes made so far, by resource", ["resource"],
                            registry=self.registry)
        self.tunnel_up = Gauge("fabmesh_tunnel_up", "1 when the peer's IKE_SA is established", ["peer"],
                               registry=self.registry)
        self.tunnel_bytes = Gauge("fabmesh_tunnel_bytes", "Bytes through the peer's CHILD_SAs (from list-sas)",
                                  ["peer", "direction"], registry=self.registry)
        self.direct_removed = Counter("fabmesh_direct_tunnels_removed_total",
                                      "Direct edge-to-edge IKE_SAs terminated for an unanswered DPD "
                                      "(their pairs relayed through the connector)", registry=self.registry)
        self._peers: set[str] = set()
        if ike_sas is not None:
            self.registry.register(SaPackets(ike_sas))

    def export_peers(self, peers: Iterable[str], sas: Mapping[str, dict]) -> None:
        """Set the per-peer series of ``peers`` from ``list-sas``; drop the series of every other peer."""
        current = set(peers)
        for gone in sorted(self._peers - current):
            self.tunnel_up.remove(gone)
            for direction in DIRECTIONS:
                self.tunnel_bytes.remove(gone, direction)
        for peer in sorted(current):
            sa = sas.get(peer, {})
            self.tunnel_up.labels(peer).set(1 if sa.get("state") == "ESTABLISHED" else 0)
            children = list(sa.get("child-sas", {}).values())
            for direction in DIRECTIONS:
                self.tunnel_bytes.labels(peer, direction).set(
                    sum(int(c.get(f"bytes-{direction}", 0)) for c in children))
        self._peers = current


def serve(registry: CollectorRegistry, address: str, port: int) -> bool:
    """Start the /metrics server in a daemon thread; False (logged once, with errno) when it cannot bind."""
    try:
        start_http_server(port, address, registry=registry)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.error("metrics server not started: cannot bind address=%s port=%d errno=%s (%s); "
                  "the data plane runs on without metrics", address, port, code, exc.strerror or exc)
        return False
    log.info("metrics server listening address=%s port=%d", address, port)
    return True
