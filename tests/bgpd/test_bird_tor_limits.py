"""``bgpd run`` behind a BIRD 2 ToR: the FIB repaired by the link watch (felix recreating or
flapping ``vxlan.calyx``), and ``max_prefixes`` closing the session for a hold-down.

Topology (one per module; every namespace and process is removed at the end)::

    h1 (bgpd, AS 65001) up0 10.10.1.1/31 ── 10.10.1.0/31 tor (BIRD, AS 65000)
    vxlan.calyx (made here, as felix would)

The ToR announces 10.79.0.0/24 (no pool: ``via 10.10.1.0``), 10.78.0.0/24 (in a pool with
``vxlan_mode: Always``: ``via 10.78.255.1 dev vxlan.calyx onlink``, the ToR being registered as a
node with that VTEP address) and, when its static protocol ``many`` is enabled, five more /24s:
seven prefixes against h1's ``max_prefixes`` of 4. bgpd's hold-down is 3 s here
(``bgp_max_prefixes_hold_down``); BIRD waits at most 2 s before it accepts a new connection after
the session was lost (``error wait time``), so the test measures bgpd's hold-down, not BIRD's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.bgpd.topo import Bgpd, Cluster, EtcdForward, kernel_routes, wait_established, wait_route
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import Bird, router_session, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

HOLD_DOWN = 3.0
MANY = [f"10.77.{i}.0/24" for i in range(5)]
BIRD_TOR = """
router id 10.10.255.254;
protocol device {}
protocol static fixed { ipv4; route 10.79.0.0/24 blackhole; route 10.78.0.0/24 blackhole; }
protocol static many {
    ipv4; disabled;
""" + "".join(f"    route {p} blackhole;\n" for p in MANY) + """}
protocol bgp h1 {
    local as 65000; neighbor 10.10.1.1 as 65001; hold time 30; graceful restart on;
    connect delay time 1; connect retry time 2; error wait time 1, 2;
    ipv4 { import all; export all; };
}
"""
VXLAN = "vxlan.calyx"


@dataclass
class Topo:
    tor: Netns
    h1: Netns
    bird: Bird
    cluster: Cluster
    bgpd: Bgpd


def _add_vxlan(h: Netns, vni: int = 4096) -> None:
    h.ip("link", "add", VXLAN, "type", "vxlan", "id", str(vni), "dstport", "4789", "local", "10.10.1.1",
         "nolearning")
    h.ip("link", "set", VXLAN, "up")


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    work: Path = tmp_path_factory.mktemp("bird-tor-limits")
    with netns_session() as make, router_session(work) as routers:
        tor, h1 = make(), make()
        create_veth(h1, tor, "10.10.1.1/31", "10.10.1.0/31", name_a="up0", name_b="h1")
        _add_vxlan(h1)
        bird = routers.bird(tor, BIRD_TOR, "tor")
        ds = etcd.client()
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=False, graceful_restart_time=60)
        c.node("h1", "10.10.1.1/31", as_number=65001)
        c.node("tor", "10.10.1.0/31", as_number=65000, vxlan_tunnel_address="10.78.255.1")
        c.peer("tor-h1", peer_ip="10.10.1.0", as_number=65000, node="h1", hold_time=30, max_prefixes=4)
        c.pool("vx", "10.78.0.0/16", vxlan_mode="Always")
        fwd = EtcdForward(h1, etcd.client_port)
        b1 = Bgpd(h1, "h1", work, fwd.endpoint)
        (b1.dir / "calyx.toml").write_text(f"[bgpd]\nbgp_max_prefixes_hold_down = {HOLD_DOWN}\n")
        b1.start()
        try:
            wait_established(c, "h1", ["10.10.1.0"], b1)
            yield Topo(tor, h1, bird, c, b1)
        finally:
            b1.stop()
            fwd.close()
            ds.close()


def _vxlan_route(topo: Topo) -> bool:
    r = kernel_routes(topo.h1).get("10.78.0.0/24")
    return r is not None and r.get("dev") == VXLAN and r.get("gateway") == "10.78.255.1" and "onlink" in r.get(
        "flags", [])


def _seconds_until(cond: Callable[[], bool], timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_vxlan_device_recreated_by_felix_routes_back_at_once(topo: Topo) -> None:
    wait_for(lambda: _vxlan_route(topo), 20, "10.78.0.0/24 via the VTEP on vxlan.calyx")
    wait_route(topo.h1, "10.79.0.0/24", ["10.10.1.0"])
    topo.h1.ip("link", "del", VXLAN)  # felix changing the VNI: the kernel drops the route silently
    assert not _vxlan_route(topo)
    _add_vxlan(topo.h1, vni=4097)
    took = _seconds_until(lambda: _vxlan_route(topo), 2.0)
    assert took is not None, f"route not back within 2 s (the periodic resync is 60 s):\n{topo.bgpd.log_tail(20)}"
    assert "kernel changed: " in topo.bgpd.log.read_text()


def test_vxlan_device_flap_routes_back_at_once(topo: Topo) -> None:
    wait_for(lambda: _vxlan_route(topo), 20, "10.78.0.0/24 via the VTEP on vxlan.calyx")
    topo.h1.ip("link", "set", VXLAN, "down")  # IPv4 flushes every route through it, without a message
    assert not _vxlan_route(topo)
    topo.h1.ip("link", "set", VXLAN, "up")
    took = _seconds_until(lambda: _vxlan_route(topo), 2.0)
    assert took is not None, topo.bgpd.log_tail(20)
    assert topo.bird.established("h1")  # the session never noticed: only the link watch repaired it


def _log_events(topo: Topo, needles: tuple[str, ...]) -> list[tuple[float, str]]:
    """(seconds, needle) for each bgpd log line holding one of ``needles``, in order."""
    out = []
    for line in topo.bgpd.log.read_text().splitlines():
        for needle in needles:
            if needle in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                out.append((stamp.timestamp(), needle))
    return out


def _trips(topo: Topo) -> int:
    return topo.bgpd.log.read_text().count("sent more than max_prefixes")


def test_max_prefixes_closes_the_session_for_the_hold_down_then_peers_again(topo: Topo) -> None:
    c, bird = topo.cluster, topo.bird
    wait_established(c, "h1", ["10.10.1.0"], topo.bgpd)
    wait_route(topo.h1, "10.79.0.0/24", ["10.10.1.0"])
    assert c.peer_status("h1")["10.10.1.0"]["prefixes_received"] == 2
    bird.birdc("enable", "many")  # 7 prefixes against a limit of 4

    def tripped() -> dict[str, object] | None:
        st = c.peer_status("h1").get("10.10.1.0", {})
        err = str(st.get("last_error") or "")
        return st if st.get("state") != "established" and err.startswith("max_prefixes (4) exceeded") else None

    st = wait_for(tripped, 20, "the session closed for max_prefixes")
    assert st["prefixes_received"] == 0
    tripped_at = time.monotonic()
    # every route from that peer is gone at once (no graceful-restart retention), and the ToR lost the session
    wait_route(topo.h1, "10.79.0.0/24", None, timeout=5)
    assert not set(kernel_routes(topo.h1)) & {"10.78.0.0/24", *MANY}
    wait_for(lambda: not bird.established("h1"), 10, "the ToR sees the session down")
    # held down: no session for (most of) the hold-down (tripped_at is when we saw the status: later)
    while time.monotonic() - tripped_at < HOLD_DOWN - 1.5:
        assert not bird.established("h1"), "the session came back during the hold-down"
        time.sleep(0.2)
    # then it is tried again and, the ToR still sending 7, closed again
    wait_for(lambda: _trips(topo) >= 2, 30, "a second attempt after the hold-down, closed again")
    # bgpd's own account: no session between the close and the end of the hold-down, which lasted H s
    events = _log_events(topo, ("sent more than max_prefixes", "hold-down over", "session 10.10.1.0 established"))
    first_trip = next(i for i, (_, what) in enumerate(events) if what == "sent more than max_prefixes")
    (t_trip, _), (t_release, what) = events[first_trip], events[first_trip + 1]
    assert what == "hold-down over" and t_release - t_trip >= HOLD_DOWN - 0.01
    assert events[first_trip + 2][1] == "session 10.10.1.0 established"
    # the ToR behaves again: after the next hold-down the session stays up with its routes
    bird.birdc("disable", "many")
    wait_established(c, "h1", ["10.10.1.0"], topo.bgpd, timeout=40)
    wait_route(topo.h1, "10.79.0.0/24", ["10.10.1.0"])
    wait_for(lambda: _vxlan_route(topo), 10, "10.78.0.0/24 back")
    trips, settled = _trips(topo), time.monotonic()
    while time.monotonic() - settled < HOLD_DOWN + 1:  # it stays up: no third trip
        assert _trips(topo) == trips and bird.established("h1")
        time.sleep(0.2)
    assert c.peer_status("h1")["10.10.1.0"]["prefixes_received"] == 2
