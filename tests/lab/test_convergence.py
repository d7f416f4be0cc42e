"""The convergence probe's arithmetic and parsing (the lab tests and the benchmark rely on it)."""

from __future__ import annotations

import pytest

from calyx.lab.convergence import _PING, _TS, Sample, _endpoint_up, percentile, summary

pytestmark = pytest.mark.unit


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([7.0], 99) == 7.0


def _sample(reachable: float | None, new_block: bool = False, tor: float | None = None) -> Sample:
    return Sample("w", "10.0.0.1", new_block, 100.0, 0.0, 0.01, None, tor, None, reachable)


def test_summary_counts_only_observed_stages() -> None:
    s = summary([_sample(0.1), _sample(0.3), _sample(None), _sample(0.2, True, 0.15)])
    assert s["reachable"]["n"] == 3 and s["reachable"]["median"] == pytest.approx(0.2)
    assert s["tor_learned"] == {"n": 1, "median": 0.15, "p99": 0.15, "max": 0.15}
    assert "announced" not in s


def test_monitor_and_ping_lines_parse() -> None:
    m = _TS.match("[2026-11-22T06:14:45.577425] 10.65.5.128 dev cali0123456789a proto 78 scope link")
    assert m is not None and m.group(3) == "10.65.5.128" and not m.group(2)
    d = _TS.match("[2026-11-22T06:14:45.582477] Deleted 10.9.0.0/24 dev lo scope link")
    assert d is not None and d.group(2)
    p = _PING.match("[1795328310.176543] 64 bytes from 10.65.5.130: icmp_seq=3 ttl=63 time=0.1 ms")
    assert p is not None and float(p.group(1)) == pytest.approx(1795328310.176543)
    assert _PING.match("From 10.0.1.1 icmp_seq=1 Destination Host Unreachable") is None


def test_endpoint_status_up() -> None:
    assert _endpoint_up(b'{"state": "up"}')
    assert not _endpoint_up(b'{"state": "down"}')
    assert not _endpoint_up(b"not json")
