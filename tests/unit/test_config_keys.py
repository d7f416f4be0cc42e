"""Configuration precedence and errors; the key schema's builders and parser agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from calyx import config
from calyx.datastore import keys
from calyx.datastore.keys import KeyInfo, Kind

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "calyx.toml"
    p.write_text(text)
    return str(p)


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'node_name = "from-file"\nlog_level = "debug"\nmetrics_port = 1000\n'
                           '[felix]\nmetrics_port = 2000\n[bgpd]\nmetrics_port = 3000\n')
    cfg = config.load("felix", path=path, environ={})
    assert (cfg.node_name, cfg.log_level, cfg.metrics_port) == ("from-file", "debug", 2000)
    assert config.load("bgpd", path=path, environ={}).metrics_port == 3000
    assert config.load("calyxctl", path=path, environ={}).metrics_port == 1000
    env = {"CALYX_NODE_NAME": "from-env", "CALYX_FELIX_METRICS_PORT": "4000", "CALYX_METRICS_PORT": "5"}
    cfg = config.load("felix", path=path, environ=env)
    assert (cfg.node_name, cfg.metrics_port) == ("from-env", 4000)
    cfg = config.load("felix", path=path, environ=env, flags={"node_name": "from-flag", "metrics_port": None})
    assert (cfg.node_name, cfg.metrics_port) == ("from-flag", 4000)


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load("felix", environ={})
    assert cfg.source == "defaults" and cfg.metrics_port == 9091
    felix = config.load("felix", environ={}, path=write(tmp_path, ""))
    assert felix.metrics_port == 9091 and felix.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert config.load("bgpd", environ={}, path=write(tmp_path, "")).metrics_port == 9092


def test_endpoints_list_or_comma_string(tmp_path: Path) -> None:
    path = write(tmp_path, 'etcd_endpoints = ["http://10.0.0.1:2379", "https://[fd00::1]:2379"]\n')
    assert config.load("felix", path=path, environ={}).etcd_endpoints == (
        "http://10.0.0.1:2379", "https://[fd00::1]:2379")
    cfg = config.load("felix", path=path, environ={"CALYX_ETCD_ENDPOINTS": "a:1, b:2"})
    assert cfg.etcd_endpoints == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        ("nodename = 'x'\n", {}, "unknown configuration key 'nodename'"),
        ("metrics_port = 'abc'\n", {}, "invalid value for metrics_port"),
        ("metrics_port = 70000\n", {}, "outside 0..65535"),
        ("log_level = 'loud'\n", {}, "invalid value for log_level"),
        ("etcd_endpoints = []\n", {}, "at least one endpoint"),
        ("etcd_endpoints = ['no port']\n", {}, "not host:port"),
        ("[felix]\niptables_backend = 'pf'\n", {}, "[felix]: invalid value for iptables_backend"),
        ("[bgpd]\ntypo = 1\n", {}, "[bgpd]: unknown configuration key 'typo'"),
        ("node_name = [\n", {}, "not valid TOML"),
        ("", {"CALYX_ETCD_TIMEOUT": "soon"}, "environment variable CALYX_ETCD_TIMEOUT"),
        ("etcd_cert = '/etc/hostname'\n", {}, "etcd_cert and etcd_key must be given together"),
        ("etcd_ca = '/nonexistent/ca.pem'\n", {}, "etcd_ca: file /nonexistent/ca.pem does not exist"),
        ("node_name = 'bad/name'\n", {}, "not a valid node name"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, env: dict[str, str], words: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=write(tmp_path, text), environ=env)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load("felix", path=str(tmp_path / "nope.toml"), environ={})
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load("felix", environ={"CALYX_CONFIG": str(tmp_path / "nope.toml")})


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "etc" / "calyx.toml"
    for comp in ("felix", "bgpd", "calyxctl", "cni"):
        config.load(comp, path=str(example), environ={})


@pytest.mark.parametrize(
    "info",
    [
        KeyInfo(Kind.CLUSTER_CONFIG, name="cluster"),
        KeyInfo(Kind.NODE, name="h1"),
        KeyInfo(Kind.BGP_PEER, name="tor"),
        KeyInfo(Kind.IP_POOL, name="p"),
        KeyInfo(Kind.IPAM_BLOCK, name="10.0.0.0-26"),
        KeyInfo(Kind.IPAM_HANDLE, name="h"),
        KeyInfo(Kind.IPAM_RESERVATION, name="r"),
        KeyInfo(Kind.WORKLOAD, node="h1", orchestrator="cni", workload="w", endpoint="eth0"),
        KeyInfo(Kind.PROFILE, name="p"),
        KeyInfo(Kind.POLICY, name="p"),
        KeyInfo(Kind.FELIX_STATUS, node="h1"),
        KeyInfo(Kind.BGP_STATUS, node="h1", name="10.0.0.1"),
        KeyInfo(Kind.ENDPOINT_STATUS, node="h1", orchestrator="cni", workload="w", endpoint="eth0"),
    ],
)
def test_key_builders_and_parser_agree(info: KeyInfo) -> None:
    key = keys.key_for(info)
    assert key.startswith(keys.PREFIX)
    assert keys.parse_key(key) == info
    assert keys.parse_key(key.encode()) == info


def test_key_segments_are_checked() -> None:
    for bad in ("", "a/b", "..", "x\n"):
        with pytest.raises(keys.KeyNameError):
            keys.node_key(bad)
    assert keys.block_name("10.65.0.64/26") == "10.65.0.64-26"
    assert keys.block_cidr("fd00::-122") == "fd00::/122"
    with pytest.raises(keys.KeyNameError):
        keys.block_cidr("10.65.0.65-26")
    assert keys.parse_key("/calyx/v1/nodes/") is None
    assert keys.parse_key(b"\xff\xfe") is None
