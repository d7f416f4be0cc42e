"""IPAM against a real etcd: allocation, release, reservations, check/fix, the CLI, concurrency."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calyx import model
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.ipam import check
from calyx.ipam.allocator import IPAM
from calyx.ipam.etcdhttp import HttpStore
from calyx.ipam.logic import AddressError, ExhaustedError
from calyx.ipam.store import DatastoreStore, Store
from calyx.model import ClusterConfig, IPAMReservation, IPPool, Node, WorkloadEndpoint
from tests.fixtures.etcd import EtcdMember

pytestmark = pytest.mark.etcd

A = ipaddress.ip_address
N = ipaddress.ip_network
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def ds(etcd: EtcdMember) -> Iterator[Datastore]:
    client = etcd.client()
    client.delete_prefix(keys.PREFIX)
    yield client
    client.delete_prefix(keys.PREFIX)


@pytest.fixture(params=["grpc", "http"])
def store(request: pytest.FixtureRequest, ds: Datastore, etcd: EtcdMember) -> Iterator[Store]:
    if request.param == "grpc":
        yield DatastoreStore(ds)
    else:
        s = HttpStore([etcd.endpoint])
        yield s
        s.close()


def put(ds: Datastore, obj: model.Resource) -> None:
    ds.put(model.key_of(obj), model.encode(obj))


def dump(ds: Datastore) -> dict[str, bytes]:
    kvs, _ = ds.get_prefix(keys.PREFIX)
    return {kv.key: kv.value for kv in kvs}


def test_allocate_release_roundtrip(ds: Datastore, store: Store) -> None:
    put(ds, IPPool("p", N("10.10.0.0/24"), 28))
    put(ds, Node("n1"))
    ipam = IPAM(store)
    [a] = ipam.allocate("h1", "n1", attributes={"created": "1"})
    assert a.address in N("10.10.0.0/24") and a.block.prefixlen == 28 and not a.borrowed
    block = model.decode(keys.ipam_block_key(a.block), ds.get(keys.ipam_block_key(a.block)).value)  # type: ignore[union-attr]
    assert isinstance(block, model.IPAMBlock) and block.affinity == "node:n1" and block.in_use() == 1
    handle = model.decode(keys.ipam_handle_key("h1"), ds.get(keys.ipam_handle_key("h1")).value)  # type: ignore[union-attr]
    assert isinstance(handle, model.IPAMHandle) and handle.addresses == [a.address]
    assert handle.attributes == {"created": "1", "node": "n1"}
    # idempotent: the same handle gets the same address, nothing written
    rev = ds.revision()
    assert [x.address for x in ipam.allocate("h1", "n1")] == [a.address]
    assert ds.revision() == rev
    [b] = ipam.allocate("h2", "n1")
    assert b.block == a.block and b.address != a.address
    assert ipam.release("h1") == [a.address]
    assert ipam.release("h1") == []  # idempotent
    assert ds.get(keys.ipam_handle_key("h1")) is None
    assert check.check(ipam, min_age=0) == []
    freed, kept = ipam.release_affinity("n1")
    assert freed == [] and kept == [a.block]
    ipam.release("h2")
    freed, kept = ipam.release_affinity("n1")
    assert freed == [a.block] and kept == []
    assert ds.get_prefix(keys.IPAM_BLOCKS_PREFIX)[0] == []


def test_borrow_and_strict_affinity(ds: Datastore, store: Store) -> None:
    put(ds, IPPool("p", N("10.11.0.0/29"), 30))
    ipam = IPAM(store)
    got = [ipam.allocate(f"a{i}", "n1")[0] for i in range(8)]  # n1 claims both /30s
    ipam.release("a3")
    [b] = ipam.allocate("b", "n2")
    assert b.borrowed and b.address == got[3].address
    with pytest.raises(ExhaustedError):
        ipam.allocate("c", "n2")
    ipam.release("b")
    put(ds, ClusterConfig(strict_affinity=True))
    with pytest.raises(ExhaustedError, match="strict affinity"):
        ipam.allocate("b", "n2")


def test_reservation_follows_the_workload_between_hosts(ds: Datastore, store: Store) -> None:
    put(ds, IPPool("p", N("10.12.0.0/24"), 26))
    put(ds, IPAMReservation("db", A("10.12.0.200"), "db"))
    ipam = IPAM(store)
    [a] = ipam.allocate("db-1", "n1", workload="db")
    assert a.address == A("10.12.0.200") and a.fixed and not a.borrowed
    others = [ipam.allocate(f"x{i}", "n1")[0].address for i in range(3)]
    assert A("10.12.0.200") not in others
    with pytest.raises(AddressError, match="held by handle 'db-1'"):
        ipam.allocate("db-2", "n2", workload="db")
    ipam.release("db-1")
    [b] = ipam.allocate("db-2", "n2", workload="db")  # restarted on n2: same address, borrowed /32
    assert b.address == A("10.12.0.200") and b.borrowed and b.block == a.block


def test_check_finds_and_fixes(ds: Datastore, store: Store) -> None:
    put(ds, IPPool("p", N("10.13.0.0/24"), 26))
    put(ds, Node("n1"))
    ipam = IPAM(store)
    attrs = {"node": "n1", "orchestrator": "cni", "workload": "w1", "endpoint": "eth0",
             "created": str(time.time() - 100)}
    [live] = ipam.allocate("live", "n1", attributes={**attrs, "workload": "live"})
    put(ds, WorkloadEndpoint("n1", "cni", "live", "eth0", "cali0123456789a", ipv4_nets=(live.network,)))
    [leak] = ipam.allocate("leaked", "n1", attributes=attrs)
    [gone] = ipam.allocate("x", "gone-node")
    [stray] = ipam.allocate("stray", "n1")
    ds.delete(keys.ipam_handle_key("stray"))  # allocation without handle
    assert ds.get(keys.ipam_handle_key("live")) is not None
    problems = check.check(ipam, min_age=0)
    kinds = {(p.kind, p.subject) for p in problems}
    assert kinds == {
        ("leaked-handle", "leaked"),
        ("orphan-block", str(gone.block)),
        ("allocation-without-handle", str(stray.address)),
    }, problems
    assert check.check(ipam, min_age=3600) == [p for p in problems if p.kind != "leaked-handle"]
    actions = check.fix(ipam, problems)
    assert len(actions) == 3, actions
    assert check.check(ipam, min_age=0) == []
    snap = ipam.snapshot()
    held = {str(a) for h, _ in snap.handles.values() for a in h.addresses}
    assert held == {str(live.address), str(gone.address)}
    assert snap.blocks[gone.block][0].affinity is None  # still holds x's address: made unaffine
    assert leak.address not in {a for b, _ in snap.blocks.values() for a in (b.address(i) for i, h in
                                                                              enumerate(b.allocations) if h)}


def calyxctl(etcd: EtcdMember, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CALYX_ETCD_ENDPOINTS=etcd.endpoint, CALYX_NODE_NAME="n1", CALYX_CONFIG="/dev/null")
    return subprocess.run([str(VENV_BIN / "calyxctl"), "ipam", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_calyxctl_ipam(ds: Datastore, etcd: EtcdMember) -> None:
    put(ds, IPPool("p", N("10.14.0.0/24"), 26))
    put(ds, Node("n1"))
    r = calyxctl(etcd, "allocate", "--handle", "h1", "-o", "json")
    assert r.returncode == 0, r.stderr
    [a] = json.loads(r.stdout)
    assert A(a["address"]) in N("10.14.0.0/24")
    r = calyxctl(etcd, "allocate", "--handle", "h2", "--ip", "10.14.0.77")
    assert r.returncode == 0 and "10.14.0.77" in r.stdout and "fixed" in r.stdout, r.stderr
    r = calyxctl(etcd, "allocate", "--handle", "h3", "--ip", "10.14.0.77")
    assert r.returncode == 1 and "held by handle 'h2'" in r.stderr
    r = calyxctl(etcd, "show", "--blocks", "--handles")
    assert r.returncode == 0 and "2/256" in r.stdout and "node:n1" in r.stdout and "h2" in r.stdout, r.stdout
    r = calyxctl(etcd, "show", "--ip", "10.14.0.77")
    assert "held by h2" in r.stdout
    r = calyxctl(etcd, "check")
    assert r.returncode == 0 and "consistent" in r.stdout
    ds.delete(keys.node_key("n1"))
    r = calyxctl(etcd, "check")
    assert r.returncode == 1 and "orphan-block" in r.stdout
    put(ds, Node("n1"))
    r = calyxctl(etcd, "release", "--ip", "10.14.0.77")
    assert r.returncode == 0 and "was held by h2" in r.stdout
    r = calyxctl(etcd, "release", "--handle", "h1")
    assert r.returncode == 0, r.stderr
    r = calyxctl(etcd, "release", "--handle", "h1")
    assert r.returncode == 1 and "holds no addresses" in r.stderr
    r = calyxctl(etcd, "release", "--empty-blocks")
    assert r.returncode == 0 and "freed block 10.14.0." in r.stdout
    r = calyxctl(etcd, "release")
    assert r.returncode == 2
    assert dump(ds).keys() == {keys.ippool_key("p"), keys.node_key("n1")}


WORKER = textwrap.dedent("""
    import sys
    from calyx.ipam.allocator import IPAM
    from calyx.ipam.etcdhttp import HttpStore
    from calyx.ipam.store import DatastoreStore
    from calyx.datastore.client import Datastore
    endpoint, node, name, count, kind = sys.argv[1:6]
    store = HttpStore([endpoint]) if kind == "http" else DatastoreStore(Datastore([endpoint]))
    ipam = IPAM(store)
    out = []
    for i in range(int(count)):
        [a] = ipam.allocate(f"{name}-{i}", node)
        out.append(str(a.address))
    print(" ".join(out))
    print(ipam.conflicts, file=sys.stderr)
