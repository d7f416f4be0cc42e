"""The FIB driver against a real kernel (a throwaway namespace): ownership, ECMP, adoption, drift."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network

import pytest

from bgpd.fib import Fib
from calyx.model import IPPool
from tests.bgpd.topo import gateways, kernel_routes
from tests.fixtures.netns import Netns, create_veth

pytestmark = pytest.mark.privileged


def host(netns: Callable[[], Netns]) -> Netns:
    h, peer = netns(), netns()
    create_veth(h, peer, "10.99.0.1/24", "10.99.0.2/24")
    return h


def test_routes_ecmp_changes_and_removal(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    fib = Fib(20, netns=h.name)
    fib.resync()
    assert IPv4Network("10.99.0.0/24") in fib.connected
    fib.update({"10.51.0.0/24": ("10.99.0.2", "10.99.0.3"), "10.52.0.1/32": ("10.99.0.2",),
                "10.99.0.0/24": ("10.99.0.3",), "10.53.0.0/24": ("192.0.2.1",)})
    stats = fib.apply(sweep=True)
    routes = kernel_routes(h)
    assert gateways(routes["10.51.0.0/24"]) == ["10.99.0.2", "10.99.0.3"]
    assert gateways(routes["10.52.0.1/32"]) == ["10.99.0.2"] and routes["10.52.0.1/32"]["metric"] == 20
    assert "10.99.0.0/24" not in routes  # never shadow a connected subnet
    assert "10.53.0.0/24" not in routes and "10.53.0.0/24" in fib.unroutable  # next hop not connected
    assert stats.added == 2
    assert fib.apply(sweep=True).writes == 0  # nothing to do: no writes
    fib.update({"10.51.0.0/24": ("10.99.0.3",)})
    assert fib.apply(sweep=True).changed == 1
    assert gateways(kernel_routes(h)["10.51.0.0/24"]) == ["10.99.0.3"]
    fib.update({"10.51.0.0/24": None, "10.52.0.1/32": None})
    assert fib.apply(sweep=True).removed == 2
    assert kernel_routes(h) == {}
    fib.close()


def test_foreign_routes_are_never_replaced(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    h.ip("route", "add", "10.60.0.0/24", "via", "10.99.0.2", "proto", "static", "metric", "20")
    fib = Fib(20, netns=h.name)
    fib.resync()
    fib.update({"10.60.0.0/24": ("10.99.0.3",), "10.61.0.0/24": ("10.99.0.3",)})
    stats = fib.apply(sweep=True)
    assert stats.conflicts == 1 and stats.added == 1
    static = kernel_routes(h, proto=None)["10.60.0.0/24"]
    assert static["gateway"] == "10.99.0.2" and static.get("protocol") == "static"
    # once the other owner is gone, the next resync installs ours
    h.ip("route", "del", "10.60.0.0/24", "proto", "static", "metric", "20")
    fib.resync()
    fib.apply(sweep=True)
    assert gateways(kernel_routes(h)["10.60.0.0/24"]) == ["10.99.0.3"]
    fib.close()


def test_adoption_after_restart_and_drift_repair(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    first = Fib(20, netns=h.name)
    first.resync()
    first.update({"10.70.0.0/24": ("10.99.0.2",), "10.71.0.0/24": ("10.99.0.2",)})
    first.apply(sweep=True)
    first.close()
    # a restarted bgpd: adopts both, re-learns one; the other stays until the RIB is complete
    fib = Fib(20, netns=h.name)
    fib.resync()
    assert fib.adopt() == 2
    fib.update({"10.70.0.0/24": ("10.99.0.2",)})
    assert fib.apply(sweep=False).writes == 0
    assert set(kernel_routes(h)) == {"10.70.0.0/24", "10.71.0.0/24"}
    assert fib.apply(sweep=True).removed == 1
    assert set(kernel_routes(h)) == {"10.70.0.0/24"}
    # drift: someone deletes our route by hand; the periodic resync puts it back
    h.ip("route", "del", "10.70.0.0/24", "proto", "79")
    fib.resync()
    assert fib.apply(sweep=True).added == 1
    assert set(kernel_routes(h)) == {"10.70.0.0/24"}
    # a metric change from the configuration: the new route goes in, then the old one goes
    fib.metric = 30
    fib.update({"10.70.0.0/24": ("10.99.0.3",)})
    fib.apply(sweep=True)
    routes = h.ip_json("route", "show", "proto", "79")
    assert [(r["dst"], r["metric"]) for r in routes] == [("10.70.0.0/24", 30)]
    fib.close()


def test_ipip_pool_without_tunnel_device_is_reported(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    fib = Fib(20, netns=h.name)
    fib.resync()
    fib.set_pools([IPPool.from_dict({"cidr": "10.80.0.0/16", "ipip_mode": "Always"}, key="k", name="p")])
    fib.update({"10.80.1.0/26": ("10.99.0.2",)})
    fib.apply(sweep=True)
    assert "10.80.1.0/26" not in kernel_routes(h)
    assert "no tunl0" in fib.unroutable["10.80.1.0/26"]
    fib.close()
