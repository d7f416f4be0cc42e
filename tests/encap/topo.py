"""The encapsulation tests' topology: three hosts running felix and bgpd, a router without BGP.

::

    h1 10.31.1.1 ─┐                                    ┌─ h2 10.31.2.1
    h3 10.31.1.3 ─┴─ br1 10.31.1.254  router  10.31.2.254 ─┘
                     (static: only the two host subnets, no workload routes)

One pool 10.66.0.0/16 (its encapsulation fields given by the test), blocks of /26 from IPAM, which
also gives the workloads their addresses; one workload per host (veth + namespace, an allow-all
profile); felix and bgpd run as subprocesses in the host namespaces (etcd reached through
:class:`~tests.bgpd.topo.EtcdForward`). Used on this machine for VXLAN and inside the test VM
(tests/fixtures/vm.py) for IP-in-IP.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from calyx.datastore import keys
from calyx.ipam.allocator import IPAM
from calyx.ipam.store import DatastoreStore
from tests.bgpd.topo import ROOT, Bgpd, Cluster, EtcdForward
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth, netns_session
from tests.fixtures.routers import wait_for
from tests.fixtures.vm import SLOWDOWN

FELIX = str(ROOT / ".venv/bin/felix")
HOSTS = {"h1": "10.31.1.1", "h2": "10.31.2.1", "h3": "10.31.1.3"}


@dataclass
class Topo:
    router: Netns
    hosts: dict[str, Netns]
    wls: dict[str, Netns]
    wl_ip: dict[str, str]
    vtep: dict[str, str]  # node → its published tunnel address
    cluster: Cluster
    work: Path
    felix_logs: dict[str, Path]


def start_felix(ns: Netns, node: str, work: Path, backend: str = "legacy") -> Path:
    d = work / f"felix-{node}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "calyx.toml").write_text("")
    env = {"CALYX_CONFIG": str(d / "calyx.toml"), "CALYX_NODE_NAME": node,
           "CALYX_ETCD_ENDPOINTS": "http://127.0.0.1:2379", "CALYX_STATE_DIR": str(d / "state"),
           "CALYX_IPTABLES_BACKEND": backend, "CALYX_IP_FORWARDING": "enable", "CALYX_STATUS_INTERVAL": "0.5",
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

    def __init__(self, ns: Netns, iface: str, expr: str, *, verbose: bool = True) -> None:
        flags = ["-v"] if verbose else []
        self.proc = ns.popen("tcpdump", "-l", "-nn", *flags, "-i", iface, expr, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        lines: list[str] = []
        while len(lines) < 3 and not any("listening" in line for line in lines):  # once the capture runs
            lines.append(self.proc.stderr.readline())
        assert "listening" in lines[-1], lines

    def stop(self) -> str:
        time.sleep(0.3)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return str(out)


@contextmanager
def encap_topology(etcd: EtcdMember, work: Path, pool: dict[str, Any], tunnel_field: str,
                   backend: str = "legacy") -> Iterator[Topo]:
    """Build the topology; yields once every felix published ``tunnel_field`` in its node key.
    Everything is removed on the way out (namespaces with their processes, relays, the client)."""
    forwards: list[EtcdForward] = []
    bgpds: list[Bgpd] = []
    ds = etcd.client()
    try:
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
            c = Cluster(ds)
            c.cluster(as_number=64512, node_to_node_mesh=True)
            for name, ip in HOSTS.items():
                c.node(name, f"{ip}/24", future_field="kept")
            c.pool("encap", "10.66.0.0/16", block_size=26, **pool)
            c.put(keys.profile_key("allow"), {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]})
            ipam = IPAM(DatastoreStore(ds))
            wls: dict[str, Netns] = {}
            wl_ip: dict[str, str] = {}
            for name in HOSTS:
                addr = str(ipam.allocate(f"wl-{name}", name, pools=["encap"])[0].address)
                wl_ip[name] = addr
                wls[name] = make()
                add_workload(hosts[name], wls[name], name, addr)
                c.put(keys.workload_key(name, "test", f"w{name}", "eth0"),
                      {"iface": f"cali{name}", "ipv4_nets": [f"{addr}/32"], "profiles": ["allow"]})
            logs = {name: start_felix(hosts[name], name, work, backend) for name in HOSTS}
            tunnel: dict[str, str] = {}

            def published() -> bool:
                for name in HOSTS:
                    kv = ds.get(keys.node_key(name))
                    value = json.loads(kv.value) if kv else {}
                    if tunnel_field not in value:
                        return False
                    tunnel[name] = value[tunnel_field]
                return True

            try:
                wait_for(published, 90 * SLOWDOWN, f"every felix to publish {tunnel_field}")
            except AssertionError:
                for name, log in logs.items():
                    print(f"--- felix {name}\n" + log.read_text(errors="replace")[-3000:])
                raise
            bgpds += [Bgpd(hosts[name], name, work, "http://127.0.0.1:2379").start() for name in HOSTS]
            yield Topo(r, hosts, wls, wl_ip, tunnel, c, work, logs)
    finally:
        for b in bgpds:
            b.stop()
        for f in forwards:
            f.close()
        ds.close()


def block_of(ip: str) -> str:
    return str(IPv4Address(int(IPv4Address(ip)) & ~63)) + "/26"


def ping_df(ns: Netns, dst: str, size: int) -> str:
    """One ping with DF set and ``size`` bytes of payload; stdout and stderr together (a PMTU already
    learned from an ICMP "frag needed" shows as ping's local error on stderr)."""
    proc = subprocess.run(["ip", "netns", "exec", ns.name, "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s",
                           str(size), dst], capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout + proc.stderr


def frag_needed(text: str, mtu: int) -> bool:
    """ping reported that the path MTU is ``mtu``: the ICMP error itself, or the PMTU it taught."""
    return f"Frag needed and DF set (mtu = {mtu})" in text or f"message too long, mtu={mtu}" in text

