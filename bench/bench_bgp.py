"""bgpd benchmarks, side by side with BIRD and ``ip -batch`` in the same run (root; throwaway namespaces).

Run: ``.venv/bin/python bench/bench_bgp.py`` (``--routes 100000 --announce 10000`` by default;
``--skip fib|learn|announce`` to leave a part out, ``--only fib`` to run one part, ``--fib-reps 3``
to repeat the FIB comparison). Every namespace is ``cxt-...`` and deleted at the end; every BIRD,
etcd, bgpd and ExaBGP started is killed, also on failure.

1. **FIB install** of N learned /32s: bgpd's path (paths into the RIB, selection, the daemon's
   hand-off loop, FIB manager on raw netlink with protocol 79) vs BIRD's kernel protocol vs
   ``ip -batch`` (the floor). BIRD and ``ip -batch`` come from bench/bench_routes.py (the kernel
   layer's benchmark). Each repetition prints the load average (1 min) before it: the machine is
   shared, so compare within a repetition.
2. **Session up → kernel full**: a BIRD ToR feeds N static /32s; the clock starts at
   ``birdc enable host`` on the ToR and stops at the N-th RTM_NEWROUTE in the host's namespace.
   Host daemon: ``bgpd run`` (ExaBGP child, real etcd) vs BIRD with ``protocol kernel``. bgpd's and
   ExaBGP's RSS are read once the kernel is full.
3. **Announce** M prefixes through ExaBGP to a BIRD receiver, commands sent one at a time after
   each ack (as bgpd does): ``announce attributes ... nlri`` in batches of 1,000 vs one
   ``announce route`` per line, at ExaBGP's default ``reactor.speed`` (1.0) and at bgpd's (0.1).
   The clock runs from the first command to BIRD holding all M.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_routes as br  # noqa: E402

from bgpd import api  # noqa: E402
from bgpd.announce import OutAttrs  # noqa: E402
from bgpd.exabgp import resolve_binary  # noqa: E402
from bgpd.fib import Fib  # noqa: E402
from bgpd.rib import Attrs, LocalInfo, PeerInfo, Rib  # noqa: E402
from calyx.kernel.routetable import PROTO_BGPD  # noqa: E402
from tests.bgpd.topo import Bgpd, Cluster, EtcdForward  # noqa: E402
from tests.fixtures.etcd import new_member  # noqa: E402
from tests.fixtures.netns import Netns, create_veth, netns_session  # noqa: E402
from tests.fixtures.routers import router_session  # noqa: E402

RTPROT_BIRD = 12
EXABGP = resolve_binary("exabgp")


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --- 1. FIB install ---------------------------------------------------------------------------------


def bench_bgpd_fib(new_ns: Callable[[], Netns], n: int) -> br.Row:
    host = br.make_host(new_ns)
    fib = Fib(br.METRIC, netns=host.name)
    fib.resync()
    rib = Rib(LocalInfo(64512, "10.99.0.1", addresses=frozenset({"10.99.0.1"})))
    rib.set_peer(PeerInfo(br.GATEWAY, ibgp=False))
    attrs = Attrs(as_path=(65000,), as_path_len=1)
    pfx = [f"{p}/32" for p in br.prefixes(n)]
    local: set[str] = set()  # the daemon's local workload hosts (none here)
    t = time.perf_counter()
    rib.announce(br.GATEWAY, attrs, br.GATEWAY, pfx)
    changes: dict[str, tuple[str, ...] | None] = {}
    for p in rib.take_dirty():  # the hand-off loop of BgpDaemon._apply_fib
        sel = rib.selection(p) if p not in local else None
        changes[p] = sel.next_hops if sel is not None else None
    t_fib = time.perf_counter()
    fib.update(changes)
    t_apply = time.perf_counter()
    fib.apply(sweep=True)
    install = time.perf_counter() - t
    fib_only = time.perf_counter() - t_fib
    apply_only = time.perf_counter() - t_apply
    if br.count_proto(host, PROTO_BGPD) != n:
        raise RuntimeError("bgpd FIB installed fewer routes")
    t = time.perf_counter()
    rib.withdraw(br.GATEWAY, pfx)
    fib.update(dict.fromkeys(rib.take_dirty()))
    fib.apply(sweep=True)
    remove = time.perf_counter() - t
    if br.count_proto(host, PROTO_BGPD) != 0:
        raise RuntimeError("bgpd FIB removal incomplete")
    fib.close()
    return br.Row("bgpd RIB → FIB (raw netlink, proto 79)", n, install, remove,
                  note=f"of which selections → kernel {fib_only:.2f} s, Fib.apply {apply_only:.2f} s")


# --- 2. session up → kernel full --------------------------------------------------------------------


def feeder_conf(n: int) -> str:
    routes = "\n".join(f"    route {p}/32 blackhole;" for p in br.prefixes(n))
    return f"""
