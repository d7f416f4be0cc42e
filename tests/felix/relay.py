"""A TCP relay from 127.0.0.1:<port> inside a network namespace to a port on the machine's loopback.

felix runs inside a test namespace and etcd on the machine's own loopback; this lets the one reach
the other without any link between the namespaces (the machine's network is never touched).
"""

from __future__ import annotations

import socket
import threading

from calyx.kernel.netns import socket_in


class Relay:
    """127.0.0.1:``port`` inside a namespace, relayed to etcd on the machine's loopback."""

    def __init__(self, ns: str, upstream_port: int, port: int = 2379) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket_in(ns)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.upstream, timeout=2)
                upstream.settimeout(None)
            except OSError:
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
