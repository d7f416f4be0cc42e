"""A TCP forwarder from a loopback port of the machine into a lab's namespace.

The lab's etcd listens on the management network inside the lab (where the hosts reach it, as in
containerlab). Operators and tests on the machine reach it through this forwarder, which listens
on ``127.0.0.1:<port>`` of the root namespace and opens each upstream connection from a socket
created inside the lab's namespace (a socket keeps the namespace it was created in). Nothing is
added to the machine's links or routes.

Run as ``python -m calyx.lab.forward --netns NAME --connect HOST:PORT --port-file FILE``: it binds
a free port (or ``--listen``), writes the port number to FILE, and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from calyx.kernel.netns import socket_in

BUFFER = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


async def _handle(netns: str, host: str, port: int, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    up = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    up.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(up, (host, port)), 5.0)
    except (OSError, TimeoutError):
        up.close()
        writer.close()
        return
    up_reader, up_writer = await asyncio.open_connection(sock=up)
    await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
    for w in (writer, up_writer):
        with contextlib.suppress(Exception):
            w.close()


async def serve(listen_host: str, listen_port: int, netns: str, host: str, port: int, port_file: str | None) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(netns, host, port, r, w), listen_host, listen_port)
    bound = server.sockets[0].getsockname()[1]
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{bound}\n")
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="calyx.lab.forward", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--netns", required=True, help="namespace (name under /run/netns or path) to connect from")
    ap.add_argument("--connect", required=True, help="HOST:PORT inside that namespace")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT on this machine (port 0: any free port)")
    ap.add_argument("--port-file", help="write the bound port here")
    args = ap.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    lhost, _, lport = args.listen.rpartition(":")
    if lhost not in ("127.0.0.1", "localhost", "::1"):
        print("calyx.lab.forward: listens on loopback only", file=sys.stderr)
        return 2
    asyncio.run(serve(lhost, int(lport), args.netns, host, int(port), args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
