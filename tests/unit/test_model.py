"""The cluster model: every kind decodes, encodes back to the same value, and bad values name key+field."""

from __future__ import annotations

import json

import pytest

from calyx import model
from calyx.datastore import keys
from calyx.model import ModelError

pytestmark = pytest.mark.unit

# one valid value per kind, as an operator would write it with etcdctl
VALID = {
    "/calyx/v1/config/cluster": {"as_number": 65000, "node_to_node_mesh": False, "communities": ["65000:100"]},
    "/calyx/v1/nodes/h1": {"ipv4": "10.0.1.11/24", "as_number": 65001, "route_reflector_cluster_id": "1.2.3.4",
                           "labels": {"rack": "r1", "calyx.io/role": "rr"},
                           "self_registered": {"ipv4": "10.0.1.11/24", "labels.rack": "r1"}},
    "/calyx/v1/bgp/peers/tor1": {"peer_ip": "10.0.1.1", "as_number": 65000, "node": "h1", "password": "s3cret",
                                 "max_prefixes": 1000, "keepalive": 10, "hold_time": 30},
    "/calyx/v1/bgp/peers/to-rrs": {"peer_selector": "has(rr)", "node_selector": "!has(rr)"},
    "/calyx/v1/ippools/p1": {"cidr": "10.65.0.0/16", "block_size": 26, "ipip_mode": "CrossSubnet",
                             "nat_outgoing": True},
    "/calyx/v1/ipam/blocks/10.65.0.0-26": {"cidr": "10.65.0.0/26", "affinity": "node:h1",
                                           "allocations": ["h-a"] + [None] * 63},
    "/calyx/v1/ipam/handles/h-a": {"blocks": {"10.65.0.0/26": ["10.65.0.0"]}, "attributes": {"node": "h1"}},
    "/calyx/v1/ipam/reservations/db": {"address": "10.65.9.9", "workload": "db-0"},
    "/calyx/v1/workloads/h1/cni/c1/eth0": {"iface": "cali0123456789a", "mac": "ee:ee:ee:ee:ee:ee",
                                           "ipv4_nets": ["10.65.0.1/32"], "profiles": ["tenant-a"],
                                           "labels": {"app": "web"}, "container_id": "c1", "network": "calyx"},
    "/calyx/v1/policy/profiles/tenant-a": {
        "labels_to_apply": {"tenant": "a"},
        "ingress": [{"action": "allow", "source": {"selector": "tenant == 'a'"}}],
        "egress": [{"action": "allow"}],
    },
    "/calyx/v1/policy/policies/web": {
        "order": 10, "selector": "app == 'web'",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "destination": {"ports": [80, "8000:8080"]}},
            {"action": "allow", "protocol": "icmp", "icmp": {"type": 8, "code": 0}},
            {"action": "deny", "source": {"nets": ["10.0.0.0/8"], "not_nets": ["10.65.0.0/16"]}},
        ],
    },
    "/calyx/v1/status/h1/felix": {"in_sync": True, "last_apply": "2026-11-22T06:00:00Z", "endpoints": 3,
                                  "errors": []},
    "/calyx/v1/status/h1/bgp/10.0.1.1": {"state": "established", "since": "2026-11-22T06:00:00Z",
                                         "prefixes_received": 4, "prefixes_sent": 1},
    "/calyx/v1/status/h1/endpoints/cni/c1/eth0": {"state": "up"},
}


@pytest.mark.parametrize("key", sorted(VALID))
def test_every_kind_round_trips(key: str) -> None:
    obj = model.decode(key, json.dumps(VALID[key]).encode())
    assert obj is not None
    assert model.key_of(obj) == key
    again = model.decode(key, model.encode(obj))
    assert again == obj
    # encode is stable (sorted keys), so unchanged objects compare equal as bytes
    assert model.encode(again) == model.encode(obj)


def test_every_kind_has_a_valid_sample() -> None:
    kinds = {keys.parse_key(k).kind for k in VALID}  # type: ignore[union-attr]
    assert kinds == set(model.KINDS)


def test_foreign_keys_are_ignored() -> None:
    assert model.decode("/calico/v1/host/x", b"{}") is None
    assert model.decode("/calyx/v1/unknown/thing", b"{}") is None
    assert model.decode("/calyx/v1/workloads/h1/too/short", b"{}") is None


