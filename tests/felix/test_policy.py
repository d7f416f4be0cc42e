"""Policy semantics, end to end in pure code: model objects → calculation → managers → the chains
the iptables driver would program, evaluated by a small iptables simulator (tests/felix/iptsim.py).
Assertions are verdicts on packets, not command lines."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from felix import rules
from felix.calc import Calculator
from felix.dataplane import Dataplane
from tests.felix.helpers import policy, pool, profile, wep
from tests.felix.iptsim import Packet, Sim, sim_for, split_line

pytestmark = pytest.mark.unit

A_IP, B_IP, C_IP, REMOTE_IP = "10.65.0.1", "10.65.0.2", "10.65.0.3", "10.65.9.9"
ALLOW_ALL = profile("open", ingress=[{"action": "allow"}], egress=[{"action": "allow"}])


class World:
    def __init__(self, *items: tuple[str, Any], node: str = "n1") -> None:
        self.calc = Calculator(node)
        self.dp = Dataplane(self.calc, backend="nft", versions=(4, 6))
        self.feed(*items)

    def feed(self, *items: tuple[str, Any]) -> None:
        for key, obj in items:
            self.calc.on_update(key, obj)
        self.dp.update(self.calc.take_dirty())

    def delete(self, key: str) -> None:
        self.calc.on_delete(key)
        self.dp.update(self.calc.take_dirty())

    def sim(self, version: int = 4) -> Sim:
        sets = {n: set(self.dp.ipsets.members(n) or ()) for n in self.dp.ipsets.names}
        return sim_for(self.dp.filter[version], sets)

    def forward(self, src: str, dst: str, iif: str, oif: str, **kw: Any) -> str:
        return self.sim().hook(rules.FORWARD, Packet(src=src, dst=dst, iif=iif, oif=oif, **kw))


def two_endpoints(*extra: tuple[str, Any], a_profiles: list[str] | None = None,
                  b_profiles: list[str] | None = None) -> World:
    return World(
        wep("n1", "a", "calia0000001", A_IP, labels={"app": "client"}, profiles=a_profiles),
        wep("n1", "b", "calib0000002", B_IP, labels={"app": "server"}, profiles=b_profiles),
        *extra,
    )


def test_default_deny_without_profile_or_policy() -> None:
    w = two_endpoints()
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "DROP"
    assert w.forward(REMOTE_IP, B_IP, "eth0", "calib0000002") == "DROP"
    assert w.forward(A_IP, REMOTE_IP, "calia0000001", "eth0") == "DROP"


def test_profile_allows_both_directions_between_local_workloads() -> None:
    w = two_endpoints(ALLOW_ALL, a_profiles=["open"], b_profiles=["open"])
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "ACCEPT"
    assert w.forward(B_IP, A_IP, "calib0000002", "calia0000001", proto=1, icmp_type=8) == "ACCEPT"
    assert w.forward(REMOTE_IP, A_IP, "eth0", "calia0000001") == "ACCEPT"


def test_sender_egress_and_receiver_ingress_both_apply() -> None:
    deny_out = profile("closed-out", ingress=[{"action": "allow"}], egress=[])
    w = two_endpoints(ALLOW_ALL, deny_out, a_profiles=["closed-out"], b_profiles=["open"])
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "DROP"  # a may not send
    assert w.forward(B_IP, A_IP, "calib0000002", "calia0000001") == "ACCEPT"


def test_policy_allows_exactly_one_tcp_port_from_selected_clients() -> None:
    pol = policy("web", "app == 'server'", ingress=[
        {"action": "allow", "protocol": "tcp", "source": {"selector": "app == 'client'"},
         "destination": {"ports": [80]}}])
    w = two_endpoints(ALLOW_ALL, pol, a_profiles=["open"], b_profiles=["open"])
    fw = w.forward
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=80) == "ACCEPT"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=22) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8) == "DROP"
    assert fw(REMOTE_IP, B_IP, "eth0", "calib0000002", dport=80) == "DROP"  # not a client
    # a remote client (another node's endpoint) is in the set too
    w.feed(wep("n2", "r", "calir", REMOTE_IP, labels={"app": "client"}))
    assert fw(REMOTE_IP, B_IP, "eth0", "calib0000002", dport=80) == "ACCEPT"
    # the label changes: out of the set again
    w.feed(wep("n2", "r", "calir", REMOTE_IP, labels={"app": "other"}))
    assert fw(REMOTE_IP, B_IP, "eth0", "calib0000002", dport=80) == "DROP"


def test_deny_rule_blocks_icmp_only_and_order_of_policies() -> None:
    first = policy("first", "all()", order=1, ingress=[{"action": "deny", "protocol": "icmp"},
                                                        {"action": "deny", "protocol": "tcp",
                                                         "destination": {"ports": [22]}}])
    then = policy("then", "all()", order=2, ingress=[{"action": "allow"}])
    w = two_endpoints(ALLOW_ALL, first, then, a_profiles=["open"], b_profiles=["open"])
    fw = w.forward
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=22) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=80) == "ACCEPT"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=17, dport=22) == "ACCEPT"
    # reverse the order: the allow comes first and wins
    w.feed(policy("then", "all()", order=0, ingress=[{"action": "allow"}]))
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8) == "ACCEPT"


def test_policy_without_a_matching_rule_drops_even_if_profile_allows_and_pass_goes_to_profiles() -> None:
    nothing = policy("nothing", "app == 'server'", ingress=[{"action": "allow", "protocol": "udp"}])
    w = two_endpoints(ALLOW_ALL, nothing, a_profiles=["open"], b_profiles=["open"])
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002", dport=80) == "DROP"
    w.feed(policy("nothing", "app == 'server'", ingress=[{"action": "pass", "protocol": "tcp"}]))
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002", dport=80) == "ACCEPT"  # via the profile
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8) == "DROP"


def test_icmp_type_code_ports_ranges_and_negations() -> None:
    pol = policy("mix", "all()", ingress=[
        {"action": "allow", "protocol": "icmp", "icmp": {"type": 8, "code": 0}},
        {"action": "allow", "protocol": "tcp", "destination": {"ports": ["8000:8010", 443],
                                                               "not_ports": [8005]}},
        {"action": "allow", "protocol": "udp", "source": {"not_nets": ["10.65.0.0/30", "10.99.0.0/16"]}},
    ])
    w = two_endpoints(pol)
    fw = w.forward
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8, icmp_code=0) == "DROP"  # a: no egress
    w.feed(ALLOW_ALL, wep("n1", "a", "calia0000001", A_IP, labels={"app": "client"}, profiles=["open"]))
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=8, icmp_code=0) == "ACCEPT"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=1, icmp_type=13) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=8003) == "ACCEPT"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=8005) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=443) == "ACCEPT"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", dport=444) == "DROP"
    assert fw(A_IP, B_IP, "calia0000001", "calib0000002", proto=17, dport=53) == "DROP"  # a is in 10.65.0.0/30
    assert fw("10.70.0.1", B_IP, "eth0", "calib0000002", proto=17, dport=53) == "ACCEPT"


def test_many_ports_are_split_into_multiport_chunks() -> None:
    ports = list(range(1000, 1040))
    pol = policy("many", "all()", ingress=[{"action": "allow", "protocol": "tcp",
                                            "destination": {"ports": ports}}])
    w = two_endpoints(pol)
    chain = rules.policy_chain("many", "ingress")
    assert len(w.dp.filter[4].desired_rules(chain)) > 2  # split: 15 ports per multiport match
    for port in (1000, 1020, 1039):
        assert w.forward(REMOTE_IP, B_IP, "eth0", "calib0000002", dport=port) == "ACCEPT"
    assert w.forward(REMOTE_IP, B_IP, "eth0", "calib0000002", dport=1040) == "DROP"


def test_anti_spoofing() -> None:
    w = two_endpoints(ALLOW_ALL, a_profiles=["open"], b_profiles=["open"])
    assert w.forward(REMOTE_IP, B_IP, "calia0000001", "calib0000002") == "DROP"  # a claims another address
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "ACCEPT"
    # two addresses: both may send, a third may not
    key, ep = wep("n1", "a", "calia0000001", A_IP, profiles=["open"])
    w.feed((key, dataclasses.replace(ep, ipv4_nets=(*ep.ipv4_nets, ipaddress.ip_network("10.65.0.50")))))
    assert w.forward("10.65.0.50", B_IP, "calia0000001", "calib0000002") == "ACCEPT"
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "ACCEPT"
    assert w.forward("10.65.0.51", B_IP, "calia0000001", "calib0000002") == "DROP"
    w.feed(wep("n1", "a", "calia0000001", "", profiles=["open"]))
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "DROP"  # no IPv4 address left


def test_fail_closed_for_unknown_workload_interfaces_and_host_traffic_untouched() -> None:
    w = two_endpoints(ALLOW_ALL, a_profiles=["open"], b_profiles=["open"])
    assert w.forward(REMOTE_IP, B_IP, "caliunknown", "calib0000002") == "DROP"
    assert w.forward(REMOTE_IP, "10.65.0.77", "eth0", "caliunknown") == "DROP"
    assert w.forward("192.168.1.1", "192.168.2.1", "eth0", "eth1") == "ACCEPT"  # not ours: RETURN
    s = w.sim()
    assert s.hook(rules.INPUT, Packet(src="1.2.3.4", dst="1.2.3.5", iif="eth0")) == "ACCEPT"
    assert s.hook(rules.INPUT, Packet(src=A_IP, dst="10.0.0.10", iif="caliunknown")) == "DROP"


def test_conntrack_fast_path() -> None:
    w = two_endpoints()
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002", ctstate="ESTABLISHED") == "ACCEPT"
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002", ctstate="INVALID") == "DROP"


def test_workload_to_host_follows_egress_policy() -> None:
    egress = policy("to-host", "app == 'client'", egress=[{"action": "allow", "destination": {"nets":
                                                                                            ["10.0.0.10/32"]}}])
    w = two_endpoints(egress)
    s = w.sim()
    assert s.hook(rules.INPUT, Packet(src=A_IP, dst="10.0.0.10", iif="calia0000001")) == "ACCEPT"
    assert s.hook(rules.INPUT, Packet(src=A_IP, dst="10.0.0.11", iif="calia0000001")) == "DROP"
    assert s.hook(rules.INPUT, Packet(src=B_IP, dst="10.0.0.10", iif="calib0000002")) == "DROP"


def test_removed_endpoint_loses_chains_and_falls_to_fail_closed() -> None:
    w = two_endpoints(ALLOW_ALL, a_profiles=["open"], b_profiles=["open"])
    t = w.dp.filter[4]
    assert rules.to_wl_chain("calib0000002") in t.chain_names
    w.delete(wep("n1", "b", "calib0000002", B_IP)[0])
    assert rules.to_wl_chain("calib0000002") not in t.chain_names
    assert rules.from_wl_chain("calib0000002") not in t.chain_names
    assert w.forward(A_IP, B_IP, "calia0000001", "calib0000002") == "DROP"
    assert w.dp.endpoints.desired_routes.keys() == {ipaddress.ip_network(A_IP)}


def test_ipv6_rendering_uses_icmpv6_and_v6_sets() -> None:
    pol = policy("v6", "all()", ingress=[{"action": "allow", "protocol": "icmpv6"},
                                         {"action": "allow", "source": {"selector": "app == 'client'"}}])
    w = World(wep("n1", "a", "calia0000001", A_IP, labels={"app": "client"}, ipv6=["fd00::1"]),
              wep("n1", "b", "calib0000002", B_IP, ipv6=["fd00::2"], profiles=["open"]), ALLOW_ALL, pol)
    s6 = w.sim(6)
    assert s6.hook(rules.FORWARD, Packet(src="fd00::9", dst="fd00::2", iif="eth0", oif="calib0000002",
                                         proto=58, icmp_type=128)) == "ACCEPT"
    assert s6.hook(rules.FORWARD, Packet(src="fd00::9", dst="fd00::2", iif="eth0", oif="calib0000002")) == "DROP"
    sid = rules.selector_set_id("app == 'client'")
    assert w.dp.ipsets.members(rules.ipset_name(sid, 6)) == {"fd00::1"}
    # the v4 chain of this policy has no ICMPv6 rule
    s4 = w.sim(4)
    assert s4.hook(rules.FORWARD, Packet(src=REMOTE_IP, dst=B_IP, iif="eth0", oif="calib0000002", proto=58)) == "DROP"


def test_nat_outgoing_masquerades_only_pool_to_outside() -> None:
    w = World(pool("p", "10.65.0.0/16", nat=True), pool("q", "10.66.0.0/16"))
    nat = w.dp.nat
    ((match, target),) = [split_line(x) for x in nat.desired_rules(rules.POSTROUTING)]
    sets = {n: set(w.dp.ipsets.members(n) or ()) for n in w.dp.ipsets.names}
    sim = Sim({}, sets)
    assert target == "-j MASQUERADE"
    assert sim.matches(match, Packet(src="10.65.1.1", dst="8.8.8.8"))
    assert not sim.matches(match, Packet(src="10.65.1.1", dst="10.66.0.1"))
    assert not sim.matches(match, Packet(src="10.66.1.1", dst="8.8.8.8"))


def test_chain_and_ipset_names_fit_and_are_distinct() -> None:
    long_a = "a" * 60 + "-x"
    long_b = "a" * 60 + "-y"
    names = {rules.policy_chain(n, d) for n in (long_a, long_b, "short") for d in ("ingress", "egress")}
    names |= {rules.profile_chain(n, d) for n in (long_a, long_b, "short") for d in ("ingress", "egress")}
    assert len(names) == 12
    assert all(len(n) <= rules.MAX_CHAIN for n in names)
    assert len(rules.to_wl_chain("x" * 15)) <= rules.MAX_CHAIN
    sid = rules.selector_set_id("a == 'b' && c in {'d'}")
    assert len(rules.ipset_name(sid, 6)) <= rules.MAX_IPSET
    assert rules.selector_set_id("a=='b'") == rules.selector_set_id("a == 'b'")  # canonical form


def test_dispatch_tree_reaches_every_endpoint() -> None:
    items = [wep("n1", f"w{i}", f"cali{i:011x}", f"10.65.{i // 200}.{i % 200 + 1}", profiles=["open"])
             for i in range(300)]
    w = World(ALLOW_ALL, *items)
    s = w.sim()
    for i in (0, 17, 255, 299):
        ip = f"10.65.{i // 200}.{i % 200 + 1}"
        assert s.hook(rules.FORWARD, Packet(src=REMOTE_IP, dst=ip, iif="eth0", oif=f"cali{i:011x}")) == "ACCEPT"
    assert len(w.dp.filter[4].desired_rules(rules.TO_DISPATCH)) < 40  # grouped, not 300 long


def test_endpoint_without_an_ipv6_address_gets_no_ipv6_chains_and_its_ipv6_is_dropped() -> None:
    w = two_endpoints(ALLOW_ALL, a_profiles=["open"], b_profiles=["open"])
    v6 = w.dp.filter[6]
    assert rules.to_wl_chain("calib0000002") not in v6.chain_names
    assert rules.from_wl_chain("calia0000001") not in v6.chain_names
    s6 = w.sim(6)
    assert s6.hook(rules.FORWARD, Packet(src="fd00::1", dst="fd00::9", iif="calia0000001", oif="eth0")) == "DROP"
    assert s6.hook(rules.FORWARD, Packet(src="fd00::9", dst="fd00::2", iif="eth0", oif="calib0000002")) == "DROP"
    # it gains one: chains appear, and lose it: they go
    w.feed(wep("n1", "b", "calib0000002", B_IP, profiles=["open"], ipv6=["fd00::2"]))
    assert w.sim(6).hook(rules.FORWARD, Packet(src="fd00::9", dst="fd00::2", iif="eth0",
                                               oif="calib0000002")) == "ACCEPT"
    w.feed(wep("n1", "b", "calib0000002", B_IP, profiles=["open"]))
    assert rules.to_wl_chain("calib0000002") not in v6.chain_names
    assert rules.to_wl_chain("calib0000002") in w.dp.filter[4].chain_names