router id 10.98.0.254;
protocol device {{}}
protocol static feed {{
    ipv4;
{routes}
}}
protocol bgp host {{
    local 10.98.0.0 as 65000; neighbor 10.98.0.1 as 65001; disabled; hold time 90;
    ipv4 {{ import none; export all; }};
}}
"""


BIRD_HOST = """
router id 10.98.0.1;
protocol device {}
protocol kernel { ipv4 { export all; }; merge paths on; }
protocol bgp tor { local 10.98.0.1 as 65001; neighbor 10.98.0.0 as 65000; ipv4 { import all; export none; }; }
"""


def _learn_topology(new_ns: Callable[[], Netns]) -> tuple[Netns, Netns]:
    tor, host = new_ns(), new_ns()
    create_veth(host, tor, "10.98.0.1/31", "10.98.0.0/31", name_a="up0", name_b="host")
    return tor, host


def _wait_full(watcher: br.RouteWatcher, n: int, timeout: float, what: str,
               alive: Callable[[], bool] = lambda: True) -> float:
    deadline = time.monotonic() + timeout
    while watcher.added < n:
        if time.monotonic() > deadline or not alive():
            raise TimeoutError(f"{what}: {watcher.added} of {n} routes after {timeout} s")
        time.sleep(0.05)
    return watcher.last_add


def bench_learn_bird(new_ns: Callable[[], Netns], n: int, work: Path) -> tuple[float, str]:
    tor, host = _learn_topology(new_ns)
    with router_session(work / "learn-bird") as routers:
        feeder = routers.bird(tor, feeder_conf(n), "feeder")
        routers.bird(host, BIRD_HOST, "host")
        watcher = br.RouteWatcher(host, RTPROT_BIRD)
        try:
            t0 = time.perf_counter()
            feeder.birdc("enable", "host")
            end = _wait_full(watcher, n, 300, "BIRD host")
        finally:
            watcher.close()
    return end - t0, ""


def bench_learn_bgpd(new_ns: Callable[[], Netns], n: int, work: Path) -> tuple[float, str]:
    tor, host = _learn_topology(new_ns)
    member = new_member(work / "etcd")
    fwd = EtcdForward(host, member.client_port)
    ds = member.client()
    bgpd: Bgpd | None = None
    try:
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=False)
        c.node("h", "10.98.0.1/31", as_number=65001)
        c.peer("tor", peer_ip="10.98.0.0", as_number=65000, node="h", hold_time=90)
        with router_session(work / "learn-bgpd") as routers:
            feeder = routers.bird(tor, feeder_conf(n), "feeder")
            bgpd = Bgpd(host, "h", work, fwd.endpoint).start()
            deadline = time.monotonic() + 30
            while bgpd.exabgp_pid() is None:  # ExaBGP configured and listening
                if time.monotonic() > deadline or not bgpd.alive:
                    raise RuntimeError(f"bgpd did not start ExaBGP:\n{bgpd.log_tail()}")
                time.sleep(0.1)
            time.sleep(2.0)
            watcher = br.RouteWatcher(host, PROTO_BGPD)
            try:
                t0 = time.perf_counter()
                feeder.birdc("enable", "host")
                end = _wait_full(watcher, n, 300, "bgpd host", lambda: bgpd is not None and bgpd.alive)
            finally:
                watcher.close()
            time.sleep(1.0)
            assert bgpd.proc is not None
            note = (f"bgpd RSS {rss_mib(bgpd.proc.pid):.0f} MiB, ExaBGP RSS {rss_mib(bgpd.exabgp_pid()):.0f} MiB "
                    f"with {n:,} learned routes")
            return end - t0, note
    finally:
        if bgpd is not None:
            bgpd.stop()
        fwd.close()
        ds.close()
        member.destroy()


# --- 3. announce through ExaBGP ---------------------------------------------------------------------

RECEIVER = """
router id 10.97.0.0;
protocol device {}
protocol bgp sender { local 10.97.0.0 as 65000; neighbor 10.97.0.1 as 65001; ipv4 { import all; export none; }; }
"""


def bird_count(bird: object) -> int:
    out = bird.birdc("show", "route", "count")  # type: ignore[attr-defined]
    for line in out.splitlines():
        if "of" in line and "routes" in line:
            return int(line.split()[0])
    return 0


def bench_announce(new_ns: Callable[[], Netns], m: int, mode: str, speed: float, work: Path) -> float:
    s, r = new_ns(), new_ns()
    create_veth(s, r, "10.97.0.1/31", "10.97.0.0/31")
    routes = {f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('10.200.0.0')) + i)}/32": OutAttrs()
              for i in range(m)}
    lines = api.announce_commands("10.97.0.0", routes) if mode == "batch" else api.route_commands("10.97.0.0", routes)
    d = Path(tempfile.mkdtemp(prefix="cxt-announce-", dir=work))
    (d / "cmds").write_text("\n".join(lines) + "\n")
    conf = d / "exabgp.conf"
    conf.write_text(f"""
