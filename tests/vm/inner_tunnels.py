"""Run inside the test VM by tests/vm/test_tunnels_vm.py (its kernel has ipip): the tunl0 driver."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

import pytest

from calyx.kernel import tunnels
from tests.fixtures.netns import Netns

A = ipaddress.IPv4Address

pytestmark = pytest.mark.skipif(os.environ.get("CALYX_IN_VM") != "1", reason="runs inside the test VM only")


def test_tunl0_driver(netns: Callable[[], Netns]) -> None:
    h1, r, h2, w1, w2 = netns(), netns(), netns(), netns(), netns()
    h1.ip("link", "add", "up0", "type", "veth", "peer", "name", "h1", "netns", r.name)
    h2.ip("link", "add", "up0", "type", "veth", "peer", "name", "h2", "netns", r.name)
    h1.ip("addr", "add", "10.98.1.2/24", "dev", "up0")
    h2.ip("addr", "add", "10.98.2.2/24", "dev", "up0")
    r.ip("addr", "add", "10.98.1.1/24", "dev", "h1")
    r.ip("addr", "add", "10.98.2.1/24", "dev", "h2")
    for ns, dev in ((h1, "up0"), (h2, "up0"), (r, "h1"), (r, "h2")):
        ns.ip("link", "set", dev, "up")
    r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    h1.ip("route", "add", "default", "via", "10.98.1.1")
    h2.ip("route", "add", "default", "via", "10.98.2.1")
    for h, w, ip in ((h1, w1, "10.65.1.1"), (h2, w2, "10.65.2.1")):
        h.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        h.ip("link", "add", "cali0", "type", "veth", "peer", "name", "eth0", "netns", w.name)
        h.ip("link", "set", "cali0", "up")
        h.run("sysctl", "-qw", "net.ipv4.conf.cali0.proxy_arp=1")
        h.ip("route", "add", f"{ip}/32", "dev", "cali0")
        w.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        w.ip("link", "set", "eth0", "up", "mtu", "1480")
        w.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")

    # a hand-added foreign address on tunl0 is ours to remove (we own tunl0's addresses)
    h1.ip("addr", "add", "192.0.2.9/32", "dev", "tunl0")
    changes = tunnels.ensure_ipip(A("10.65.1.60"), 1480, netns=h1.name)
    assert any("removed address 192.0.2.9/32" in c for c in changes)
    assert any("added address 10.65.1.60/32" in c for c in changes) and "tunl0: up" in changes
    tunnels.ensure_ipip(A("10.65.2.60"), 1480, netns=h2.name)
    assert tunnels.ensure_ipip(A("10.65.1.60"), 1480, netns=h1.name) == []
    h1.ip("route", "add", "10.65.2.0/26", "via", "10.98.2.2", "dev", "tunl0", "onlink")
    h2.ip("route", "add", "10.65.1.0/26", "via", "10.98.1.2", "dev", "tunl0", "onlink")
    assert "3 received" in w1.run("ping", "-c", "3", "-W", "2", "10.65.2.1")
    # the host itself reaches a remote workload, from its tunnel address
    assert "1 received" in h1.run("ping", "-c", "1", "-W", "2", "10.65.2.1")
    # MTU: 1,400 bytes with DF cross; a workload that believes in 1500 gets "frag needed (mtu = 1480)"
    assert "1 received" in w1.run("ping", "-c", "1", "-M", "do", "-s", "1372", "10.65.2.1")
    w1.ip("link", "set", "eth0", "mtu", "1500")
    big = w1.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", "10.65.2.1", check=False)
    assert "Frag needed and DF set (mtu = 1480)" in big
    # MTU follows configuration; disabling removes the address and sets tunl0 down
    assert tunnels.ensure_ipip(A("10.65.1.60"), 1400, netns=h1.name) == ["tunl0: mtu 1400"]
    off = tunnels.disable_ipip(netns=h1.name)
    assert "tunl0: removed address 10.65.1.60/32" in off and "tunl0: down" in off
    assert "10.65.1.60" not in h1.ip("addr", "show", "dev", "tunl0")
