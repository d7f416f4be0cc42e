"""Node self-registration's merge rules, written to a real etcd by compare-and-swap.

The host's wishes (an address, an AS, labels) are given as :class:`Wanted` here; detection has its
own tests (test_autodetect.py). Each test uses its own node name on the module's etcd member.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from calyx import model
from calyx.config import Config
from calyx.datastore import keys
from calyx.datastore.client import KV, Datastore
from calyx.kernel.autodetect import Method
from calyx.noderegister import CAS_ATTEMPTS, NodeRegistration, RegistrationError, Wanted, register, start
from tests.fixtures.etcd import EtcdCluster, EtcdMember

pytestmark = pytest.mark.etcd

ADDR = IPv4Interface("10.0.1.11/24")


def want(ipv4: str | None = "10.0.1.11/24", as_number: int | None = None, **labels: str) -> Wanted:
    return Wanted(IPv4Interface(ipv4) if ipv4 else None, ipv4 is not None, as_number, labels)


def stored(ds: Datastore, node: str) -> dict[str, Any] | None:
    kv = ds.get(keys.node_key(node))
    return None if kv is None else json.loads(kv.value)


def put(ds: Datastore, node: str, value: dict[str, Any]) -> None:
    ds.put(keys.node_key(node), json.dumps(value))


def revision(ds: Datastore, node: str) -> int:
    kv = ds.get(keys.node_key(node))
    assert kv is not None
    return kv.mod_revision


def test_create_then_idempotent(etcd: EtcdMember) -> None:
    ds = etcd.client()
    merged = register(ds, "create", want(as_number=65001, rack="r1"))
    assert merged.changed
    value = stored(ds, "create")
    assert value == {"ipv4": "10.0.1.11/24", "as_number": 65001, "labels": {"rack": "r1"},
                     "self_registered": {"as_number": "65001", "ipv4": "10.0.1.11/24", "labels.rack": "r1"}}
    node = model.decode(keys.node_key("create"), json.dumps(value).encode(), strict=True)
    assert isinstance(node, model.Node) and node.ipv4 == ADDR and node.labels == {"rack": "r1"}
    rev = revision(ds, "create")
    again = register(ds, "create", want(as_number=65001, rack="r1"))  # felix after bgpd, or a restart
    assert not again.changed and revision(ds, "create") == rev


def test_nothing_to_register_creates_nothing(etcd: EtcdMember) -> None:
    ds = etcd.client()
    assert not register(ds, "nothing", want(None)).changed
    assert stored(ds, "nothing") is None


def test_the_host_moved_its_address_follows(etcd: EtcdMember) -> None:
    ds = etcd.client()
    register(ds, "moved", want("10.0.1.11/24", rack="r1"))
    merged = register(ds, "moved", want("10.0.2.11/24", rack="r1"))
    assert merged.changes == ["ipv4=10.0.2.11/24 (was 10.0.1.11/24)"]
    value = stored(ds, "moved")
    assert value is not None
    assert value["ipv4"] == "10.0.2.11/24" and value["self_registered"]["ipv4"] == "10.0.2.11/24"
    assert value["labels"] == {"rack": "r1"}


def test_operator_fields_are_never_overwritten(etcd: EtcdMember) -> None:
    """A Node written by an operator (or the lab runner) before the host started: only empty fields are
    filled; what the operator set stays, even where the host would say otherwise."""
    ds = etcd.client()
    operator = {"ipv4": "192.168.9.9/16", "as_number": 65009, "labels": {"rack": "ops"}}
    put(ds, "ops", operator)
    merged = register(ds, "ops", want("10.0.1.11/24", as_number=65001, rack="r1", zone="z1"))
    value = stored(ds, "ops")
    assert value == {"ipv4": "192.168.9.9/16", "as_number": 65009, "labels": {"rack": "ops", "zone": "z1"},
                     "self_registered": {"labels.zone": "z1"}}
    assert merged.changes == ["labels.zone=z1"]
    assert sorted(merged.operator) == [
        "as_number: the operator's 65009 is kept (this host's would be 65001)",
        "ipv4: the operator's 192.168.9.9/16 is kept (this host's would be 10.0.1.11/24)",
        "labels.rack: the operator's ops is kept (this host's would be r1)",
    ]
    # the same values as the operator's: nothing to say, nothing adopted
    put(ds, "ops-same", {"ipv4": "10.0.1.11/24"})
    merged = register(ds, "ops-same", want("10.0.1.11/24"))
    assert not merged.changed and merged.operator == [] and stored(ds, "ops-same") == {"ipv4": "10.0.1.11/24"}
    # an operator's field stays the operator's when the host moves
    assert not register(ds, "ops-same", want("10.0.5.5/24")).changed
    assert stored(ds, "ops-same") == {"ipv4": "10.0.1.11/24"}


def test_a_value_the_operator_changed_after_the_host_wrote_it_becomes_theirs(etcd: EtcdMember) -> None:
    ds = etcd.client()
    register(ds, "taken", want("10.0.1.11/24", as_number=65001, rack="r1"))
    value = stored(ds, "taken")
    assert value is not None
    value["ipv4"] = "10.0.1.99/24"  # etcdctl edit (or calyxctl get -o yaml | edit | apply) keeping the record
    value["labels"]["rack"] = "r7"
    put(ds, "taken", value)
    merged = register(ds, "taken", want("10.0.3.3/24", as_number=65001, rack="r1"))
    after = stored(ds, "taken")
    assert after is not None
    assert after["ipv4"] == "10.0.1.99/24" and after["labels"] == {"rack": "r7"}
    assert after["self_registered"] == {"as_number": "65001"}  # the stale records are dropped
    assert merged.changes == []
    assert len(merged.operator) == 2
    # and it stays theirs: nothing is written at the next start
    assert not register(ds, "taken", want("10.0.3.3/24", as_number=65001, rack="r1")).changed


def test_labels_and_as_no_longer_configured_are_removed_only_if_the_host_added_them(etcd: EtcdMember) -> None:
    ds = etcd.client()
    put(ds, "labels", {"ipv4": "10.0.1.11/24", "labels": {"owner": "ops"}})
    register(ds, "labels", want(as_number=65001, rack="r1", zone="z1"))
    value = stored(ds, "labels")
    assert value is not None and value["labels"] == {"owner": "ops", "rack": "r1", "zone": "z1"}
    merged = register(ds, "labels", want(zone="z1"))  # rack and the AS dropped from the configuration
    assert sorted(merged.changes) == ["as_number removed", "labels.rack removed"]
    value = stored(ds, "labels")
    assert value == {"ipv4": "10.0.1.11/24", "labels": {"owner": "ops", "zone": "z1"},
                     "self_registered": {"labels.zone": "z1"}}
    register(ds, "labels", want())
    assert stored(ds, "labels") == {"ipv4": "10.0.1.11/24", "labels": {"owner": "ops"}}


def test_unknown_fields_and_felix_fields_are_kept(etcd: EtcdMember) -> None:
    ds = etcd.client()
    value = {"ipv4": "10.0.1.11/24", "ipip_tunnel_address": "10.65.0.1", "vxlan_tunnel_address": "10.66.0.1",
             "vxlan_tunnel_mac": "02:00:00:00:00:01", "route_reflector_cluster_id": "1.2.3.4",
             "future_field": {"nested": [1, 2]}, "self_registered": {"ipv6": "fd00::1/64"}}
    put(ds, "unknown", value)
    register(ds, "unknown", want(rack="r1"))
    after = stored(ds, "unknown")
    assert after == {**value, "labels": {"rack": "r1"},
                     "self_registered": {"ipv6": "fd00::1/64", "labels.rack": "r1"}}
    node = model.decode(keys.node_key("unknown"), json.dumps(after).encode())
    assert isinstance(node, model.Node) and node.ipip_tunnel_address is not None


def test_skip_leaves_the_address_and_its_record(etcd: EtcdMember) -> None:
    ds = etcd.client()
    register(ds, "skip", want("10.0.1.11/24"))
    rev = revision(ds, "skip")
    assert not register(ds, "skip", Wanted(None, False)).changed  # skip, or a detection that found nothing
    assert revision(ds, "skip") == rev
    assert stored(ds, "skip") == {"ipv4": "10.0.1.11/24", "self_registered": {"ipv4": "10.0.1.11/24"}}


def test_a_value_that_is_not_an_object_is_left_alone(etcd: EtcdMember) -> None:
    ds = etcd.client()
    ds.put(keys.node_key("garbage"), b"[1, 2]")
    with pytest.raises(RegistrationError, match="does not hold a JSON object"):
        register(ds, "garbage", want())
    put(ds, "badlabels", {"labels": ["x"]})
    with pytest.raises(RegistrationError, match="labels is not an object"):
        register(ds, "badlabels", want(rack="r1"))
    assert ds.get(keys.node_key("garbage")).value == b"[1, 2]"  # type: ignore[union-attr]


class RacingDatastore(Datastore):
    """A real client; after each of its first ``races`` reads of a node key, another writer (``other``)
    changes that key: the window compare-and-swap exists for."""

    def __init__(self, endpoint: str, other: Datastore, change: Callable[[dict[str, Any], int], None],
                 races: int) -> None:
        super().__init__([endpoint])
        self.other = other
        self.change = change
        self.races = races
        self.reads = 0

    def get(self, key: str) -> KV | None:
        kv = super().get(key)
        if key.startswith(keys.NODES_PREFIX):
            self.reads += 1
            if self.races > 0:
                self.races -= 1
                current = self.other.get(key)
                value = json.loads(current.value) if current is not None else {}
                self.change(value, self.reads)
                self.other.put(key, json.dumps(value))
        return kv


def felix_publishes(value: dict[str, Any], n: int) -> None:
    """What felix's tunnel manager writes into the node key meanwhile."""
    value["ipip_tunnel_address"] = f"10.65.0.{n}"


