"""Configuration precedence and errors; the key schema's builders and parser agree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
        ("log_format = 'xml'\n", {}, "invalid value for log_format: expected one of text, json, got 'xml'"),
        ("[felix]\nlog_levle = 'debug'\n", {}, "unknown configuration key 'log_levle': did you mean 'log_level'?"),
        ("zzz = 1\n", {}, "unknown configuration key 'zzz': docs/configuration.md lists the keys"),
        ("[bgpd]\nbgp_router_id = 'tor1'\n", {}, "invalid value for bgp_router_id: expected an IPv4 address"),
        ("", {"CALYX_ETCD_KEY": "/etc/hostname"},
         "environment variable CALYX_ETCD_KEY: etcd_key is set but etcd_cert is not: etcd_cert and etcd_key must be "
         "given together (set etcd_cert too, or remove etcd_key)"),
        ("etcd_ca = '/etc/hostname'\n", {}, "calyx.toml: etcd_ca: /etc/hostname holds no CA certificate in PEM form"),
        ("node_ipv4_autodetection = 'first-found'\n", {},
         "calyx.toml: invalid value for node_ipv4_autodetection: expected one of default-route, interface=REGEX, "
         "can-reach=IP, skip, got 'first-found'"),
        ("node_ipv4_autodetection = 'interface=eth[0-'\n", {},
         "invalid value for node_ipv4_autodetection: interface=eth[0-: not a valid regular expression"),
        ("", {"CALYX_NODE_IPV4_AUTODETECTION": "can-reach=10.0.0.300"},
         "environment variable CALYX_NODE_IPV4_AUTODETECTION: invalid value for node_ipv4_autodetection: "
         "can-reach=10.0.0.300: not an IPv4 address"),
        ("node_ipv4_autodetection = 'interface='\n", {}, "invalid value for node_ipv4_autodetection: expected one of"),
        ("node_as_number = 0\n", {}, "invalid value for node_as_number: 0 is outside 1..4294967295"),
        ("", {"CALYX_NODE_AS_NUMBER": "65536.1"}, "invalid value for node_as_number: expected an AS number"),
        ("node_labels = {rack = 3}\n", {}, "invalid value for node_labels: label 'rack': values must be strings"),
        ("node_labels = ['rack']\n", {}, "invalid value for node_labels: expected a table of label"),
        ("", {"CALYX_NODE_LABELS": "rack=r1,zone"},
         "environment variable CALYX_NODE_LABELS: invalid value for node_labels: expected name=value pairs "
         "separated by commas, got 'zone'"),
        ("", {"CALYX_NODE_LABELS": "bad key!=x"}, "invalid value for node_labels: 'bad key!' is not a valid label"),
        ("[bgpd]\nnode_labels = {rack = 'r1'}\n", {},
         "calyx.toml [bgpd]: node_labels describes the host (felix and bgpd both register the node with it and must "
         "agree): set it at the top level of the file or as CALYX_NODE_LABELS"),
        ("", {"CALYX_FELIX_NODE_AS_NUMBER": "65001"},
         "environment variable CALYX_FELIX_NODE_AS_NUMBER: node_as_number describes the host"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, env: dict[str, str], words: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=write(tmp_path, text), environ=env)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_tls_file_names_its_source_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "[felix]\netcd_ca = '/nonexistent/ca.pem'\n")
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=path, environ={})
    assert str(info.value) == (f"{path} [felix]: etcd_ca: file /nonexistent/ca.pem does not exist: create it "
                               f"(docs/install.md, etcd with TLS) or correct the path")
    with pytest.raises(config.ConfigError, match=r"^--etcd-ca: etcd_ca: file /nonexistent/x does not exist"):
        config.load("felix", path=write(tmp_path, ""), environ={}, flags={"etcd_ca": "/nonexistent/x"})


def test_unreadable_tls_file(tmp_path: Path) -> None:
    """A key the daemon cannot read is named with the fix, not left to a crash loop (bgpd runs as calyx; felix
    as root without CAP_DAC_OVERRIDE, so a key owned by another user with mode 0600 is out of its reach too)."""
    key = tmp_path / "client.key"
    key.write_text("secret")
    key.chmod(0o600)
    if os.geteuid() != 0:
        with pytest.raises(config.ConfigError) as info:
            config.load("felix", path=write(tmp_path, ""), environ={"CALYX_ETCD_CERT": str(key),
                                                                     "CALYX_ETCD_KEY": str(key)})
        msg = str(info.value)
    else:  # as felix's unit runs it: root, without the capabilities that read any file
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
        os.chown(key, 65534, 65534)
        code = ("import sys; from calyx import config\n"
                "env = {'CALYX_ETCD_CERT': sys.argv[1], 'CALYX_ETCD_KEY': sys.argv[1]}\n"
                "try:\n    config.load('felix', path=sys.argv[2], environ=env)\n"
                "except config.ConfigError as exc:\n    print(exc)\n")
        r = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c", code,
                            str(key), write(tmp_path, "")], capture_output=True, text=True, timeout=60, check=True)
        msg = r.stdout.strip()
    assert msg.startswith(f"environment variable CALYX_ETCD_CERT: etcd_cert: file {key} cannot be read by uid "), msg
    assert "(Permission denied): let this user read it" in msg


def test_default_node_name_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.socket, "gethostname", lambda: "my host")
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=write(tmp_path, ""), environ={})
    assert "node_name is not set and the host name 'my host' is not a valid node name" in str(info.value)
    assert "set node_name in the configuration file or CALYX_NODE_NAME" in str(info.value)
    assert config.load("felix", path=write(tmp_path, ""), environ={"CALYX_NODE_NAME": "h1"}).node_name == "h1"
    monkeypatch.setattr(config.socket, "gethostname", lambda: "host-7")
    cfg = config.load("felix", path=write(tmp_path, ""), environ={})
    assert cfg.node_name == "host-7" and cfg.origin("node_name") == "default"


def test_origin_of_each_key(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level = 'debug'\n[felix]\nmetrics_port = 1\n")
    cfg = config.load("felix", path=path, environ={"CALYX_FELIX_LOG_FORMAT": "json"}, flags={"node_name": "n"})
    assert cfg.origin("log_level") == path and cfg.origin("metrics_port") == f"{path} [felix]"
    assert cfg.origin("log_format") == "environment variable CALYX_FELIX_LOG_FORMAT"
    assert cfg.origin("node_name") == "--node-name" and cfg.origin("etcd_timeout") == "default"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    nope = tmp_path / "nope.toml"
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=str(nope), environ={})
    assert str(info.value).startswith(f"--config: configuration file {nope} does not exist: create it")
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", environ={"CALYX_CONFIG": str(nope)})
    assert str(info.value).startswith(f"environment variable CALYX_CONFIG: configuration file {nope} does not exist")


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


def test_node_registration_keys(tmp_path: Path) -> None:
    cfg = config.load("felix", path=write(tmp_path, ""), environ={})
    assert (cfg.node_ipv4_autodetection, cfg.node_as_number, cfg.node_labels) == ("default-route", None, ())
    path = write(tmp_path, "node_ipv4_autodetection = 'interface=ens[0-9]+'\nnode_as_number = '1.10'\n"
                           "[node_labels]\nrack = 'r1'\n'calyx.io/zone' = 'z'\n")
    cfg = config.load("bgpd", path=path, environ={})
    assert cfg.node_ipv4_autodetection == "interface=ens[0-9]+"
    assert cfg.node_as_number == 65546
    assert cfg.node_labels == (("calyx.io/zone", "z"), ("rack", "r1"))
    env = {"CALYX_NODE_LABELS": " zone = z1 , rack=r2,empty=", "CALYX_NODE_IPV4_AUTODETECTION": "Can-Reach=10.0.0.1",
           "CALYX_NODE_AS_NUMBER": "65001"}
    cfg = config.load("felix", path=path, environ=env)
    assert cfg.node_labels == (("empty", ""), ("rack", "r2"), ("zone", "z1"))
    assert (cfg.node_ipv4_autodetection, cfg.node_as_number) == ("can-reach=10.0.0.1", 65001)
    assert config.load("felix", path=path, environ={"CALYX_NODE_LABELS": ""}).node_labels == ()


def test_calyxctl_reads_the_units_environment_file(tmp_path: Path) -> None:
    envfile = tmp_path / "calyx.env"
    envfile.write_text('# as shipped in systemd/calyx.env\n\nCALYX_ETCD_ENDPOINTS="http://10.0.0.11:2379,http://10.0.0.12:2379"\n'
                       "CALYX_NODE_NAME='host-7'\nCALYX_FELIX_METRICS_PORT=9191\nOTHER=ignored\n")
    path = write(tmp_path, 'log_level = "debug"\n')
    cfg = config.load("calyxctl", path=path, environ={"CALYX_ENV_FILE": str(envfile)})
    assert cfg.etcd_endpoints == ("http://10.0.0.11:2379", "http://10.0.0.12:2379")
    assert cfg.node_name == "host-7" and cfg.log_level == "debug"
    assert cfg.origin("etcd_endpoints") == f"{envfile} (CALYX_ETCD_ENDPOINTS)"
    # the real environment wins over the file, as an export in the shell would
    cfg = config.load("calyxctl", path=path, environ={"CALYX_ENV_FILE": str(envfile), "CALYX_NODE_NAME": "h9"})
    assert cfg.node_name == "h9" and cfg.origin("node_name") == "environment variable CALYX_NODE_NAME"
    # the daemons get the file from systemd (EnvironmentFile=), never by reading it themselves
    felix = config.load("felix", path=path, environ={"CALYX_ENV_FILE": str(envfile)})
    assert felix.etcd_endpoints == ("http://127.0.0.1:2379",)


def test_a_bad_environment_file_is_a_configuration_error(tmp_path: Path) -> None:
    envfile = tmp_path / "calyx.env"
    envfile.write_text("CALYX_LOG_LEVEL=debug\nthis is not an assignment\n")
    with pytest.raises(config.ConfigError, match=r"calyx.env:2: expected KEY=VALUE"):
        config.load("calyxctl", path=write(tmp_path, ""), environ={"CALYX_ENV_FILE": str(envfile)})
    envfile.write_text("CALYX_LOG_LEVEL=loud\n")
    with pytest.raises(config.ConfigError, match=r"calyx.env \(CALYX_LOG_LEVEL\): invalid value for log_level"):
        config.load("calyxctl", path=write(tmp_path, ""), environ={"CALYX_ENV_FILE": str(envfile)})
    with pytest.raises(config.ConfigError, match=r"CALYX_ENV_FILE: .* does not exist"):
        config.load("calyxctl", path=write(tmp_path, ""), environ={"CALYX_ENV_FILE": str(tmp_path / "nope")})
