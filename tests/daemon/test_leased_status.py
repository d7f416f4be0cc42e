"""LeasedStatus against a real etcd: keys live on a lease, come back after the lease is lost, vanish on stop."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from calyx.daemon import LeasedStatus
from tests.fixtures.etcd import EtcdMember

pytestmark = pytest.mark.etcd


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_status_keys_follow_the_lease(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    status = LeasedStatus(etcd.client(), ttl=3)
    k1, k2 = etcd_prefix + "felix", etcd_prefix + "bgp/10.0.0.1"
    status.start()
    try:
        status.set(k1, b"one")
        status.set(k2, b"two")
        wait_for(lambda: (kv := ds.get(k2)) is not None and kv.value == b"two")
        kv1 = ds.get(k1)
        assert kv1 is not None and kv1.lease != 0
        # coalesced updates: the last value wins
        for i in range(20):
            status.set(k1, f"v{i}".encode())
        wait_for(lambda: (kv := ds.get(k1)) is not None and kv.value == b"v19")
        # a deleted status key goes away
        status.delete(k2)
        wait_for(lambda: ds.get(k2) is None)
        # the lease is lost behind our back (as after a long etcd outage): keys are rewritten on a new lease
        old = ds.get(k1)
        assert old is not None
        ds._revoke_lease(old.lease)
        assert ds.get(k1) is None
        wait_for(lambda: (kv := ds.get(k1)) is not None and kv.lease != old.lease, timeout=10)
        # refreshing keeps keys alive past the TTL
        time.sleep(4)
        assert ds.get(k1) is not None
    finally:
        status.stop(revoke=False)
    # not refreshed any more: the key expires with its lease (ttl 3 s)
    wait_for(lambda: ds.get(k1) is None, timeout=10)


def test_clean_stop_revokes(etcd: EtcdMember, etcd_prefix: str) -> None:
    ds = etcd.client()
    status = LeasedStatus(etcd.client(), ttl=30)
    status.start()
    status.set(etcd_prefix + "felix", b"x")
    wait_for(lambda: ds.get(etcd_prefix + "felix") is not None)
    status.stop()
    assert ds.get(etcd_prefix + "felix") is None
