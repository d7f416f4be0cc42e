"""bgpd against an FRR ToR (MD5, no graceful restart) and a second ToR (BIRD): ECMP, MD5, peer loss.

Topology::

    g1 (AS 65011) 10.20.1.1/31 ── 10.20.1.0/31 fa (FRR, AS 65100) 10.20.2.2/24 ─┐
                                                                                ├─ bridge ── g2 10.20.2.1/24
                                            fb (BIRD, AS 65200) 10.20.2.3/24 ─┘      (AS 65012)

fa and fb both originate 10.77.0.0/24, so g2 must install it as one multipath route.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bgpd.topo import (
    Bgpd,
    Cluster,
    EtcdForward,
    add_address,
    kernel_routes,
    ping_ok,
    wait_established,
    wait_route,
)
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import Bird, Frr, router_session, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

PASSWORD = "frr-s3cret"

FRR_CONF = f"""
frr defaults traditional
hostname fa
router bgp 65100
 bgp router-id 10.20.255.1
 no bgp ebgp-requires-policy
 no bgp network import-check
 bgp graceful-restart-disable
 neighbor 10.20.1.1 remote-as 65011
 neighbor 10.20.1.1 password {PASSWORD}
 neighbor 10.20.1.1 timers 3 9
 neighbor 10.20.1.1 timers connect 2
 neighbor 10.20.2.1 remote-as 65012
 neighbor 10.20.2.1 timers connect 2
 address-family ipv4 unicast
  network 10.77.0.0/24
  neighbor 10.20.1.1 activate
  neighbor 10.20.2.1 activate
 exit-address-family
"""

BIRD_CONF = """
router id 10.20.255.2;
protocol device {}
protocol static { ipv4; route 10.77.0.0/24 blackhole; }
protocol bgp g2 { local 10.20.2.3 as 65200; neighbor 10.20.2.1 as 65012; ipv4 { import all; export all; }; }
"""


@dataclass
class Topo:
    g1: Netns
    g2: Netns
    fa: Netns
    frr: Frr
    bird: Bird
    cluster: Cluster
    bgpd1: Bgpd
    bgpd2: Bgpd


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    work: Path = tmp_path_factory.mktemp("frr-tor")
    with netns_session() as make, router_session(work) as routers:
        fa, fb, g1, g2, sw = make(), make(), make(), make(), make()
        create_veth(g1, fa, "10.20.1.1/31", "10.20.1.0/31", name_a="up0", name_b="g1")
        sw.ip("link", "add", "br0", "type", "bridge")
        sw.ip("link", "set", "br0", "up")
        lan = ((g2, "10.20.2.1/24", "p-g2"), (fa, "10.20.2.2/24", "p-fa"), (fb, "10.20.2.3/24", "p-fb"))
        for ns, addr, port in lan:
            create_veth(ns, sw, addr, None, name_a="lan0", name_b=port)
            sw.ip("link", "set", port, "master", "br0")
        fa.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        add_address(g1, "10.66.1.1/32")
        add_address(g2, "10.66.2.1/32")
        frr = routers.frr(fa, FRR_CONF, "fa")
        bird = routers.bird(fb, BIRD_CONF, "fb")
        ds = etcd.client()
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=False)
        c.node("g1", "10.20.1.1/31", as_number=65011)
        c.node("g2", "10.20.2.1/24", as_number=65012)
        c.peer("fa-g1", peer_ip="10.20.1.0", as_number=65100, node="g1", password=PASSWORD, hold_time=9)
        c.peer("fa-g2", peer_ip="10.20.2.2", as_number=65100, node="g2")
        c.peer("fb-g2", peer_ip="10.20.2.3", as_number=65200, node="g2")
        c.pool("p", "10.66.0.0/16")
        c.block("10.66.1.0/26", "g1")
        c.block("10.66.2.0/26", "g2")
        fwds = [EtcdForward(g1, etcd.client_port), EtcdForward(g2, etcd.client_port)]
        b1 = Bgpd(g1, "g1", work, fwds[0].endpoint).start()
        b2 = Bgpd(g2, "g2", work, fwds[1].endpoint).start()
        try:
            wait_established(c, "g1", ["10.20.1.0"], b1)
            wait_established(c, "g2", ["10.20.2.2", "10.20.2.3"], b2)
            yield Topo(g1, g2, fa, frr, bird, c, b1, b2)
        finally:
            for b in (b1, b2):
                b.stop()
            for f in fwds:
                f.close()
            ds.close()


def test_md5_session_and_routes_through_frr(topo: Topo) -> None:
    assert topo.frr.neighbor_state("10.20.1.1") == "Established"
    paths = wait_for(lambda: topo.frr.bgp_routes().get("10.66.1.0/26"), 20, "g1's block in FRR")
    assert paths[0]["nexthops"][0]["ip"] == "10.20.1.1"
    wait_route(topo.g2, "10.66.1.0/26", ["10.20.2.2"])
    wait_route(topo.g1, "10.66.2.0/26", ["10.20.1.0"])
    assert ping_ok(topo.g2, "10.66.2.1", "10.66.1.1")
    # FRR sends g1's own block back (as-path 65100 65011): the AS-path loop check drops it
    assert "10.66.1.0/26" not in kernel_routes(topo.g1)


def test_two_tors_give_an_ecmp_route(topo: Topo) -> None:
    r = wait_route(topo.g2, "10.77.0.0/24", ["10.20.2.2", "10.20.2.3"])
    assert r["metric"] == 20 and len(r["nexthops"]) == 2
    wait_route(topo.g1, "10.77.0.0/24", ["10.20.1.0"])  # one ToR only: a plain route


def test_wrong_md5_password_keeps_the_session_down(topo: Topo) -> None:
    c = topo.cluster
    c.peer("fa-g1", peer_ip="10.20.1.0", as_number=65100, node="g1", password="wrong-password", hold_time=9)
    wait_for(lambda: topo.frr.neighbor_state("10.20.1.1") != "Established", 30, "the MD5 mismatch to take effect")
    time.sleep(8)  # several connect attempts both ways
    assert topo.frr.neighbor_state("10.20.1.1") != "Established"
    assert c.peer_status("g1")["10.20.1.0"]["state"] != "established"
    assert topo.bgpd1.alive
    c.peer("fa-g1", peer_ip="10.20.1.0", as_number=65100, node="g1", password=PASSWORD, hold_time=9)
    wait_established(c, "g1", ["10.20.1.0"], topo.bgpd1, timeout=60)
    wait_route(topo.g2, "10.66.1.0/26", ["10.20.2.2"], timeout=30)


def test_status_reports_peers(topo: Topo) -> None:
    st = topo.cluster.peer_status("g2")
    assert set(st) == {"10.20.2.2", "10.20.2.3"}
    assert {s["peer_as"] for s in st.values()} == {65100, 65200}
    assert all(s["state"] == "established" and s["prefixes_sent"] == 1 for s in st.values())
    print(json.dumps(st, indent=1))


def test_peer_loss_without_graceful_restart_cleans_up(topo: Topo) -> None:
    """FRR does no graceful restart here: when it dies its routes go at once (last test: FRR stays down)."""
    wait_route(topo.g2, "10.77.0.0/24", ["10.20.2.2", "10.20.2.3"])
    topo.frr.stop()
    wait_route(topo.g2, "10.77.0.0/24", ["10.20.2.3"], timeout=15)
    wait_route(topo.g2, "10.66.1.0/26", None, timeout=15)
    wait_route(topo.g1, "10.66.2.0/26", None, timeout=15)
    assert topo.bgpd1.alive and topo.bgpd2.alive