def test_defaults() -> None:
    pool = model.decode("/calyx/v1/ippools/p", b'{"cidr": "10.0.0.0/16"}')
    assert isinstance(pool, model.IPPool)
    assert (pool.block_size, pool.ipip_mode, pool.vxlan_mode, pool.node_selector) == (26, "Never", "Never", "all()")
    v6 = model.decode("/calyx/v1/ippools/p6", b'{"cidr": "fd00::/48"}')
    assert isinstance(v6, model.IPPool) and v6.block_size == 122
    cfg = model.decode("/calyx/v1/config/cluster", b"{}")
    assert isinstance(cfg, model.ClusterConfig)
    assert (cfg.as_number, cfg.node_to_node_mesh, cfg.graceful_restart_time) == (64512, True, 120)
    pol = model.decode("/calyx/v1/policy/policies/p", b'{"egress": [{"action": "deny"}]}')
    assert isinstance(pol, model.Policy) and pol.types == ("ingress", "egress") and pol.order is None
    wl = model.decode("/calyx/v1/workloads/h/o/w/e", b'{"iface": "cali1", "ipv4_nets": ["10.0.0.1"]}')
    assert isinstance(wl, model.WorkloadEndpoint)
    assert str(wl.ipv4_nets[0]) == "10.0.0.1/32" and wl.state == "active"


def test_block_allocations_as_map() -> None:
    blk = model.decode("/calyx/v1/ipam/blocks/10.65.0.64-26",
                       b'{"cidr": "10.65.0.64/26", "affinity": null, "allocations": {"3": "h"}}')
    assert isinstance(blk, model.IPAMBlock)
    assert blk.allocations[3] == "h" and blk.in_use() == 1 and blk.node is None
    assert str(blk.address(3)) == "10.65.0.67"


BAD = [
    ("/calyx/v1/nodes/h1", b"not json", "", "not valid JSON"),
    ("/calyx/v1/nodes/h1", b"[1, 2]", "", "expected an object"),
    ("/calyx/v1/nodes/h1", b'{"ipv4": "10.0.1.11"}', "ipv4", "prefix length"),
    ("/calyx/v1/nodes/h1", b'{"ipv4": "fd00::1/64"}', "ipv4", "IPv4"),
    ("/calyx/v1/nodes/h1", b'{"as_number": 0}', "as_number", "minimum"),
    ("/calyx/v1/nodes/h1", b'{"labels": {"bad key!": "x"}}', "labels.bad key!", "label name"),
    ("/calyx/v1/nodes/h1", b'{"self_registered": ["ipv4"]}', "self_registered", "expected an object"),
    ("/calyx/v1/nodes/h1", b'{"self_registered": {"as_number": 65001}}', "self_registered.as_number",
     "expected a string"),
    ("/calyx/v1/bgp/peers/p", b'{"as_number": 65000}', "peer_ip", "exactly one"),
    ("/calyx/v1/bgp/peers/p", b'{"peer_ip": "10.0.0.1"}', "as_number", "required"),
    ("/calyx/v1/bgp/peers/p", b'{"peer_ip": "10.0.0.300", "as_number": 1}', "peer_ip", "not a valid"),
    ("/calyx/v1/bgp/peers/p", b'{"peer_ip": "10.0.0.1", "as_number": 1, "hold_time": 30, "keepalive": 40}',
     "keepalive", "less than"),
    ("/calyx/v1/bgp/peers/p", b'{"peer_ip": "10.0.0.1", "as_number": 1, "node_selector": "a =="}',
     "node_selector", "selector"),
    ("/calyx/v1/ippools/p", b'{"block_size": 26}', "cidr", "required"),
    ("/calyx/v1/ippools/p", b'{"cidr": "10.0.0.1/16"}', "cidr", "host bits"),
    ("/calyx/v1/ippools/p", b'{"cidr": "10.0.0.0/28"}', "block_size", "do not fit"),
    ("/calyx/v1/ippools/p", b'{"cidr": "10.0.0.0/16", "ipip_mode": "Always", "vxlan_mode": "Always"}',
     "vxlan_mode", "at most one"),
    ("/calyx/v1/ippools/p", b'{"cidr": "10.0.0.0/16", "ipip_mode": "Sometimes"}', "ipip_mode", "not one of"),
    ("/calyx/v1/ipam/blocks/10.65.0.0-26", b'{"cidr": "10.65.0.64/26"}', "cidr", "does not match"),
    ("/calyx/v1/ipam/blocks/10.65.0.0-26", b'{"cidr": "10.65.0.0/26", "allocations": [null]}', "allocations",
     "slots"),
    ("/calyx/v1/ipam/blocks/not-a-cidr", b'{"cidr": "10.65.0.0/26"}', "", "invalid block name"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"ipv4_nets": []}', "iface", "required"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"iface": "cali1", "container_id": 7}', "container_id", "expected a string"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"iface": "this-name-is-too-long"}', "iface", "15 characters"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"iface": "cali1", "ipv4_nets": ["10.0.0.0/24"]}', "ipv4_nets[0]",
     "single address"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"iface": "cali1", "mac": "zz"}', "mac", "MAC"),
    ("/calyx/v1/workloads/h/o/w/e", b'{"iface": "cali1", "state": "running"}', "state", "not one of"),
    ("/calyx/v1/policy/policies/p", b'{"ingress": [{"protocol": "tcp"}]}', "ingress[0].action", "required"),
    ("/calyx/v1/policy/policies/p", b'{"ingress": [{"action": "allow", "destination": {"ports": [80]}}]}',
     "ingress[0].destination.ports", "need protocol"),
    ("/calyx/v1/policy/policies/p",
     b'{"ingress": [{"action": "allow", "protocol": "udp", "destination": {"ports": [70000]}}]}',
     "ingress[0].destination.ports[0]", "0 to 65535"),
    ("/calyx/v1/policy/policies/p", b'{"ingress": [{"action": "allow", "protocol": "gre"}]}',
     "ingress[0].protocol", "not a protocol"),
    ("/calyx/v1/policy/policies/p", b'{"ingress": [{"action": "allow", "icmp": {"type": 8}}]}',
     "ingress[0].icmp", "needs protocol"),
    ("/calyx/v1/policy/policies/p", b'{"selector": "app == "}', "selector", "selector"),
    ("/calyx/v1/policy/policies/p", b'{"types": ["sideways"]}', "types[0]", "ingress or egress"),
    ("/calyx/v1/policy/profiles/p", b'{"ingress": "allow all"}', "ingress", "expected a list"),
]


