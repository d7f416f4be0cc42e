"""A workload's servers for felix's privileged tests: TCP listeners that accept and close, and a
UDP port that records every datagram's source address (one line per datagram) in a file."""

from __future__ import annotations

import socket
import sys
import threading


def tcp(port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        c.close()


def udp(port: int, path: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    with open(path, "a", buffering=1) as out:
        while True:
            _, addr = s.recvfrom(2048)
            out.write(addr[0] + "\n")


def main() -> None:
    udp_port, path, *tcp_ports = sys.argv[1:]
    for p in tcp_ports:
        threading.Thread(target=tcp, args=(int(p),), daemon=True).start()
    udp(int(udp_port), path)


if __name__ == "__main__":
    main()
