"""felix's reporting: the leased status keys in etcd and the Prometheus metrics.

What it owns:

* ``/calyx/v1/status/<node>/felix`` (:class:`~calyx.model.FelixStatus`): in sync, time of the last
  apply that did work, number of local endpoints, errors (malformed datastore keys, failed applies,
  IP forwarding off) and whether IP forwarding is on. Written on a lease (``calyx.daemon.LeasedStatus``),
  so it disappears when felix stops refreshing it.
* ``/calyx/v1/status/<node>/endpoints/<orchestrator>/<workload>/<endpoint>``
  (:class:`~calyx.model.EndpointStatus`, when ``endpoint_status`` is on): ``up`` once the endpoint's
  route and chains are programmed, ``down`` while its interface is missing.
* The metrics below (names are a contract for dashboards).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from calyx.daemon import LeasedStatus
from calyx.datastore import keys
from calyx.model import EndpointStatus, FelixStatus, encode


def _metric(cls: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    try:
        return cls(name, doc, labels, **kw)
    except ValueError:  # registered already (module imported twice in one process)
        return REGISTRY._names_to_collectors[name]


APPLY_SECONDS = _metric(Histogram, "calyx_felix_apply_duration_seconds", "Time of one dataplane apply",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RESTORE_CALLS = _metric(Counter, "calyx_felix_iptables_restore_calls_total", "iptables-restore runs", ("table",))
RESTORE_FAILURES = _metric(Counter, "calyx_felix_iptables_restore_failures_total", "Failed iptables-restore runs",
                           ("table",))
ENDPOINTS = _metric(Gauge, "calyx_felix_endpoints", "Local workload endpoints")
RESYNCS = _metric(Counter, "calyx_felix_resyncs_total", "Periodic dataplane resyncs", ("what",))
APPLY_FAILURES = _metric(Counter, "calyx_felix_apply_failures_total", "Applies that left work to retry", ("what",))
MALFORMED = _metric(Gauge, "calyx_felix_datastore_malformed_keys", "Datastore keys currently skipped as malformed")
DATASTORE_ERRORS = _metric(Gauge, "calyx_felix_datastore_errors", "Datastore values skipped, by kind", ("kind",))
IN_SYNC = _metric(Gauge, "calyx_felix_in_sync", "1 when the dataplane matches the datastore")
IP_FORWARDING = _metric(Gauge, "calyx_felix_ip_forwarding", "1 when IPv4 forwarding is on")


class StatusReporter:
    """Turns felix's state into leased status keys (coalesced; written by the lease thread)."""

    def __init__(self, leased: LeasedStatus | None, node: str, *, endpoint_status: bool, version: str) -> None:
        self.leased = leased
        self.node = node
        self.endpoint_status = endpoint_status
        self.version = version
        self._endpoints: dict[str, str] = {}

    def felix(self, *, in_sync: bool, last_apply: str | None, endpoints: int, errors: list[str],
              ip_forwarding: bool | None) -> FelixStatus:
        status = FelixStatus(node=self.node, in_sync=in_sync, last_apply=last_apply, endpoints=endpoints,
                             errors=tuple(errors), ip_forwarding=ip_forwarding, version=self.version)
        IN_SYNC.set(1 if in_sync else 0)
        ENDPOINTS.set(endpoints)
        if ip_forwarding is not None:
            IP_FORWARDING.set(1 if ip_forwarding else 0)
        if self.leased is not None:
            self.leased.set(keys.felix_status_key(self.node), encode(status))
        return status

    def endpoints(self, states: dict[str, str]) -> None:
        """``states``: workload key → ``up``/``down``; keys absent are deleted."""
        if not self.endpoint_status or self.leased is None:
            return
        for key in self._endpoints.keys() - states.keys():
            skey = _status_key(key)
            if skey is not None:
                self.leased.delete(skey)
        for key, state in states.items():
            if self._endpoints.get(key) == state:
                continue
            info = keys.parse_key(key)
            if info is None:
                continue
            obj = EndpointStatus(node=info.node, orchestrator=info.orchestrator, workload=info.workload,
                                 endpoint=info.endpoint, state=state,
                                 error=None if state == "up" else "interface not present yet")
            self.leased.set(keys.endpoint_status_key(info.node, info.orchestrator, info.workload, info.endpoint),
                            encode(obj))
        self._endpoints = dict(states)


def _status_key(key: str) -> str | None:
    info = keys.parse_key(key)
    if info is None:
        return None
    return keys.endpoint_status_key(info.node, info.orchestrator, info.workload, info.endpoint)
