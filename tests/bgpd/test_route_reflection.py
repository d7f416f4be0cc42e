"""Route reflection on one LAN: bgpd as the reflector first, then BIRD as the reflector.

Everyone is on one bridge (10.30.0.0/24), AS 64512::

    c1 10.30.0.1 (bgpd)   c2 10.30.0.2 (bgpd)   rr1 10.30.0.10 (bgpd, cluster id 10.30.255.1)   obs 10.30.0.20 (BIRD)

Phase 1: the mesh is on and rr1 has a cluster id, so the mesh becomes a reflector topology (clients
peer with rr1 only); BIRD is a non-client iBGP peer of rr1 and shows the reflected attributes.
Phase 2: the mesh is off and BIRD reflects for c1 and c2 (a BGPPeer selecting the clients).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calyx.datastore import keys
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
from tests.fixtures.routers import Bird, router_session, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

BIRD_OBSERVER = """
router id 10.30.0.20;
protocol device {}
protocol static { ipv4; route 10.67.9.0/24 blackhole; }
protocol bgp rr1 {
    local 10.30.0.20 as 64512; neighbor 10.30.0.10 as 64512;
    ipv4 { import all; export all; next hop self; };
}
"""

BIRD_REFLECTOR = """
router id 10.30.0.20;
protocol device {}
template bgp clients {
    local 10.30.0.20 as 64512; rr client; rr cluster id 10.30.255.2; graceful restart on;
    ipv4 { import all; export all; };
}
protocol bgp c1 from clients { neighbor 10.30.0.1 as 64512; }
protocol bgp c2 from clients { neighbor 10.30.0.2 as 64512; }
"""


@dataclass
class Topo:
    c1: Netns
    c2: Netns
    rr1: Netns
    bird: Bird
    cluster: Cluster
    bgpds: dict[str, Bgpd]


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    work: Path = tmp_path_factory.mktemp("rr")
    with netns_session() as make, router_session(work) as routers:
        sw = make()
        sw.ip("link", "add", "br0", "type", "bridge")
        sw.ip("link", "set", "br0", "up")
        hosts = {"c1": (make(), "10.30.0.1"), "c2": (make(), "10.30.0.2"), "rr1": (make(), "10.30.0.10"),
                 "obs": (make(), "10.30.0.20")}
        for name, (ns, ip) in hosts.items():
            create_veth(ns, sw, f"{ip}/24", None, name_a="lan0", name_b=f"p-{name}")
            sw.ip("link", "set", f"p-{name}", "master", "br0")
        c1, c2, rr1 = hosts["c1"][0], hosts["c2"][0], hosts["rr1"][0]
        add_address(c1, "10.67.1.1/32")
        add_address(c2, "10.67.2.1/32")
        bird = routers.bird(hosts["obs"][0], BIRD_OBSERVER, "obs")
        ds = etcd.client()
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=True)
        c.node("c1", "10.30.0.1/24", labels={"client": "yes"})
        c.node("c2", "10.30.0.2/24", labels={"client": "yes"})
        c.node("rr1", "10.30.0.10/24", route_reflector_cluster_id="10.30.255.1", labels={"rr": "yes"})
        c.peer("obs", peer_ip="10.30.0.20", as_number=64512, node="rr1")
        c.pool("p", "10.67.0.0/16")
        c.block("10.67.1.0/26", "c1")
        c.block("10.67.2.0/26", "c2")
        fwds = {n: EtcdForward(hosts[n][0], etcd.client_port) for n in ("c1", "c2", "rr1")}
        bgpds = {n: Bgpd(hosts[n][0], n, work, fwds[n].endpoint).start() for n in ("c1", "c2", "rr1")}
        try:
            wait_established(c, "rr1", ["10.30.0.1", "10.30.0.2", "10.30.0.20"], bgpds["rr1"])
            yield Topo(c1, c2, rr1, bird, c, bgpds)
        finally:
            for b in bgpds.values():
                b.stop()
            for f in fwds.values():
                f.close()
            ds.close()


def test_bgpd_reflects_between_clients_with_next_hop_unchanged(topo: Topo) -> None:
    assert set(topo.cluster.peer_status("c1")) == {"10.30.0.10"}  # clients do not mesh
    st = topo.cluster.peer_status("rr1")
    assert st["10.30.0.1"]["peer_type"] == "route reflector client"
    wait_route(topo.c2, "10.67.1.0/26", ["10.30.0.1"])
    wait_route(topo.c1, "10.67.2.0/26", ["10.30.0.2"])
    wait_route(topo.rr1, "10.67.1.0/26", ["10.30.0.1"])
    assert ping_ok(topo.c2, "10.67.2.1", "10.67.1.1")
    assert "10.67.1.0/26" not in kernel_routes(topo.c1)  # nothing reflected back to the originator


def test_reflected_attributes_seen_by_a_non_client(topo: Topo) -> None:
    paths = wait_for(lambda: topo.bird.routes().get("10.67.1.0/26"), 20, "c1's block reflected to BIRD")
    attrs = paths[0].attrs
    assert attrs.get("BGP.originator_id") == "10.30.0.1"
    assert attrs.get("BGP.cluster_list") == "10.30.255.1"
    assert attrs.get("BGP.next_hop") == "10.30.0.1"


def test_non_client_route_reflected_to_clients(topo: Topo) -> None:
    wait_route(topo.c1, "10.67.9.0/24", ["10.30.0.20"])
    wait_route(topo.c2, "10.67.9.0/24", ["10.30.0.20"])


def test_bird_as_reflector(topo: Topo) -> None:
    c = topo.cluster
    topo.bird.configure(BIRD_REFLECTOR)
    c.ds.delete(keys.bgp_peer_key("obs"))
    c.peer("bird-rr", peer_ip="10.30.0.20", as_number=64512, node_selector="has(client)")
    c.cluster(as_number=64512, node_to_node_mesh=False)
    wait_established(c, "c1", ["10.30.0.20"], topo.bgpds["c1"])
    wait_established(c, "c2", ["10.30.0.20"], topo.bgpds["c2"])
    wait_for(lambda: set(c.peer_status("c1")) == {"10.30.0.20"}, 20, "c1 peering with BIRD only")
    wait_for(lambda: topo.bird.established("c1") and topo.bird.established("c2"), 20, "BIRD sessions")
    # reflected by BIRD: the next hop is still the originating client, and nothing comes back to it
    wait_route(topo.c2, "10.67.1.0/26", ["10.30.0.1"], timeout=30)
    wait_route(topo.c1, "10.67.2.0/26", ["10.30.0.2"], timeout=30)
    assert "10.67.1.0/26" not in kernel_routes(topo.c1)
    paths = topo.bird.routes()["10.67.1.0/26"]
    assert paths[0].attrs.get("BGP.next_hop") == "10.30.0.1"
    assert ping_ok(topo.c2, "10.67.2.1", "10.67.1.1")
    assert all(b.alive for b in topo.bgpds.values())
