"""The path from each lab host to the API server: a TCP relay listening on 127.0.0.1:6443 inside every
node host's namespace, forwarding to the real kube-apiserver on the machine's loopback.

Why: lab hosts are network namespaces, and the API server listens on the root
namespace's 127.0.0.1, which no host can reach. On a real node the agent reaches
the API server over the node's network; here this relay stands in for that
path (TLS passes through untouched: the server's certificate names 127.0.0.1).
It is not on the hosts' WAN: ``fabmesh lab cut`` takes tunnels down and leaves
the node able to report it, as a tunnel path failure on a real edge would.

Each listening socket is made inside its host's namespace with ``setns(2)``
(the main thread enters it, binds, and returns before any thread starts; a
socket stays in the namespace it was made in). Run as
``python -m fabmesh.lab.apiproxy --dir LAB_DIR``; stopped by PID with the lab.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import socket
import threading
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

from fabmesh.lab.state import LabState

log = logging.getLogger("fabmesh.lab.apiproxy")
PORT = 6443
SERVER = f"https://127.0.0.1:{PORT}"  # what the lab's node processes are told
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def listen_in(netns: str, port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` inside ``netns``; the caller's namespace is restored."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(target)
    return sock


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, upstream: tuple[str, int]) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            server = socket.create_connection(upstream, timeout=10)
        except OSError as exc:
            log.warning("cannot reach the API server at %s:%d: %s", *upstream, exc)
            conn.close()
            continue
        server.settimeout(None)
        for a, b in ((conn, server), (server, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fabmesh.lab.apiproxy")
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    state = LabState.load(args.dir)
    if state is None or state.kubeconfig is None:
        parser.error(f"no running lab in {args.dir}")
    import yaml

    server = urlparse(yaml.safe_load(Path(state.kubeconfig).read_text())["clusters"][0]["cluster"]["server"])
    upstream = (server.hostname or "127.0.0.1", server.port or 443)
    listeners = {h.name: listen_in(h.netns, PORT) for h in state.hosts if h.role != "cloud"}
    for name, listener in listeners.items():
        threading.Thread(target=_serve, args=(listener, upstream), daemon=True).start()
        log.info("host=%s listening 127.0.0.1:%d -> %s:%d", name, PORT, *upstream)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