@pytest.mark.parametrize(("key", "value", "field", "words"), BAD)
def test_malformed_values_name_key_and_field(key: str, value: bytes, field: str, words: str) -> None:
    with pytest.raises(ModelError) as info:
        model.decode(key, value)
    err = info.value
    assert err.key == key
    assert err.field == field
    assert words in str(err)


def test_lenient_ignores_unknown_fields_strict_rejects() -> None:
    key = "/calyx/v1/ippools/p"
    value = b'{"cidr": "10.0.0.0/16", "future_field": 1}'
    assert isinstance(model.decode(key, value), model.IPPool)
    with pytest.raises(ModelError, match="future_field: unknown field"):
        model.decode(key, value, strict=True)


def test_kind_lookup_any_spelling() -> None:
    for spelling in ("ippool", "ippools", "IPPool", "IPPOOLS", "pool"):
        assert model.kind_info(spelling).kind is model.Kind.IP_POOL
    for spelling in ("bgppeer", "BGPPeers", "policy", "Policies", "node", "workload", "profile", "wep"):
        model.kind_info(spelling)
    with pytest.raises(ValueError, match="unknown kind"):
        model.kind_info("pods")


def test_workload_names_are_paths() -> None:
    info = model.kind_info("workload")
    assert info.key_for_name("h1/cni/c1/eth0") == "/calyx/v1/workloads/h1/cni/c1/eth0"
    with pytest.raises(ValueError, match="four parts"):
        info.key_for_name("c1")
    blk = model.kind_info("block")
    assert blk.key_for_name("10.65.0.0/26") == blk.key_for_name("10.65.0.0-26") == "/calyx/v1/ipam/blocks/10.65.0.0-26"


def test_lazy_kinds_load_on_first_use_and_behave_like_the_others() -> None:
    """policy and status are imported on first use; a fresh interpreter doing what a CNI ADD does
    (pools, blocks, endpoints) must not load them, and every name must still resolve."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from calyx import model\n"
        "import calyx.cni.plugin, calyx.cni.dataplane, calyx.ipam.allocator\n"
        "from calyx.datastore import keys\n"
        "model.decode(keys.ippool_key('p'), b'{\"cidr\": \"10.0.0.0/16\"}')\n"
        "assert 'calyx.model.policy' not in sys.modules, 'policy loaded'\n"
        "assert 'calyx.model.status' not in sys.modules, 'status loaded'\n"
        "assert 'calyx.selector' not in sys.modules, 'selector loaded for an all() pool'\n"
        "p = model.decode(keys.policy_key('x'), b'{\"selector\": \"all()\"}')\n"
        "assert type(p) is model.Policy and model.kind_of(p) is keys.Kind.POLICY\n"
        "assert model.key_of(p) == keys.policy_key('x'), model.key_of(p)\n"
        "assert model.Policy in model.Resource.__args__\n"
        "from calyx.model import FelixStatus, Rule\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError):
        model.NoSuchKind  # noqa: B018
    with pytest.raises(TypeError):
        model.kind_of(object())  # type: ignore[arg-type]


def test_node_self_registered_record() -> None:
    """calyxctl apply (strict) accepts the record a host writes; readers accept records of fields they do not
    know (a newer Calyx may register more), and a Node without one encodes exactly as before."""
    key = "/calyx/v1/nodes/h1"
    value = json.dumps({"ipv4": "10.0.1.11/24", "self_registered": {"ipv4": "10.0.1.11/24", "ipv6": "fd00::1/64"}})
    node = model.decode(key, value.encode(), strict=True)
    assert isinstance(node, model.Node)
    assert node.self_registered == {"ipv4": "10.0.1.11/24", "ipv6": "fd00::1/64"}
    plain = model.decode(key, b'{"ipv4": "10.0.1.11/24"}')
    assert isinstance(plain, model.Node) and plain.self_registered == {}
    assert "self_registered" not in plain.to_dict()
