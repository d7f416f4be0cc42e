"""LeasedStatus's failure logging: a short outage is INFO, one that puts the keys at risk is a WARNING."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from calyx.daemon import LeasedStatus
from calyx.datastore.client import DatastoreError

pytestmark = pytest.mark.unit


class FakeLease:
    def __init__(self, ds: FakeDs, lease_id: int) -> None:
        self.ds = ds
        self.id = lease_id

    def refresh(self) -> None:
        self.ds.check()

    def revoke(self) -> None:
        pass


class FakeDs:
    """Just what LeasedStatus calls; ``down_until`` makes every call fail until that monotonic time."""

    def __init__(self) -> None:
        self.down_until = 0.0
        self.puts: list[tuple[str, bytes, int]] = []
        self.leases = 0
        self.lock = threading.Lock()

    def check(self) -> None:
        if time.monotonic() < self.down_until:
            raise DatastoreError("UNKNOWN: context deadline exceeded")

    def grant_lease(self, ttl: int) -> FakeLease:
        self.check()
        with self.lock:
            self.leases += 1
            return FakeLease(self, self.leases)

    def put(self, key: str, value: bytes, lease: int = 0) -> Any:
        self.check()
        with self.lock:
            self.puts.append((key, value, lease))

    def delete(self, key: str) -> Any:
        self.check()


def _wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _run_outage(caplog: pytest.LogCaptureFixture, ttl: int, outage: float) -> list[logging.LogRecord]:
    ds = FakeDs()
    status = LeasedStatus(ds, ttl=ttl)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="calyx.daemon")
    status.start()
    try:
        status.set("/k", b"1")
        _wait(lambda: len(ds.puts) == 1)
        ds.down_until = time.monotonic() + outage
        status.set("/k", b"2")  # the next write fails for the length of the outage
        _wait(lambda: any(v == b"2" for _, v, _ in ds.puts), timeout=outage + 5)
        assert ds.puts[-1][2] == ds.leases > 1  # rewritten on a new lease after the failure
    finally:
        status.stop(revoke=False)
    return [r for r in caplog.records if r.name == "calyx.daemon"]


def test_a_short_failure_is_info(caplog: pytest.LogCaptureFixture) -> None:
    records = _run_outage(caplog, ttl=30, outage=0.3)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO], [r.getMessage() for r in records]
    assert "failed" in records[0].getMessage() and "recovered" in records[1].getMessage()


def test_a_failure_that_lasts_half_the_ttl_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    records = _run_outage(caplog, ttl=4, outage=3.5)
    levels = [r.levelno for r in records]
    assert levels.count(logging.WARNING) == 1, [r.getMessage() for r in records]
    warning = next(r for r in records if r.levelno == logging.WARNING).getMessage()
    assert "may expire" in warning and "TTL 4 s" in warning
    assert "recovered after" in records[-1].getMessage()
