"""felix's tunnel manager: which tunnels a node needs, the INPUT rules and hosts ipset for tunnel
traffic, and (real etcd, a throwaway namespace) addresses from IPAM, the node key published by
compare-and-swap, the VXLAN device and its peers, the MTU file, and a kernel without ipip."""

from __future__ import annotations

import json
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from calyx import model
from calyx.datastore import keys
from calyx.kernel.tunnels import VXLAN_DEVICE, TunnelError, vtep_mac
from calyx.model import IPPool, Node
from felix import rules
from felix.calc import Calculator
from felix.dataplane import Dataplane
from felix.tunnels import TunnelManager, plan_tunnels, vxlan_peers
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import Netns, create_veth


def pool(name: str, cidr: str, **fields: Any) -> IPPool:
    return IPPool.from_dict({"cidr": cidr, **fields}, key=keys.ippool_key(name), name=name)


def node(name: str, **fields: Any) -> Node:
    return Node.from_dict(fields, key=keys.node_key(name), name=name)


@pytest.mark.unit
def test_plan_follows_modes_selectors_and_disabled_pools() -> None:
    nodes = {"a": node("a", ipv4="10.0.1.1/24", labels={"rack": "r1"}), "b": node("b", ipv4="10.0.2.1/24")}
    pools = {
        "ipip": pool("ipip", "10.65.0.0/16", ipip_mode="CrossSubnet", node_selector="rack == 'r1'"),
        "vx": pool("vx", "10.66.0.0/16", vxlan_mode="Always"),
        "off": pool("off", "10.67.0.0/16", vxlan_mode="Always", disabled=True),
        "plain": pool("plain", "10.68.0.0/16"),
    }
    a = plan_tunnels("a", pools, nodes)
    assert (a.ipip_pools, a.vxlan_pools) == (("ipip",), ("vx",))
    b = plan_tunnels("b", pools, nodes)  # not selected by the IP-in-IP pool
    assert (b.ipip_pools, b.vxlan_pools) == ((), ("vx",))
    assert plan_tunnels("c", {"plain": pools["plain"]}, nodes) == plan_tunnels("c", {}, {})


@pytest.mark.unit
def test_vxlan_peers_are_the_other_nodes_with_a_published_vtep() -> None:
    nodes = {
        "a": node("a", ipv4="10.0.1.1/24", vxlan_tunnel_address="10.66.0.1", vxlan_tunnel_mac=vtep_mac("a")),
        "b": node("b", ipv4="10.0.2.1/24", vxlan_tunnel_address="10.66.1.1", vxlan_tunnel_mac=vtep_mac("b")),
        "c": node("c", ipv4="10.0.3.1/24"),
        "d": node("d", vxlan_tunnel_address="10.66.3.1", vxlan_tunnel_mac=vtep_mac("d")),
    }
    peers = vxlan_peers("a", nodes)
    assert list(peers) == [IPv4Address("10.66.1.1")]
    assert peers[IPv4Address("10.66.1.1")].underlay_ip == IPv4Address("10.0.2.1")
    assert peers[IPv4Address("10.66.1.1")].mac == vtep_mac("b")


@pytest.mark.unit
def test_dataplane_renders_tunnel_input_rules_and_hosts_ipset(tmp_path: Path) -> None:
    calc = Calculator("a")
    dp = Dataplane(calc, backend="nft", versions=(4, 6),
                   tunnels=TunnelManager("a", None, state_dir=str(tmp_path), uplink_mtu=lambda: 1500))
    hosts = rules.ipset_name(rules.ALL_HOSTS, 4)

    def feed(*objs: Any) -> None:
        for o in objs:
            calc.on_update(model.key_of(o), o)
        dp.update(calc.take_dirty())

    def inp(version: int) -> str:
        return "\n".join(line for line in dp.filter[version].dump_desired().splitlines()
                         if line.startswith(f"-A {rules.INPUT} "))

    feed(node("a", ipv4="10.0.1.1/24"), node("b", ipv4="10.0.2.1/24"), pool("p", "10.65.0.0/16"))
    assert "-p 4" not in inp(4) and dp.ipsets.members(hosts) is None
    feed(pool("p", "10.65.0.0/16", ipip_mode="CrossSubnet"))
    text = inp(4)
    assert f"-p 4 -m set --match-set {hosts} src" in text and "-p 4 -m comment" in text  # accept, then drop
    assert text.index("ACCEPT") < text.index("DROP")
    assert "4789" not in text and "-p 4" not in inp(6)
    assert dp.ipsets.members(hosts) == frozenset({"10.0.1.1", "10.0.2.1"})
    feed(node("c", ipv4="10.0.3.1/24"))
    assert dp.ipsets.members(hosts) == frozenset({"10.0.1.1", "10.0.2.1", "10.0.3.1"})
    feed(pool("p", "10.65.0.0/16", vxlan_mode="Always"))
    text = inp(4)
    assert "-p 4" not in text and "--dport 4789" in text and f"--match-set {hosts} src" in text
    feed(pool("p", "10.65.0.0/16"))
    assert "4789" not in inp(4) and dp.ipsets.members(hosts) is None


# --- real etcd and a namespace ---------------------------------------------------------------------


def put_node(ds: Any, name: str, value: dict[str, Any]) -> None:
    ds.put(keys.node_key(name), json.dumps(value))


