"""The tunnel drivers in throwaway namespaces: VXLAN device and peers (this kernel has vxlan, not ipip).

Workloads on two hosts reach each other through ``vxlan.calyx`` with real packets, the capture on
the underlay shows VNI 4096 on UDP 4789, and the driver converges: a second ensure changes
nothing, stale peers are swept, a changed parameter recreates the device. The tunl0 driver is
proven inside the test VM's kernel (tests/vm/).
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable

import pytest

from calyx.kernel import tunnels
from calyx.kernel.tunnels import VxlanPeer
from tests.fixtures.netns import Netns

pytestmark = pytest.mark.privileged

A = ipaddress.IPv4Address


def wire(netns: Callable[[], Netns]) -> tuple[Netns, Netns, Netns, Netns]:
    h1, h2, w1, w2 = netns(), netns(), netns(), netns()
    h1.ip("link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", h2.name)
    h1.ip("addr", "add", "10.99.0.1/24", "dev", "up0")
    h2.ip("addr", "add", "10.99.0.2/24", "dev", "up0")
    for h in (h1, h2):
        h.ip("link", "set", "up0", "up")
        h.ip("route", "add", "default", "via", "10.99.0.254", "dev", "up0", "onlink")
        h.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    for h, w, ip in ((h1, w1, "10.65.1.1"), (h2, w2, "10.65.2.1")):
        h.ip("link", "add", "cali0", "type", "veth", "peer", "name", "eth0", "netns", w.name)
        h.ip("link", "set", "cali0", "up")
        h.run("sysctl", "-qw", "net.ipv4.conf.cali0.proxy_arp=1")
        h.ip("route", "add", f"{ip}/32", "dev", "cali0")
        w.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        w.ip("link", "set", "eth0", "up", "mtu", "1450")
        w.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
    return h1, h2, w1, w2


def test_vxlan_device_peers_and_packets(netns: Callable[[], Netns]) -> None:
    h1, h2, w1, _w2 = wire(netns)
    mac1, mac2 = tunnels.vtep_mac("h1"), tunnels.vtep_mac("h2")
    assert mac1 != mac2 and int(mac1[:2], 16) & 0x03 == 0x02  # locally administered, unicast
    ch1 = tunnels.ensure_vxlan(local_ip=A("10.99.0.1"), mac=mac1, address=A("10.65.1.192"), mtu=1450, netns=h1.name)
    assert any("created" in c for c in ch1)
    tunnels.ensure_vxlan(local_ip=A("10.99.0.2"), mac=mac2, address=A("10.65.2.192"), mtu=1450, netns=h2.name)
    # converged: nothing to do the second time
    assert tunnels.ensure_vxlan(local_ip=A("10.99.0.1"), mac=mac1, address=A("10.65.1.192"), mtu=1450,
                                netns=h1.name) == []
    p2 = VxlanPeer(A("10.65.2.192"), mac2, A("10.99.0.2"))
    p1 = VxlanPeer(A("10.65.1.192"), mac1, A("10.99.0.1"))
    assert tunnels.sync_vxlan_peers({p2.vtep_ip: p2}, netns=h1.name)
    assert tunnels.sync_vxlan_peers({p1.vtep_ip: p1}, netns=h2.name)
    assert tunnels.sync_vxlan_peers({p2.vtep_ip: p2}, netns=h1.name) == []
    # the remote block's route (bgpd's job) via the remote VTEP, onlink
    h1.ip("route", "add", "10.65.2.0/26", "via", "10.65.2.192", "dev", "vxlan.calyx", "onlink")
    h2.ip("route", "add", "10.65.1.0/26", "via", "10.65.1.192", "dev", "vxlan.calyx", "onlink")
    cap = h2.popen("tcpdump", "-l", "-n", "-i", "up0", "-c", "2", "udp port 4789",
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        out = w1.run("ping", "-c", "3", "-W", "2", "10.65.2.1")
        assert "3 received" in out
        captured, _ = cap.communicate(timeout=10)
    finally:
        if cap.poll() is None:
            cap.kill()
    assert "10.99.0.1" in captured and "VXLAN" in captured and "vni 4096" in captured
    assert "10.65.1.1 > 10.65.2.1" in captured

    # a stale peer (a node that left) is swept; the wanted one stays
    ghost = VxlanPeer(A("10.65.9.192"), tunnels.vtep_mac("gone"), A("10.99.0.9"))
    tunnels.sync_vxlan_peers({p2.vtep_ip: p2, ghost.vtep_ip: ghost}, netns=h1.name)
    assert "10.65.9.192" in h1.ip("neigh", "show", "dev", "vxlan.calyx")
    removed = tunnels.sync_vxlan_peers({p2.vtep_ip: p2}, netns=h1.name)
    assert any("removed neighbour 10.65.9.192" in c for c in removed)
    assert any("removed fdb" in c for c in removed)
    assert "10.65.9.192" not in h1.ip("neigh", "show", "dev", "vxlan.calyx")
    assert "10.99.0.9" not in h1.run("bridge", "fdb", "show", "dev", "vxlan.calyx")
    assert "3 received" in w1.run("ping", "-c", "3", "-W", "2", "10.65.2.1")

    # MTU: a 1,400-byte packet with DF crosses; a workload that believes in 1500 gets the host's
    # ICMP "fragmentation needed" naming the tunnel's MTU
    assert "1 received" in w1.run("ping", "-c", "1", "-M", "do", "-s", "1372", "10.65.2.1")
    w1.ip("link", "set", "eth0", "mtu", "1500")
    big = w1.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", "10.65.2.1", check=False)
    assert "Frag needed and DF set (mtu = 1450)" in big

    # a parameter that cannot change in place (the local address) recreates the device
    h1.ip("addr", "add", "10.99.0.11/24", "dev", "up0")
    changes = tunnels.ensure_vxlan(local_ip=A("10.99.0.11"), mac=mac1, address=A("10.65.1.192"), mtu=1450,
                                   netns=h1.name)
    assert any("parameters changed" in c for c in changes)
    assert "local 10.99.0.11" in h1.ip("-d", "link", "show", "vxlan.calyx")
    assert tunnels.remove_vxlan(netns=h1.name) == ["vxlan.calyx: deleted"]
    assert tunnels.remove_vxlan(netns=h1.name) == []


def test_ipip_unavailable_is_a_clear_error(netns: Callable[[], Netns]) -> None:
    """This host kernel has no ipip module: the driver says so instead of failing obscurely."""
    h = netns()
    if "tunl0" in h.ip("link", "show"):
        pytest.skip("this kernel has ipip, so the ipip-less error cannot be shown here "
                    "(the tunl0 driver itself is tests/vm/test_tunnels_vm.py)")
    with pytest.raises(tunnels.TunnelError, match="no IP-in-IP support"):
        tunnels.ensure_ipip(A("10.65.1.193"), 1480, netns=h.name)
    assert tunnels.disable_ipip(netns=h.name) == []
