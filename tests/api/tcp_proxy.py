"""A TCP relay on 127.0.0.1 whose forwarding can be frozen: a network partition without touching iptables.

Frozen, it keeps every connection open and accepts new ones but throws away every
byte in both directions, as a link that drops packets does; nobody sees a reset or
a FIN, so a client only notices through its own timeouts. The relay terminates TCP,
so a dropped byte is gone for good (no retransmission after the heal): a TLS stream
that lost bytes is broken and the client must reconnect, and a request sent during
the partition can never reach the API server late.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class FreezableProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def freeze(self) -> None:
        self.frozen.set()

    def heal(self) -> None:
        self.frozen.clear()

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        if not self.frozen.is_set():  # a FIN is a packet too: frozen, it is dropped like the rest
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
