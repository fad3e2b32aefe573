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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabmesh.mesh.model import split_pems
from fabmesh.strongswan.driver import Charon


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def session_digest(conn: Mapping[str, Any]) -> str:
    """The digest of what an established IKE_SA depends on: all but credentials (this node's own
    certificate, the CA bundle). A peer's pinned public key (``remote.pubkeys``) stays in: a renewal
    keeps it, a revocation replaces it."""
    view = json.loads(json.dumps(conn))
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
    def __init__(self, connect: Callable[[], Charon], state_file: Path) -> None:
        """``connect`` opens a VICI session; the session's socket path identifies the charon run."""
        self._connect = connect
        self._state_file = state_file
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
            for name in sorted(reach):
                if name in desired and _needs_initiate(sas.get(name)):
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


def _charon_run(socket_path: Path) -> str:
    st = socket_path.stat()
    return f"{st.st_ino}:{st.st_ctime_ns}"


def _needs_initiate(sa: dict[str, Any] | None) -> bool:
    """No IKE_SA, or an established one without any CHILD_SA (e.g. TS_UNACCEPTABLE earlier)."""
    if sa is None:
        return True
    return sa.get("state") == "ESTABLISHED" and not sa.get("child-sas")
