"""The syncer against a real etcd: snapshot and in-sync marker, live updates, 10k keys, etcd killed
while writes are in flight, a cluster member lost, compaction during a disconnection (resync emits only
the difference), malformed values, and the asyncio adapter.

Every test compares the consumer's complete key -> value view with what etcd holds, and checks that
no (key, mod_revision) was delivered twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from calyx.datastore.client import Datastore, Put, Unavailable
from calyx.datastore.syncer import AsyncSyncer, Delete, Event, InSync, Syncer, Update
from calyx.model.errors import ModelError
from tests.fixtures.etcd import EtcdCluster, EtcdMember, TcpProxy

pytestmark = pytest.mark.etcd


def decode(key: str, value: bytes) -> object | None:
    """Test decoder: b"bad" is malformed, b"ignore" is not ours, b"crash" is a decoder bug."""
    if value == b"bad":
        raise ModelError(key, "spec.value", "the value is bad")
    if value == b"ignore":
        return None
    if value == b"crash":
        raise KeyError("decoder bug")
    return value.decode()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Consumer:
    """Applies batches to a key -> object view and records everything it was told."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.batches: list[list[Event]] = []
        self.events: list[Event] = []
        self.view: dict[str, object] = {}
        self.delivered: collections.Counter[tuple[str, int]] = collections.Counter()
        self.stray_deletes: list[str] = []
        self.insyncs: list[int] = []

    def __call__(self, batch: list[Event]) -> None:
        with self.cond:
            self.batches.append(batch)
            for ev in batch:
                self.events.append(ev)
                if isinstance(ev, Update):
                    self.view[ev.key] = ev.obj
                    self.delivered[(ev.key, ev.mod_revision)] += 1
                elif isinstance(ev, Delete):
                    if self.view.pop(ev.key, None) is None:
                        self.stray_deletes.append(ev.key)
                else:
                    self.insyncs.append(ev.revision)
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"timed out waiting for {what}"

    def wait_insync(self, n: int = 1, timeout: float = 15.0) -> None:
        self.wait(lambda: len(self.insyncs) >= n, timeout, f"InSync #{n}")

    def duplicates(self) -> list[tuple[str, int]]:
        return [k for k, n in self.delivered.items() if n > 1]


def etcd_view(ds: Datastore, *prefixes: str) -> dict[str, object]:
    """What a consumer should hold: every decodable value under ``prefixes``."""
    out: dict[str, object] = {}
    for p in prefixes:
        for kv in ds.get_prefix(p)[0]:
            if kv.value not in (b"bad", b"ignore", b"crash"):
                out[kv.key] = kv.value.decode()
    return out


def wait_caught_up(syncer: Syncer, ds: Datastore, timeout: float = 15.0) -> None:
    """Wait until the syncer's view has reached etcd's current revision (writes are under its prefix)."""
    target = ds.revision()
    deadline = time.monotonic() + timeout
    while syncer.revision < target:
        assert time.monotonic() < deadline, f"syncer at {syncer.revision}, etcd at {target}"
        time.sleep(0.02)


def in_sync(syncer: Syncer) -> bool:
    """Read the status afresh (a plain ``syncer.in_sync`` in an assert is narrowed by mypy)."""
    return syncer.in_sync


def put_retrying(ds: Datastore, key: str, value: str, deadline: float) -> int:
    while True:
        try:
            return ds.put(key, value)
        except Unavailable:
            assert time.monotonic() < deadline, "etcd did not come back"
            time.sleep(0.05)


def delete_retrying(ds: Datastore, key: str, deadline: float) -> None:
    while True:
        try:
            ds.delete(key)
            return
        except Unavailable:
            assert time.monotonic() < deadline, "etcd did not come back"
            time.sleep(0.05)


# --- basic behaviour -------------------------------------------------------------------------------