def test_a_concurrent_change_during_compare_and_swap_is_merged_not_lost(etcd: EtcdMember) -> None:
    other = etcd.client()
    put(other, "race", {"ipv4": "10.0.1.11/24"})
    racing = RacingDatastore(etcd.endpoint, other, felix_publishes, races=2)
    try:
        merged = register(racing, "race", want(rack="r1"))
    finally:
        racing.close()
    assert racing.reads == 3  # two writes lost the race, the third read won
    assert merged.changes == ["labels.rack=r1"]
    assert stored(other, "race") == {"ipv4": "10.0.1.11/24", "ipip_tunnel_address": "10.65.0.2",
                                     "labels": {"rack": "r1"}, "self_registered": {"labels.rack": "r1"}}


def test_compare_and_swap_gives_up_after_bounded_attempts(etcd: EtcdMember) -> None:
    other = etcd.client()
    racing = RacingDatastore(etcd.endpoint, other, felix_publishes, races=CAS_ATTEMPTS)
    try:
        with pytest.raises(RegistrationError, match=f"changed under every one of {CAS_ATTEMPTS} compare-and-swap"):
            register(racing, "race-lost", want(rack="r1"))
    finally:
        racing.close()
    assert racing.reads == CAS_ATTEMPTS
    assert stored(other, "race-lost") == {"ipip_tunnel_address": f"10.65.0.{CAS_ATTEMPTS}"}  # the racer's only


