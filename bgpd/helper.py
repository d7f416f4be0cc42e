"""The ExaBGP API helper: a byte pipe between ExaBGP's ``process`` pipes and bgpd's unix socket.

ExaBGP starts it (``run python -m bgpd.helper <socket>``) and talks to it over stdin/stdout; bgpd
listens on the socket. The helper first sends ``#hello <ExaBGP's pid>`` so bgpd can tell a respawned
helper of the same ExaBGP (state must be re-learned) from a new ExaBGP. Then it copies stdin to the
socket and the socket to stdout, and exits when either side closes: ExaBGP respawns it, bgpd
re-learns what it missed. It never stops reading stdin while connected, so ExaBGP never blocks on
it. It imports nothing from bgpd (it starts fast and cannot fail on bgpd's dependencies).
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time

CONNECT_TIMEOUT = 10.0


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bgpd.helper <socket path>", file=sys.stderr)
        return 2
    try:
        sock = _connect(args[0])
    except OSError as exc:
        print(f"bgpd helper: cannot connect to {args[0]}: {exc}", file=sys.stderr)
        return 1
    sock.sendall(f"#hello {os.getppid()}\n".encode())
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == stdin:
                data = os.read(stdin, 1 << 16)
                if not data:
                    return 0
                sock.sendall(data)
            else:
                data = sock.recv(1 << 16)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    n = os.write(stdout, view)
                    view = view[n:]


if __name__ == "__main__":
    sys.exit(main())
