"""Which way a probe's packets went, read off the SA packet counters it moved (pure).

One rule for the lab (``fabmesh lab status``, reading charon over VICI) and for
``kubectl fabmesh ping`` (reading the same counters from the nodes'
``fabmesh_sa_packets`` metric through the API server's node proxy).

``fabmesh lab status`` used to print the path the node labels call for; a pair
whose direct tunnel was down still read ``direct``. Now every probe is
bracketed by two readings of the tunnel hosts' CHILD_SA counters (``list-sas``
``packets-in``/``packets-out``), and the path is what the counters saw:

* ``direct``: the source edge's CHILD_SA with the destination edge sent it;
* ``relayed``: the source edge's CHILD_SA with the connector sent it, and the
  connector's CHILD_SA with the destination edge sent it on;
* ``cloud``: one end is a cloud node and the edge end's tunnel with the
  connector carried it (two cloud nodes: flannel only, no SA is involved);
* ``local``: one node; ``none``: no tunnel on the way counted it.

Counters are keyed per CHILD_SA (connection name and charon's unique id), so a
rekey between two readings counts the new SA from zero instead of going
negative.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fabmesh.mesh.topology import Path

# (tunnel host, peer connection name, child SA key) -> (packets in, packets out)
Counters = dict[tuple[str, str, str], tuple[int, int]]


Observed = Path  # the same vocabulary as the rules' intended path, so the two compare directly


@dataclass(frozen=True, order=True)
class Counted:
    """One tunnel that carried packets during a probe: on ``host``, the SA with ``peer``."""

    host: str
    peer: str
    packets_in: int
    packets_out: int

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "sa": self.peer, "packets_in": self.packets_in, "packets_out": self.packets_out}


def child_key(key: str, child: Mapping[str, Any]) -> str:
    """One CHILD_SA's identity across readings: a rekeyed SA gets a new one (charon's unique id, inbound SPI)."""
    return f"{key}/{child.get('uniqueid', '')}/{child.get('spi-in', '')}"


def child_packets(ike_sas: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, str, int, int]]:
    """(connection name, child key, packets in, packets out) of every CHILD_SA in ``list-sas`` items."""
    return [(name, child_key(key, child), int(child.get("packets-in", 0)), int(child.get("packets-out", 0)))
            for name, sa in ike_sas for key, child in (sa.get("child-sas") or {}).items()]


def counters(host: str, ike_sas: Iterable[tuple[str, Mapping[str, Any]]]) -> Counters:
    """One host's CHILD_SA counters from ``list-sas`` items (connection name, IKE_SA)."""
    return {(host, name, ident): (pin, pout) for name, ident, pin, pout in child_packets(ike_sas)}


def counted(before: Counters, after: Counters) -> list[Counted]:
    """The SAs whose counters moved between two readings, summed per (host, peer), sorted."""
    moved: dict[tuple[str, str], tuple[int, int]] = {}
    for key, (pin, pout) in after.items():
        bin_, bout = before.get(key, (0, 0))
        din, dout = max(pin - bin_, 0), max(pout - bout, 0)
        if din or dout:
            total = moved.get(key[:2], (0, 0))
            moved[key[:2]] = (total[0] + din, total[1] + dout)
    return sorted(Counted(h, p, i, o) for (h, p), (i, o) in moved.items())


def observed_path(src: str, dst: str, edges: set[str], connector: str | None, evidence: list[Counted]) -> Observed:
    """The path a probe from a pod on ``src`` to a pod on ``dst`` took, by the SAs that sent it."""
    if src == dst:
        return Observed.LOCAL
    sent = {(c.host, c.peer) for c in evidence if c.packets_out}
    if src in edges and dst in edges:
        if (src, dst) in sent:
            return Observed.DIRECT
        if connector and (src, connector) in sent and (connector, dst) in sent:
            return Observed.RELAYED
        return Observed.NONE
    if src in edges:
        return Observed.CLOUD if connector and (src, connector) in sent else Observed.NONE
    if dst in edges:
        return Observed.CLOUD if connector and (connector, dst) in sent else Observed.NONE
    return Observed.CLOUD  # cloud to cloud: flannel's VXLAN, no tunnel on the way
