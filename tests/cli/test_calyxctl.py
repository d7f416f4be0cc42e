"""calyxctl against a real etcd: round trips of every kind, hand-written keys, bad input, exit codes.

Every command runs as a real subprocess (the installed console script), so exit codes, stdout and
stderr are what an operator sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from calyx.datastore import keys
from tests.fixtures.etcd import EtcdMember

pytestmark = pytest.mark.etcd

CALYXCTL = str(Path(sys.executable).with_name("calyxctl"))

DOCS: list[dict[str, Any]] = [
    {"kind": "ClusterConfig", "name": "cluster",
     "spec": {"as_number": 65000, "node_to_node_mesh": False, "graceful_restart_time": 120,
              "communities": ["65000:100"], "strict_affinity": False}},
    {"kind": "Node", "name": "h1", "spec": {"ipv4": "10.0.1.11/24", "as_number": 65001, "labels": {"rack": "r1"}}},
    {"kind": "Node", "name": "rr1", "spec": {"ipv4": "10.0.1.2/24", "route_reflector_cluster_id": "10.0.1.2",
                                           "labels": {"rr": "true"}}},
    {"kind": "BGPPeer", "name": "tor-r1",
     "spec": {"peer_ip": "10.0.1.1", "as_number": 65101, "node_selector": "rack == 'r1'", "password": "s3cret",
              "passive": False, "graceful_restart": True, "hold_time": 30, "keepalive": 10}},
    {"kind": "BGPPeer", "name": "to-rrs", "spec": {"peer_selector": "has(rr)", "node_selector": "!has(rr)",
                                                 "passive": False, "graceful_restart": True}},
    {"kind": "IPPool", "name": "pool-a",
     "spec": {"cidr": "10.65.0.0/16", "block_size": 26, "ipip_mode": "CrossSubnet", "vxlan_mode": "Never",
              "nat_outgoing": True, "disabled": False, "node_selector": "all()"}},
    {"kind": "IPAMBlock", "name": "10.65.0.0/26",
     "spec": {"cidr": "10.65.0.0/26", "affinity": "node:h1", "allocations": ["h-1"] + [None] * 63}},
    {"kind": "IPAMHandle", "name": "h-1", "spec": {"blocks": {"10.65.0.0/26": ["10.65.0.0"]},
                                                  "attributes": {"node": "h1"}}},
    {"kind": "IPAMReservation", "name": "db", "spec": {"address": "10.65.9.9", "workload": "db-0"}},
    {"kind": "WorkloadEndpoint", "name": "h1/cni/web-1/eth0",
     "spec": {"iface": "cali0123456789a", "mac": "ee:ee:ee:ee:ee:ee", "ipv4_nets": ["10.65.0.1/32"],
              "ipv6_nets": [], "profiles": ["tenant-a"], "labels": {"app": "web"}, "state": "active"}},
    {"kind": "Profile", "name": "tenant-a",
     "spec": {"labels_to_apply": {"tenant": "a"},
              "ingress": [{"action": "allow", "source": {"selector": "tenant == 'a'"}}],
              "egress": [{"action": "allow"}]}},
    {"kind": "Policy", "name": "web",
     "spec": {"order": 10, "selector": "app == 'web'", "types": ["ingress"],
              "ingress": [{"action": "allow", "protocol": "tcp", "destination": {"ports": [80, "8000:8080"]}},
                          {"action": "deny", "protocol": "icmp", "icmp": {"type": 8}}],
              "egress": []}},
]


def run(etcd: EtcdMember | None, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CALYX_")}
    full_env["CALYX_CONFIG"] = os.devnull  # an empty file: no /etc/calyx/calyx.toml influence
    if etcd is not None:
        full_env["CALYX_ETCD_ENDPOINTS"] = etcd.endpoint
    full_env.update(env or {})
    proc = subprocess.run([CALYXCTL, *args], check=False, input=stdin, capture_output=True, text=True, env=full_env,
                          timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def dump(etcd: EtcdMember) -> dict[str, bytes]:
    with etcd.client() as ds:
        kvs, _ = ds.get_prefix(keys.PREFIX)
    return {kv.key: kv.value for kv in kvs}


@pytest.fixture
def clean(etcd: EtcdMember) -> Iterator[EtcdMember]:
    with etcd.client() as ds:
        ds.delete_prefix(keys.PREFIX)
    yield etcd


def test_apply_get_round_trip_every_kind(clean: EtcdMember) -> None:
    text = yaml.safe_dump_all(DOCS, sort_keys=False)
    proc = run(clean, "apply", "-f", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("created") == len(DOCS)
    for doc in DOCS:
        got = run(clean, "get", doc["kind"], doc["name"], "-o", "json")
        assert got.returncode == 0, got.stderr
        back = json.loads(got.stdout)
        assert back["kind"] == doc["kind"]
        assert back["spec"] == doc["spec"], doc["kind"]
    # the whole listing, fed back to apply, changes nothing
    for kind in {d["kind"] for d in DOCS}:
        listing = run(clean, "get", kind, "-o", "yaml")
        assert listing.returncode == 0
        before = dump(clean)
        again = run(clean, "apply", "-f", "-", stdin=listing.stdout)
        assert again.returncode == 0, again.stderr
        assert "configured" not in again.stdout and "unchanged" in again.stdout
        assert dump(clean) == before


def test_table_output_and_kind_spellings(clean: EtcdMember) -> None:
    assert run(clean, "apply", "-f", "-", stdin=yaml.safe_dump_all(DOCS)).returncode == 0
    for spelling in ("ippool", "ippools", "IPPool", "IPPOOLS", "pools"):
        out = run(clean, "get", spelling)
        assert out.returncode == 0
        assert out.stdout.splitlines()[0].split()[:3] == ["NAME", "CIDR", "BLOCK"]
        assert "10.65.0.0/16" in out.stdout and "CrossSubnet" in out.stdout
    wl = run(clean, "get", "workloads")
    assert "cali0123456789a" in wl.stdout and "10.65.0.1/32" in wl.stdout
    blocks = run(clean, "get", "blocks")
    assert "node:h1" in blocks.stdout


def test_keys_written_by_hand_with_etcdctl_are_read(clean: EtcdMember) -> None:
    clean.etcdctl("put", "/calyx/v1/ippools/by-hand", '{"cidr": "10.70.0.0/16", "ipip_mode": "Always"}')
    clean.etcdctl("put", "/calyx/v1/workloads/h2/k8s/ns.pod/eth0",
                  '{"iface": "calia1b2c3d4e5f", "ipv4_nets": ["10.70.0.5"], "labels": {"app": "db"}}')
    pool = json.loads(run(clean, "get", "ippool", "by-hand", "-o", "json").stdout)
    assert pool["spec"]["block_size"] == 26 and pool["spec"]["ipip_mode"] == "Always"
    wl = json.loads(run(clean, "get", "workload", "h2/k8s/ns.pod/eth0", "-o", "json").stdout)
    assert wl["spec"]["ipv4_nets"] == ["10.70.0.5/32"] and wl["spec"]["labels"] == {"app": "db"}


def test_malformed_values_are_reported_not_fatal(clean: EtcdMember) -> None:
    clean.etcdctl("put", "/calyx/v1/nodes/good", '{"ipv4": "10.0.0.1/24"}')
    clean.etcdctl("put", "/calyx/v1/nodes/bad-json", "{not json")
    clean.etcdctl("put", "/calyx/v1/nodes/bad-field", '{"ipv4": "10.0.0.300/24"}')
    out = run(clean, "get", "nodes")
    assert out.returncode == 0
    assert "good" in out.stdout and "bad-json" not in out.stdout
    assert "/calyx/v1/nodes/bad-json" in out.stderr and "not valid JSON" in out.stderr
    assert "/calyx/v1/nodes/bad-field: ipv4" in out.stderr
    one = run(clean, "get", "node", "bad-field")
    assert one.returncode == 1 and one.stderr.startswith("error: stored value is malformed")


def test_multi_document_apply_is_all_or_nothing(clean: EtcdMember) -> None:
    assert run(clean, "apply", "-f", "-", stdin=yaml.safe_dump_all(DOCS[:3])).returncode == 0
    before = dump(clean)
    bad = [*DOCS[3:6], {"kind": "IPPool", "name": "broken", "spec": {"cidr": "10.66.0.0/16", "block_size": 8}}]
    proc = run(clean, "apply", "-f", "-", stdin=yaml.safe_dump_all(bad))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "document 4" in proc.stderr and "block_size" in proc.stderr
    assert dump(clean) == before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: IPPool\nname: p\nspec: {cidr: 10.0.0.0/16, blocksize: 24}\n", "blocksize: unknown field"),
        ("kind: Pod\nname: p\n", "unknown kind 'Pod'"),
        ("name: p\nspec: {}\n", "missing kind"),
        ("kind: IPPool\nspec: {cidr: 10.0.0.0/16}\n", "missing name"),
        ("kind: IPPool\nname: p\nspec: {cidr: 10.0.0.0/16}\nextra: 1\n", "unknown top-level field 'extra'"),
        ("kind: IPPool\nname: a/b\nspec: {cidr: 10.0.0.0/16}\n", "invalid IP pool name"),
        ("kind: FelixStatus\nname: h1\nspec: {}\n", "written by the daemons"),
        ("kind: IPPool\nname: [unclosed\n", "invalid YAML at line 3"),
        ('{"kind": "IPPool", "name": "p", ', "invalid JSON"),
        ("", "no documents"),
        ("- 1\n- 2\n", "expected an object"),
        ("kind: IPPool\nname: p\nspec: {cidr: 10.0.0.0/16}\n---\nkind: IPPool\nname: p\nspec: {cidr: 10.1.0.0/16}\n",
         "also defined in"),
    ],
)
def test_bad_documents_get_one_line_and_write_nothing(clean: EtcdMember, text: str, words: str) -> None:
    proc = run(clean, "apply", "-f", "-", stdin=text)
    assert proc.returncode == 1, proc.stdout
    assert words in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert dump(clean) == {}


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["get", "pods"], 2, "unknown kind"),
        (["get", "ippool", "-o", "xml"], 2, "Invalid value"),
        (["apply"], 2, "Missing option"),
        (["frobnicate"], 2, "No such command"),
        (["delete", "ippool"], 2, "Missing argument"),
        (["apply", "-f", "/nonexistent.yaml"], 1, "cannot read /nonexistent.yaml"),
        (["get", "ippool", "nope"], 1, "IPPool 'nope' not found"),
        (["delete", "ippool", "nope"], 1, "IPPool 'nope' not found"),
        (["get", "workload", "just-a-name"], 1, "four parts"),
        (["delete", "felixstatus", "h1"], 1, "written by the daemons"),
    ],
)
def test_bad_arguments(clean: EtcdMember, args: list[str], code: int, words: str) -> None:
    proc = run(clean, *args)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert words in proc.stderr


def test_delete_and_guards(clean: EtcdMember) -> None:
    assert run(clean, "apply", "-f", "-", stdin=yaml.safe_dump_all(DOCS)).returncode == 0
    # a pool whose addresses are in use cannot be deleted, nor re-sized
    proc = run(clean, "delete", "ippool", "pool-a")
    assert proc.returncode == 1 and "still has 1 address" in proc.stderr
    resized = dict(DOCS[5], spec={**DOCS[5]["spec"], "block_size": 24})
    proc = run(clean, "apply", "-f", "-", stdin=yaml.safe_dump(resized))
    assert proc.returncode == 1 and "cannot change" in proc.stderr
    # several names: all or nothing
    proc = run(clean, "delete", "policy", "web", "missing")
    assert proc.returncode == 1
    assert run(clean, "get", "policy", "web").returncode == 0
    proc = run(clean, "delete", "policy", "web")
    assert proc.returncode == 0 and "Policy web deleted" in proc.stdout
    assert run(clean, "get", "policy", "web").returncode == 1
    proc = run(clean, "delete", "workload", "h1/cni/web-1/eth0")
    assert proc.returncode == 0
    assert keys.workload_key("h1", "cni", "web-1", "eth0") not in dump(clean)


def test_node_status(clean: EtcdMember) -> None:
    none = run(clean, "node", "status", "h1")
    assert none.returncode == 1 and "felix: not running" in none.stdout
    with clean.client() as ds:
        lease = ds.grant_lease(30)
        ds.put(keys.felix_status_key("h1"), json.dumps(
            {"in_sync": True, "last_apply": "2026-11-22T06:00:00Z", "endpoints": 2, "errors": [],
             "ip_forwarding": True}), lease=lease)
        ds.put(keys.bgp_status_key("h1", "10.0.1.1"), json.dumps(
            {"state": "established", "since": "2026-11-22T06:00:01Z", "prefixes_received": 3,
             "prefixes_sent": 1, "peer_type": "global", "peer_as": 65101}), lease=lease)
        ds.put(keys.bgp_status_key("h1", "10.0.1.12"), json.dumps(
            {"state": "active", "since": "2026-11-22T06:00:02Z", "last_error": "Connection refused",
             "peer_type": "node-to-node mesh"}), lease=lease)
        out = run(clean, "node", "status", "h1")
        assert "felix: running, in sync, 2 local endpoint(s)" in out.stdout
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
        assert [c.strip() for c in lines[0].strip("|").split("|")] == [
            "PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]
        rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]}
        assert rows["10.0.1.1"][1:4] == ["global", "up", "2026-11-22T06:00:01Z"]
        assert rows["10.0.1.12"][2] == "start" and "Connection refused" in rows["10.0.1.12"][4]
        assert out.returncode == 1  # one session is down
        everyone = run(clean, "node", "status", "--all")
        assert "Node h1" in everyone.stdout
        # the keys vanish with the lease: a stopped daemon is never shown healthy
        lease.revoke()
    gone = run(clean, "node", "status", "h1")
    assert "felix: not running" in gone.stdout and "10.0.1.1" not in gone.stdout


def test_unreachable_etcd_and_config_errors(tmp_path: Path) -> None:
    proc = run(None, "get", "ippools", env={"CALYX_ETCD_ENDPOINTS": "http://127.0.0.1:1", "CALYX_ETCD_TIMEOUT": "1"})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot reach etcd at http://127.0.0.1:1")
    assert proc.stderr.count("\n") == 1
    cfg = tmp_path / "calyx.toml"
    cfg.write_text("etcd_endpoint = 'typo'\n")
    proc = run(None, "get", "ippools", env={"CALYX_CONFIG": str(cfg)})
    assert proc.returncode == 2 and "unknown configuration key 'etcd_endpoint'" in proc.stderr
    proc = run(None, "--etcd-endpoints", "not an endpoint", "get", "ippools")
    assert proc.returncode == 2 and "--etcd-endpoints" in proc.stderr


def test_version() -> None:
    proc = run(None, "version")
    assert proc.returncode == 0 and proc.stdout.startswith("calyxctl 0.1.0")
