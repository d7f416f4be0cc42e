"""The etcd adapter against a real etcd 3.4: CRUD, CAS, transactions, paging, leases, watches, failure
translation, authentication, TLS and failover."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from calyx.datastore.client import (
    KV,
    AuthError,
    Compacted,
    Datastore,
    DatastoreError,
    Delete,
    LeaseExpired,
    Put,
    Unavailable,
    WatchEvent,
    _parse_endpoint,
)
from tests.fixtures.etcd import EtcdCluster, EtcdMember, free_ports, new_member

pytestmark = pytest.mark.etcd


def bulk_put(ds: Datastore, items: Mapping[str, bytes], chunk: int = 100) -> None:
    """Write many keys quickly: unconditional transactions of ``chunk`` puts."""
    keys = list(items)
    for i in range(0, len(keys), chunk):
        assert ds.commit([Put(k, items[k]) for k in keys[i : i + chunk]])


def as_map(kvs: list[KV]) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in kvs}


# --- CRUD and CAS ----------------------------------------------------------------------------------


def test_put_get_delete(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    k = etcd_prefix + "a"
    assert ds.get(k) is None
    rev1 = ds.put(k, "one")
    kv = ds.get(k)
    assert kv == KV(k, b"one", rev1, rev1, 1, 0)
    rev2 = ds.put(k, b"two")
    assert rev2 > rev1
    assert ds.get(k) == KV(k, b"two", rev2, rev1, 2, 0)
    assert ds.revision() >= rev2
    assert ds.delete(k) is True
    assert ds.get(k) is None
    assert ds.delete(k) is False


def test_create_update_delete_compare_and_swap(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    k = etcd_prefix + "cas"
    assert ds.create(k, "v1") is True
    assert ds.create(k, "other") is False
    kv = ds.get(k)
    assert kv is not None and kv.value == b"v1"

    assert ds.update(k, "v2", kv.mod_revision) is True
    stale = kv.mod_revision
    assert ds.update(k, "lost", stale) is False
    kv2 = ds.get(k)
    assert kv2 is not None and kv2.value == b"v2"

    assert ds.delete(k, mod_revision=stale) is False
    assert ds.get(k) is not None
    assert ds.delete(k, mod_revision=kv2.mod_revision) is True
    assert ds.get(k) is None
    assert ds.update(k, "x", kv2.mod_revision) is False  # gone: no mod revision matches
    assert ds.get(k) is None


def test_commit_is_all_or_nothing(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    ds.put(p + "a", "a0")
    ds.put(p + "b", "b0")
    a = ds.get(p + "a")
    assert a is not None
    before = as_map(ds.get_prefix(p)[0])

    # One stale expectation (b changed behind our back) fails the whole transaction.
    stale_b = ds.get(p + "b")
    assert stale_b is not None
    ds.put(p + "b", "b1")
    ok = ds.commit(
        [
            Put(p + "a", "a1", expect_mod_revision=a.mod_revision),
            Put(p + "b", "b2", expect_mod_revision=stale_b.mod_revision),
            Put(p + "c", "c1", expect_mod_revision=0),
        ]
    )
    assert ok is False
    assert as_map(ds.get_prefix(p)[0]) == {**before, p + "b": b"b1"}

    # "Must not exist" fails when the key exists.
    assert ds.commit([Put(p + "a", "x", expect_mod_revision=0), Put(p + "new", "x")]) is False
    assert ds.get(p + "new") is None

    b = ds.get(p + "b")
    assert b is not None
    ok = ds.commit(
        [
            Put(p + "a", "a1", expect_mod_revision=a.mod_revision),
            Delete(p + "b", expect_mod_revision=b.mod_revision),
            Put(p + "c", "c1", expect_mod_revision=0),
            Put(p + "d", "d1"),
        ]
    )
    assert ok is True
    assert as_map(ds.get_prefix(p)[0]) == {p + "a": b"a1", p + "c": b"c1", p + "d": b"d1"}

    with pytest.raises(ValueError, match="only once"):
        ds.commit([Put(p + "a", "1"), Delete(p + "a")])
    with pytest.raises(ValueError, match="at most"):
        ds.commit([Put(f"{p}many/{i}", "x") for i in range(129)])
    assert ds.commit([]) is True


def test_delete_prefix_only_touches_the_prefix(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    bulk_put(ds, {f"{p}dir/{i}": b"x" for i in range(5)})
    ds.put(p + "dir", "the key itself, not under dir/")
    ds.put(p + "dir0", "sibling")
    assert ds.delete_prefix(p + "dir/") == 5
    assert as_map(ds.get_prefix(p)[0]) == {p + "dir": b"the key itself, not under dir/", p + "dir0": b"sibling"}
    with pytest.raises(ValueError):
        ds.delete_prefix("")


# --- paging ----------------------------------------------------------------------------------------


def test_get_prefix_pages_10k_keys_over_the_4mb_reply_limit(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    # 10,000 x 600-byte values: about 6.4 MB, over gRPC's default 4 MB reply limit in one reply.
    items = {f"{p}k{i:05d}": (f"{i:05d}".encode() * 120) for i in range(10_000)}
    bulk_put(ds, items)
    ds.put(p[:-1] + "0", "just past the prefix")  # range end of the prefix: must not be included

    kvs, rev = ds.get_prefix(p, page_size=1000)
    assert [kv.key for kv in kvs] == sorted(items)
    assert as_map(kvs) == items
    assert rev == ds.revision()

    # One unpaged reply also works, thanks to the raised receive limit.
    one, rev_one = ds.get_prefix(p, page_size=0)
    assert as_map(one) == items and rev_one == rev

    # Pages read at one revision: later writes do not leak into a read at the older revision.
    ds.put(f"{p}k00000", "changed")
    ds.delete(f"{p}k09999")
    ds.put(f"{p}k99999", "added")
    old, old_rev = ds.get_prefix(p, revision=rev, page_size=777)
    assert old_rev == rev and as_map(old) == items
    new, new_rev = ds.get_prefix(p, page_size=3000)
    assert new_rev > rev
    expected = {**items, f"{p}k00000": b"changed", f"{p}k99999": b"added"}
    del expected[f"{p}k09999"]
    assert as_map(new) == expected
    assert ds.delete_prefix(p) == 10_000


def test_get_prefix_at_compacted_revision_raises(etcd_fresh: EtcdMember) -> None:
    ds = etcd_fresh.client()
    bulk_put(ds, {f"/c/{i:03d}": b"x" for i in range(30)})
    rev = ds.revision()
    ds.put("/c/000", "y")
    ds.compact(ds.revision())
    with pytest.raises(Compacted):
        ds.get_prefix("/c/", revision=rev, page_size=10)


# --- leases ----------------------------------------------------------------------------------------


def test_lease_expires_without_refresh_and_stays_with_it(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    lapsing = ds.grant_lease(2)
    kept = ds.grant_lease(2)
    assert lapsing.id != kept.id and kept.ttl >= 2
    ds.put(p + "lapsing", "x", lease=lapsing)
    assert ds.create(p + "kept", "y", lease=kept.id) is True
    kv = ds.get(p + "kept")
    assert kv is not None and kv.lease == kept.id

    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert kept.refresh() >= 1
        time.sleep(0.5)
    assert ds.get(p + "lapsing") is None
    assert ds.get(p + "kept") is not None
    with pytest.raises(LeaseExpired):
        lapsing.refresh()

    kept.revoke()
    assert ds.get(p + "kept") is None
    kept.revoke()  # revoking a lease that is gone is fine


# --- watches ---------------------------------------------------------------------------------------


def test_watch_prefix_delivers_changes_in_order_and_cancels_promptly(
    etcd: EtcdMember, etcd_prefix: str
) -> None:
    ds = etcd.client()
    p = etcd_prefix
    start = ds.put(p + "a", "1")
    ds.put(p[:-1] + "-outside", "not under the prefix")
    r2 = ds.put(p + "b", "2")
    r3 = ds.commit([Put(p + "a", "3"), Delete(p + "b")]) and ds.revision()

    seen: list[WatchEvent] = []
    with ds.watch_prefix(p, start) as w:  # replay from history
        while len(seen) < 4:
            seen.extend(next(w))
        assert [(e.type, e.kv.key, e.kv.value) for e in seen] == [
            ("put", p + "a", b"1"),
            ("put", p + "b", b"2"),
            ("put", p + "a", b"3"),
            ("delete", p + "b", b""),
        ]
        assert seen[1].kv.mod_revision == r2
        assert seen[2].kv.mod_revision == seen[3].kv.mod_revision == r3  # one transaction
        assert w.revision == r3

        # Live events, then cancel from another thread while blocked.
        got: list[list[WatchEvent]] = []

        def consume() -> None:
            got.extend(w)  # stops when cancelled

        t = threading.Thread(target=consume)
        t.start()
        r4 = ds.put(p + "c", "4")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        w.cancel()
        t.join(2)
        assert not t.is_alive()
        assert time.monotonic() - t0 < 1.0
    assert [[(e.type, e.kv.key, e.kv.mod_revision) for e in b] for b in got] == [[("put", p + "c", r4)]]


def test_watch_from_compacted_revision_raises_compacted(etcd_fresh: EtcdMember) -> None:
    ds = etcd_fresh.client()
    first = ds.put("/w/a", "1")
    for i in range(5):
        ds.put("/w/a", str(i))
    now = ds.revision()
    ds.compact(now)
    w = ds.watch_prefix("/w/", first)
    with pytest.raises(Compacted) as info:
        next(w)
    assert info.value.compact_revision == now
    # From the compaction revision on, history is there.
    with ds.watch_prefix("/w/", now) as w2:
        assert [(e.kv.value, e.kv.mod_revision) for e in next(w2)] == [(b"4", now)]


def test_watch_breaks_with_unavailable_when_etcd_dies(etcd_fresh: EtcdMember) -> None:
    ds = etcd_fresh.client()
    rev = ds.put("/k/a", "1")
    w = ds.watch_prefix("/k/", rev + 1)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for _ in w:
                pass
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    etcd_fresh.kill()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 2.0
    assert len(errors) == 1 and isinstance(errors[0], Unavailable)

    with pytest.raises(Unavailable):
        ds.get("/k/a")
    etcd_fresh.start()
    deadline = time.monotonic() + 10
    while True:  # the failed endpoint is retried after a short pause (not pyetcd's 300 s)
        try:
            kv = ds.get("/k/a")
            break
        except Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert kv is not None and kv.value == b"1"
    # Resume where the broken watch stopped.
    ds.put("/k/b", "2")
    with ds.watch_prefix("/k/", w.revision + 1) as w2:
        assert [(e.kv.key, e.kv.value) for e in next(w2)] == [("/k/b", b"2")]


# --- failures and configuration --------------------------------------------------------------------


def test_unreachable_endpoint_raises_unavailable_quickly() -> None:
    (port,) = free_ports(1)
    with Datastore([f"127.0.0.1:{port}"], timeout=3.0) as ds:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            ds.get("/x")
        with pytest.raises(Unavailable):
            ds.watch_prefix("/x/", 1)
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(DatastoreError, match="closed"):
        ds.get("/x")


def test_endpoint_parsing() -> None:
    t = _parse_endpoint("http://10.0.0.1:2379")
    assert (t.host, t.port, t.scheme) == ("10.0.0.1", 2379, "http")
    t = _parse_endpoint("etcd.example:12379")
    assert (t.host, t.port, t.scheme) == ("etcd.example", 12379, "")
    t = _parse_endpoint("https://[fd00::1]:2379/")
    assert (t.host, t.port, t.scheme) == ("[fd00::1]", 2379, "https")
    assert _parse_endpoint("etcd").port == 2379
    for bad in ("ftp://h:1", "http://h:notaport", "http://h:1/path", ""):
        with pytest.raises(ValueError):
            _parse_endpoint(bad)
    with pytest.raises(ValueError, match="both"):
        Datastore(["h:1"], cert="/c.pem")
    with pytest.raises(ValueError, match="both"):
        Datastore(["h:1"], username="u")
    with Datastore(("http://a:1", "b:2")) as ds:
        assert ds.endpoints == ("http://a:1", "http://b:2")


def test_username_password_and_token_renewal(tmp_path: Path) -> None:
    # Tokens live 1 s here, so the client must notice expiry and authenticate again.
    member = new_member(tmp_path / "etcd-auth", extra_args=["--auth-token-ttl", "1"])
    try:
        member.etcdctl("user", "add", "root:rootpw")
        member.etcdctl("user", "add", "calyx:s3cret")
        member.etcdctl("role", "add", "calyx")
        member.etcdctl("role", "grant-permission", "calyx", "--prefix=true", "readwrite", "/calyx/")
        member.etcdctl("user", "grant-role", "calyx", "calyx")
        member.etcdctl("auth", "enable")

        with pytest.raises(AuthError):
            member.client().get("/calyx/a")
        with pytest.raises(AuthError):
            member.client(username="calyx", password="wrong").get("/calyx/a")

        ds = member.client(username="calyx", password="s3cret")
        rev = ds.put("/calyx/a", "1")
        with pytest.raises(AuthError):
            ds.put("/other/a", "1")  # outside the role's permission
        time.sleep(2.5)  # token expired
        kv = ds.get("/calyx/a")
        assert kv is not None and kv.value == b"1"
        time.sleep(2.5)
        with ds.watch_prefix("/calyx/", rev) as w:  # watch creation also renews the token
            assert [e.kv.key for e in next(w)] == ["/calyx/a"]
        lease = ds.grant_lease(5)
        assert lease.refresh() >= 1
    finally:
        member.destroy()


def test_tls_with_client_certificate(etcd_tls: EtcdMember) -> None:
    assert etcd_tls.tls is not None
    ds = etcd_tls.client()  # ca, cert and key of the fixture's PKI
    assert ds.endpoints[0].startswith("https://")
    rev = ds.put("/tls/a", "secret")
    with ds.watch_prefix("/tls/", rev) as w:
        assert [(e.kv.key, e.kv.value) for e in next(w)] == [("/tls/a", b"secret")]
    # Same host:port without the scheme: TLS because TLS files are given.
    host_port = etcd_tls.endpoint.removeprefix("https://")
    with Datastore([host_port], ca=etcd_tls.tls.ca, cert=etcd_tls.tls.cert, key=etcd_tls.tls.key) as ds2:
        kv = ds2.get("/tls/a")
        assert kv is not None and kv.value == b"secret"
    # Without a client certificate etcd refuses the handshake.
    with Datastore([etcd_tls.endpoint], ca=etcd_tls.tls.ca, timeout=2.0) as ds3, pytest.raises(DatastoreError):
        ds3.get("/tls/a")
    with pytest.raises(ValueError, match="http://"):
        Datastore([f"http://{host_port}"], ca=etcd_tls.tls.ca)


def test_cluster_failover_after_killing_the_member_in_use(etcd_cluster: EtcdCluster) -> None:
    ds = etcd_cluster.client(timeout=2.0)
    ds.put("/f/a", "1")
    assert len(ds.member_list()) == 3
    victim = next(m for m in etcd_cluster.members if m.endpoint == ds.current_endpoint)
    victim.kill()

    # Reads fail over by themselves; writes are never retried blindly, so the caller retries. If the
    # victim was the leader, a write proposed during the election is dropped by etcd and times out.
    t0 = time.monotonic()
    failures = 0
    for i in range(20):
        while True:
            try:
                ds.put(f"/f/{i}", str(i))
                break
            except Unavailable:
                failures += 1
                assert time.monotonic() - t0 < 10, "no failover within 10 s"
                time.sleep(0.05)
    assert ds.current_endpoint != victim.endpoint
    kvs, _ = ds.get_prefix("/f/")
    assert as_map(kvs) == {"/f/a": b"1", **{f"/f/{i}": str(i).encode() for i in range(20)}}
    assert time.monotonic() - t0 < 8
    print(f"failover: {failures} failed writes, {time.monotonic() - t0:.2f} s")