def get_node(ds: Any, name: str) -> dict[str, Any]:
    kv = ds.get(keys.node_key(name))
    assert kv is not None
    value: dict[str, Any] = json.loads(kv.value)
    return value


def snapshot(ds: Any) -> tuple[dict[str, IPPool], dict[str, Node]]:
    pools: dict[str, IPPool] = {}
    nodes: dict[str, Node] = {}
    for prefix in (keys.IPPOOLS_PREFIX, keys.NODES_PREFIX):
        for kv in ds.get_prefix(prefix)[0]:
            obj = model.decode(kv.key, kv.value)
            if isinstance(obj, IPPool):
                pools[obj.name] = obj
            elif isinstance(obj, Node):
                nodes[obj.name] = obj
    return pools, nodes


@pytest.mark.etcd
@pytest.mark.privileged
def test_manager_against_etcd_and_kernel(etcd_fresh: EtcdMember, netns: Callable[[], Netns],
                                         tmp_path: Path) -> None:
    h, peer = netns(), netns()
    create_veth(h, peer, "10.99.0.1/24", "10.99.0.2/24")
    h.ip("route", "add", "default", "via", "10.99.0.2")
    ds = etcd_fresh.client()
    state = tmp_path / "state"
    mgr = TunnelManager("a", ds, state_dir=str(state), netns=h.name)
    try:
        put_node(ds, "a", {"ipv4": "10.99.0.1/24", "labels": {"x": "y"}, "future_field": {"kept": True}})
        put_node(ds, "b", {"ipv4": "10.98.0.1/24"})
        ds.put(keys.ippool_key("vx"), json.dumps({"cidr": "10.66.0.0/16", "vxlan_mode": "CrossSubnet"}))

        mgr.update(*snapshot(ds))
        res = mgr.apply()
        assert res.errors == []
        a = get_node(ds, "a")
        assert a["future_field"] == {"kept": True} and a["labels"] == {"x": "y"}  # every other field kept
        assert a["vxlan_tunnel_mac"] == vtep_mac("a") and IPv4Address(a["vxlan_tunnel_address"]) in \
            pool("vx", "10.66.0.0/16").cidr
        link = h.ip_json("-d", "link", "show", VXLAN_DEVICE)[0]
        info = link["linkinfo"]["info_data"]
        assert (info["id"], info["port"], info["local"], link["mtu"], link["address"]) == \
            (4096, 4789, "10.99.0.1", 1450, vtep_mac("a"))
        assert not info.get("learning", False)
        addrs = [x["local"] for x in h.ip_json("-4", "addr", "show", VXLAN_DEVICE)[0]["addr_info"]]
        assert addrs == [a["vxlan_tunnel_address"]]
        assert (state / "mtu").read_text().strip() == "1450"
        assert mgr.apply().changes == []  # nothing changed: no work

        # the other node publishes its VTEP: a permanent neighbour and FDB entry appear
        put_node(ds, "b", {"ipv4": "10.98.0.1/24", "vxlan_tunnel_address": "10.66.9.1",
                           "vxlan_tunnel_mac": vtep_mac("b")})
        mgr.update(*snapshot(ds))
        assert mgr.apply().errors == []
        neigh = h.run("ip", "neigh", "show", "dev", VXLAN_DEVICE)
        assert f"10.66.9.1 lladdr {vtep_mac('b')} PERMANENT" in neigh
        fdb = h.run("bridge", "fdb", "show", "dev", VXLAN_DEVICE)
        assert f"{vtep_mac('b')} dst 10.98.0.1 self permanent" in fdb

        # switch to IP-in-IP: the VXLAN device goes, its fields and address are released; this kernel
        # has no ipip, which is an error (reported, not a crash) and the MTU file follows the mode
        ds.put(keys.ippool_key("vx"), json.dumps({"cidr": "10.66.0.0/16", "ipip_mode": "Always"}))
        mgr.update(*snapshot(ds))
        res = mgr.apply()
        assert any("no IP-in-IP support" in e for e in res.errors), res.errors
        assert h.run("ip", "link", "show", VXLAN_DEVICE, check=False).strip() == ""
        a = get_node(ds, "a")
        assert "vxlan_tunnel_address" not in a and "vxlan_tunnel_mac" not in a and a["future_field"]
        assert ds.get(keys.ipam_handle_key("vxlan-tunnel-addr-a")) is None
        assert (state / "mtu").read_text().strip() == "1480"
        assert mgr.apply().errors  # still dirty: retried

        # no pool needs a tunnel: everything released, the MTU file removed, no errors
        ds.put(keys.ippool_key("vx"), json.dumps({"cidr": "10.66.0.0/16"}))
        mgr.update(*snapshot(ds))
        assert mgr.apply().errors == []
        assert ds.get(keys.ipam_handle_key("ipip-tunnel-addr-a")) is None
        assert not (state / "mtu").exists()

        # a node key that does not exist is never created
        other = TunnelManager("ghost", ds, state_dir=str(state), netns=h.name)
        ds.put(keys.ippool_key("vx"), json.dumps({"cidr": "10.66.0.0/16", "vxlan_mode": "Always"}))
        other.update(*snapshot(ds))
        res = other.apply()
        assert any("has no ipv4" in e for e in res.errors), res.errors
        with pytest.raises(TunnelError, match="does not exist"):
            other._publish({"ipip_tunnel_address": "10.65.0.1"})  # what enabling IP-in-IP ends with
        assert ds.get(keys.node_key("ghost")) is None
    finally:
        ds.close()
