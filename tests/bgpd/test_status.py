"""Status keys and metrics: one leased key per peer, removed with the peer; gauges by state."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from bgpd.status import StatusReporter
from calyx.datastore import keys
from calyx.model import BGPPeerStatus

pytestmark = pytest.mark.unit


class FakeLeased:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.sets = 0

    def set(self, key: str, value: bytes) -> None:
        self.values[key] = value
        self.sets += 1

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def test_publish_writes_changes_only_and_deletes_gone_peers() -> None:
    leased = FakeLeased()
    rep = StatusReporter(leased, "h1")  # type: ignore[arg-type]
    a = BGPPeerStatus(node="h1", peer_ip="10.0.0.1", state="established", prefixes_received=5, prefixes_sent=2,
                      peer_type="global", peer_as=65000)
    b = BGPPeerStatus(node="h1", peer_ip="10.0.0.2", state="connect", last_error="notification 6/2")
    rep.publish([a, b])
    assert set(leased.values) == {keys.bgp_status_key("h1", "10.0.0.1"), keys.bgp_status_key("h1", "10.0.0.2")}
    assert json.loads(leased.values[keys.bgp_status_key("h1", "10.0.0.1")])["prefixes_received"] == 5
    assert REGISTRY.get_sample_value("calyx_bgpd_sessions", {"state": "established"}) == 1
    assert REGISTRY.get_sample_value("calyx_bgpd_prefixes", {"direction": "received"}) == 5
    rep.publish([a, b])
    assert leased.sets == 2  # unchanged: not rewritten
    rep.publish([a])
    assert set(leased.values) == {keys.bgp_status_key("h1", "10.0.0.1")}
    assert REGISTRY.get_sample_value("calyx_bgpd_sessions", {"state": "connect"}) == 0
