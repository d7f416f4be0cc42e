"""bgpd speaks systemd's notify protocol and answers /livez and /readyz — as a real process (with its
ExaBGP) in a network namespace, a real etcd, and a BIRD ToR as its peer.

Topology: ``h1`` (bgpd, AS 65001, 10.10.1.1/31) ── ``tor`` (BIRD, AS 65000, 10.10.1.0/31). bgpd gets
``NOTIFY_SOCKET`` (a socket this test reads, with the sender's credentials, as systemd does) and
``WATCHDOG_USEC=2 s``. What must hold:

- no ``READY=1`` while etcd is unreachable, nor while this node has no address in the datastore
  (bgpd cannot peer), each said in /readyz and ``STATUS=``; ``READY=1`` once in sync with ExaBGP
  running its configuration and the FIB programmed;
- /readyz 200 only when every configured session is established or reports why not: a second peer
  where nothing listens keeps it 503 until its status carries a reason;
- ``WATCHDOG=1`` keeps coming from bgpd's pid; they stop while its main thread alone is stopped
  (ptrace; /livez then says 503) and while the process is stopped (SIGSTOP), and resume after;
- /readyz 503 while etcd is unreachable after start-up; SIGTERM sends ``STOPPING=1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calyx.datastore import keys
from tests.bgpd.topo import Bgpd, Cluster, EtcdForward, wait_established
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import Bird, router_session, wait_for
from tests.fixtures.sdnotify import QUIET, NotifySocket, assert_silent_while_stopped, freeze_main_thread, http_get

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

WATCHDOG_USEC = 2_000_000
METRICS_PORT = 9092
TOR, GHOST = "10.10.1.0", "10.10.7.7"  # GHOST: routed through the ToR, which has no route to it

BIRD_TOR = """
router id 10.10.255.254;
protocol device {}
protocol kernel { ipv4 { export where source = RTS_BGP; }; }
protocol static { ipv4; route 10.88.0.0/24 blackhole; }
protocol bgp h1 { local as 65000; neighbor 10.10.1.1 as 65001; hold time 30; ipv4 { import all; export all; }; }
"""


@dataclass
class Topo:
    h1: Netns
    tor: Netns
    bird: Bird
    cluster: Cluster
    fwd: EtcdForward
    work: Path


@pytest.fixture
def topo(etcd: EtcdMember, tmp_path: Path) -> Iterator[Topo]:
    with netns_session() as make, router_session(tmp_path) as routers:
        h1, tor = make(), make()
        create_veth(h1, tor, "10.10.1.1/31", "10.10.1.0/31", name_a="up0", name_b="h1")
        h1.ip("route", "add", f"{GHOST}/32", "via", TOR)
        tor.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        bird = routers.bird(tor, BIRD_TOR, "tor")
        ds = etcd.client()
        ds.delete_prefix(keys.PREFIX)
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=False, graceful_restart_time=5)
        c.peer("tor", peer_ip=TOR, as_number=65000, node="h1")
        c.pool("p", "10.65.0.0/16")
        c.block("10.65.1.0/26", "h1")
        fwd = EtcdForward(h1, etcd.client_port)
        try:
            yield Topo(h1, tor, bird, c, fwd, tmp_path)
        finally:
            fwd.close()
            ds.delete_prefix(keys.PREFIX)
            ds.close()


def _start(topo: Topo, sock: NotifySocket) -> Bgpd:
    b = Bgpd(topo.h1, "h1", topo.work, topo.fwd.endpoint, metrics_port=METRICS_PORT,
             env={"NOTIFY_SOCKET": sock.env, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    return b.start()


def _probe(topo: Topo, path: str) -> tuple[int, str]:
    return http_get(METRICS_PORT, path, topo.h1.name)


def _listening(topo: Topo) -> bool:
    try:
        _probe(topo, "/livez")
    except OSError:
        return False
    return True


def test_ready_when_in_sync_and_programmed_and_readyz_waits_for_every_session(topo: Topo,
                                                                             notify_socket: NotifySocket) -> None:
    sock, c = notify_socket, topo.cluster
    topo.fwd.block()  # etcd unreachable from h1
    bgpd = _start(topo, sock)
    try:
        assert bgpd.proc is not None
        pid = bgpd.proc.pid  # `ip netns exec` execs bgpd: its pid, as systemd's main pid would be
        sock.wait_count("WATCHDOG=1", 2, 30)
        wait_for(lambda: _listening(topo), 20, "bgpd's metrics listener")
        sock.wait_for("STATUS=not ready: waiting for the datastore (etcd unreachable, or the snapshot is loading)", 10)
        assert _probe(topo, "/readyz")[0] == 503
        # etcd answers, but the node has no address yet: still not ready, and it says why
        topo.fwd.unblock()
        no_node = f"node h1 has no IPv4 address in the datastore ({keys.node_key('h1')}): not peering"
        sock.wait_for(f"STATUS=not ready: {no_node}", 30, alive=lambda: bgpd.alive)
        assert _probe(topo, "/readyz") == (503, no_node + "\n")
        time.sleep(QUIET)
        assert not sock.with_field("READY=1"), sock.summary()
        # the node appears: ExaBGP starts, the FIB is programmed: READY=1
        c.node("h1", "10.10.1.1/31", as_number=65001)
        ready = sock.wait_for("READY=1", 30, alive=lambda: bgpd.alive)
        assert bgpd.exabgp_pid() is not None  # the announcer runs when READY=1 is sent
        assert ready.pid == pid and {m.pid for m in sock.messages()} == {pid}
        wait_established(c, "h1", [TOR], bgpd)
        wait_for(lambda: _probe(topo, "/readyz")[0] == 200, 20, "/readyz 200 with the one session established")
        assert _probe(topo, "/readyz")[1] == "ok: in sync; FIB programmed; 1/1 BGP sessions established\n"

        # a second peer where nothing listens: not ready until its status says why it is not established
        c.peer("ghost", peer_ip=GHOST, as_number=65000, node="h1")
        wait_for(lambda: _probe(topo, "/readyz")[0] == 503, 20, "/readyz 503 with a silent session")
        assert GHOST in _probe(topo, "/readyz")[1]

        def ghost_reported() -> bool:
            return bool(c.peer_status("h1").get(GHOST, {}).get("last_error"))

        wait_for(ghost_reported, 60, "the ghost peer's status to carry a reason")
        wait_for(lambda: _probe(topo, "/readyz")[0] == 200, 20, "/readyz 200 with every session accounted for")
        body = _probe(topo, "/readyz")[1]
        assert body == "ok: in sync; FIB programmed; 1/2 BGP sessions established, 1 down with a reason " \
                       "(calyxctl node status)\n", body

        # etcd lost after start-up: 503 with the reason; back: 200; READY=1 only ever once
        topo.fwd.block()
        wait_for(lambda: _probe(topo, "/readyz")[0] == 503, 20, "/readyz 503 while etcd is unreachable")
        assert _probe(topo, "/readyz")[1].startswith("datastore not in sync")
        assert _probe(topo, "/livez")[0] == 200
        topo.fwd.unblock()
        wait_for(lambda: _probe(topo, "/readyz")[0] == 200, 30, "/readyz 200 with etcd back")
        assert len(sock.with_field("READY=1")) == 1
        bgpd.stop()
        assert sock.wait_for("STOPPING=1", 5).pid == pid
    finally:
        bgpd.stop()
        print(bgpd.log_tail())


def test_watchdog_pings_come_from_the_main_loop(topo: Topo, notify_socket: NotifySocket) -> None:
    sock = notify_socket
    topo.cluster.node("h1", "10.10.1.1/31", as_number=65001)
    bgpd = _start(topo, sock)
    try:
        assert bgpd.proc is not None
        pid = bgpd.proc.pid
        sock.wait_for("READY=1", 40, alive=lambda: bgpd.alive)
        wait_for(lambda: _listening(topo), 20, "bgpd's metrics listener")
        start = time.monotonic()
        time.sleep(QUIET)
        assert len([m for m in sock.with_field("WATCHDOG=1", since=start) if m.pid == pid]) >= 2, sock.summary()

        with freeze_main_thread(pid):  # the loop stopped, the process's other threads running
            frozen = time.monotonic()
            wait_for(lambda: _probe(topo, "/livez")[0] == 503, 10, "/livez 503 with the main loop stopped")
            assert _probe(topo, "/readyz")[1].startswith("main loop has not turned for")
            time.sleep(max(0.0, frozen + QUIET - time.monotonic()))
            assert not sock.with_field("WATCHDOG=1", since=frozen + 0.5), sock.summary()
        sock.wait_for("WATCHDOG=1", 10, since=time.monotonic())
        wait_for(lambda: _probe(topo, "/livez")[0] == 200, 10, "/livez 200 again")

        assert_silent_while_stopped(sock, pid)
        assert bgpd.alive
    finally:
        bgpd.stop()