""")


def test_eight_processes_allocate_4000_distinct_addresses(ds: Datastore, etcd: EtcdMember) -> None:
    put(ds, IPPool("big", N("10.128.0.0/16"), 26))
    nodes = [f"n{i % 4}" for i in range(8)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, etcd.endpoint, node, f"w{i}", "500",
                          "http" if i % 2 else "grpc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, node in enumerate(nodes)
    ]
    results: list[tuple[str, list[str]]] = []
    conflicts = 0
    for node, p in zip(nodes, procs, strict=True):
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, err
        results.append((node, out.split()))
        conflicts += int(err.strip().splitlines()[-1])
    addrs = [a for _, lst in results for a in lst]
    assert len(addrs) == 4000 and len(set(addrs)) == 4000
    ipam = IPAM(DatastoreStore(ds))
    snap = ipam.snapshot()
    assert len(snap.handles) == 4000
    assert sum(b.in_use() for b, _ in snap.blocks.values()) == 4000
    for node, lst in results:  # every address came from a block of its own node: no borrowing needed
        for a in lst:
            [blk] = [b for b, _ in snap.blocks.values() if A(a) in b.cidr]
            assert blk.affinity == f"node:{node}"
    assert check.find_problems(snap, endpoint_keys=set(), nodes={f"n{i}" for i in range(4)}, now=time.time()) == []
    print(f"compare-and-swap conflicts retried: {conflicts}")
