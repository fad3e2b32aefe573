"""Bring charon's loaded connections to the desired set, touching only what differs.

``list-conns`` does not echo everything ``load-conn`` took (proposals, for one),
so charon cannot tell us whether a loaded connection still matches. We keep a
digest of what we loaded per connection in a small state file, together with
the identity of the charon run: the VICI socket's inode and creation time, which
charon makes anew at every start. (Not ``stats`` -> ``uptime.since``: charon
recomputes it from two clocks on every call and it flips by a second while the
same daemon runs.) A different identity means charon restarted and lost
everything: reload all. A lost state file costs one
harmless reload. A connection whose digest is unchanged is never reloaded, so
a healthy tunnel is never disturbed.

A changed connection is terminated before it is reloaded only when the change
touches the session: charon does not re-narrow an established CHILD_SA's traffic
selectors on ``load-conn``, and a peer whose pinned key changed is a revocation,
so its old IKE_SA must end. Credentials alone (this node's own certificate, the
CA bundle, a peer's renewed certificate with the same key) are replaced in
place: ``load-conn`` under the same name swaps charon's peer config while the
established IKE_SAs keep running on the one they were made with, and the next
IKE_SA uses the new credentials. So a renewal or a CA roll drops no tunnel.

A mediated connection (hole punching, ``node/tunnels.py``) can hang: when the
connectivity checks find no working pair (a symmetric NAT) or lose a race
inside charon (``connect_manager.c``: the peer's forwarded ME_CONNECT handled
before the answer to our own, "checklist with id ... not found"), charon keeps
the waiting IKE_SA forever ("this should (can?) not happen") and never tries
again. An attempt still not established :data:`MEDIATION_STUCK_S` after it was
first seen is ended here and started anew, so a pair that can punch through
gets its direct tunnel at a later attempt, and one that cannot stays relayed.
Ending the attempt does not always free charon: after the lost race its
connect manager keeps the pair registered as "in progress" and queues every
later attempt from the same side ("mediation with the same peer is already in
progress, queued") until charon restarts. So the responder of a mediated pair
initiates too when the pair has had no IKE_SA for :data:`MEDIATION_RESPONDER_S`
(its own connect manager is clear); should both sides then build an IKE_SA, the
responder side's ``unique = replace`` keeps one. After a charon restart every
mediated connection is initiated once, responder or not, as soon as the
mediation IKE_SA is up: the peer still holds the old direct IKE_SA, which only
a new one (INITIAL_CONTACT) ends before DPD does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabmesh.mesh.model import split_pems
from fabmesh.strongswan.driver import Charon, ViciError

# Punching through takes about a second (checks every 25 ms, one second to settle on the best pair).
MEDIATION_STUCK_S = 10.0
# How long a mediated pair may stay without an IKE_SA before its responder initiates too.
MEDIATION_RESPONDER_S = 30.0
# How long a pass waits for a mediation IKE_SA it starts (inside the VICI session's 10 s timeout).
MEDIATION_WAIT_MS = 5000


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def session_digest(conn: Mapping[str, Any]) -> str:
    """The digest of what an established IKE_SA depends on: all but credentials (this node's own
    certificate, the CA bundle) and ``unique``, which charon checks only when a new IKE_SA is made
    (the connector switches an edge to ``no`` when it becomes a mediation client, and must not cut
    its tunnel for that). A peer's pinned public key (``remote.pubkeys``) stays in: a renewal keeps
    it, a revocation replaces it."""
    view = json.loads(json.dumps(conn))
    view.pop("unique", None)
    view.get("local", {}).pop("certs", None)
    view.get("remote", {}).pop("cacerts", None)
    return digest(view)


@dataclass(frozen=True)
class Credentials:
    key_pem: str
    ca_pem: str

    def digest(self) -> str:
        return digest([self.key_pem, self.ca_pem])


@dataclass
class TunnelChanges:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    initiated: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)  # reloaded with their IKE_SA ended (a subset of loaded)
    credentials: bool = False

    def __bool__(self) -> bool:
        return bool(self.loaded or self.unloaded or self.initiated or self.credentials)


class TunnelSync:
    def __init__(self, connect: Callable[[], Charon], state_file: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``connect`` opens a VICI session; the session's socket path identifies the charon run."""
        self._connect = connect
        self._state_file = state_file
        self._clock = clock
        self._waiting: dict[str, tuple[str, float]] = {}  # mediated conn -> (IKE_SA uniqueid, first seen)
        self._rejoin: set[str] = set()  # mediated conns to initiate once after a charon restart
        self._absent: dict[str, float] = {}  # mediated conn -> since when it has had no IKE_SA
        self.writes = 0

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self._state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_state(self, state: dict[str, Any]) -> None:
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True))
        tmp.replace(self._state_file)

    def apply(self, desired: Mapping[str, dict[str, Any]], creds: Credentials,
              initiators: set[str]) -> TunnelChanges:
        changes = TunnelChanges()
        with self._connect() as charon:
            run = _charon_run(charon.socket_path)
            state = self._read_state()
            before = json.dumps(state, sort_keys=True)
            restarted = bool(state.get("charon_run")) and state.get("charon_run") != run
            if state.get("charon_run") != run:
                state = {"charon_run": run, "conns": {}, "creds": ""}
            if state.get("creds") != creds.digest():
                charon.load_key(creds.key_pem)
                self.writes += 1
                for ca_pem in split_pems(creds.ca_pem):  # one load-cert per CA of the bundle
                    charon.load_cert(ca_pem, ca=True)
                    self.writes += 1
                state["creds"] = creds.digest()
                changes.credentials = True
            loaded = set(charon.conns())
            recorded: dict[str, str] = state.setdefault("conns", {})
            sessions: dict[str, str] = state.setdefault("sessions", {})
            for name in sorted(loaded - set(desired)):
                charon.unload_conn(name)
                charon.terminate_ike(name)
                self.writes += 2
                recorded.pop(name, None)
                sessions.pop(name, None)
                changes.unloaded.append(name)
            for name, conn in sorted(desired.items()):
                want, session = digest(conn), session_digest(conn)
                if name in loaded and recorded.get(name) == want:
                    continue
                # Load first, then end the old IKE_SA: a peer that reconnects at once (close_action
                # restart) must meet the new config, not the one that still accepts its old key.
                charon.load_conn(name, conn)
                self.writes += 1
                if name in loaded and sessions.get(name) != session:
                    charon.terminate_ike(name)
                    self.writes += 1
                    changes.terminated.append(name)
                recorded[name] = want
                sessions[name] = session
                changes.loaded.append(name)
            if json.dumps(state, sort_keys=True) != before:
                self._write_state(state)
            sas = charon.sas()
            # After a charon restart the peers still hold our old SAs (they only notice by DPD, minutes
            # later), so this side reaches out to every peer it can address, responder or not: the new
            # IKE_SA carries INITIAL_CONTACT and the peer drops the stale one at once.
            reach = set(initiators)
            if restarted:
                reach |= {n for n, c in desired.items() if c.get("remote_addrs") != ["%any"]}
                # Mediated peers too, responder or not, once the mediation IKE_SA is up (a later pass).
                self._rejoin = {n for n, c in desired.items() if c.get("mediated_by")}
            self._rejoin &= desired.keys()
            reach |= self._rejoin
            # The responder of a mediated pair steps in when the pair stays without a direct IKE_SA.
            reach |= {n for n, c in desired.items() if c.get("mediated_by") and self._overdue(n, sas.get(n))}
            for name in sorted(reach & desired.keys(), key=lambda n: (_stage(desired[n]), n)):
                if not desired[name].get("children"):  # a mediation connection: an IKE_SA only
                    # Only beside an established data IKE_SA with the same peer: charon forces
                    # unique=replace on mediation connections, so a first IKE_SA would carry
                    # INITIAL_CONTACT and make the peer drop the data one (node/tunnels.py).
                    if sas.get(name) is None and _data_sa_up(desired, sas, name):
                        # Waited for (a few round trips), so this pass can start the mediated ones.
                        # Not up in time: the mediated connections wait for a later pass.
                        with contextlib.suppress(ViciError):
                            charon.initiate_ike(name, timeout_ms=MEDIATION_WAIT_MS)
                        self.writes += 1
                        changes.initiated.append(name)
                        sas = charon.sas()
                elif (mediation := desired[name].get("mediated_by")) and \
                        sas.get(mediation, {}).get("state") != "ESTABLISHED":
                    # charon would start the mediation connection itself, INITIAL_CONTACT and all.
                    continue
                elif name in self._rejoin:
                    self._rejoin.discard(name)
                    if sas.get(name, {}).get("state") != "ESTABLISHED":
                        charon.initiate(name, name)
                        self.writes += 1
                        changes.initiated.append(name)
                elif mediation and self._stuck(name, sas.get(name)):
                    charon.terminate_ike(name)
                    charon.initiate(name, name)
                    self.writes += 2
                    changes.initiated.append(name)
                elif _needs_initiate(sas.get(name)):
                    charon.initiate(name, name)
                    self.writes += 1
                    changes.initiated.append(name)
        return changes

    def unload_all(self) -> list[str]:
        """Unload and terminate every connection charon holds (an uninstall); the names unloaded."""
        with self._connect() as charon:
            loaded = sorted(charon.conns())
            for name in loaded:
                charon.unload_conn(name)
                charon.terminate_ike(name)
                self.writes += 2
        self._state_file.unlink(missing_ok=True)
        return loaded

    def _overdue(self, name: str, sa: dict[str, Any] | None) -> bool:
        """Whether a mediated connection has had no IKE_SA for :data:`MEDIATION_RESPONDER_S` (our
        side's view: the initiator may be stuck in charon, see the module docstring)."""
        now = self._clock()
        if sa is not None:
            self._absent.pop(name, None)
            return sa.get("state") != "ESTABLISHED"  # our own attempt: stuck handling follows
        since = self._absent.setdefault(name, now)
        if now - since < MEDIATION_RESPONDER_S:
            return False
        self._absent[name] = now
        return True

    def _stuck(self, name: str, sa: dict[str, Any] | None) -> bool:
        """Whether the mediated connection's IKE_SA has waited too long to establish."""
        if sa is None or sa.get("state") == "ESTABLISHED":
            self._waiting.pop(name, None)
            return False
        ident, now = str(sa.get("uniqueid", "")), self._clock()
        seen = self._waiting.setdefault(name, (ident, now))
        if seen[0] != ident:
            self._waiting[name] = (ident, now)
            return False
        if now - seen[1] < MEDIATION_STUCK_S:
            return False
        del self._waiting[name]
        return True


def _charon_run(socket_path: Path) -> str:
    st = socket_path.stat()
    return f"{st.st_ino}:{st.st_ctime_ns}"


def _stage(conn: Mapping[str, Any]) -> int:
    """Initiation order within a pass: data connections, then mediation ones, then mediated ones."""
    if not conn.get("children"):
        return 1
    return 2 if conn.get("mediated_by") else 0


def _data_sa_up(desired: Mapping[str, dict[str, Any]], sas: Mapping[str, dict[str, Any]], name: str) -> bool:
    """Whether a connection with CHILD_SAs to the same peer identity as ``name`` has an established IKE_SA."""
    peer = desired[name].get("remote", {}).get("id")
    return any(conn.get("children") and conn.get("remote", {}).get("id") == peer
               and sas.get(other, {}).get("state") == "ESTABLISHED"
               for other, conn in desired.items() if other != name)


def _needs_initiate(sa: dict[str, Any] | None) -> bool:
    """No IKE_SA, or an established one without any CHILD_SA (e.g. TS_UNACCEPTABLE earlier)."""
    if sa is None:
        return True
    return sa.get("state") == "ESTABLISHED" and not sa.get("child-sas")
