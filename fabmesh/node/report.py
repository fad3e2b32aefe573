"""What a node reports about its tunnels, and whether to write it now (pure).

:func:`observe` turns charon's ``list-sas`` (plain dicts) into a
:class:`~fabmesh.mesh.tunnelstatus.NodeReport`. A cut path is not visible in
charon's SA state for a long time: after the peer goes silent charon sends a
DPD and retransmits it (``retransmit_tries``, ~2 min) before it gives the SA up,
and until then ``list-sas`` says ESTABLISHED. What it does show is the DPD task
(``IKE_DPD``) waiting in ``tasks-active``: a healthy peer answers in one round
trip, so the same SA seen waiting on two polls in a row is reported
``unresponsive``, long before charon tears it down.

:func:`decide` keeps the API server's write budget: a write only when what a
person acts on changed (states, endpoints, NAT, generation, error; never the
counters), no sooner than ``min_interval_s`` after the last one, and a
heartbeat every ``heartbeat_s`` so a silent node shows as stale rather than
healthy. At 10,000 edges with the defaults (10 s, 300 s) that is 33 writes/s
steady and at most 1,000 writes/s while every tunnel flaps at once, which a
burst of changes cannot exceed (docs/operator.md, "Debugging").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fabmesh.mesh.timestamps import format_time
from fabmesh.mesh.tunnelstatus import MAX_LISTED_TUNNELS, NodeReport, Tunnel, TunnelState

LIVENESS_TASKS = frozenset({"IKE_DPD"})


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _endpoint(host: Any, port: Any) -> str | None:
    if not host:
        return None
    host = f"[{host}]" if ":" in str(host) else str(host)
    return f"{host}:{port}" if port else host


def waiting_for_peer(sa: Mapping[str, Any]) -> bool:
    """True while a liveness check of this IKE_SA waits for the peer's answer."""
    return bool(LIVENESS_TASKS & set(sa.get("tasks-active") or ()))


def tunnel_state(sa: Mapping[str, Any] | None, waited_before: bool) -> TunnelState:
    if not sa:
        return TunnelState.DOWN
    if sa.get("state") != "ESTABLISHED":
        return TunnelState.CONNECTING
    if waited_before and waiting_for_peer(sa):
        return TunnelState.UNRESPONSIVE
    children = (sa.get("child-sas") or {}).values()
    if not any(c.get("state") == "INSTALLED" for c in children):
        return TunnelState.CONNECTING
    return TunnelState.UP


def observe(role: str, peers: Iterable[str], sas: Mapping[str, Mapping[str, Any]], now: datetime,
            previous: NodeReport | None, waited: frozenset[str], *, generation: str | None, last_error: str,
            nat_keepalive_s: int | None, max_listed: int = MAX_LISTED_TUNNELS) -> NodeReport:
    """The report for the configured ``peers``; ``waited`` are the peers whose SA waited on the last poll.

    ``since`` is the IKE_SA's establishment time while up; otherwise the time this node first saw the
    current state, kept from ``previous`` while the state holds.
    """
    before = {t.peer: t for t in (previous.tunnels if previous else ())}
    tunnels = []
    for peer in sorted(set(peers)):
        sa = sas.get(peer)
        state = tunnel_state(sa, peer in waited)
        old = before.get(peer)
        if state is TunnelState.UP and sa is not None and sa.get("established") is not None:
            since = format_time(now - timedelta(seconds=_int(sa.get("established"))))
            if old is not None and old.state is state and old.since:
                since = old.since  # charon's seconds tick: keep the first value, not a jittering one
        else:
            since = old.since if old is not None and old.state is state and old.since else format_time(now)
        children = list(((sa or {}).get("child-sas") or {}).values())
        tunnels.append(Tunnel(
            peer=peer, state=state, since=since,
            local_endpoint=_endpoint((sa or {}).get("local-host"), (sa or {}).get("local-port")),
            remote_endpoint=_endpoint((sa or {}).get("remote-host"), (sa or {}).get("remote-port")),
            nat_local=(sa or {}).get("nat-local") == "yes", nat_remote=(sa or {}).get("nat-remote") == "yes",
            initiator=(sa or {}).get("initiator") == "yes",
            bytes_in=sum(_int(c.get("bytes-in")) for c in children),
            bytes_out=sum(_int(c.get("bytes-out")) for c in children),
            packets_in=sum(_int(c.get("packets-in")) for c in children),
            packets_out=sum(_int(c.get("packets-out")) for c in children)))
    up = sum(1 for t in tunnels if t.state is TunnelState.UP)
    listed = tunnels
    if len(tunnels) > max_listed:
        listed = [t for t in tunnels if t.state is not TunnelState.UP][:max_listed]
    return NodeReport(role=role, config_generation=generation, last_error=last_error,
                      tunnels_expected=len(tunnels), tunnels_up=up, nat_keepalive_s=nat_keepalive_s,
                      tunnels=tuple(listed), truncated=len(listed) < len(tunnels), written_at=format_time(now))


def waiting_peers(sas: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The peers whose IKE_SA waits for a liveness answer now (remembered for the next poll)."""
    return frozenset(name for name, sa in sas.items() if waiting_for_peer(sa))


@dataclass(frozen=True)
class Decision:
    write: bool
    reason: str  # "first", "changed", "heartbeat", or why not: "unchanged", "rate-limited"
    retry_in_s: float = 0.0  # when rate-limited: how long until a write is allowed


def decide(report: NodeReport, written: NodeReport | None, written_at: datetime | None, now: datetime,
           min_interval_s: float, heartbeat_s: float) -> Decision:
    """Whether to write ``report`` now, given what was last written (and when, by this node's clock)."""
    if written is None or written_at is None:
        return Decision(True, "first")
    elapsed = (now - written_at).total_seconds()
    if elapsed < 0:  # this node's clock stepped back: do not wait for it to catch up
        elapsed = max(min_interval_s, heartbeat_s)
    if report.key() == written.key():
        if elapsed >= heartbeat_s:
            return Decision(True, "heartbeat")
        return Decision(False, "unchanged")
    if elapsed >= min_interval_s:
        return Decision(True, "changed")
    return Decision(False, "rate-limited", retry_in_s=min_interval_s - elapsed)
