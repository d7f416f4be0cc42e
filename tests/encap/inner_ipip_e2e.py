"""Run inside the test VM by tests/encap/test_ipip_vm.py (its kernel has ipip): IP-in-IP end to end.

The topology of :mod:`tests.encap.topo` (three hosts, felix and bgpd as subprocesses, a router
without BGP, etcd started inside the VM on its loopback and relayed into the host namespaces), with
the pool in ``ipip_mode: CrossSubnet``. Proved with real packets:

- cross-subnet: h1's route to h2's block is ``via 10.31.2.1 dev tunl0 onlink`` (bgpd), tunl0 is up
  with MTU 1480 and the tunnel address felix allocated and published; the router's capture shows
  IP protocol 4 between 10.31.1.1 and 10.31.2.1 wrapping the workloads' ICMP;
- the host itself reaches a remote workload (from its tunnel address);
- same subnet (h1 → h3) is routed directly: no protocol 4 on h1's port;
- the MTU file says 1480; a 1,400-byte DF ping crosses, a 1,472-byte one (1,500 bytes of IP) gets "Frag needed";
- IP-in-IP from the router (10.31.2.254, not a node) to h2 is dropped by felix's INPUT rule;
- switching the pool to ``Always`` wraps h1 → h3 as well, without a restart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.bgpd.topo import gateways, kernel_routes, ping_ok, wait_route
from tests.encap.topo import Capture, Topo, block_of, encap_topology, frag_needed, ping_df
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.routers import wait_for
from tests.fixtures.vm import SLOWDOWN

pytestmark = pytest.mark.skipif(os.environ.get("CALYX_IN_VM") != "1", reason="runs inside the test VM only")


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    with encap_topology(etcd, tmp_path_factory.mktemp("ipip"), {"ipip_mode": "CrossSubnet"},
                        "ipip_tunnel_address") as t:
        yield t


def test_cross_subnet_is_ipip_between_host_addresses(topo: Topo) -> None:
    h1 = topo.hosts["h1"]
    route = wait_route(h1, block_of(topo.wl_ip["h2"]), ["10.31.2.1"],
            timeout=120 * SLOWDOWN, what="h2's block via tunl0")
    assert route["dev"] == "tunl0" and "onlink" in route.get("flags", [])
    tunl = h1.ip_json("-4", "addr", "show", "tunl0")[0]
    assert tunl["mtu"] == 1480 and "UP" in tunl["flags"]
    assert [a["local"] for a in tunl["addr_info"]] == [topo.vtep["h1"]]
    cap = Capture(topo.router, "r-h2", "ip proto 4", verbose=False)
    assert wait_for(lambda: ping_ok(topo.wls["h1"], topo.wl_ip["h1"], topo.wl_ip["h2"], count=2),
            30 * SLOWDOWN, "w1 → w2")
    text = cap.stop()
    w1, w2 = re.escape(topo.wl_ip["h1"]), re.escape(topo.wl_ip["h2"])
    assert re.search(rf"10\.31\.1\.1 > 10\.31\.2\.1: IP {w1} > {w2}: ICMP echo request", text), text
    assert re.search(rf"10\.31\.2\.1 > 10\.31\.1\.1: IP {w2} > {w1}: ICMP echo reply", text), text
    # the host itself, from its tunnel address
    assert "1 received" in h1.run("ping", "-c", "1", "-W", "2", topo.wl_ip["h2"])


def test_same_subnet_is_not_encapsulated_in_cross_subnet_mode(topo: Topo) -> None:
    wait_route(topo.hosts["h1"], block_of(topo.wl_ip["h3"]), ["10.31.1.3"],
            timeout=60 * SLOWDOWN, what="h3's block direct")
    cap = Capture(topo.router, "p-h1", "icmp or ip proto 4", verbose=False)
    assert wait_for(lambda: ping_ok(topo.wls["h1"], topo.wl_ip["h1"], topo.wl_ip["h3"], count=2),
            30 * SLOWDOWN, "w1 → w3")
    text = cap.stop()
    assert f"IP {topo.wl_ip['h1']} > {topo.wl_ip['h3']}: ICMP echo request" in text, text
    assert "10.31.1.1 > 10.31.1.3" not in text, text


def test_mtu_file_df_pings_and_frag_needed(topo: Topo) -> None:
    assert (topo.work / "felix-h1" / "state" / "mtu").read_text().strip() == "1480"
    w1, dst = topo.wls["h1"], topo.wl_ip["h2"]
    wait_for(lambda: ping_ok(w1, topo.wl_ip["h1"], dst, count=1), 30 * SLOWDOWN, "w1 → w2 ping")
    ok = ping_df(w1, dst, 1400)
    assert " 0% packet loss" in ok, ok  # 1,428 bytes of IP: fits in the tunnel
    big = ping_df(w1, dst, 1472)  # 1,500 bytes: fits the workload's link, not the tunnel
    assert " 0 received" in big and frag_needed(big, 1480), big  # the host's ICMP: PMTU 1480


def test_ipip_from_a_non_node_address_is_dropped(topo: Topo) -> None:
    r, h2 = topo.router, topo.hosts["h2"]
    r.ip("link", "add", "rogue", "type", "ipip", "local", "10.31.2.254", "remote", "10.31.2.1")
    r.ip("addr", "add", "10.66.250.1/32", "dev", "rogue")
    r.ip("link", "set", "rogue", "up")
    r.ip("route", "add", topo.wl_ip["h2"], "dev", "rogue")

    def drops() -> int:
        out = h2.run("iptables-legacy", "-w", "-nvxL", "calyx-INPUT")
        return sum(int(f[0]) for f in (line.split() for line in out.splitlines())
                   if len(f) > 3 and f[2] == "DROP" and f[3] in ("4", "ipencap", "ipv4"))

    before = drops()
    cap = Capture(topo.wls["h2"], "eth0", "icmp", verbose=False)
    out = r.run("ping", "-c", "2", "-W", "1", "-I", "10.66.250.1", topo.wl_ip["h2"], check=False)
    text = cap.stop()
    assert " 100% packet loss" in out, out
    assert "10.66.250.1" not in text, text
    assert drops() >= before + 2


def test_switch_to_always_reprograms_without_restart(topo: Topo) -> None:
    topo.cluster.pool("encap", "10.66.0.0/16", ipip_mode="Always", block_size=26)
    h1, block = topo.hosts["h1"], block_of(topo.wl_ip["h3"])

    def via_tunl0() -> bool:
        r = kernel_routes(h1).get(block)
        return r is not None and r.get("dev") == "tunl0" and gateways(r) == ["10.31.1.3"]

    wait_for(via_tunl0, 60 * SLOWDOWN, "h3's block via tunl0 once the pool says Always")
    cap = Capture(topo.router, "p-h1", "ip proto 4", verbose=False)
    assert wait_for(lambda: ping_ok(topo.wls["h1"], topo.wl_ip["h1"], topo.wl_ip["h3"], count=2),
            30 * SLOWDOWN, "w1 → w3")
    text = cap.stop()
    assert re.search(r"10\.31\.1\.1 > 10\.31\.1\.3: IP ", text), text
