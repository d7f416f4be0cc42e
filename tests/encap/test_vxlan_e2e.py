"""VXLAN end to end in namespaces: felix and bgpd (subprocesses) on three hosts, a router without BGP.

::

    h1 10.31.1.1 ─┐                                    ┌─ h2 10.31.2.1
    h3 10.31.1.3 ─┴─ br1 10.31.1.254  router  10.31.2.254 ─┘
                     (static: only the two host subnets, no workload routes)

One pool 10.66.0.0/16 with ``vxlan_mode: CrossSubnet`` (blocks of /26 by IPAM, which also gives
the workloads their addresses); one workload per host (veth + namespace, an allow-all profile);
the bgpd full mesh peers across the router. Proved with real packets:

- cross-subnet ping w1 → w2 works, and a capture on the router shows UDP 4789, VNI 4096, between
  the host addresses 10.31.1.1 and 10.31.2.1;
- same-subnet ping w1 → w3 is routed directly (the capture shows the workload addresses, no 4789);
- felix wrote the workload MTU (1450) to its state directory; a 1,400-byte DF ping crosses the
  tunnel and a 1,450-byte one gets "Frag needed" (mtu 1450) from the host;
- switching the pool to ``Always`` re-programs h1 → h3 through the tunnel without a restart;
- VXLAN from an address that is not a node's is dropped by felix's INPUT rule (a rogue VTEP on
  the router with the right VNI and MACs gets nothing through, and the DROP counter moves).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from calyx.datastore import keys
from calyx.ipam.allocator import IPAM
from calyx.ipam.store import DatastoreStore
from calyx.kernel.tunnels import VXLAN_DEVICE, vtep_mac
from tests.bgpd.topo import ROOT, Bgpd, Cluster, EtcdForward, ping_ok, wait_route
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

FELIX = str(ROOT / ".venv/bin/felix")
HOSTS = {"h1": "10.31.1.1", "h2": "10.31.2.1", "h3": "10.31.1.3"}


@dataclass
class Topo:
    router: Netns
    hosts: dict[str, Netns]
    wls: dict[str, Netns]
    wl_ip: dict[str, str]
    vtep: dict[str, str]
    cluster: Cluster
    work: Path
    felix_logs: dict[str, Path]


def start_felix(ns: Netns, node: str, work: Path) -> Path:
    d = work / f"felix-{node}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "calyx.toml").write_text("")
    env = {"CALYX_CONFIG": str(d / "calyx.toml"), "CALYX_NODE_NAME": node,
           "CALYX_ETCD_ENDPOINTS": "http://127.0.0.1:2379", "CALYX_STATE_DIR": str(d / "state"),
           "CALYX_IPTABLES_BACKEND": "legacy", "CALYX_IP_FORWARDING": "enable", "CALYX_STATUS_INTERVAL": "0.5",
           "CALYX_METRICS_PORT": "0", "CALYX_LOG_LEVEL": "info", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    log = d / "felix.log"
    with open(log, "wb") as f:
        ns.popen("env", *[f"{k}={v}" for k, v in env.items()], FELIX, "run", stdout=f, stderr=subprocess.STDOUT,
                 stdin=subprocess.DEVNULL)
    return log


def add_workload(host: Netns, wl: Netns, name: str, ip: str) -> None:
    iface = f"cali{name}"
    create_veth(host, wl, None, f"{ip}/32", name_a=iface, name_b="eth0")
    wl.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    wl.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")


class Capture:
    """tcpdump inside a namespace until stopped; ``text`` is what it printed."""

    def __init__(self, ns: Netns, iface: str, expr: str) -> None:
        self.proc = ns.popen("tcpdump", "-l", "-nn", "-v", "-i", iface, expr, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ..." once the capture runs
        assert "listening" in line, line

    def stop(self) -> str:
        time.sleep(0.3)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return str(out)


@pytest.fixture(scope="module")
def topo(etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    work: Path = tmp_path_factory.mktemp("vxlan")
    forwards: list[EtcdForward] = []
    with netns_session() as make:
        r = make()
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        r.ip("link", "add", "br1", "type", "bridge")
        r.ip("addr", "add", "10.31.1.254/24", "dev", "br1")
        r.ip("link", "set", "br1", "up")
        hosts: dict[str, Netns] = {}
        for name, ip in HOSTS.items():
            h = hosts[name] = make()
            if name == "h2":
                create_veth(h, r, f"{ip}/24", "10.31.2.254/24", name_a="eth0", name_b="r-h2")
            else:
                create_veth(h, r, f"{ip}/24", None, name_a="eth0", name_b=f"p-{name}")
                r.ip("link", "set", f"p-{name}", "master", "br1")
            gw = "10.31.2.254" if name == "h2" else "10.31.1.254"
            h.ip("route", "add", "default", "via", gw)
            forwards.append(EtcdForward(h, etcd.client_port))
        ds = etcd.client()
        c = Cluster(ds)
        c.cluster(as_number=64512, node_to_node_mesh=True)
        for name, ip in HOSTS.items():
            c.node(name, f"{ip}/24", future_field="kept")
        c.pool("vx", "10.66.0.0/16", vxlan_mode="CrossSubnet", block_size=26)
        c.put(keys.profile_key("allow"), {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]})
        ipam = IPAM(DatastoreStore(ds))
        wls: dict[str, Netns] = {}
        wl_ip: dict[str, str] = {}
        for name in HOSTS:
            addr = str(ipam.allocate(f"wl-{name}", name, pools=["vx"])[0].address)
            wl_ip[name] = addr
            wls[name] = make()
            add_workload(hosts[name], wls[name], name, addr)
            c.put(keys.workload_key(name, "test", f"w{name}", "eth0"),
                  {"iface": f"cali{name}", "ipv4_nets": [f"{addr}/32"], "profiles": ["allow"]})
        logs = {name: start_felix(hosts[name], name, work) for name in HOSTS}
        vtep: dict[str, str] = {}

        def published() -> bool:
            for name in HOSTS:
                kv = ds.get(keys.node_key(name))
                value = json.loads(kv.value) if kv else {}
                if "vxlan_tunnel_address" not in value:
                    return False
                vtep[name] = value["vxlan_tunnel_address"]
            return True

        try:
            wait_for(published, 30, "every felix to publish its VTEP")
            bgpds = [Bgpd(hosts[name], name, work, "http://127.0.0.1:2379").start() for name in HOSTS]
            yield Topo(r, hosts, wls, wl_ip, vtep, c, work, logs)
        finally:
            for b in bgpds if "bgpds" in locals() else []:
                b.stop()
            for f in forwards:
                f.close()
            ds.close()


def block_of(ip: str) -> str:
    return str(IPv4Address(int(IPv4Address(ip)) & ~63)) + "/26"


def test_cross_subnet_is_vxlan_between_host_addresses(topo: Topo) -> None:
    h1 = topo.hosts["h1"]
    route = wait_route(h1, block_of(topo.wl_ip["h2"]), [topo.vtep["h2"]], timeout=60, what="h2's block via VXLAN")
    assert route["dev"] == VXLAN_DEVICE and "onlink" in route.get("flags", [])
    direct = wait_route(h1, block_of(topo.wl_ip["h3"]), ["10.31.1.3"], timeout=30, what="h3's block direct")
    assert direct["dev"] == "eth0"
    assert f"{topo.vtep['h2']} lladdr {vtep_mac('h2')} PERMANENT" in h1.run("ip", "neigh", "show", "dev", VXLAN_DEVICE)
    node = json.loads(topo.cluster.ds.get(keys.node_key("h1")).value)  # type: ignore[union-attr]
    assert node["future_field"] == "kept" and node["vxlan_tunnel_mac"] == vtep_mac("h1")
    w1 = topo.wls["h1"]
    cap = Capture(topo.router, "r-h2", "udp port 4789")
    assert wait_for(lambda: ping_ok(w1, topo.wl_ip["h1"], topo.wl_ip["h2"], count=2), 20, "w1 → w2 ping")
    text = cap.stop()
    assert re.search(r"10\.31\.1\.1\.\d+ > 10\.31\.2\.1\.4789: VXLAN.*vni 4096", text), text
    assert re.search(rf"{re.escape(topo.wl_ip['h1'])} > {re.escape(topo.wl_ip['h2'])}: ICMP echo request", text), text
    assert re.search(r"10\.31\.2\.1\.\d+ > 10\.31\.1\.1\.4789: VXLAN", text), text  # the reply is wrapped too


def test_same_subnet_is_not_encapsulated_in_cross_subnet_mode(topo: Topo) -> None:
    w1 = topo.wls["h1"]
    wait_route(topo.hosts["h1"], block_of(topo.wl_ip["h3"]), ["10.31.1.3"], timeout=30, what="h3's block direct")
    cap = Capture(topo.router, "p-h1", "icmp or udp port 4789")
    assert wait_for(lambda: ping_ok(w1, topo.wl_ip["h1"], topo.wl_ip["h3"], count=2), 20, "w1 → w3 ping")
    text = cap.stop()
    assert f"{topo.wl_ip['h1']} > {topo.wl_ip['h3']}: ICMP echo request" in text, text
    assert "4789" not in text, text


def test_mtu_file_df_pings_and_frag_needed(topo: Topo) -> None:
    assert (topo.work / "felix-h1" / "state" / "mtu").read_text().strip() == "1450"
    assert topo.hosts["h1"].ip_json("link", "show", VXLAN_DEVICE)[0]["mtu"] == 1450
    w1, dst = topo.wls["h1"], topo.wl_ip["h2"]
    wait_for(lambda: ping_ok(w1, topo.wl_ip["h1"], dst, count=1), 20, "w1 → w2 ping")
    ok = w1.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", dst, check=False)
    assert " 0% packet loss" in ok, ok  # 1,428 bytes of IP: fits in the tunnel
    big = w1.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1450", dst, check=False)
    assert re.search(r"Frag needed and DF set \(mtu = 1450\)", big), big  # ICMP from h1, PMTU learned


def test_vxlan_from_a_non_node_address_is_dropped(topo: Topo) -> None:
    """The router (10.31.2.254, not a node) builds a VTEP with h1's VNI and MACs and sends to h2."""
    r, h2 = topo.router, topo.hosts["h2"]
    r.ip("link", "add", "rogue", "address", vtep_mac("h1"), "type", "vxlan", "id", "4096", "dstport", "4789",
         "local", "10.31.2.254", "nolearning")
    r.ip("addr", "add", "10.66.250.1/32", "dev", "rogue")
    r.ip("link", "set", "rogue", "up")
    r.ip("neigh", "replace", topo.vtep["h2"], "lladdr", vtep_mac("h2"), "dev", "rogue", "nud", "permanent")
    r.run("bridge", "fdb", "append", vtep_mac("h2"), "dev", "rogue", "dst", "10.31.2.1", "self", "permanent")
    r.ip("route", "add", topo.wl_ip["h2"], "via", topo.vtep["h2"], "dev", "rogue", "onlink")

    def drops() -> int:
        out = h2.run("iptables-legacy", "-w", "-nvxL", "calyx-INPUT")
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if "udp dpt:4789" in line and "DROP" in line)

    before = drops()
    cap = Capture(topo.wls["h2"], "eth0", "icmp")
    out = r.run("ping", "-c", "2", "-W", "1", "-I", "10.66.250.1", topo.wl_ip["h2"], check=False)
    text = cap.stop()
    assert " 100% packet loss" in out, out
    assert "10.66.250.1" not in text, text  # nothing reached the workload
    assert drops() >= before + 2


def test_switch_to_always_reprograms_without_restart(topo: Topo) -> None:
    """Last (it changes the pool): h1 → h3 on the same subnet is wrapped once the pool says Always."""
    topo.cluster.pool("vx", "10.66.0.0/16", vxlan_mode="Always", block_size=26)
    h1 = topo.hosts["h1"]
    route = wait_route(h1, block_of(topo.wl_ip["h3"]), [topo.vtep["h3"]], timeout=30, what="h3's block via VXLAN")
    assert route["dev"] == VXLAN_DEVICE
    cap = Capture(topo.router, "p-h1", "udp port 4789")
    assert wait_for(lambda: ping_ok(topo.wls["h1"], topo.wl_ip["h1"], topo.wl_ip["h3"], count=2), 20, "w1 → w3")
    text = cap.stop()
    assert re.search(r"10\.31\.1\.1\.\d+ > 10\.31\.1\.3\.4789: VXLAN.*vni 4096", text), text
