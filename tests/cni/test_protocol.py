"""The plugins through the CNI exec protocol by hand: error codes, rollback, netns path forms,
readiness gate, STATUS and GC (spec 1.1, which no client on this machine speaks).

Every failing call must leave the datastore byte-for-byte as it was (a full dump before and after).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import Any

import pytest

from calyx.datastore import keys
from calyx.model import EndpointStatus, IPAMReservation, IPPool, Node
from tests.fixtures.cni import CniHost

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

N = ipaddress.ip_network


def conf(h: CniHost, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "net1", **h.calyx_plugin(**extra)}


@pytest.fixture
def ready(cni_host: CniHost) -> CniHost:
    """A pool, the node, and one workload already added (its block claimed), so that a failed ADD that
    allocated and rolled back leaves every value identical."""
    h = cni_host
    h.put(IPPool("pool1", N("10.71.0.0/24"), 26))
    h.put(Node(h.node))
    c = h.new_netns()
    rc, out = h.plugin("calyx", "ADD", conf(h), container_id="base", netns=c.path)
    assert rc == 0, out
    return h


def expect_error(h: CniHost, code: int, text: str, command: str, stdin: dict[str, Any] | bytes, *,
                 plugin: str = "calyx", **kw: Any) -> dict[str, Any]:
    before = h.dump()
    links = h.host_links()
    rc, out = h.plugin(plugin, command, stdin, **kw)
    assert rc == 1, out
    assert isinstance(out, dict) and out["code"] == code and text in out["msg"], out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}
    assert h.dump() == before, "the datastore changed"
    assert h.host_links() == links, "a host interface was left behind"
    return out


def test_version(cni_host: CniHost) -> None:
    for plugin in ("calyx", "calyx-ipam"):
        rc, out = cni_host.plugin(plugin, "VERSION", b'{"cniVersion":"1.0.0"}', env={
            "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy"})
        assert rc == 0 and out == {"cniVersion": "1.0.0",
                                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
        rc, out = cni_host.plugin(plugin, "VERSION", b"")
        assert rc == 0 and out["cniVersion"] == "1.1.0"


def test_input_errors_leave_everything_unchanged(ready: CniHost) -> None:
    h = ready
    c = h.new_netns()
    add = {"container_id": "c1", "netns": c.path}
    expect_error(h, 6, "not valid JSON", "ADD", b"{not json", **add)
    expect_error(h, 6, "must be a JSON object", "ADD", b"[1, 2]", **add)
    expect_error(h, 1, "CNI version 9.9.9 is not supported", "ADD", conf(h, "9.9.9"), **add)
    expect_error(h, 7, "no cniVersion", "ADD", {"name": "x", "type": "calyx"}, **add)
    missing_name = conf(h)
    del missing_name["name"]
    expect_error(h, 7, "no 'name'", "ADD", missing_name, **add)
    expect_error(h, 7, "ipam.type", "ADD", {**conf(h), "ipam": {}}, **add)
    expect_error(h, 7, "mtu must be", "ADD", conf(h, mtu=10), **add)
    expect_error(h, 7, "labels", "ADD", conf(h, labels={"bad key!": "x"}), **add)
    expect_error(h, 1, "CHECK needs cniVersion 0.4.0", "CHECK", conf(h, "0.3.1"), **add)
    expect_error(h, 1, "GC needs cniVersion 1.1.0", "GC", conf(h), **add)
    expect_error(h, 4, "CNI_CONTAINERID is required", "ADD", conf(h), netns=c.path)
    expect_error(h, 4, "CNI_NETNS is required", "ADD", conf(h), container_id="c1")
    expect_error(h, 4, "CNI_ARGS", "ADD", conf(h), args="NOEQUALS", **add)
    expect_error(h, 4, "unknown CNI_COMMAND", "FROB", conf(h), **add)
    expect_error(h, 4, "CNI_COMMAND is not set", "", conf(h), **add)
    # a namespace that vanished: code 3, nothing allocated
    gone = h.new_netns()
    gone.delete()
    expect_error(h, 3, "does not exist", "ADD", conf(h), container_id="c2", netns=gone.path)
    expect_error(h, 3, "not a usable network namespace", "ADD", conf(h), container_id="c2", netns="/proc/self/ns/mnt")
    # etcd down (nothing listens there): try again later
    dead = {**conf(h), "etcd_endpoints": [f"unix://{h.root}/no-etcd.sock"]}
    expect_error(h, 11, "etcd is unreachable", "ADD", dead, **add)
    # IPAM plugin missing from CNI_PATH
    expect_error(h, 105, "not found in CNI_PATH", "ADD", {**conf(h), "ipam": {"type": "no-such-ipam"}}, **add)
    # calyx-ipam on its own
    expect_error(h, 7, "ipam.assign_ipv4", "ADD", {**conf(h), "ipam": {"type": "calyx-ipam", "assign_ipv4": 3}},
                 plugin="calyx-ipam", container_id="c3")
    expect_error(h, 101, "does not exist", "ADD",
                 {**conf(h), "ipam": {"type": "calyx-ipam", "ipv4_pools": ["nope"]}}, plugin="calyx-ipam",
                 container_id="c3")


def test_failed_add_rolls_everything_back(ready: CniHost) -> None:
    h = ready
    c = h.new_netns()
    c.ip("link", "add", "eth0", "type", "veth", "peer", "name", "other")  # the interface name is taken
    out = expect_error(h, 100, "interface eth0 already exists", "ADD", conf(h), container_id="c4", netns=c.path)
    assert "ADD was called twice" in out["msg"]
    # the pool is exhausted: 101 and no veth
    h.put(IPPool("tiny", N("10.72.0.0/30"), 30))
    tiny = {**conf(h), "ipam": {"type": "calyx-ipam", "ipv4_pools": ["tiny"]}}
    c2 = h.new_netns()
    for i in range(4):
        rc, out = h.plugin("calyx", "ADD", tiny, container_id=f"fill{i}", netns=h.new_netns().path)
        assert rc == 0, out
    expect_error(h, 101, "no free address left", "ADD", tiny, container_id="c5", netns=c2.path)
    # readiness gate: felix never reports the endpoint up -> 103, and all of it is undone
    c3 = h.new_netns()
    expect_error(h, 103, "did not report endpoint cni/c6/eth0 programmed within 0.3 s", "ADD",
                 conf(h, readiness_timeout=0.3), container_id="c6", netns=c3.path)
    # ...and when felix has reported it up, ADD succeeds
    h.put(EndpointStatus(h.node, "cni", "c6", "eth0", state="up"))
    rc, out = h.plugin("calyx", "ADD", conf(h, readiness_timeout=5), container_id="c6", netns=c3.path)
    assert rc == 0, out


def test_netns_path_forms_and_tolerant_del(ready: CniHost) -> None:
    h = ready
    a, b, c = h.new_netns(), h.new_netns(), h.new_netns()
    # a process inside a (its /proc/<pid>/ns/net), and one holding an fd on b (/proc/<pid>/fd/3)
    sleeper = a.popen("sh", "-c", f"exec sleep 60 3<{b.path}")
    try:
        pid = None
        for _ in range(100):
            pids = a.pids()
            if pids:
                pid = pids[0]
                break
            subprocess.run(["sleep", "0.05"], check=False)
        assert pid is not None
        forms = ((a, f"/proc/{pid}/ns/net"), (b, f"/proc/{pid}/fd/3"), (c, c.path.replace("/run/", "/var/run/")))
        for i, (ns, path) in enumerate(forms):
            rc, out = h.plugin("calyx", "ADD", conf(h), container_id=f"forms{i}", netns=path, ifname="eth1",
                               args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod-{i}")
            assert rc == 0, out
            assert out["interfaces"][1] == {"name": "eth1", "mac": out["interfaces"][1]["mac"], "sandbox": path}
            assert ns.ip_json("addr", "show", "dev", "eth1")[0]["addr_info"][0]["local"] == \
                out["ips"][0]["address"].split("/")[0]
        key = keys.workload_key(h.node, "cni", "ns1.pod-0", "eth1")
        labels = json.loads(h.ds.get(key).value)["labels"]  # type: ignore[union-attr]
        assert labels == {"calyx/namespace": "ns1"}
    finally:
        sleeper.kill()
    # DEL with an empty CNI_NETNS (containerd after the task exited), twice, and with no state at all
    for _ in range(2):
        rc, out = h.plugin("calyx", "DEL", conf(h), container_id="forms0", netns="", ifname="eth1",
                           args="K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod-0")
        assert rc == 0, out
    rc, out = h.plugin("calyx", "DEL", conf(h), container_id="never-added", netns="/run/netns/gone")
    assert rc == 0, out
    rc, out = h.plugin("calyx", "DEL", {**conf(h), "ipam": {"type": "no-such-ipam"}}, container_id="x")
    assert rc == 0, out
    left = {kv.key for kv in h.ds.get_prefix(keys.WORKLOADS_PREFIX)[0]}
    assert key not in left and keys.workload_key(h.node, "cni", "ns1.pod-1", "eth1") in left
    assert h.ds.get(keys.ipam_handle_key("net1.forms0")) is None
    assert "eth1" not in [link["ifname"] for link in a.ip_json("link", "show")]


def test_results_in_older_versions(ready: CniHost) -> None:
    h = ready
    for version in ("0.3.0", "0.3.1", "0.4.0", "1.1.0"):
        rc, out = h.plugin("calyx", "ADD", conf(h, version), container_id=f"v{version}", netns=h.new_netns().path)
        assert rc == 0, out
        assert out["cniVersion"] == version
        assert ("version" in out["ips"][0]) == version.startswith("0."), out


def test_status_and_gc(ready: CniHost) -> None:
    h = ready
    rc, out = h.plugin("calyx", "STATUS", conf(h, "1.1.0"))
    assert rc == 0 and out is None
    rc, out = h.plugin("calyx", "STATUS", {**conf(h, "1.1.0"), "etcd_endpoints": [f"unix://{h.root}/none.sock"]})
    assert rc == 1 and out["code"] == 50, out
    c1, c2 = h.new_netns(), h.new_netns()
    for cid, ns in (("keep", c1), ("stale", c2)):
        rc, out = h.plugin("calyx", "ADD", conf(h, "1.1.0"), container_id=cid, netns=ns.path)
        assert rc == 0, out
    stale_if = [x for x in h.host_links() if x.startswith("cali")]
    gc = {**conf(h, "1.1.0"), "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"},
                                                           {"containerID": "base", "ifname": "eth0"}]}
    rc, out = h.plugin("calyx", "GC", gc)
    assert rc == 0, out
    handles = {kv.key.rsplit("/", 1)[1] for kv in h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0]}
    assert handles == {"net1.keep", "net1.base"}
    workloads = {kv.key.split("/")[-2] for kv in h.ds.get_prefix(keys.WORKLOADS_PREFIX)[0]}
    assert workloads == {"keep", "base"}
    assert len([x for x in h.host_links() if x.startswith("cali")]) == len(stale_if) - 1
    assert "eth0" not in [link["ifname"] for link in c2.ip_json("link", "show")]  # went with the host veth
    assert "eth0" in [link["ifname"] for link in c1.ip_json("link", "show")]


def test_dual_stack(cni_host: CniHost) -> None:
    h = cni_host
    h.put(IPPool("v4", N("10.74.0.0/24"), 26))
    h.put(IPPool("v6", N("fd00:74::/120"), 122))
    # IPv6 forwarding is global only (the per-interface flag does not route): felix's business on a
    # real host, the test's own namespace here.
    h.host.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    ds_conf = conf(h, ipam={"type": "calyx-ipam", "assign_ipv6": True})
    c1, c2 = h.new_netns(), h.new_netns()
    results = []
    for cid, ns in (("d1", c1), ("d2", c2)):
        rc, out = h.plugin("calyx", "ADD", ds_conf, container_id=cid, netns=ns.path)
        assert rc == 0, out
        results.append(out)
    r1, r2 = results
    assert [ipaddress.ip_interface(ip["address"]).network.prefixlen for ip in r1["ips"]] == [32, 128]
    assert {"dst": "::/0", "gw": "fe80::1"} in r1["routes"]
    v6_1 = r1["ips"][1]["address"].split("/")[0]
    v6_2 = r2["ips"][1]["address"].split("/")[0]
    routes6 = c1.ip_json("-6", "route", "show", "default")
    assert routes6 and routes6[0]["gateway"] == "fe80::1"
    host_if = r1["interfaces"][0]["name"]
    assert any(a["local"] == "fe80::1" for a in h.host.ip_json("addr", "show", "dev", host_if)[0]["addr_info"])
    out = c1.run("ping", "-6", "-c", "1", "-W", "3", v6_2)
    assert "1 received" in out, out
    ep = json.loads(h.ds.get(keys.workload_key(h.node, "cni", "d1", "eth0")).value)  # type: ignore[union-attr]
    assert ep["ipv6_nets"] == [f"{v6_1}/128"]
    for cid, ns in (("d1", c1), ("d2", c2)):
        rc, out = h.plugin("calyx", "CHECK", {**ds_conf, "prevResult": r1 if cid == "d1" else r2},
                           container_id=cid, netns=ns.path)
        assert rc == 0, out
        rc, out = h.plugin("calyx", "DEL", ds_conf, container_id=cid, netns=ns.path)
        assert rc == 0, out
    assert h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0] == []


def test_del_with_etcd_down_still_cleans_the_host(ready: CniHost) -> None:
    h = ready
    c = h.new_netns()
    rc, out = h.plugin("calyx", "ADD", conf(h), container_id="down", netns=c.path)
    assert rc == 0, out
    host_if = out["interfaces"][0]["name"]
    dead = {**conf(h), "etcd_endpoints": [f"unix://{h.root}/no-etcd.sock"]}
    rc, out = h.plugin("calyx", "DEL", dead, container_id="down", netns=c.path)
    assert rc == 1 and out["code"] == 11, out  # the runtime retries
    assert host_if not in h.host_links()
    rc, out = h.plugin("calyx", "DEL", conf(h), container_id="down", netns=c.path)  # the retry finishes
    assert rc == 0, out
    assert h.ds.get(keys.ipam_handle_key("net1.down")) is None
    assert h.ds.get(keys.workload_key(h.node, "cni", "down", "eth0")) is None


def test_fixed_addresses_through_cni(ready: CniHost) -> None:
    h = ready
    h.put(IPAMReservation("web", ipaddress.ip_address("10.71.0.200"), "web"))
    c1 = h.new_netns()
    rc, out = h.plugin("calyx", "ADD", conf(h), container_id="web-1", netns=c1.path, args="K8S_POD_NAME=web")
    assert rc == 0 and out["ips"][0]["address"] == "10.71.0.200/32", out
    # the workload restarts on another host: after DEL it gets the same address there, a borrowed /32
    rc, out = h.plugin("calyx", "DEL", conf(h), container_id="web-1", netns=c1.path, args="K8S_POD_NAME=web")
    assert rc == 0, out
    other = conf(h, node_name="h2")
    c2 = h.new_netns()
    rc, out = h.plugin("calyx", "ADD", other, container_id="web-2", netns=c2.path, args="K8S_POD_NAME=web")
    assert rc == 0 and out["ips"][0]["address"] == "10.71.0.200/32", out
    assert h.ds.get(keys.workload_key("h2", "cni", "web", "eth0")) is not None
    block = json.loads(h.ds.get(keys.ipam_block_key("10.71.0.192/26")).value)  # type: ignore[union-attr]
    assert block["affinity"] == f"node:{h.node}" and block["allocations"][8] == "net1.web-2"
    # another workload never gets the reserved address; IP= in CNI_ARGS asks for a fixed one
    rc, out = h.plugin("calyx", "ADD", conf(h), container_id="ip-arg", netns=h.new_netns().path,
                       args="IgnoreUnknown=1;IP=10.71.0.150")
    assert rc == 0 and out["ips"][0]["address"] == "10.71.0.150/32", out
    expect_error(h, 101, "reserved for workload 'web'", "ADD", conf(h), container_id="thief",
                 netns=h.new_netns().path, args="IP=10.71.0.200")


def test_cluster_from_environment_and_config_file(ready: CniHost) -> None:
    """What the network configuration leaves out comes from CALYX_* and the configuration file.
    (calyx.config accepts only TCP endpoints, so the unix socket this test's etcd listens on stays in
    the network configuration and the node name comes from elsewhere.)"""
    h = ready
    no_node = {k: v for k, v in conf(h).items() if k != "node_name"}
    toml = h.root / "calyx.toml"
    toml.write_text('[cni]\nnode_name = "from-file"\n')
    rc, out = h.plugin("calyx", "ADD", no_node, container_id="f1", netns=h.new_netns().path,
                       env={"CALYX_CONFIG": str(toml)})
    assert rc == 0, out
    assert h.ds.get(keys.workload_key("from-file", "cni", "f1", "eth0")) is not None
    rc, out = h.plugin("calyx", "ADD", no_node, container_id="e1", netns=h.new_netns().path,
                       env={"CALYX_CONFIG": str(toml), "CALYX_NODE_NAME": "from-env"})
    assert rc == 0, out
    assert h.ds.get(keys.workload_key("from-env", "cni", "e1", "eth0")) is not None
    toml.write_text('node_name = "bad name!"\n')
    expect_error(h, 7, "Calyx configuration", "ADD", no_node, container_id="e2", netns=h.new_netns().path,
                 env={"CALYX_CONFIG": str(toml)})


def test_second_network_in_one_container_keeps_the_first_default_route(ready: CniHost) -> None:
    h = ready
    c = h.new_netns()
    rc, first = h.plugin("calyx", "ADD", conf(h), container_id="multi", netns=c.path, ifname="eth0")
    assert rc == 0, first
    second_conf = {**conf(h), "name": "net2"}
    rc, second = h.plugin("calyx", "ADD", second_conf, container_id="multi", netns=c.path, ifname="eth1")
    assert rc == 0, second
    assert first["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}] and second["routes"] == []
    [default] = c.ip_json("route", "show", "default")
    assert default["dev"] == "eth0"
    for nc_, res, ifname in ((conf(h), first, "eth0"), (second_conf, second, "eth1")):
        rc, out = h.plugin("calyx", "CHECK", {**nc_, "prevResult": res}, container_id="multi", netns=c.path,
                           ifname=ifname)
        assert rc == 0, out
    c.ip("route", "del", "default")
    rc, out = h.plugin("calyx", "CHECK", {**conf(h), "prevResult": first}, container_id="multi", netns=c.path)
    assert rc == 1 and out["code"] == 104 and "no default route via 169.254.1.1 dev eth0" in out["msg"], out


def test_gc_with_another_ipam_plugin_finds_stale_endpoints_by_their_attachment(ready: CniHost) -> None:
    """host-local keeps its own state: GC finds this network's stale endpoints from the attachment
    they record (container id, network), removes them and their veths, keeps the valid ones and
    those of other networks, then hands GC to host-local (Debian 12's has no GC, so its refusal is
    the answer, after Calyx's own part is done)."""
    h = ready
    hl = {**conf(h), "name": "hl", "ipam": {"type": "host-local", "dataDir": str(h.root / "host-local"),
                                                     "ranges": [[{"subnet": "10.72.0.0/24"}]]}}
    c1, c2 = h.new_netns(), h.new_netns()
    for cid, ns in (("hl-keep", c1), ("hl-stale", c2)):
        rc, out = h.plugin("calyx", "ADD", hl, container_id=cid, netns=ns.path)
        assert rc == 0, out
    ep = json.loads(h.ds.get(keys.workload_key(h.node, "cni", "hl-keep", "eth0")).value)  # type: ignore[union-attr]
    assert (ep["container_id"], ep["network"]) == ("hl-keep", "hl")
    links_before = [x for x in h.host_links() if x.startswith("cali")]
    gc = {**hl, "cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "hl-keep", "ifname": "eth0"}]}
    rc, out = h.plugin("calyx", "GC", gc)
    # a host-local without GC (Debian 12's) refuses it; its answer is passed on, after Calyx's part
    assert rc == 0 or (rc == 1 and out["msg"].startswith("host-local:")), out
    workloads = {kv.key.split("/")[-2] for kv in h.ds.get_prefix(keys.WORKLOADS_PREFIX)[0]}
    assert workloads == {"hl-keep", "base"}  # base is net1's (calyx-ipam): not this network's to collect
    assert len([x for x in h.host_links() if x.startswith("cali")]) == len(links_before) - 1
    assert "eth0" not in [link["ifname"] for link in c2.ip_json("link", "show")]
    assert "eth0" in [link["ifname"] for link in c1.ip_json("link", "show")]
