"""The lab files: every topology in labs/ loads, agrees with its cluster objects, and bad files fail
with an error that names the file and the field."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml

from calyx.cli import resources
from calyx.lab.topology import TopologyError, labs_root, load, resolve
from calyx.model import Node

pytestmark = pytest.mark.unit

LABS = ("two-racks", "route-reflectors", "cross-subnet")


@pytest.mark.parametrize("name", LABS)
def test_lab_loads_and_matches_its_cluster_objects(name: str) -> None:
    topo = load(resolve(name))
    assert topo.name == name
    assert topo.etcd_node.role == "etcd"
    docs = resources.parse_documents(topo.cluster_file.read_text(), str(topo.cluster_file))  # type: ignore[union-attr]
    nodes = {d.name: d.obj for d in docs if isinstance(d.obj, Node)}
    # every host of the topology is a Calyx node whose address is on one of its interfaces' subnets
    assert sorted(nodes) == sorted(h.name for h in topo.hosts)
    for host in topo.hosts:
        addrs = [a[3] for a in host.exec if a[:3] == ("ip", "addr", "add")]
        assert str(nodes[host.name].ipv4) in addrs, f"{host.name}: exec does not give it its Node address"
        assert host.env["CALYX_NODE_NAME"] == host.name
        assert host.env["CALYX_ETCD_ENDPOINTS"] == f"http://{topo.etcd_node.mgmt_ipv4}:2379"
    for wl in topo.workloads:
        assert wl.host in nodes
        assert "lab" in wl.profiles
    for r in topo.by_role("frr", "bird"):
        assert r.config is not None and r.config.is_file()
    # every link end is a distinct interface, never eth0 (containerlab's management interface)
    ends = [e for link in topo.links for e in (link.a, link.b)]
    assert len(ends) == len(set(ends))
    assert all(iface != "eth0" for _, iface in ends)


def test_two_racks_shape() -> None:
    topo = load(resolve("two-racks"))
    assert [n.name for n in topo.by_role("frr")] == ["tor1", "tor2"]
    assert len(topo.hosts) == 4
    assert {w.host for w in topo.workloads} == {"h1a", "h1b", "h2a", "h2b"}
    assert {w.labels["tenant"] for w in topo.workloads} == {"a", "b"}
    assert "tenant-isolation" in topo.policies
    assert topo.interfaces("tor1") == ["eth1", "eth2", "eth3"]


def test_cross_subnet_requires_ipip_and_route_reflectors_has_bird() -> None:
    assert load(resolve("cross-subnet")).requires == ("ipip",)
    rr = load(resolve("route-reflectors"))
    assert [n.name for n in rr.by_role("bird")] == ["rr2"]


def test_frr_configs_disable_ebgp_policy_requirement() -> None:
    for conf in (labs_root() / "two-racks").glob("tor*/frr.conf"):
        assert "no bgp ebgp-requires-policy" in conf.read_text(), conf


def _write(tmp: Path, clab: dict[str, object], sidecar: dict[str, object] | None = None) -> Path:
    f = tmp / "x.clab.yml"
    f.write_text(yaml.safe_dump(clab))
    if sidecar is not None:
        (tmp / "calyx-lab.yml").write_text(yaml.safe_dump(sidecar))
    return f


def _base() -> dict[str, object]:
    return {
        "name": "x",
        "mgmt": {"ipv4-subnet": "172.20.30.0/24"},
        "topology": {
            "nodes": {
                "etcd": {"kind": "linux", "mgmt-ipv4": "172.20.30.2", "labels": {"calyx.role": "etcd"}},
                "h1": {"kind": "linux", "mgmt-ipv4": "172.20.30.3", "labels": {"calyx.role": "host"},
                       "exec": ["ip addr add 10.0.0.1/24 dev eth1"]},
                "h2": {"kind": "linux", "mgmt-ipv4": "172.20.30.4", "labels": {"calyx.role": "host"}},
            },
            "links": [{"endpoints": ["h1:eth1", "h2:eth1"]}],
        },
    }


def test_minimal_file_loads(tmp_path: Path) -> None:
    topo = load(_write(tmp_path, _base()))
    assert topo.mgmt_subnet == ipaddress.IPv4Network("172.20.30.0/24")
    assert topo.links[0].a == ("h1", "eth1")
    assert topo.workloads == ()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t["nodes"]["h1"].update(kind="nokia_srlinux"), "nodes.h1.kind"),
    (lambda t: t["nodes"]["h1"]["labels"].update({"calyx.role": "spine"}), "calyx.role"),
    (lambda t: t["nodes"]["h1"].update({"exec": ["iptables -F"]}), "nodes.h1.exec[0]"),
    (lambda t: t["nodes"]["h1"].update({"exec": ["sysctl -w kernel.panic=1"]}), "net.*"),
    (lambda t: t["nodes"]["h1"].update({"mgmt-ipv4": "10.9.9.9"}), "mgmt-ipv4"),
    (lambda t: t["nodes"]["h1"].update({"mgmt-ipv4": "172.20.30.4"}), "share a mgmt-ipv4"),
    (lambda t: t["nodes"]["h1"]["labels"].update({"calyx.role": "frr"}), "bind onto /etc/frr/frr.conf"),
    (lambda t: t["links"].append({"endpoints": ["h1:eth1", "etcd:eth1"]}), "used by two links"),
    (lambda t: t["links"].append({"endpoints": ["h1:eth0", "etcd:eth1"]}), "eth0 is the management"),
    (lambda t: t["links"].append({"endpoints": ["h1:eth2", "nope:eth1"]}), "unknown node 'nope'"),
    (lambda t: t["nodes"]["etcd"]["labels"].update({"calyx.role": "host"}), "exactly one node"),
])
def test_bad_clab_files_name_the_field(tmp_path: Path, mutate: object, message: str) -> None:
    clab = _base()
    mutate(clab["topology"])  # type: ignore[operator]
    with pytest.raises(TopologyError, match=re.escape(message)):
        load(_write(tmp_path, clab))


@pytest.mark.parametrize(("sidecar", "message"), [
    ({"workloads": [{"name": "w", "host": "etcd"}]}, r"workloads\[0\].host"),
    ({"workloads": [{"name": "w", "host": "h1"}, {"name": "w", "host": "h2"}]}, r"workloads\[1\].name"),
    ({"workloads": [{"name": "w", "host": "h1", "ip": "1.2.3.4"}]}, "unknown field 'ip'"),
    ({"cluster": "missing.yaml"}, "does not exist"),
    ({"requires": ["gre"]}, "requires"),
    ({"surprise": 1}, "unknown field 'surprise'"),
])
def test_bad_sidecars_name_the_field(tmp_path: Path, sidecar: dict[str, object], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        load(_write(tmp_path, _base(), sidecar))


def test_resolve_names_dirs_and_files(tmp_path: Path) -> None:
    f = resolve("two-racks")
    assert f.name == "two-racks.clab.yml"
    assert resolve(str(f.parent)) == f
    assert resolve(str(f)) == f
    with pytest.raises(TopologyError, match="no lab called 'nope'"):
        resolve("nope")
