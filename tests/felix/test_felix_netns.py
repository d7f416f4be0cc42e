"""felix against a real kernel and a real etcd, proven with real packets.

The lab (one per iptables backend, shared by the tests of this module): a "host" namespace with an
uplink to an "outside" namespace and a default route through it (proxy ARP needs one), three
workload namespaces wired as a CNI plugin would (``cali…`` veth on the host, a /32 in the
workload, default via 169.254.1.1 onlink), etcd on the machine's loopback reached from the host
namespace through a relay, and felix running as a subprocess inside the host namespace with short
refresh intervals. Every namespace is deleted and every felix killed at teardown; nothing outside
the namespaces is touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from calyx import selector
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from felix import rules
from tests.fixtures.etcd import EtcdMember, TcpProxy
from tests.fixtures.netns import Netns, netns_session

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

REPO = Path(__file__).resolve().parents[2]
FELIX = str(REPO / ".venv/bin/felix")
PYTHON = str(REPO / ".venv/bin/python")
SERVER = str(Path(__file__).with_name("wlserver.py"))
NODE = "node1"
HOST_IP, OUT_IP = "192.168.77.2", "192.168.77.1"
METRICS_PORT = 9091
REFRESH = 2.0
ROUTE_REFRESH = 3.0
WORKLOADS = {"w1": "10.65.0.1", "w2": "10.65.0.2", "w3": "10.65.0.3"}
TCP_OPEN, TCP_DENIED, UDP_PORT = 8080, 8022, 9999


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll until ``cond()``; returns the time it took, fails the test on timeout."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.1)


class Lab:
    def __init__(self, backend: str, make_ns: Callable[[], Netns], etcd: EtcdMember, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.etcd = etcd
        self.ds: Datastore = etcd.client()
        self.ds.delete_prefix(keys.PREFIX)
        self.host = make_ns()
        self.outside = make_ns()
        self.make_ns = make_ns
        self.host.ip("link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", self.outside.name)
        self.host.ip("addr", "add", f"{HOST_IP}/24", "dev", "up0")
        self.host.ip("link", "set", "up0", "up")
        self.outside.ip("addr", "add", f"{OUT_IP}/24", "dev", "eth0")
        self.outside.ip("link", "set", "eth0", "up")
        self.host.ip("route", "add", "default", "via", OUT_IP)
        self.host.run("sysctl", "-qw", "net.ipv4.ip_forward=0")  # felix must turn it on (configured to)
        self.wl: dict[str, Netns] = {}
        self.iface: dict[str, str] = {}
        for name, ip in WORKLOADS.items():
            self.add_workload(name, ip)
        self.relay = TcpProxy(etcd.client_port, netns=self.host.name, port=2379)
        self.config = tmp / "calyx.toml"
        self.config.write_text("")
        self.felix: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # --- topology ---

    def add_workload(self, name: str, ip: str) -> Netns:
        """Wire a workload as the CNI plugin does (no datastore write)."""
        ns = self.make_ns()
        iface = "cali" + (name.encode().hex() + "0" * 11)[:11]
        self.host.ip("link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.host.ip("link", "set", iface, "up")
        ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
        ns.popen(PYTHON, SERVER, str(UDP_PORT), str(self.tmp / f"udp-{name}.log"), str(TCP_OPEN), str(TCP_DENIED),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wl[name] = ns
        self.iface[name] = iface
        return ns

    # --- felix ---

    def start_felix(self, extra_env: dict[str, str] | None = None) -> None:
        self.starts += 1
        env = dict(os.environ)
        env.update({
            "CALYX_CONFIG": str(self.config),
            "CALYX_NODE_NAME": NODE,
            "CALYX_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
            "CALYX_IPTABLES_BACKEND": self.backend,
            "CALYX_IPTABLES_REFRESH_INTERVAL": str(REFRESH),
            "CALYX_IPSET_REFRESH_INTERVAL": str(REFRESH),
            "CALYX_ROUTE_REFRESH_INTERVAL": str(ROUTE_REFRESH),
            "CALYX_STATUS_INTERVAL": "0.5",
            "CALYX_STATUS_TTL": "5",
            "CALYX_IP_FORWARDING": "enable",
            "CALYX_METRICS_PORT": str(METRICS_PORT),
            "CALYX_LOG_LEVEL": "info",
            **(extra_env or {}),
        })
        log = open(self.log_path(self.starts), "wb")  # noqa: SIM115 (the child owns it)
        self.felix = self.host.popen(FELIX, "run", env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def log_path(self, n: int | None = None) -> Path:
        return self.tmp / f"felix-{n or self.starts}.log"

    def log(self, n: int | None = None) -> str:
        return self.log_path(n).read_text(errors="replace")

    def stop_felix(self, sig: int = signal.SIGTERM) -> None:
        proc = self.felix
        if proc is not None and proc.poll() is None:
            # ``ip netns exec`` execs felix: the pid is felix's own
            os.kill(proc.pid, sig)
            proc.wait(timeout=15)
        self.felix = None

    def felix_alive(self) -> bool:
        return self.felix is not None and self.felix.poll() is None

    # --- datastore ---

    def put(self, key: str, value: dict[str, Any] | str) -> None:
        self.ds.put(key, value if isinstance(value, str) else json.dumps(value))

    def put_workload(self, name: str, *, labels: dict[str, str] | None = None, profiles: list[str] | None = None,
                     ip: str | None = None) -> str:
        key = keys.workload_key(NODE, "k8s", name, "eth0")
        self.put(key, {"iface": self.iface[name], "ipv4_nets": [ip or WORKLOADS[name]],
                       "labels": labels if labels is not None else {"app": name},
                       "profiles": profiles if profiles is not None else ["open"]})
        return key

    def status(self) -> dict[str, Any] | None:
        kv = self.ds.get(keys.felix_status_key(NODE))
        return json.loads(kv.value) if kv is not None else None

    def baseline(self) -> None:
        self.ds.delete_prefix(keys.POLICIES_PREFIX)
        # delete only the extra endpoints: deleting and re-adding the baseline ones would make felix
        # remove and re-add them (a flap that later assertions could catch half-way)
        wanted = {keys.workload_key(NODE, "k8s", name, "eth0") for name in WORKLOADS}
        kvs, _ = self.ds.get_prefix(keys.workloads_prefix())
        for kv in kvs:
            if kv.key not in wanted:
                self.ds.delete(kv.key)
        self.put(keys.profile_key("open"), {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]})
        self.put(keys.ippool_key("pool"), {"cidr": "10.65.0.0/16", "nat_outgoing": True})
        self.put(keys.ipam_block_key("10.65.0.0/26"), {"cidr": "10.65.0.0/26", "affinity": f"node:{NODE}"})
        for name in WORKLOADS:
            self.put_workload(name)

    # --- probes ---

    def ping(self, src: str, dst: str, *, count: int = 1, interval: float | None = None, wait: float = 1) -> bool:
        args = ["ip", "netns", "exec", self.wl[src].name, "ping", "-n", "-q", "-c", str(count), "-W", str(wait)]
        if interval is not None:
            args += ["-i", str(interval)]
        return subprocess.run([*args, dst], capture_output=True, check=False).returncode == 0

    def tcp(self, src: str, dst: str, port: int) -> bool:
        args = ["ip", "netns", "exec", self.wl[src].name, "nc", "-z", "-w", "1", dst, str(port)]
        return subprocess.run(args, capture_output=True, check=False).returncode == 0

    def udp_from(self, src: str, dst: str, *, source_ip: str) -> None:
        code = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                "s.bind((sys.argv[1],0));"
                f"[s.sendto(b'x',(sys.argv[2],{UDP_PORT})) for _ in range(3)]")
        self.wl[src].run(PYTHON, "-c", code, source_ip, dst)

    def udp_sources(self, name: str) -> list[str]:
        path = self.tmp / f"udp-{name}.log"
        return path.read_text().split() if path.exists() else []

    def iptables_save(self, table: str = "filter") -> str:
        return self.host.run(f"iptables-{self.backend}-save", "-t", table)

    def routes(self) -> list[dict[str, Any]]:
        return list(self.host.ip_json("route", "show", "proto", "78"))

    def route_dsts(self) -> set[str]:
        return {r["dst"] for r in self.routes()}

    def felix_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``felix <args>`` inside the host namespace, configured like the daemon."""
        env = dict(os.environ, CALYX_CONFIG=str(self.config), CALYX_NODE_NAME=NODE,
                   CALYX_ETCD_ENDPOINTS="http://127.0.0.1:2379", CALYX_IPTABLES_BACKEND=self.backend)
        return subprocess.run(["ip", "netns", "exec", self.host.name, FELIX, *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    def converged(self) -> bool:
        """The kernel holds exactly what the datastore asks for (``felix diff`` finds nothing)."""
        return self.felix_cli("diff").returncode == 0

    def metrics(self) -> str:
        return self.host.run("curl", "-s", "--max-time", "2", f"http://127.0.0.1:{METRICS_PORT}/metrics")

    def close(self) -> None:
        self.stop_felix(signal.SIGKILL)
        self.relay.close()
        self.ds.close()


@pytest.fixture(scope="module", params=["nft", "legacy"])
def lab(request: pytest.FixtureRequest, etcd: EtcdMember, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with netns_session() as make_ns:
        lab = Lab(request.param, make_ns, etcd, tmp_path_factory.mktemp(f"felix-{request.param}"))
        try:
            lab.baseline()
            lab.start_felix()
            wait_for(lambda: lab.ping("w1", WORKLOADS["w2"]), 20, "the baseline to be programmed")
            yield lab
        finally:
            lab.close()


@pytest.fixture
def base(lab: Lab) -> Iterator[Lab]:
    """The lab at its baseline (three endpoints with an allow-all profile, no policy), felix running."""
    if not lab.felix_alive():
        lab.start_felix()
    lab.baseline()
    wait_for(lambda: lab.ping("w1", WORKLOADS["w2"]) and lab.ping("w2", WORKLOADS["w3"]), 15, "baseline")
    yield lab
    assert lab.felix_alive(), f"felix died:\n{lab.log()[-3000:]}"


# --- the tests -------------------------------------------------------------------------------------


def test_allowed_traffic_flows_and_default_deny(base: Lab) -> None:
    lab = base
    assert lab.ping("w1", WORKLOADS["w3"])
    assert lab.tcp("w3", WORKLOADS["w1"], TCP_OPEN)
    assert lab.ping("w1", HOST_IP)  # workload → host, allowed by the profile's egress
    # w3 loses its profile: nothing may reach it or leave it
    lab.put_workload("w3", profiles=[])
    wait_for(lambda: not lab.ping("w1", WORKLOADS["w3"]), 10, "default deny to w3")
    assert not lab.ping("w3", WORKLOADS["w1"])
    assert lab.ping("w1", WORKLOADS["w2"])  # others unaffected
    # routes, proxy ARP and sysctls are felix's
    assert {f"{ip}" for ip in WORKLOADS.values()} <= lab.route_dsts()
    assert lab.host.run("cat", f"/proc/sys/net/ipv4/conf/{lab.iface['w1']}/proxy_arp").strip() == "1"
    assert lab.host.run("cat", f"/proc/sys/net/ipv4/neigh/{lab.iface['w1']}/proxy_delay").strip() == "0"
    blackholes = [r for r in lab.routes() if r.get("type") == "blackhole"]
    assert [r["dst"] for r in blackholes] == ["10.65.0.0/26"]


def test_deny_blocks_exactly_one_tcp_port_and_icmp(base: Lab) -> None:
    lab = base
    lab.put(keys.policy_key("guard-w2"), {
        "selector": "app == 'w2'", "order": 10,
        "ingress": [{"action": "deny", "protocol": "tcp", "destination": {"ports": [TCP_DENIED]}},
                    {"action": "deny", "protocol": "icmp"},
                    {"action": "allow"}]})
    wait_for(lambda: not lab.ping("w1", WORKLOADS["w2"]), 10, "ICMP to w2 to be denied")
    assert not lab.tcp("w1", WORKLOADS["w2"], TCP_DENIED)
    assert lab.tcp("w1", WORKLOADS["w2"], TCP_OPEN)
    assert lab.ping("w1", WORKLOADS["w3"])  # the policy selects only w2
    assert lab.ping("w2", WORKLOADS["w1"])  # w2's own egress is not governed by it
    lab.ds.delete(keys.policy_key("guard-w2"))
    wait_for(lambda: lab.tcp("w1", WORKLOADS["w2"], TCP_DENIED), 10, "the deny to go away")


def test_selector_change_moves_an_endpoint_in_and_out_of_a_set(base: Lab) -> None:
    lab = base
    sel = "role == 'friend'"
    lab.put(keys.policy_key("friends-only"), {
        "selector": "app == 'w2'",
        "ingress": [{"action": "allow", "protocol": "tcp", "source": {"selector": sel}}]})
    wait_for(lambda: not lab.tcp("w1", WORKLOADS["w2"], TCP_OPEN), 10, "w1 to be refused")
    set_name = rules.ipset_name("s" + selector.parse(sel).unique_id, 4)
    lab.put_workload("w1", labels={"app": "w1", "role": "friend"})
    wait_for(lambda: lab.tcp("w1", WORKLOADS["w2"], TCP_OPEN), 10, "w1 to be let in")
    assert WORKLOADS["w1"] in lab.host.run("ipset", "list", set_name)
    assert not lab.tcp("w3", WORKLOADS["w2"], TCP_OPEN)
    lab.put_workload("w1", labels={"app": "w1"})
    wait_for(lambda: not lab.tcp("w1", WORKLOADS["w2"], TCP_OPEN), 10, "w1 to be refused again")
    assert WORKLOADS["w1"] not in lab.host.run("ipset", "list", set_name)


def test_spoofed_sources_are_dropped(base: Lab) -> None:
    lab = base
    spoofed = "10.65.0.200"

    def genuine_arrives() -> bool:
        lab.udp_from("w1", WORKLOADS["w2"], source_ip=WORKLOADS["w1"])
        time.sleep(0.2)
        return WORKLOADS["w1"] in lab.udp_sources("w2")

    wait_for(genuine_arrives, 5, "the genuine datagrams")
    # the dispatch rule towards w1's policy matches its address; the rest falls to the final DROP
    chain = f"calyx-fd-{rules.dispatch_group(lab.iface['w1'])}"

    def spoof_drops() -> int:
        out = lab.host.run(f"iptables-{lab.backend}", "-L", chain, "-v", "-n", "-x")
        return int([line for line in out.splitlines() if "DROP" in line][-1].split()[0])

    before = spoof_drops()
    lab.wl["w1"].ip("addr", "add", f"{spoofed}/32", "dev", "eth0")  # the workload claims another address
    try:
        lab.udp_from("w1", WORKLOADS["w2"], source_ip=spoofed)
        time.sleep(1.0)
    finally:
        lab.wl["w1"].ip("addr", "del", f"{spoofed}/32", "dev", "eth0")
    assert spoofed not in lab.udp_sources("w2")
    assert spoof_drops() >= before + 3  # dropped by felix's anti-spoofing, not lost elsewhere


def test_removing_an_endpoint_removes_its_route_and_chains(base: Lab) -> None:
    lab = base
    iface = lab.iface["w3"]
    assert rules.to_wl_chain(iface) in lab.iptables_save()
    lab.ds.delete(keys.workload_key(NODE, "k8s", "w3", "eth0"))
    wait_for(lambda: WORKLOADS["w3"] not in lab.route_dsts(), 10, "the route to go")
    wait_for(lambda: rules.to_wl_chain(iface) not in lab.iptables_save(), 10, "the chains to go")
    assert rules.from_wl_chain(iface) not in lab.iptables_save()
    assert not lab.ping("w1", WORKLOADS["w3"])  # and its interface is now unknown: fail closed
    assert not lab.ping("w3", WORKLOADS["w1"])


def test_hand_made_damage_is_repaired_and_foreign_rules_are_untouched(base: Lab) -> None:
    lab = base
    ipt = f"iptables-{lab.backend}"
    lab.host.run(ipt, "-A", "FORWARD", "-s", "203.0.113.7", "-j", "DROP")
    lab.host.run(ipt, "-N", "foreign-chain")
    lab.host.run(ipt, "-A", "foreign-chain", "-j", "RETURN")
    lab.host.ip("route", "del", f"{WORKLOADS['w2']}/32")
    lab.host.run(ipt, "-D", rules.to_wl_chain(lab.iface["w3"]), "1")  # the jump to the profile
    lab.host.run(ipt, "-D", "FORWARD", "1")  # felix's hook
    assert not lab.ping("w1", WORKLOADS["w2"], wait=0.5)
    took = wait_for(lambda: WORKLOADS["w2"] in lab.route_dsts(), ROUTE_REFRESH * 1.1 + 3, "the route to return")

    def hook_on_top() -> bool:
        forward = [line for line in lab.iptables_save().splitlines() if line.startswith("-A FORWARD ")]
        return bool(forward) and "calyx:" in forward[0] and "-j calyx-FORWARD" in forward[0]

    wait_for(hook_on_top, REFRESH * 1.1 + 3, "the hook to return to the top of FORWARD")
    assert lab.ping("w1", WORKLOADS["w3"])  # with the hook back, only the repaired rule lets this through
    save = lab.iptables_save()
    forward = [line for line in save.splitlines() if line.startswith("-A FORWARD ")]
    assert any("203.0.113.7" in line for line in forward)
    assert ":foreign-chain" in save and "-A foreign-chain -j RETURN" in save
    assert took < ROUTE_REFRESH * 1.1 + 3
    lab.host.run(ipt, "-D", "FORWARD", "-s", "203.0.113.7", "-j", "DROP")
    lab.host.run(ipt, "-F", "foreign-chain")
    lab.host.run(ipt, "-X", "foreign-chain")


def test_interface_created_after_its_endpoint_is_picked_up(base: Lab) -> None:
    lab = base
    ns = lab.add_workload("w4", "10.65.0.4")
    lab.host.ip("link", "del", lab.iface["w4"])  # the CNI plugin has not created it yet
    lab.put_workload("w4", ip="10.65.0.4")
    time.sleep(1.0)
    assert "10.65.0.4" not in lab.route_dsts()
    lab.host.ip("link", "add", lab.iface["w4"], "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    lab.host.ip("link", "set", lab.iface["w4"], "up")
    ns.ip("addr", "add", "10.65.0.4/32", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
    took = wait_for(lambda: "10.65.0.4" in lab.route_dsts(), 5, "the late interface's route")
    assert took < ROUTE_REFRESH * 0.9, "picked up by a periodic resync, not by the link event"
    wait_for(lambda: lab.ping("w4", WORKLOADS["w1"]), 5, "w4 to reach w1")
    lab.ds.delete(keys.workload_key(NODE, "k8s", "w4", "eth0"))


def test_kill_9_and_restart_under_continuous_ping_loses_nothing(base: Lab) -> None:
    lab = base
    wait_for(lab.converged, 15, "felix to finish the baseline")  # so that the restart has nothing to do
    args = ["ip", "netns", "exec", lab.wl["w1"].name, "ping", "-n", "-i", "0.05", "-c", "100", "-W", "1",
            WORKLOADS["w2"]]
    ping = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    lab.stop_felix(signal.SIGKILL)
    time.sleep(0.5)
    lab.start_felix()
    out, _ = ping.communicate(timeout=30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m is not None, out
    assert m.group(1) == m.group(2) == "100", out
    wait_for(lambda: "programming the dataplane" in lab.log(), 10, "the restarted felix to sync")
    wait_for(lambda: (lab.status() or {}).get("in_sync") is True, 10, "in sync")
    wait_for(lambda: "first apply complete" in lab.log(), 10, "the first apply")
    log = lab.log()
    # nothing changed: the restarted felix read everything back and wrote nothing
    assert "the kernel was already right" in log, log[-2000:]
    assert " apply " not in log.split("first apply complete")[0], log[-2000:]  # no apply summary: no work


def test_malformed_values_are_skipped_and_reported(base: Lab) -> None:
    lab = base
    bad = keys.workload_key(NODE, "k8s", "broken", "eth0")
    lab.put(bad, '{"iface": 5, "ipv4_nets": ["not an ip"]}')
    wait_for(lambda: any(bad in e for e in (lab.status() or {}).get("errors", [])), 10, "the status error")
    metrics = lab.metrics()
    assert re.search(r'^calyx_datastore_errors_total\{kind="malformed"\} [1-9]', metrics, re.M), metrics
    assert re.search(r"^calyx_felix_datastore_malformed_keys 1\.0$", metrics, re.M)
    assert lab.ping("w1", WORKLOADS["w2"])
    assert lab.felix_alive()
    lab.ds.delete(bad)
    wait_for(lambda: not (lab.status() or {}).get("errors"), 10, "the error to clear")


def test_status_metrics_and_ip_forwarding(base: Lab) -> None:
    lab = base
    # the status is eventually consistent (written every status_interval): wait for the baseline in it
    wait_for(lambda: {k: (lab.status() or {}).get(k) for k in ("in_sync", "endpoints", "ip_forwarding")}
             == {"in_sync": True, "endpoints": 3, "ip_forwarding": True}, 10, "the status to show the baseline")
    assert lab.host.run("sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"  # turned on (configured so)
    ep = lab.ds.get(keys.endpoint_status_key(NODE, "k8s", "w1", "eth0"))
    assert ep is not None and json.loads(ep.value)["state"] == "up"
    names = ("calyx_felix_apply_duration_seconds_count", "calyx_felix_iptables_restore_calls_total",
             "calyx_felix_endpoints 3.0", "calyx_felix_resyncs_total", "calyx_felix_in_sync 1.0")
    wait_for(lambda: all(name in lab.metrics() for name in names), 10, "the metrics")


def test_nat_outgoing(base: Lab) -> None:
    lab = base
    assert lab.ping("w1", OUT_IP)  # the outside has no route back to 10.65/16: masquerade did it
    lab.put(keys.ippool_key("pool"), {"cidr": "10.65.0.0/16", "nat_outgoing": False})
    wait_for(lambda: not lab.ping("w1", OUT_IP), 10, "no masquerade")
    lab.put(keys.ippool_key("pool"), {"cidr": "10.65.0.0/16", "nat_outgoing": True})
    wait_for(lambda: lab.ping("w1", OUT_IP), 10, "masquerade again")


def test_fail_closed_rules_stay_when_felix_stops(base: Lab) -> None:
    lab = base
    lab.add_workload("w5", "10.65.0.5")  # wired, but no endpoint in the datastore
    # give it what the CNI plugin would (proxy ARP, a route of its own protocol): only iptables stands
    # between it and the others
    iface = lab.iface["w5"]
    lab.host.run("sysctl", "-qw", f"net.ipv4.conf.{iface}.proxy_arp=1")
    lab.host.ip("route", "add", "10.65.0.5/32", "dev", iface, "proto", "boot")
    assert not lab.ping("w5", WORKLOADS["w1"])
    assert not lab.ping("w1", "10.65.0.5")
    lab.stop_felix(signal.SIGTERM)
    assert lab.ping("w1", WORKLOADS["w2"])  # programmed traffic keeps flowing
    assert not lab.ping("w5", WORKLOADS["w1"])  # and the unknown interface stays closed
    assert rules.FROM_DISPATCH in lab.iptables_save()
    lab.start_felix()
    wait_for(lambda: (lab.status() or {}).get("in_sync") is True, 10, "in sync")
    assert "10.65.0.5" in {r["dst"] for r in lab.host.ip_json("route", "show", "proto", "boot")}  # not ours


def test_dump_and_diff_commands(base: Lab) -> None:
    lab = base
    felix = lab.felix_cli

    wait_for(lambda: felix("diff").returncode == 0, 10, "felix diff to report no difference")
    tw = rules.to_wl_chain(lab.iface["w2"])
    desired, actual = felix("dump", "--desired"), felix("dump", "--actual")
    assert desired.returncode == actual.returncode == 0
    for out in (desired.stdout, actual.stdout):
        assert f":{tw} " in out and f"{WORKLOADS['w2']}/32 dev {lab.iface['w2']}" in out
    lab.stop_felix()  # so that nothing repairs the damage while we look at it
    try:
        lab.host.run(f"iptables-{lab.backend}", "-D", tw, "1")
        lab.host.ip("route", "del", f"{WORKLOADS['w2']}/32")
        diff = felix("diff")
        assert diff.returncode == 1
        assert f"-I {tw} 1 " in diff.stdout  # the rule to put back, at its place
        assert f"+ {WORKLOADS['w2']}/32 dev {lab.iface['w2']}" in diff.stdout
        assert not [x for x in diff.stdout.splitlines() if x.startswith(("-D ", "-F ", "-X "))]  # nothing else
    finally:
        lab.start_felix()
    wait_for(lambda: felix("diff").returncode == 0, 15, "felix to repair the damage")
    assert felix("dump").returncode == 2  # neither --desired nor --actual: usage error
