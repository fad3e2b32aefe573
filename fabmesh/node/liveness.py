"""Remove a direct edge-to-edge tunnel whose peer stopped answering, within seconds, so the pair is relayed.

A pair whose direct CHILD_SA is absent falls to the connector tunnel, whose selectors cover the
whole edge pool (libipsec picks it by its own policy lookup; with kernel ESP charon's policy for
it sits under the direct one's and above fabmesh's ``block`` policies, see
``fabmesh/mesh/dataplane.py``). But a direct CHILD_SA that is installed and dead (UDP blocked
between the two edges) keeps the pair's packets until charon gives up on it: DPD after
``dpd_delay`` without inbound traffic, then charon's retransmit schedule, ``retransmit_timeout *
sum(retransmit_base**i for i in 0..retransmit_tries)`` = 2 s * 41.3 = 83 s with fabmesh's
``strongswan.conf``. Every packet of the pair is lost meanwhile.

That schedule is global to charon: it also decides when an edge gives up on its connector tunnel
over a lossy WAN (every DPD and IKE_AUTH retransmission lost: a full re-handshake, an outage for
everything the edge has) and how hard edges retransmit at a busy connector. So it stays, and only
direct tunnels are cut short, here: they get their own DPD delay (``tunnel.direct_dpd_delay_s``,
2 s), so charon sends a DPD 2 s after the last inbound packet; when that DPD is still unanswered
``tunnel.direct_dpd_timeout_s`` (3 s) later, the agent terminates the IKE_SA. 3 s lets charon's
first retransmission (at 2 s) be answered, so a false alarm needs two losses in a row; and a false
alarm is cheap (the pair is relayed until the initiator's next pass, 2 s later, makes the tunnel
again), while a late one costs every packet. Detection: 2 s + 3 s + up to one 1 s poll.

An IKE_SA with a DPD in flight shows ``IKE_DPD`` in ``list-sas`` ``tasks-active`` (``mobike = no``,
so IKEv2 liveness checks are plain ``IKE_DPD`` tasks). Each IKE_SA is followed by its unique id, so a
new IKE_SA with the same peer starts afresh.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DPD_TASK = "IKE_DPD"


@dataclass(frozen=True, order=True)
class DeadTunnel:
    """A direct tunnel to remove: connection ``peer``, IKE_SA ``ike_id``, its DPD unanswered for ``unanswered_s``."""

    peer: str
    ike_id: str
    unanswered_s: float


@dataclass
class DirectLiveness:
    """Which direct IKE_SAs have had a DPD unanswered for ``timeout_s`` (pure, fed with clock and ``list-sas``)."""

    timeout_s: float
    _since: dict[str, float] = field(default_factory=dict)  # IKE_SA unique id -> first seen with a DPD in flight

    def observe(self, now: float, ike_sas: Iterable[tuple[str, Mapping[str, Any]]],
                direct: Collection[str]) -> list[DeadTunnel]:
        """The direct IKE_SAs to remove now, sorted; remembers when each DPD in flight was first seen.

        ``ike_sas`` is every IKE_SA as (connection name, ``list-sas`` entry); ``direct`` names the
        connections that are edge-to-edge tunnels (the connector tunnel is never removed here).
        """
        waiting: dict[str, float] = {}
        dead: list[DeadTunnel] = []
        for name, sa in ike_sas:
            ike_id = str(sa.get("uniqueid", ""))
            if name not in direct or not ike_id or DPD_TASK not in (sa.get("tasks-active") or ()):
                continue
            waiting[ike_id] = since = self._since.get(ike_id, now)
            if self.timeout_s and now - since >= self.timeout_s:
                dead.append(DeadTunnel(name, ike_id, round(now - since, 1)))
        self._since = waiting
        return sorted(dead)
