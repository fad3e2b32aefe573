"""A thin, typed driver for charon's VICI socket.

It knows VICI, not fabmesh: callers pass plain connection dictionaries in the
shape ``load-conn`` takes and get plain data back. Everything is decoded from
the ``bytes`` the ``vici`` package returns, so callers compare strings.

Quirks: VICI wants certificates and keys as data, not file names (swanctl reads
the files for you; we do not use swanctl). ``initiate`` blocks until the IKE_SA
is up unless given a timeout of ``-1``; we pass the timeout explicitly. With
``kernel-libipsec`` a ``trap`` policy never fires, so callers load connections
with ``start_action = none`` and call :meth:`Charon.initiate` themselves
(fabmesh.node.tunnels and TunnelSync).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vici


class ViciError(RuntimeError):
    pass


def decode(value: Any) -> Any:
    """Turn the nested bytes/OrderedDict the vici package returns into plain str/dict/list."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Mapping):
        return {decode(k): decode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [decode(v) for v in value]
    return value


class Charon:
    """One VICI session. Cheap to create; reconnect by creating another."""

    def __init__(self, socket_path: Path | str, timeout: float = 10.0) -> None:
        self.socket_path = Path(str(socket_path).removeprefix("unix://"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise ViciError(f"cannot reach charon at {self.socket_path}: {exc}") from exc
        self._sock = sock
        self._session = vici.Session(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Charon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except vici.exception.CommandException as exc:
            raise ViciError(f"{what}: {exc}") from exc
        except (OSError, vici.exception.SessionException) as exc:
            raise ViciError(f"{what}: lost charon at {self.socket_path}: {exc}") from exc

    def version(self) -> dict[str, str]:
        return decode(self._call("version", self._session.version))

    def load_key(self, key_pem: str, key_type: str = "any") -> None:
        self._call("load-key", self._session.load_key, {"type": key_type, "data": key_pem})

    def load_cert(self, cert_pem: str, *, ca: bool = False) -> None:
        message = {"type": "X509", "flag": "CA" if ca else "NONE", "data": cert_pem}
        self._call("load-cert", self._session.load_cert, message)

    def load_conn(self, name: str, conn: Mapping[str, Any]) -> None:
        self._call(f"load-conn {name}", self._session.load_conn, {name: conn})

    def unload_conn(self, name: str) -> None:
        self._call(f"unload-conn {name}", self._session.unload_conn, {"name": name})

    def conns(self) -> dict[str, dict[str, Any]]:
        """Loaded connections by name, as ``list-conns`` reports them."""
        result: dict[str, dict[str, Any]] = {}
        for item in self._call("list-conns", lambda: list(self._session.list_conns())):
            result.update(decode(item))
        return result

    def sas(self) -> dict[str, dict[str, Any]]:
        """IKE_SAs by connection name (the last one wins if a connection has several), except that an
        IKE_SA without CHILD_SA never hides one with: on the connector an edge's mediation IKE_SA shares
        the name of its data connection (``node/tunnels.py``)."""
        result: dict[str, dict[str, Any]] = {}
        for item in self._call("list-sas", lambda: list(self._session.list_sas())):
            for name, sa in decode(item).items():
                if name not in result or sa.get("child-sas") or not result[name].get("child-sas"):
                    result[name] = sa
        return result

    def ike_sas(self) -> list[tuple[str, dict[str, Any]]]:
        """Every IKE_SA as (connection name, SA), duplicates included (a rekey or a race leaves two)."""
        items = self._call("list-sas", lambda: list(self._session.list_sas()))
        return [(name, sa) for item in items for name, sa in decode(item).items()]

    def initiate(self, child: str, ike: str | None = None, timeout_ms: int = -1) -> None:
        """Start a CHILD_SA. ``timeout_ms=-1`` returns at once (charon keeps trying)."""
        message: dict[str, Any] = {"child": child, "timeout": str(timeout_ms), "init-limits": "no"}
        if ike:
            message["ike"] = ike
        self._call(f"initiate {child}", lambda: list(self._session.initiate(message)))

    def initiate_ike(self, ike: str, timeout_ms: int = -1) -> None:
        """Start an IKE_SA without a CHILD_SA (a mediation connection has none to start)."""
        message = {"ike": ike, "timeout": str(timeout_ms), "init-limits": "no"}
        self._call(f"initiate {ike}", lambda: list(self._session.initiate(message)))

    def rekey_child(self, child: str) -> int:
        """Start rekeying the CHILD_SAs named ``child``; returns how many matched.

        Asynchronous, as charon does it: the new CHILD_SA shows in :meth:`sas` once installed.
        """
        reply = decode(self._call(f"rekey {child}", self._session.rekey, {"child": child}))
        return int(reply.get("matches", 0))

    def terminate_ike(self, ike: str, timeout_ms: int = -1, *, ike_id: str | None = None) -> None:
        """End connection ``ike``'s IKE_SAs (only the one with unique id ``ike_id`` when given) at once:
        ``force`` sends the DELETE and removes the SA and its CHILD_SAs without waiting for an answer."""
        which = {"ike": ike} if ike_id is None else {"ike-id": ike_id}
        message = {**which, "timeout": str(timeout_ms), "force": "yes"}
        try:
            self._call(f"terminate {ike}", lambda: list(self._session.terminate(message)))
        except ViciError as exc:
            # "no matching SAs found" is the idempotent case: nothing to terminate.
            if "no matching" not in str(exc):
                raise

