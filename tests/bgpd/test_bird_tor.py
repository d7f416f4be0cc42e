"""Two hosts running ``bgpd run`` behind a BIRD 2 ToR, with real etcd, ExaBGP and packets.

Topology (one per module; every namespace and process is removed at the end)::

    h1 (AS 65001) 10.10.1.1/31 ── 10.10.1.0/31 tor (BIRD, AS 65000) 10.10.2.0/31 ── 10.10.2.1/31 h2 (AS 65002)
    workload 10.65.1.1 in block 10.65.1.0/26                              workload 10.65.2.1 in 10.65.2.0/26
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calyx.datastore import keys
from calyx.kernel.netns import socket_in
from tests.bgpd.topo import (
    Bgpd,
    Cluster,
    EtcdForward,
    Pinger,
    add_address,
    kernel_routes,
    ping_ok,
    wait_established,
    wait_route,
)
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import Bird, router_session, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

BIRD_TOR = """
router id 10.10.255.254;
protocol device {}
protocol kernel { ipv4 { export where source = RTS_BGP; }; merge paths on; }
protocol static odd {
    ipv4;
    route 10.88.0.0/24 blackhole { bgp_origin = ORIGIN_INCOMPLETE; bgp_med = 7; bgp_community.add((65000, 7));
                                   bgp_large_community.add((65000, 1, 2)); bgp_ext_community.add((rt, 65000, 9)); };
}
template bgp hosts {
    local as 65000; hold time 30; graceful restart on;
    ipv4 { import all; export all; };
}
protocol bgp h1 from hosts { neighbor 10.10.1.1 as 65001; }
protocol bgp h2 from hosts { neighbor 10.10.2.1 as 65002; }
"""


@dataclass
class Topo:
    tor: Netns
    h1: Netns
    h2: Netns
    bird: Bird
    cluster: Cluster
    bgpd1: Bgpd
    bgpd2: Bgpd


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    work: Path = tmp_path_factory.mktemp("bird-tor")
    with netns_session() as make, router_session(work) as routers:
        tor, h1, h2 = make(), make(), make()
        create_veth(h1, tor, "10.10.1.1/31", "10.10.1.0/31", name_a="up0", name_b="h1")
        create_veth(h2, tor, "10.10.2.1/31", "10.10.2.0/31", name_a="up0", name_b="h2")
        tor.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        add_address(h1, "10.65.1.1/32")
        add_address(h2, "10.65.2.1/32")
        bird = routers.bird(tor, BIRD_TOR, "tor")
        ds = etcd.client()
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=False, graceful_restart_time=60)
        c.node("h1", "10.10.1.1/31", as_number=65001)
        c.node("h2", "10.10.2.1/31", as_number=65002)
        c.peer("tor-h1", peer_ip="10.10.1.0", as_number=65000, node="h1", hold_time=30)
        c.peer("tor-h2", peer_ip="10.10.2.0", as_number=65000, node="h2", hold_time=30)
        c.pool("p", "10.65.0.0/16")
        c.block("10.65.1.0/26", "h1")
        c.block("10.65.2.0/26", "h2")
        fwds = [EtcdForward(h1, etcd.client_port), EtcdForward(h2, etcd.client_port)]
        b1 = Bgpd(h1, "h1", work, fwds[0].endpoint).start()
        b2 = Bgpd(h2, "h2", work, fwds[1].endpoint).start()
        try:
            wait_established(c, "h1", ["10.10.1.0"], b1)
            wait_established(c, "h2", ["10.10.2.0"], b2)
            yield Topo(tor, h1, h2, bird, c, b1, b2)
        finally:
            for b in (b1, b2):
                b.stop()
            for f in fwds:
                f.close()
            ds.close()


def test_sessions_and_status(topo: Topo, etcd: EtcdMember) -> None:
    assert topo.bird.established("h1") and topo.bird.established("h2")
    st = topo.cluster.peer_status("h1")["10.10.1.0"]
    assert st["peer_type"] == "node specific" and st["peer_as"] == 65000 and st["since"]
    # what an operator sees (calyxctl reads the same leased keys)
    out = subprocess.run([sys.executable, "-m", "calyx.cli.main", "--etcd-endpoints", etcd.endpoint, "node",
                          "status", "h1"], capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "CALYX_CONFIG": "/dev/null"})
    assert "10.10.1.0" in out.stdout and "node specific" in out.stdout, out.stdout + out.stderr


def test_blocks_reach_tor_and_other_host(topo: Topo) -> None:
    routes = wait_for(lambda: topo.bird.routes().get("10.65.1.0/26"), 20, "h1's block at the ToR")
    assert routes[0].nexthops == ["10.10.1.1"] and routes[0].attrs.get("BGP.as_path") == "65001"
    r = wait_route(topo.h2, "10.65.1.0/26", ["10.10.2.0"])
    assert r["metric"] == 20  # kernel_routes lists protocol 79 only
    wait_route(topo.h1, "10.65.2.0/26", ["10.10.1.0"])
    assert ping_ok(topo.h2, "10.65.2.1", "10.65.1.1")
    # the route with unusual attributes (origin incomplete, MED, large and extended communities) parsed
    wait_route(topo.h1, "10.88.0.0/24", ["10.10.1.0"])
    # our own block is never installed from BGP on the host that owns it
    assert "10.65.1.0/26" not in kernel_routes(topo.h1)
    status = topo.cluster.peer_status("h2")["10.10.2.0"]
    assert status["prefixes_sent"] == 1 and status["prefixes_received"] >= 2


def test_borrowed_address_and_withdraws(topo: Topo) -> None:
    c = topo.cluster
    c.workload("h1", "borrow", "10.65.2.9/32")  # an address of h2's block living on h1
    wait_for(lambda: "10.65.2.9/32" in topo.bird.routes(), 20, "borrowed /32 at the ToR")
    wait_route(topo.h2, "10.65.2.9/32", ["10.10.2.0"])
    c.delete_workload("h1", "borrow")
    wait_for(lambda: "10.65.2.9/32" not in topo.bird.routes(), 20, "borrowed /32 withdrawn at the ToR")
    wait_route(topo.h2, "10.65.2.9/32", None)
    c.block("10.65.3.0/26", "h1")
    wait_route(topo.h2, "10.65.3.0/26", ["10.10.2.0"])
    c.delete_block("10.65.3.0/26")
    wait_route(topo.h2, "10.65.3.0/26", None)
    assert "10.65.3.0/26" not in topo.bird.routes()


def test_peer_shutdown_removes_routes_and_flaps_do_not_crash(topo: Topo) -> None:
    topo.bird.birdc("disable", "h2")  # a Cease notification: graceful restart does not apply
    wait_route(topo.h2, "10.65.1.0/26", None, timeout=15)
    for _ in range(3):
        topo.bird.birdc("enable", "h2")
        time.sleep(0.5)
        topo.bird.birdc("disable", "h2")
        time.sleep(0.3)
    topo.bird.birdc("enable", "h2")
    wait_route(topo.h2, "10.65.1.0/26", ["10.10.2.0"], timeout=40)
    assert topo.bgpd2.alive
    wait_established(topo.cluster, "h2", ["10.10.2.0"], topo.bgpd2)


def _helper_pid(topo: Topo) -> int | None:
    exa = topo.bgpd1.exabgp_pid()
    if exa is None:
        return None
    for child in topo.bgpd1.children(exa):
        with contextlib.suppress(OSError):
            if b"bgpd.helper" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    return None


def test_helper_respawn_relearns_state(topo: Topo) -> None:
    """ExaBGP respawns a dead API helper and replays nothing: bgpd reads its Adj-RIBs back."""
    helper = wait_for(lambda: _helper_pid(topo), 10, "the API helper")
    exa = topo.bgpd1.exabgp_pid()
    os.kill(helper, signal.SIGKILL)
    wait_for(lambda: "re-learned state after helper respawn" in topo.bgpd1.log.read_text(), 30, "re-learning")
    assert topo.bgpd1.exabgp_pid() == exa  # the same ExaBGP, sessions kept
    assert topo.bird.established("h1")
    wait_route(topo.h1, "10.65.2.0/26", ["10.10.1.0"])
    topo.cluster.block("10.65.4.0/26", "h1")  # announcements and withdraws still work afterwards
    wait_route(topo.h2, "10.65.4.0/26", ["10.10.2.0"])
    topo.cluster.delete_block("10.65.4.0/26")
    wait_route(topo.h2, "10.65.4.0/26", None)
    topo.cluster.block("10.65.5.0/26", "h2")  # and so does learning
    wait_route(topo.h1, "10.65.5.0/26", ["10.10.1.0"])
    topo.cluster.delete_block("10.65.5.0/26")
    wait_route(topo.h1, "10.65.5.0/26", None)


def _bgp(msg_type: int, body: bytes) -> bytes:
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), msg_type) + body


def _open(asn: int, router_id: str) -> bytes:
    caps = bytes([1, 4, 0, 1, 0, 1]) + bytes([65, 4]) + struct.pack("!I", asn)
    params = bytes([2, len(caps)]) + caps
    return _bgp(1, struct.pack("!BHH4sB", 4, asn, 30, socket.inet_aton(router_id), len(params)) + params)


def test_garbage_from_a_peer_does_not_crash_bgpd(topo: Topo) -> None:
    """A configured peer that sends junk, and one that opens a session then sends a malformed UPDATE."""
    exa_before = topo.bgpd1.exabgp_pid()
    since_before = _settled_since(topo.bird, "h1")
    with netns_session() as make:
        junk = make()
        create_veth(topo.h1, junk, "10.10.9.1/31", "10.10.9.0/31", name_a="j0", name_b="j0")
        junk.ip("route", "add", "10.10.1.1/32", "via", "10.10.9.1")
        topo.cluster.peer("junk", peer_ip="10.10.9.0", as_number=65010, node="h1", hold_time=30)
        wait_for(lambda: "10.10.9.0" in topo.cluster.peer_status("h1"), 20, "the junk peer configured")
        for attempt in range(4):
            sock = socket_in(junk.name, socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.bind(("10.10.9.0", 0))
                sock.connect(("10.10.1.1", 179))
                if attempt % 2:
                    sock.sendall(b"\x00GARBAGE" * 100)
                else:
                    sock.sendall(_open(65010, "10.10.9.0"))
                    sock.recv(4096)
                    sock.sendall(_bgp(4, b""))  # keepalive
                    bad_attrs = bytes([0x40, 1, 5, 0, 0, 0, 0, 0]) + bytes([0x40, 3, 4]) + socket.inet_aton("10.10.9.0")
                    sock.sendall(_bgp(2, struct.pack("!H", 0) + struct.pack("!H", len(bad_attrs)) + bad_attrs
                                      + bytes([24, 10, 55, 1])))
                with contextlib.suppress(OSError):
                    sock.recv(4096)
            except OSError:
                pass
            finally:
                sock.close()
            time.sleep(0.5)
        assert topo.bgpd1.alive, topo.bgpd1.log_tail()
        assert topo.cluster.peer_status("h1")["10.10.9.0"]["state"] != "established"
        assert "10.55.1.0/24" not in kernel_routes(topo.h1)
        topo.cluster.ds.delete(keys.bgp_peer_key("junk"))
        wait_for(lambda: "10.10.9.0" not in topo.cluster.peer_status("h1"), 20, "the junk peer removed")
    assert topo.bird.established("h1")
    wait_established(topo.cluster, "h1", ["10.10.1.0"], topo.bgpd1)
    # adding and removing the peer reloaded ExaBGP (SIGUSR1): same process, the ToR session never reset
    assert topo.bgpd1.exabgp_pid() == exa_before
    assert _since(topo.bird, "h1") == since_before


def _settled_since(bird: Bird, proto: str) -> str:
    """The time BIRD's session with ``proto`` last changed state, once it is Established and unchanged for 2 s.

    A session the previous test disturbed can still be settling (BIRD records more than one state change
    within milliseconds as a session comes up); comparing against such a reading would blame this test.
    """
    last = ""
    stable_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _since(bird, proto) if bird.established(proto) else ""
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now and time.monotonic() - stable_since >= 2.0:
            return now
        time.sleep(0.2)
    raise AssertionError(f"BIRD's session {proto} did not settle in Established within 60 s (last since={last!r})")


def _since(bird: Bird, proto: str) -> str:
    for line in bird.birdc("show", "protocols", proto).splitlines():
        parts = line.split()
        if parts and parts[0] == proto:
            return parts[4]
    return ""


def _watch_no_gap(topo: Topo, action: str) -> None:
    """Kill ExaBGP or bgpd on h1 under a ping from h2; the ToR and both kernels must keep the routes."""
    assert ping_ok(topo.h2, "10.65.2.1", "10.65.1.1")
    pinger = Pinger(topo.h2, "10.65.2.1", "10.65.1.1")
    time.sleep(0.5)
    old_exabgp = topo.bgpd1.exabgp_pid()
    assert old_exabgp is not None
    if action == "exabgp":
        os.kill(old_exabgp, signal.SIGKILL)
    else:
        topo.bgpd1.kill()
        time.sleep(1.0)
        topo.bgpd1.start()  # what systemd would do
    deadline = time.monotonic() + 40
    seen_new = False
    while time.monotonic() < deadline:
        assert "10.65.1.0/26" in topo.bird.routes(), "the ToR lost h1's block"
        assert "10.65.2.0/26" in kernel_routes(topo.h1), "h1 lost its route to h2's block"
        assert "10.65.1.0/26" in kernel_routes(topo.h2), "h2 lost its route to h1's block"
        pid = topo.bgpd1.exabgp_pid()
        if pid is not None and pid != old_exabgp and topo.bird.established("h1"):
            routes = topo.bird.routes().get("10.65.1.0/26", [])
            if routes and "stale" not in str(routes[0].attrs).lower():
                seen_new = True
                break
        time.sleep(0.2)
    time.sleep(1.0)
    sent, received, out = pinger.stop()
    assert seen_new, f"h1 did not re-establish with the ToR:\n{topo.bgpd1.log_tail()}"
    assert sent > 50 and received == sent, out


def test_kill_exabgp_loses_nothing(topo: Topo) -> None:
    _watch_no_gap(topo, "exabgp")
    assert topo.bgpd1.alive
    wait_established(topo.cluster, "h1", ["10.10.1.0"], topo.bgpd1)


def test_kill_bgpd_loses_nothing(topo: Topo) -> None:
    _watch_no_gap(topo, "bgpd")
    wait_established(topo.cluster, "h1", ["10.10.1.0"], topo.bgpd1)
    assert "adopted" in topo.bgpd1.log.read_text()