def test_snapshot_then_insync_then_live_updates(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    ds.put(p + "a/1", "a1")
    ds.put(p + "b/1", "b1")
    ds.put(p + "c/1", "not watched")
    snap_rev = ds.put(p + "a/2", "a2")

    consumer = Consumer()
    syncer = Syncer(ds, [p + "a/", p + "b/", p + "a/sub/"], decode, consumer, name="basic")
    assert syncer.prefixes == (p + "a/", p + "b/")
    syncer.start()
    try:
        consumer.wait_insync()
        assert consumer.events == [
            Update(p + "a/1", "a1", snap_rev - 3),
            Update(p + "a/2", "a2", snap_rev),
            Update(p + "b/1", "b1", snap_rev - 2),
            InSync(snap_rev),
        ]
        assert syncer.in_sync and syncer.revision == snap_rev

        r1 = ds.put(p + "b/2", "b2")
        ds.put(p + "c/2", "not watched either")
        r2 = ds.commit([Put(p + "a/1", "a1'"), Put(p + "b/1", "b1'")]) and ds.revision()
        ds.delete(p + "a/2")
        r3 = ds.revision()
        consumer.wait(lambda: len(consumer.events) >= 8, what="live events")
        assert consumer.events[4:] == [
            Update(p + "b/2", "b2", r1),
            Update(p + "a/1", "a1'", r2),
            Update(p + "b/1", "b1'", r2),
            Delete(p + "a/2", r3),
        ]
        assert consumer.view == etcd_view(ds, p + "a/", p + "b/")
        wait_caught_up(syncer, ds)
    finally:
        t0 = time.monotonic()
        syncer.stop()
    assert time.monotonic() - t0 < 1.0
    assert not syncer.running and syncer.failure is None
    assert not consumer.duplicates() and not consumer.stray_deletes


def test_bulk_snapshot_of_10k_keys_in_batches(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    keys = [f"{p}wl/{i:05d}" for i in range(10_000)]
    for i in range(0, len(keys), 100):
        assert ds.commit([Put(k, f"endpoint-{k[-5:]}" * 20) for k in keys[i : i + 100]])
    consumer = Consumer()
    syncer = Syncer(ds, [p], decode, consumer, name="bulk")
    t0 = time.monotonic()
    syncer.start()
    try:
        consumer.wait_insync(timeout=30)
        elapsed = time.monotonic() - t0
        assert all(len(b) <= 1000 for b in consumer.batches)
        assert len(consumer.batches) >= 10
        assert consumer.events[-1] == InSync(ds.revision())
        assert sum(isinstance(e, Update) for e in consumer.events) == 10_000
        assert consumer.view == etcd_view(ds, p)
        print(f"10k-key snapshot delivered in {elapsed:.2f} s")
    finally:
        syncer.stop()
    assert not consumer.duplicates()


def test_consumer_exception_stops_the_syncer_and_is_reported(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    ds.put(etcd_prefix + "x", "1")
    exits: list[BaseException | None] = []

    def broken(batch: list[Event]) -> None:
        raise RuntimeError("consumer bug")

    syncer = Syncer(ds, [etcd_prefix], decode, broken, name="broken", on_exit=exits.append)
    syncer.start()
    deadline = time.monotonic() + 10
    while syncer.running:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert isinstance(syncer.failure, RuntimeError)
    assert len(exits) == 1 and exits[0] is syncer.failure
    assert not syncer.in_sync


# --- bad values ------------------------------------------------------------------------------------


def test_malformed_values_are_reported_skipped_and_fail_closed(
    etcd: EtcdMember, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="calyx.datastore.syncer")
    ds = etcd.client()
    p = etcd_prefix
    malformed0 = metric("calyx_datastore_errors_total", kind="malformed")
    crashes0 = metric("calyx_datastore_errors_total", kind="decoder_exception")
    ds.put(p + "a", "good")
    ds.put(p + "b", "bad")
    ds.put(p + "c", "ignore")

    consumer = Consumer()
    syncer = Syncer(ds, [p], decode, consumer, name="malformed")
    syncer.start()
    try:
        consumer.wait_insync()
        assert consumer.view == {p + "a": "good"}
        assert set(syncer.errors) == {p + "b"} and "spec.value" in syncer.errors[p + "b"]
        assert metric("calyx_datastore_errors_total", kind="malformed") == malformed0 + 1
        bad_logs = [r for r in caplog.records if "malformed" in r.getMessage()]
        # the key and the field travel as structured context (extra=): text lines show key=value, JSON fields
        assert len(bad_logs) == 1 and getattr(bad_logs[0], "key", None) == p + "b"
        assert getattr(bad_logs[0], "field", None) == "spec.value"
        mark = len(consumer.events)

        r_a_bad = ds.put(p + "a", "bad")  # valid -> malformed: disappears for the consumer
        r_b_good = ds.put(p + "b", "fixed")  # malformed -> valid: appears, error cleared
        ds.delete(p + "a")  # malformed and deleted: nothing to tell, error cleared
        ds.put(p + "e", "crash")  # decoder bug: counted, skipped
        r_d = ds.put(p + "d", "good")  # the syncer goes on
        consumer.wait(lambda: any(getattr(e, "key", "") == p + "d" for e in consumer.events))
        assert consumer.events[mark:] == [
            Delete(p + "a", r_a_bad),
            Update(p + "b", "fixed", r_b_good),
            Update(p + "d", "good", r_d),
        ]
        assert consumer.view == etcd_view(ds, p) == {p + "b": "fixed", p + "d": "good"}
        assert set(syncer.errors) == {p + "e"}
        assert metric("calyx_datastore_errors_total", kind="malformed") == malformed0 + 2
        assert metric("calyx_datastore_errors_total", kind="decoder_exception") == crashes0 + 1
        assert syncer.running and syncer.in_sync
    finally:
        syncer.stop()
    assert not consumer.duplicates() and not consumer.stray_deletes


# --- outages ---------------------------------------------------------------------------------------


def test_survives_etcd_sigkill_with_writes_in_flight(
    etcd_fresh: EtcdMember, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="calyx.datastore.syncer")
    etcd_fresh.kill()  # the daemon starts before etcd does
    ds = etcd_fresh.client(timeout=2.0)
    writer_ds = etcd_fresh.client(timeout=2.0)
    consumer = Consumer()
    syncer = Syncer(ds, ["/k/"], decode, consumer, name="kill", backoff_max=0.5)
    syncer.start()
    try:
        time.sleep(0.8)
        assert not consumer.batches and syncer.revision == 0
        assert not in_sync(syncer)
        etcd_fresh.start()
        consumer.wait_insync()
        assert consumer.events == [InSync(consumer.insyncs[0])]

        rng = random.Random(7)
        done = threading.Event()
        progress = [0]
        deadline = time.monotonic() + 30

        def writer() -> None:
            for i in range(300):
                key = f"/k/{rng.randrange(40)}"
                if rng.random() < 0.2:
                    delete_retrying(writer_ds, key, deadline)
                else:
                    put_retrying(writer_ds, key, f"v{i}", deadline)
                progress[0] = i
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        while progress[0] < 100:
            time.sleep(0.005)
        etcd_fresh.kill()  # SIGKILL while the writer keeps writing (and retrying)
        time.sleep(0.3)
        etcd_fresh.start()
        t.join(30)
        assert done.is_set()
        wait_caught_up(syncer, writer_ds)
        assert consumer.view == etcd_view(writer_ds, "/k/")
        assert syncer.errors == {}
        assert in_sync(syncer)
    finally:
        syncer.stop()
    assert not consumer.duplicates() and not consumer.stray_deletes
    assert len(consumer.insyncs) == 1  # resumed, not resynced
    outages = [r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
    assert len(outages) == 2  # one per outage (before the first start, and the kill), not per retry
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 2


def test_cluster_member_loss_is_invisible_to_the_consumer(etcd_cluster: EtcdCluster) -> None:
    ds = etcd_cluster.client(timeout=2.0)
    writer_ds = etcd_cluster.client(timeout=2.0)
    consumer = Consumer()
    syncer = Syncer(ds, ["/m/"], decode, consumer, name="cluster", backoff_max=0.5)
    syncer.start()
    try:
        consumer.wait_insync()
        deadline = time.monotonic() + 30
        for i in range(50):
            put_retrying(writer_ds, f"/m/{i % 30}", f"a{i}", deadline)
        victim = next(m for m in etcd_cluster.members if m.endpoint == ds.current_endpoint)
        victim.kill()
        for i in range(100):
            if i % 7 == 0:
                delete_retrying(writer_ds, f"/m/{i % 30}", deadline)
            else:
                put_retrying(writer_ds, f"/m/{i % 30}", f"b{i}", deadline)
        wait_caught_up(syncer, writer_ds)
        assert consumer.view == etcd_view(writer_ds, "/m/")
        assert ds.current_endpoint != victim.endpoint
    finally:
        syncer.stop()
    assert not consumer.duplicates() and not consumer.stray_deletes
    assert len(consumer.insyncs) == 1


def test_compaction_while_disconnected_resyncs_only_the_difference(etcd_fresh: EtcdMember) -> None:
    direct = etcd_fresh.client()
    for i in range(10):
        direct.put(f"/c/k{i}", f"v{i}")
    with TcpProxy(etcd_fresh.client_port) as proxy:
        ds = Datastore([proxy.endpoint], timeout=2.0)
        consumer = Consumer()
        syncer = Syncer(ds, ["/c/"], decode, consumer, name="compact", backoff_max=0.3)
        resyncs0 = metric("calyx_datastore_resyncs_total")
        syncer.start()
        try:
            consumer.wait_insync()
            mark = len(consumer.events)
            proxy.block()
            deadline = time.monotonic() + 10
            while syncer.in_sync:
                assert time.monotonic() < deadline, "the syncer did not notice the disconnection"
                time.sleep(0.02)

            # Changes the syncer cannot see, then the history it would need is compacted away.
            direct.put("/c/k1", "v1-changed")
            direct.delete("/c/k2")
            direct.put("/c/k10", "new")
            direct.put("/c/k3", "v3")  # same value, new revision: delivered again as an update
            direct.put("/c/k4", "bad")  # now malformed: gone from the consumer's view
            direct.put("/c/k11", "short-lived")
            direct.delete("/c/k11")  # created and deleted in the gap: nothing to tell
            direct.put("/c/k5", "v5-changed")
            direct.put("/c/k5", "v5")  # changed and changed back: new revision, one update
            compact_at = direct.put("/c/k12", "new too")
            direct.compact(compact_at)
            proxy.unblock()

            consumer.wait_insync(2)
            after = consumer.events[mark:]
            r2 = consumer.insyncs[1]
            assert r2 >= compact_at
            assert after[-1] == InSync(r2)
            got = {(type(e).__name__, e.key, getattr(e, "obj", None)) for e in after[:-1]}  # type: ignore[union-attr]
            assert got == {
                ("Update", "/c/k1", "v1-changed"),
                ("Delete", "/c/k2", None),
                ("Update", "/c/k10", "new"),
                ("Update", "/c/k3", "v3"),
                ("Delete", "/c/k4", None),
                ("Update", "/c/k5", "v5"),
                ("Update", "/c/k12", "new too"),
            }
            assert len(after) == 8
            assert metric("calyx_datastore_resyncs_total") == resyncs0 + 1
            assert consumer.view == etcd_view(direct, "/c/")
            assert set(syncer.errors) == {"/c/k4"}

            # And it watches on from the new snapshot.
            r = direct.put("/c/k0", "after")
            consumer.wait(lambda: consumer.events[-1] == Update("/c/k0", "after", r), what="live update")
        finally:
            syncer.stop()
            ds.close()
    assert not consumer.duplicates() and not consumer.stray_deletes


# --- asyncio ---------------------------------------------------------------------------------------


def test_async_syncer_feeds_the_event_loop(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    p = etcd_prefix
    rev = ds.put(p + "a", "1")

    async def main() -> list[list[Event]]:
        syncer = AsyncSyncer(ds, [p], decode, name="async")
        syncer.start()
        got: list[list[Event]] = []
        async for batch in syncer:
            got.append(batch)
            if isinstance(batch[-1], InSync):
                assert syncer.in_sync
                put_revs.append(await asyncio.to_thread(ds.put, p + "b", "2"))
            elif any(isinstance(e, Update) and e.key == p + "b" for e in batch):
                await syncer.stop()  # the iteration then ends
        return got

    put_revs: list[int] = []
    batches = asyncio.run(asyncio.wait_for(main(), 30))
    events = [e for b in batches for e in b]
    # the snapshot revision is whatever etcd's was when the syncer read (other tests share this etcd)
    assert isinstance(events[1], InSync) and events[1].revision >= rev
    assert events == [Update(p + "a", "1", rev), events[1], Update(p + "b", "2", put_revs[0])]