process announcer {{
    run {sys.executable} {ROOT / 'bench' / 'bgp_announcer.py'} {d / 'cmds'} {d / 'result'};
    encoder json;
}}
neighbor 10.97.0.0 {{
    router-id 10.97.0.1; local-address 10.97.0.1; local-as 65001; peer-as 65000;
    family {{ ipv4 unicast; }}
    api {{ processes [ announcer ]; neighbor-changes; }}
}}
""")
    env = {**os.environ, "exabgp.daemon.user": "root", "exabgp.daemon.drop": "false", "exabgp.api.cli": "false",
           "exabgp.reactor.speed": str(speed), "exabgp.log.level": "WARNING"}
    with router_session(work / f"announce-{mode}-{speed}") as routers:
        bird = routers.bird(r, RECEIVER, "receiver")
        with open(d / "exabgp.log", "wb") as log:
            proc = s.popen(EXABGP, "server", str(conf), env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 600
            while bird_count(bird) < m:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise TimeoutError(f"announce {mode}: {bird_count(bird)} of {m}")
                time.sleep(0.05)
            end = time.time()
        finally:
            proc.terminate()
            proc.wait(10)
    start = float((d / "result").read_text().split()[1])
    return end - start


# --- main ---------------------------------------------------------------------------------------------


@contextmanager
def workdir() -> Iterator[Path]:
    with br.workdir() as wd:
        yield Path(wd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--routes", type=int, default=100_000)
    ap.add_argument("--announce", type=int, default=10_000)
    ap.add_argument("--skip", action="append", default=[], choices=["fib", "learn", "announce"])
    ap.add_argument("--only", choices=["fib", "learn", "announce"], help="run this part only")
    ap.add_argument("--fib-reps", type=int, default=1, help="repetitions of the FIB comparison (each printed)")
    args = ap.parse_args(argv)
    if args.only:
        args.skip = [part for part in ("fib", "learn", "announce") if part != args.only]
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    n, m = args.routes, args.announce
    out: list[str] = [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; host: {os.uname().nodename}, "
        f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
        f"Command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}",
        "",
    ]
    with workdir() as wd:
        if "fib" not in args.skip:
            ratios = []
            for rep in range(1, args.fib_reps + 1):
                load = os.getloadavg()
                rows = []
                for name, fn in (("bgpd", lambda f: bench_bgpd_fib(f, n)),
                                 ("bird", lambda f: br.bench_bird(f, n, str(wd))),
                                 ("ip", lambda f: br.bench_ip_batch(f, n))):
                    with netns_session() as new_ns:
                        row = fn(new_ns)
                    print(f"# {name}: {row.install:.2f} s", file=sys.stderr)
                    rows.append(row)
                ratios.append(f"{rows[0].install / rows[1].install:.2f} (load {load[0]:.2f})")
                title = f"### FIB install, {n:,} learned /32s"
                if args.fib_reps > 1:
                    title += f" — run {rep} of {args.fib_reps}"
                out += [title, "", f"Load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", "",
                        br.table(rows), ""]
            if args.fib_reps > 1:
                out += [f"bgpd/BIRD install ratio per run: {', '.join(ratios)}", ""]
        if "learn" not in args.skip:
            with netns_session() as new_ns:
                bird_t, _ = bench_learn_bird(new_ns, n, wd)
            print(f"# learn BIRD: {bird_t:.2f} s", file=sys.stderr)
            with netns_session() as new_ns:
                bgpd_t, note = bench_learn_bgpd(new_ns, n, wd)
            print(f"# learn bgpd: {bgpd_t:.2f} s ({note})", file=sys.stderr)
            out += [
                f"### Session up → kernel full, {n:,} routes from a BIRD ToR", "",
                "| host daemon | seconds | x BIRD |", "|---|---:|---:|",
                f"| BIRD 2 (protocol kernel) | {bird_t:.2f} | 1.00 |",
                f"| bgpd + ExaBGP | {bgpd_t:.2f} | {bgpd_t / bird_t:.2f} |", "", note, "",
            ]  # fmt: skip
        if "announce" not in args.skip:
            results = []
            for mode, speed in (("line", 1.0), ("batch", 1.0), ("batch", 0.1)):
                with netns_session() as new_ns:
                    secs = bench_announce(new_ns, m, mode, speed, wd)
                print(f"# announce {mode} speed {speed}: {secs:.2f} s", file=sys.stderr)
                results.append((mode, speed, secs))
            base = results[0][2]
            out += [f"### Announcing {m:,} prefixes through ExaBGP to BIRD", "",
                    "| commands | reactor.speed | seconds | prefixes/s | speed-up vs one per line |",
                    "|---|---:|---:|---:|---:|"]
            for mode, speed, secs in results:
                label = ("one `announce route` per line" if mode == "line"
                         else "`announce attributes … nlri`, 1,000 a line")
                out.append(f"| {label} | {speed} | {secs:.2f} | {m / secs:,.0f} | {base / secs:.1f}x |")
            out.append("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
