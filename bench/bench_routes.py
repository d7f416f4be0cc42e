"""Kernel route install speed: Calyx RouteTable vs ``ip -batch`` vs BIRD 2 vs pyroute2.

Run as root: ``.venv/bin/python bench/bench_routes.py --routes 100000``

Every method gets its own pair of throwaway namespaces (``cxt-...``): a host with a veth to a
peer at 10.99.0.2, and installs N learned /32s ``via 10.99.0.2`` (10.128.0.0 upwards) in the
host's main table, then removes them. Nothing outside those namespaces is touched; every BIRD
started is killed and every namespace deleted, also on failure.

* **calyx**: ``RouteTable(79).set_routes(...)`` then ``apply()`` (includes the initial readback of
  the kernel). Building the ``Route`` objects is timed apart. Also: a no-op apply, a resync (full
  readback of N routes and diff), removal (``set_routes([])`` + apply) and the process RSS.
* **ip -batch**: one ``ip -n ns -batch`` file of ``route add`` lines; removal with ``route del``.
* **bird**: BIRD 2 with N static routes and ``protocol kernel`` disabled at start; the clock runs
  from ``birdc enable kernel1`` until the last route notification (RTM_NEWROUTE, proto bird, read
  from an rtnetlink multicast socket in the namespace) once the kernel holds all N. Removal:
  ``birdc disable kernel1`` until the last RTM_DELROUTE.
* **pyroute2** (``--pyroute2-routes``, 10k by default): ``IPRoute.route("add", ...)`` one call per
  route, time scaled linearly to N.

Prints a markdown table: seconds, routes per second, and ratios to BIRD and to ``ip -batch``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calyx.kernel import netns as knetns
from calyx.kernel import rtnl
from calyx.kernel.cmd import ip_batch
from calyx.kernel.routetable import PROTO_BGPD, Route, RouteTable
from tests.fixtures.netns import Netns, create_veth, netns_session

GATEWAY = "10.99.0.2"
BASE = int(ipaddress.ip_address("10.128.0.0"))
METRIC = 1024
PROTO_BIRD = 12
RTNLGRP_IPV4_ROUTE = 7
NETLINK_ADD_MEMBERSHIP = 1


@dataclass
class Row:
    method: str
    routes: int
    install: float
    remove: float | None
    note: str = ""
    scaled_from: int | None = None


@dataclass
class Extras:
    lines: list[str] = field(default_factory=list)


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def prefixes(n: int) -> Iterator[str]:
    for i in range(n):
        yield socket.inet_ntoa((BASE + i).to_bytes(4, "big"))


def make_host(new_ns: Callable[[], Netns]) -> Netns:
    host, peer = new_ns(), new_ns()
    create_veth(host, peer, "10.99.0.1/24", f"{GATEWAY}/24")
    return host


def count_proto(ns: Netns, proto: int) -> int:
    with rtnl.RtnlSocket(ns.name) as sock:
        return len(sock.dump_routes(socket.AF_INET, proto=proto))


class RouteWatcher:
    """Counts RTM_NEWROUTE/RTM_DELROUTE notifications of one protocol in a namespace (a thread)."""

    def __init__(self, ns: Netns, proto: int) -> None:
        self.proto = proto
        self.sock = knetns.socket_in(ns.name, socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.sock.setsockopt(270, NETLINK_ADD_MEMBERSHIP, RTNLGRP_IPV4_ROUTE)
        self.sock.settimeout(0.2)
        self.added = 0
        self.deleted = 0
        self.last_add = 0.0
        self.last_del = 0.0
        self.overflow = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        hdr = struct.Struct("=IHHII")
        while not self._stop:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                self.overflow = True  # ENOBUFS: some notifications were lost
                continue
            now = time.perf_counter()
            pos = 0
            while pos + 16 <= len(data):
                mlen, mtype, _f, _s, _p = hdr.unpack_from(data, pos)
                if mlen < 16:
                    break
                if mtype in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE) and data[pos + 21] == self.proto:
                    if mtype == rtnl.RTM_NEWROUTE:
                        self.added += 1
                        self.last_add = now
                    else:
                        self.deleted += 1
                        self.last_del = now
                pos += (mlen + 3) & ~3

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def bench_calyx(new_ns: Callable[[], Netns], n: int, extras: Extras, batch_size: int) -> Row:
    host = make_host(new_ns)
    rss0 = rss_kib()
    gw = ipaddress.IPv4Address(GATEWAY)
    t = time.perf_counter()
    routes = [Route(IPv4Network((BASE + i, 32)), gateway=gw) for i in range(n)]
    build = time.perf_counter() - t
    rss_routes = rss_kib()
    table = RouteTable(PROTO_BGPD, netns=host.name, metric_default=METRIC, batch_size=batch_size)
    try:
        t = time.perf_counter()
        table.set_routes(routes)
        set_time = time.perf_counter() - t
        t = time.perf_counter()
        result = table.apply()
        install = time.perf_counter() - t
        if result.added != n or count_proto(host, PROTO_BGPD) != n:
            raise RuntimeError(f"calyx installed {result.added} ({result}), kernel holds fewer than {n}")
        rss1 = rss_kib()
        t = time.perf_counter()
        noop = table.apply()
        noop_time = time.perf_counter() - t
        table.resync()
        t = time.perf_counter()
        resync = table.apply()
        resync_time = time.perf_counter() - t
        if noop.writes or resync.writes:
            raise RuntimeError("a no-op apply wrote to the kernel")
        table.set_routes([])
        t = time.perf_counter()
        removed = table.apply()
        remove = time.perf_counter() - t
        if removed.removed != n or count_proto(host, PROTO_BGPD) != 0:
            raise RuntimeError("calyx removal incomplete")
    finally:
        table.close()
    if extras.lines:
        return Row("Calyx RouteTable.apply (raw netlink)", n, install, remove)  # first repetition's figures
    per_route = 1024 / max(n, 1)
    extras.lines += [
        f"- Calyx: building {n:,} `Route` objects {build:.2f} s (caller side, not in the install time); "
        f"`set_routes` {set_time:.3f} s; no-op apply {noop_time * 1000:.2f} ms (0 writes); "
        f"resync (readback of {n:,} + diff, 0 writes) {resync_time:.2f} s.",
        f"- Calyx RSS (first repetition): {rss0 / 1024:.0f} MiB at start, {rss_routes / 1024:.0f} MiB with the "
        f"{n:,} `Route` objects built ({(rss_routes - rss0) * per_route:.0f} B a route), {rss1 / 1024:.0f} MiB "
        f"after apply (the table's desired and believed state: {(rss1 - rss_routes) * per_route:.0f} B a route).",
    ]
    return Row("Calyx RouteTable.apply (raw netlink)", n, install, remove)


def bench_ip_batch(new_ns: Callable[[], Netns], n: int) -> Row:
    host = make_host(new_ns)
    adds = [f"route add {p}/32 via {GATEWAY} proto {PROTO_BGPD} metric {METRIC}" for p in prefixes(n)]
    dels = [f"route del {p}/32 proto {PROTO_BGPD} metric {METRIC}" for p in prefixes(n)]
    t = time.perf_counter()
    ip_batch(adds, host.name)
    install = time.perf_counter() - t
    if count_proto(host, PROTO_BGPD) != n:
        raise RuntimeError("ip -batch installed fewer routes")
    t = time.perf_counter()
    ip_batch(dels, host.name)
    remove = time.perf_counter() - t
    if count_proto(host, PROTO_BGPD) != 0:
        raise RuntimeError("ip -batch removal incomplete")
    return Row("ip -batch", n, install, remove)


def bench_bird(new_ns: Callable[[], Netns], n: int, workdir: str) -> Row:
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        raise RuntimeError("bird/birdc not installed (Debian package bird2)")
    host = make_host(new_ns)
    conf = os.path.join(workdir, f"bird-{host.name}.conf")
    ctl = os.path.join(workdir, f"bird-{host.name}.ctl")
    with open(conf, "w") as fh:
        fh.write(
            "router id 10.99.0.1;\n"
            "protocol device { scan time 600; }\n"
            f"protocol kernel kernel1 {{ disabled; metric {METRIC}; scan time 3600; learn off;\n"
            "  ipv4 { import none; export all; }; }\n"
            "protocol static static1 { ipv4;\n"
        )
        for p in prefixes(n):
            fh.write(f"  route {p}/32 via {GATEWAY};\n")
        fh.write("}\n")

    def birdc(*args: str) -> str:
        return subprocess.run(
            ["birdc", "-s", ctl, *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout

    host.popen("bird", "-f", "-c", conf, "-s", ctl, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rib_full() -> bool:
        if not os.path.exists(ctl):
            return False
        try:
            out = birdc("show", "route", "count")
        except subprocess.CalledProcessError:
            return False
        return f"{n} of {n} routes" in out

    wait_for(rib_full, 300, "BIRD to load its static routes")
    watcher = RouteWatcher(host, PROTO_BIRD)
    try:
        t0 = time.perf_counter()
        birdc("enable", "kernel1")
        wait_for(lambda: watcher.added >= n or watcher.overflow, 600, "BIRD to install the routes")
        if watcher.overflow:  # notifications lost: fall back to counting with dumps
            wait_for(lambda: count_proto(host, PROTO_BIRD) >= n, 600, "BIRD to install the routes")
            install = time.perf_counter() - t0
        else:
            install = watcher.last_add - t0
        if count_proto(host, PROTO_BIRD) != n:
            raise RuntimeError("BIRD installed a different number of routes")
        t0 = time.perf_counter()
        birdc("disable", "kernel1")
        wait_for(lambda: watcher.deleted >= n or watcher.overflow, 600, "BIRD to remove the routes")
        if watcher.overflow:
            wait_for(lambda: count_proto(host, PROTO_BIRD) == 0, 600, "BIRD to remove the routes")
            remove = time.perf_counter() - t0
        else:
            remove = watcher.last_del - t0
    finally:
        watcher.close()
    note = "dump-polled (notifications overflowed)" if watcher.overflow else ""
    return Row("BIRD 2 protocol kernel", n, install, remove, note)


def bench_pyroute2(new_ns: Callable[[], Netns], n: int, sample: int) -> Row:
    from pyroute2 import IPRoute

    host = make_host(new_ns)
    nets = list(prefixes(sample))
    with knetns.enter(host.name):
        ipr = IPRoute()
    try:
        t = time.perf_counter()
        for p in nets:
            ipr.route("add", dst=f"{p}/32", gateway=GATEWAY, proto=PROTO_BGPD, priority=METRIC)
        install = time.perf_counter() - t
        if count_proto(host, PROTO_BGPD) != sample:
            raise RuntimeError("pyroute2 installed fewer routes")
        t = time.perf_counter()
        for p in nets:
            ipr.route("del", dst=f"{p}/32", proto=PROTO_BGPD, priority=METRIC)
        remove = time.perf_counter() - t
    finally:
        ipr.close()
    scale = n / sample
    return Row("pyroute2 IPRoute.route, one call a route", n, install * scale, remove * scale, scaled_from=sample)


def table(rows: list[Row]) -> str:
    bird = next((r.install for r in rows if r.method.startswith("BIRD")), None)
    ipb = next((r.install for r in rows if r.method == "ip -batch"), None)
    out = [
        "| method | routes | install (s) | routes/s | x BIRD | x ip -batch | remove (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r.method + (f" (measured {r.scaled_from:,}, scaled)" if r.scaled_from else "")
        label += f" ({r.note})" if r.note else ""
        ratio_b = f"{r.install / bird:.2f}" if bird else "-"
        ratio_i = f"{r.install / ipb:.2f}" if ipb else "-"
        remove = f"{r.remove:.2f}" if r.remove is not None else "-"
        rate = f"{r.routes / r.install:,.0f}"
        out.append(f"| {label} | {r.routes:,} | {r.install:.2f} | {rate} | {ratio_b} | {ratio_i} | {remove} |")
    return "\n".join(out)


@contextmanager
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cxt-bench-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--routes", type=int, default=100_000, help="routes to install (default 100000)")
    ap.add_argument("--pyroute2-routes", type=int, default=10_000, help="pyroute2 sample size, 0 to skip")
    ap.add_argument("--batch-size", type=int, default=rtnl.DEFAULT_BATCH, help="Calyx netlink batch size")
    ap.add_argument("--reps", type=int, default=1, help="repetitions; the best time of each method is shown")
    ap.add_argument("--skip", action="append", default=[], choices=["calyx", "ip", "bird", "pyroute2"])
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    n = args.routes
    best: dict[str, Row] = {}
    extras = Extras()
    with workdir() as wd:
        for _rep in range(args.reps):
            runs: list[tuple[str, Callable[[Callable[[], Netns]], Row]]] = [
                ("calyx", lambda f: bench_calyx(f, n, extras, args.batch_size)),
                ("ip", lambda f: bench_ip_batch(f, n)),
                ("bird", lambda f: bench_bird(f, n, wd)),
            ]
            if args.pyroute2_routes:
                runs.append(("pyroute2", lambda f: bench_pyroute2(f, n, min(args.pyroute2_routes, n))))
            for name, fn in runs:
                if name in args.skip:
                    continue
                with netns_session() as new_ns:
                    row = fn(new_ns)
                print(f"# {row.method}: install {row.install:.2f} s, remove {row.remove or 0:.2f} s", file=sys.stderr)
                if name not in best or row.install < best[name].install:
                    best[name] = row
    rows = [best[k] for k in ("calyx", "ip", "bird", "pyroute2") if k in best]
    print(f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; host: {os.uname().nodename}, "
          f"{os.cpu_count()} CPUs, Linux {os.uname().release}")  # fmt: skip
    print(f"Command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print()
    print(table(rows))
    print()
    for line in extras.lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