def test_felix_and_bgpd_registering_at_once_agree(etcd: EtcdMember) -> None:
    put(etcd.client(), "both", {"vxlan_tunnel_mac": "02:00:00:00:00:01"})
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def daemon() -> None:
        ds = etcd.client()
        try:
            start.wait()
            for _ in range(5):
                register(ds, "both", want(as_number=65001, rack="r1", zone="z1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=daemon) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert stored(etcd.client(), "both") == {
        "vxlan_tunnel_mac": "02:00:00:00:00:01", "ipv4": "10.0.1.11/24", "as_number": 65001,
        "labels": {"rack": "r1", "zone": "z1"},
        "self_registered": {"as_number": "65001", "ipv4": "10.0.1.11/24", "labels.rack": "r1", "labels.zone": "z1"}}


def test_operator_difference_is_logged_once(etcd: EtcdMember, caplog: pytest.LogCaptureFixture) -> None:
    ds = etcd.client()
    put(ds, "note", {"ipv4": "10.0.1.11/24", "as_number": 65009})
    reg = NodeRegistration(ds, "note", method=Method.parse("skip"), as_number=65001, recheck_interval=0)
    with caplog.at_level(logging.INFO, logger="calyx.noderegister"):
        reg.once()
        reg.once()
    notes = [r for r in caplog.records if "operator's 65009 is kept" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "/calyx/v1/nodes/note: as_number: the operator's 65009 is kept (this host's would be 65001)" in (
        notes[0].getMessage())
    assert stored(ds, "note") == {"ipv4": "10.0.1.11/24", "as_number": 65009}


def test_an_unreachable_datastore_is_retried_in_the_background(etcd_fresh: EtcdMember, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The task does not hold its loop: other work goes on while etcd is down; once etcd is back the
    node is registered."""
    etcd_fresh.stop()
    ds = Datastore([etcd_fresh.endpoint], timeout=1.0)
    reg = NodeRegistration(ds, "late", method=Method.parse("skip"), labels={"rack": "r1"}, recheck_interval=0)

    async def scenario() -> int:
        task = asyncio.create_task(reg.run())
        ticks = 0
        for _ in range(30):  # 3 s of a loop that must keep turning
            await asyncio.sleep(0.1)
            ticks += 1
        assert not task.done()
        await asyncio.to_thread(etcd_fresh.start)
        await asyncio.wait_for(task, 60)
        return ticks

    try:
        with caplog.at_level(logging.INFO, logger="calyx.noderegister"):
            assert asyncio.run(scenario()) == 30
    finally:
        ds.close()
    warnings = [r for r in caplog.records if "cannot reach the datastore" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert stored(etcd_fresh.client(), "late") == {"labels": {"rack": "r1"}, "self_registered": {"labels.rack": "r1"}}


def test_start_returns_after_the_first_pass_or_the_wait(etcd_cluster: EtcdCluster) -> None:
    """A daemon awaits start() before its syncer: its own Node is then in the snapshot (no warning that
    it has none). An etcd that hangs (a member that lost its quorum answers nothing until the call's
    timeout) holds it only ``wait`` seconds; registration goes on in the background."""
    cfg = replace(Config(), node_name="first", node_ipv4_autodetection="skip", node_labels=(("rack", "r1"),))
    ds = etcd_cluster.client()

    async def reachable() -> None:
        task = await start(cfg, ds, wait=30)
        assert stored(ds, "first") == {"labels": {"rack": "r1"}, "self_registered": {"labels.rack": "r1"}}
        assert not task.done()  # re-checks later
        task.cancel()

    async def hung() -> float:
        t0 = time.monotonic()
        task = await start(replace(cfg, node_name="second"), lonely, wait=0.5)
        took = time.monotonic() - t0
        assert not task.done()
        task.cancel()
        return took

    asyncio.run(reachable())
    for member in etcd_cluster.members[1:]:
        member.stop()
    lonely = etcd_cluster.members[0].client(timeout=3.0)
    assert 0.5 <= asyncio.run(hung()) < 2.5  # not the 3 s of the first, unanswered read
