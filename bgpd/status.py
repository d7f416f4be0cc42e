"""bgpd's reporting: leased BGP peer status keys in etcd, and Prometheus metrics.

What it owns:

* ``/calyx/v1/status/<node>/bgp/<peer ip>`` (:class:`~calyx.model.BGPPeerStatus`): session state
  (``established`` when up), since when, prefixes received and sent, the last error, why the
  peering exists and the peer's AS. Written on a lease (``calyx.daemon.LeasedStatus``), so the keys
  vanish when bgpd stops refreshing them; ``calyxctl node status`` shows them. Keys of peers that are
  no longer configured are deleted.
* The metrics below (names are a contract for dashboards).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from calyx.daemon import LeasedStatus
from calyx.datastore import keys
from calyx.model import BGPPeerStatus, encode


def _metric(cls: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    try:
        return cls(name, doc, labels, **kw)
    except ValueError:  # registered already (module imported twice in one process)
        return REGISTRY._names_to_collectors[name]


SESSIONS = _metric(Gauge, "calyx_bgpd_sessions", "BGP sessions by state", ("state",))
PREFIXES = _metric(Gauge, "calyx_bgpd_prefixes", "Prefixes received, sent and installed", ("direction",))
FIB_APPLY_SECONDS = _metric(Histogram, "calyx_bgpd_fib_apply_duration_seconds", "Time of one FIB apply",
                            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EXABGP_RESTARTS = _metric(Counter, "calyx_bgpd_exabgp_restarts_total", "Times ExaBGP died and was restarted")
GARBAGE_LINES = _metric(Counter, "calyx_bgpd_api_garbage_lines_total", "Lines from ExaBGP that could not be parsed")
REJECTED_PATHS = _metric(Counter, "calyx_bgpd_rejected_paths_total", "Received paths dropped by loop checks or limits")

STATES = ("established", "connect", "idle", "down")


class StatusReporter:
    """Turns the sessions into leased status keys (coalesced; written by the lease thread)."""

    def __init__(self, leased: LeasedStatus | None, node: str) -> None:
        self.leased = leased
        self.node = node
        self._written: dict[str, bytes] = {}

    def publish(self, statuses: Iterable[BGPPeerStatus]) -> None:
        want: dict[str, bytes] = {}
        counts = dict.fromkeys(STATES, 0)
        received = sent = 0
        for st in statuses:
            want[keys.bgp_status_key(self.node, st.peer_ip)] = encode(st)
            counts[st.state if st.state in counts else "idle"] += 1
            received += st.prefixes_received
            sent += st.prefixes_sent
        for state, n in counts.items():
            SESSIONS.labels(state).set(n)
        PREFIXES.labels("received").set(received)
        PREFIXES.labels("sent").set(sent)
        if self.leased is None:
            self._written = want
            return
        for key, value in want.items():
            if self._written.get(key) != value:
                self.leased.set(key, value)
        for key in self._written.keys() - want.keys():
            self.leased.delete(key)
        self._written = want

    @property
    def written(self) -> dict[str, bytes]:
        return dict(self._written)
