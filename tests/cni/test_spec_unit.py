"""Unit tests of the CNI protocol helpers and the plugin's configuration (no kernel, no etcd)."""

from __future__ import annotations

import json

import pytest

from calyx.cni import spec
from calyx.cni.netconf import cluster_from, handle_id, identity, plugin_conf
from calyx.cni.spec import CNIError

pytestmark = pytest.mark.unit


def env(**kw: str) -> spec.Env:
    base = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}
    base.update(kw)
    return spec.parse_env(base)


def nc(**raw: object) -> spec.NetConf:
    doc = {"cniVersion": "1.0.0", "name": "net", "type": "calyx", "ipam": {"type": "calyx-ipam"}, **raw}
    return spec.parse_netconf(json.dumps(doc).encode(), command="ADD")


def test_cni_args() -> None:
    assert spec.parse_args("IgnoreUnknown=1;K8S_POD_NAME=web;X=a=b") == {"IgnoreUnknown": "1",
                                                                          "K8S_POD_NAME": "web", "X": "a=b"}
    with pytest.raises(CNIError) as exc:
        spec.parse_args("novalue")
    assert exc.value.code == spec.INVALID_ENV


def test_results_per_version() -> None:
    result = {"ips": [{"address": "10.0.0.1/32", "interface": 1}, {"address": "fd00::1/128", "interface": 1}]}
    old = spec.convert_result(result, "0.4.0")
    assert old["cniVersion"] == "0.4.0" and [ip["version"] for ip in old["ips"]] == ["4", "6"]
    assert spec.normalize_result(old)["ips"] == result["ips"]
    assert "version" not in spec.convert_result(result, "1.0.0")["ips"][0]


def test_identity_and_names() -> None:
    e = env(CNI_ARGS="K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1")
    ident = identity(e)
    assert (ident.orchestrator, ident.workload, ident.endpoint) == ("cni", "prod.web-1", "eth0")
    assert ident.host_iface.startswith("cali") and len(ident.host_iface) == 15
    assert identity(e).host_iface == ident.host_iface != identity(env()).host_iface
    assert identity(env()).workload == "c1"  # no pod name: the container id
    assert handle_id(nc(), e) == "net.c1"
    with pytest.raises(CNIError):
        identity(env(CNI_ARGS="K8S_POD_NAME=a/b"))


def test_plugin_conf_labels_and_profiles() -> None:
    e = env(CNI_ARGS="CALYX_LABELS=tier=db,app=x;CALYX_PROFILES=extra")
    pc = plugin_conf(nc(labels={"app": "web"}, profiles=["base"],
                        args={"cni": {"labels": [{"key": "team", "value": "a"}]}}), e)
    assert pc.labels == {"app": "x", "tier": "db", "team": "a"} and pc.profiles == ("base", "extra")
    for bad in ({"mtu": 20}, {"mtu": True}, {"profiles": "p"}, {"labels": {"a": 1}}, {"readiness_timeout": -1},
                {"orchestrator": "a/b"}):
        with pytest.raises(CNIError) as exc:
            plugin_conf(nc(**bad), e)
        assert exc.value.code == spec.INVALID_CONFIG


def test_cluster_fields_and_fallback() -> None:
    c = cluster_from({"etcd_endpoints": "http://a:1,http://b:2", "node_name": "n"}, {})
    assert c.etcd_endpoints == ("http://a:1", "http://b:2") and c.node_name == "n"
    c = cluster_from({}, {"etcd_endpoints": ["unix:///x"]}, environ={"CALYX_NODE_NAME": "from-env",
                                                                     "CALYX_CONFIG": "/dev/null"})
    assert c.node_name == "from-env" and c.etcd_endpoints == ("unix:///x",)
    with pytest.raises(CNIError, match="Calyx configuration"):
        cluster_from({}, environ={"CALYX_ETCD_TIMEOUT": "x", "CALYX_CONFIG": "/dev/null"})
    with pytest.raises(CNIError, match="does not exist"):
        cluster_from({"etcd_endpoints": ["h:1"], "node_name": "n", "etcd_ca": "/nope"})


def test_netconf_errors() -> None:
    with pytest.raises(CNIError) as exc:
        spec.parse_netconf(b'{"cniVersion": "0.2.0", "name": "n", "type": "t"}', command="ADD")
    assert exc.value.code == spec.INCOMPATIBLE_VERSION
    v = spec.parse_netconf(b"garbage", command="VERSION")
    assert v.cni_version == "1.1.0"


def test_host_route_key_matches_felix() -> None:
    """The plugin's host route must have felix's (proto, metric) so felix adopts it, not adds a twin."""
    from calyx.cni import dataplane
    from calyx.kernel import routetable

    assert (dataplane.FELIX_PROTO, dataplane.FELIX_METRIC) == (routetable.PROTO_FELIX, routetable.DEFAULT_METRIC)
