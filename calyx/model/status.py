"""Status reported by the daemons under ``/calyx/v1/status/<node>/``, always on a lease.

A status key disappears by itself when its daemon stops refreshing the lease, so ``calyxctl node
status`` never shows a dead daemon as healthy. Timestamps are ISO 8601 UTC strings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from calyx.model.validate import Reader

BGP_STATES = ("idle", "connect", "active", "opensent", "openconfirm", "established", "down", "up")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class FelixStatus:
    """``/calyx/v1/status/<node>/felix``."""

    node: str
    in_sync: bool = False
    last_apply: str | None = None
    endpoints: int = 0
    errors: tuple[str, ...] = ()
    ip_forwarding: bool | None = None
    version: str | None = None

    @property
    def name(self) -> str:
        return self.node

    @classmethod
    def from_dict(cls, data: object, *, key: str, node: str, strict: bool = False) -> FelixStatus:
        r = Reader(data, key=key, strict=strict)
        errors_raw = r.raw("errors")
        errors: tuple[str, ...]
        if isinstance(errors_raw, int) and not isinstance(errors_raw, bool):
            errors = tuple(f"{errors_raw} error(s)" for _ in range(1 if errors_raw else 0))
        else:
            errors = r.str_list("errors")
        ipf = r.raw("ip_forwarding")
        if ipf is not None and not isinstance(ipf, bool):
            r.fail("ip_forwarding", "expected true, false or null")
        obj = cls(
            node=node,
            in_sync=r.bool_("in_sync", False),
            last_apply=r.str_("last_apply"),
            endpoints=r.int_("endpoints", 0, lo=0) or 0,
            errors=errors,
            ip_forwarding=ipf,
            version=r.str_("version"),
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_sync": self.in_sync,
            "last_apply": self.last_apply,
            "endpoints": self.endpoints,
            "errors": list(self.errors),
            "ip_forwarding": self.ip_forwarding,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class BGPPeerStatus:
    """``/calyx/v1/status/<node>/bgp/<peer ip>``: one BGP session as bgpd sees it.

    ``peer_type`` says why the session exists (``node-to-node mesh``, ``global``, ``node specific``,
    ``route reflector client``...), as ``calicoctl node status`` shows it.
    """

    node: str
    peer_ip: str
    state: str = "idle"
    since: str | None = None
    prefixes_received: int = 0
    prefixes_sent: int = 0
    last_error: str | None = None
    peer_type: str | None = None
    peer_as: int | None = None

    @property
    def name(self) -> str:
        return f"{self.node}/{self.peer_ip}"

    @classmethod
    def from_dict(cls, data: object, *, key: str, node: str, peer_ip: str, strict: bool = False) -> BGPPeerStatus:
        r = Reader(data, key=key, strict=strict)
        obj = cls(
            node=node,
            peer_ip=peer_ip,
            state=r.choice("state", BGP_STATES, "idle"),
            since=r.str_("since"),
            prefixes_received=r.int_("prefixes_received", 0, lo=0) or 0,
            prefixes_sent=r.int_("prefixes_sent", 0, lo=0) or 0,
            last_error=r.str_("last_error"),
            peer_type=r.str_("peer_type"),
            peer_as=r.as_number("peer_as"),
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "prefixes_received": self.prefixes_received,
            "prefixes_sent": self.prefixes_sent,
            "last_error": self.last_error,
            "peer_type": self.peer_type,
            "peer_as": self.peer_as,
        }


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """``/calyx/v1/status/<node>/endpoints/<orchestrator>/<workload>/<endpoint>`` (extension).

    Written by felix once an endpoint's route and policy are programmed; the CNI plugin's optional
    readiness gate waits for ``state == "up"``.
    """

    node: str
    orchestrator: str
    workload: str
    endpoint: str
    state: str = "down"
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.node}/{self.orchestrator}/{self.workload}/{self.endpoint}"

    @classmethod
    def from_dict(
        cls, data: object, *, key: str, node: str, orchestrator: str, workload: str, endpoint: str,
        strict: bool = False,
    ) -> EndpointStatus:
        r = Reader(data, key=key, strict=strict)
        obj = cls(node=node, orchestrator=orchestrator, workload=workload, endpoint=endpoint,
                  state=r.choice("state", ("up", "down", "error"), "down"), error=r.str_("error"))
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error}
