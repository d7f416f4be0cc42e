"""The route table driver both daemons use: desired routes in, minimal netlink writes out.

What it owns: every route in one kernel table (``table``, main by default) of one network namespace
whose protocol number is ``proto``: felix uses 78 (``calyx-felix``: workload /32s to a veth by
interface name, scope link, and blackholes for this host's IPAM blocks), bgpd uses 79
(``calyx-bgpd``: every route learned from BGP). It finds its routes by that number only; a route
with any other protocol (connected ``kernel`` routes, ``static``, ``boot``, BIRD's, the other
daemon's) is never written, replaced or deleted. The ownership matrix is in docs/kernel.md.

How it works (the shape of Calico's felix route table and its DeltaTracker):

* **Desired** routes are set with :meth:`RouteTable.set_routes` (full replace), :meth:`set_route`
  and :meth:`remove_route`. These are cheap and do no I/O: they only mark destinations dirty.
* **Believed actual** is what the kernel held with our protocol at the last readback, plus every
  write acknowledged since. The first :meth:`apply` and the first after :meth:`resync` dump the
  kernel (filtered by protocol in the kernel); other applies trust the belief.
* :meth:`apply` diffs the dirty destinations, writes the minimum in batched netlink messages and
  sweeps our routes that are no longer desired. A failing route stays dirty (retried on the next
  apply) while the others proceed; one bad route never fails the batch.

Kernel quirks handled (details in docs/kernel.md):

* Routes name interfaces, the kernel wants indexes: names are resolved at apply time. A route
  whose interface does not exist yet, or is down, is **pending**, not an error; it is retried on
  the next apply and when :meth:`on_link_up` reports the interface. An interface recreated with a
  new index (the kernel deleted our routes with the old one) is noticed when the link map is
  read, or told by :meth:`on_link_up`; its routes are rewritten.
* The kernel's route key is (table, destination, metric): a different metric is a second route.
  Every route gets an explicit metric (``metric_default`` unless it names one). Changing a metric
  adds the new route first and deletes the old one only once the new one is in.
* A new destination is created with ``NLM_F_EXCL``, never ``NLM_F_REPLACE``: a replace would
  silently overwrite another owner's route (e.g. a connected route) holding the same key.
  ``EEXIST`` triggers one readback; if the route is still not ours it is reported as a conflict.
  Only a route we believe is ours is replaced in place.
* Readback equality ignores what the kernel fills in: the interface of a gateway route given
  without one, ``lo`` on IPv6 blackholes, IPv6 scope, nexthop order of multipath routes (ECMP
  order is irrelevant), and status flags (linkdown, offload) on nexthops.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from calyx.kernel import rtnl
from calyx.kernel.rtnl import Ack, AckCode, Link, Op, RouteMsg, RouteRequest

__all__ = [
    "DEFAULT_METRIC",
    "PROTO_BGPD",
    "PROTO_FELIX",
    "ApplyResult",
    "IPAddress",
    "IPNetwork",
    "Kernel",
    "NextHop",
    "Route",
    "RouteTable",
    "RouteType",
    "Scope",
]

log = logging.getLogger(__name__)

PROTO_FELIX = 78  # etc/iproute2/rt_protos.d/calyx.conf
PROTO_BGPD = 79
DEFAULT_METRIC = 1024

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address
Key = tuple[bytes, int]  # (packed network address, prefix length): 4 bytes for IPv4, 16 for IPv6


class RouteType(enum.Enum):
    UNICAST = rtnl.RTN_UNICAST
    BLACKHOLE = rtnl.RTN_BLACKHOLE
    UNREACHABLE = rtnl.RTN_UNREACHABLE
    PROHIBIT = rtnl.RTN_PROHIBIT


class Scope(enum.IntEnum):
    UNIVERSE = rtnl.RT_SCOPE_UNIVERSE
    LINK = rtnl.RT_SCOPE_LINK
    HOST = rtnl.RT_SCOPE_HOST


@dataclass(frozen=True, slots=True)
class NextHop:
    """One path of an ECMP route: a gateway, an interface name, or both (``onlink`` needs both)."""

    gateway: IPAddress | None = None
    oif: str | None = None
    onlink: bool = False

    def __post_init__(self) -> None:
        if self.gateway is None and self.oif is None:
            raise ValueError("a nexthop needs a gateway or an interface")
        if self.onlink and (self.gateway is None or self.oif is None):
            raise ValueError("an onlink nexthop needs both a gateway and an interface")

    def _order(self) -> tuple[bytes, str, bool]:
        return (self.gateway.packed if self.gateway is not None else b"", self.oif or "", self.onlink)


@dataclass(frozen=True, slots=True)
class Route:
    """A route as the daemons want it. Interfaces are names; None fields take the table's defaults.

    ``nexthops`` (two or more for ECMP) excludes ``gateway``/``oif``/``onlink``; it is kept sorted, so
    two routes that differ only in nexthop order are equal. ``scope`` None means link scope for a
    unicast route without gateway (``dev X``), universe otherwise.
    """

    dst: IPNetwork
    type: RouteType = RouteType.UNICAST
    oif: str | None = None
    gateway: IPAddress | None = None
    nexthops: tuple[NextHop, ...] = ()
    onlink: bool = False
    metric: int | None = None
    proto: int | None = None
    table: int | None = None
    scope: Scope | None = None
    _key: Key = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.dst, IPv4Network | IPv6Network):
            raise TypeError(f"dst must be an IPv4Network or IPv6Network, not {type(self.dst).__name__}")
        version = self.dst.version
        if self.type is not RouteType.UNICAST:
            if self.oif is not None or self.gateway is not None or self.nexthops or self.onlink:
                raise ValueError(f"{self.dst}: a {self.type.name.lower()} route has no interface or gateway")
        elif not (self.oif or self.gateway or self.nexthops):
            raise ValueError(f"{self.dst}: a unicast route needs an interface, a gateway or nexthops")
        if self.nexthops and (self.oif is not None or self.gateway is not None or self.onlink):
            raise ValueError(f"{self.dst}: give either nexthops or gateway/oif/onlink, not both")
        if self.onlink and (self.gateway is None or self.oif is None):
            raise ValueError(f"{self.dst}: onlink needs both a gateway and an interface")
        gateways = [self.gateway] + [nh.gateway for nh in self.nexthops]
        for gw in gateways:
            if gw is not None and gw.version != version:
                raise ValueError(f"{self.dst}: gateway {gw} is not IPv{version}")
        if self.metric is not None and not 0 <= self.metric <= 0xFFFFFFFF:
            raise ValueError(f"{self.dst}: metric {self.metric} out of range")
        if self.table is not None and not 1 <= self.table <= 0xFFFFFFFF:
            raise ValueError(f"{self.dst}: table {self.table} out of range")
        if self.proto is not None and not 0 < self.proto < 256:
            raise ValueError(f"{self.dst}: protocol {self.proto} out of range")
        if len(self.nexthops) > 1:
            ordered = tuple(sorted(self.nexthops, key=NextHop._order))
            if ordered != self.nexthops:
                object.__setattr__(self, "nexthops", ordered)
        object.__setattr__(self, "_key", (self.dst.network_address.packed, self.dst.prefixlen))

    @property
    def ifnames(self) -> frozenset[str]:
        """The interfaces this route needs."""
        names = {nh.oif for nh in self.nexthops if nh.oif}
        if self.oif:
            names.add(self.oif)
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one :meth:`RouteTable.apply` did."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    failed: int = 0
    pending: int = 0
    writes: int = 0  # netlink messages sent (0: the kernel was left alone)
    readback: bool = False  # whether the kernel was dumped
    duration: float = 0.0
    errors: Mapping[IPNetwork, str] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.failed or self.writes)


class Kernel(Protocol):
    """The seam to the kernel (an :class:`rtnl.RtnlSocket`, or an in-memory fake in unit tests)."""

    def dump_routes(
        self, family: int, *, table: int | None = ..., proto: int | None = ..., rtype: int | None = ...
    ) -> list[RouteMsg]: ...

    def links(self) -> dict[str, Link]: ...

    def route_batch(self, requests: Sequence[RouteRequest]) -> list[Ack]: ...

    def close(self) -> None: ...


_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def _matches(want: RouteMsg, have: RouteMsg) -> bool:
    """Whether the kernel's ``have`` is what ``want`` asks for (see the module docstring)."""
    if want.type != have.type or want.metric != have.metric:
        return False
    if want.family == socket.AF_INET and want.scope != have.scope:
        return False
    if want.type != rtnl.RTN_UNICAST:
        return True
    if want.multipath:
        if len(want.multipath) != len(have.multipath):
            return False
        wants = sorted(want.multipath, key=lambda nh: (nh.gateway or b"", nh.oif))
        haves = sorted(have.multipath, key=lambda nh: (nh.gateway or b"", nh.oif))
        for w, h in zip(wants, haves, strict=True):
            if w.gateway != h.gateway or (w.oif and w.oif != h.oif) or h.hops:
                return False
            if (w.flags ^ h.flags) & rtnl.RTNH_F_ONLINK:
                return False
        return True
    if have.multipath or want.gateway != have.gateway:
        return False
    if want.oif and want.oif != have.oif:
        return False
    return not (want.flags ^ have.flags) & rtnl.RTNH_F_ONLINK


@dataclass(slots=True)
class _Write:
    key: Key
    kind: str  # "add", "change", "remove", "supersede"
    op: Op
    msg: RouteMsg
    old: RouteMsg | None = None  # the entry it replaces or deletes


class RouteTable:
    """The routes with protocol ``proto`` in one table of one namespace (see the module docstring).

    Not thread-safe: call it from one thread (the daemon's apply loop).
    """

    def __init__(
        self,
        proto: int,
        *,
        table: int = rtnl.RT_TABLE_MAIN,
        netns: str | None = None,
        metric_default: int = DEFAULT_METRIC,
        kernel: Kernel | None = None,
        batch_size: int = rtnl.DEFAULT_BATCH,
    ) -> None:
        if not 0 < proto < 256 or proto in (2, 3, 4):  # kernel, boot, static are never ours
            raise ValueError(f"invalid route protocol {proto} for an owner")
        self.proto = proto
        self.table = table
        self.netns = netns
        self.metric_default = metric_default
        self._kernel = kernel
        self._batch_size = batch_size
        self._desired: dict[Key, Route] = {}
        self._actual: dict[Key, tuple[RouteMsg, ...]] = {}
        self._dirty: set[Key] = set()
        self._force: set[Key] = set()  # rewrite even if the belief matches (the kernel may have lost it)
        self._by_ifname: dict[str, set[Key]] = {}
        self._pending: dict[Key, str] = {}
        self._failed: dict[Key, str] = {}
        self._conflicts: set[Key] = set()  # EEXIST still after a readback: a foreign route holds the key
        self._links: dict[str, int] | None = None
        self._need_readback = True
        self._need_links = True

    # -- desired state (no I/O) --

    def set_routes(self, routes: Mapping[IPNetwork, Route] | Iterable[Route]) -> None:
        """Replace the whole desired state."""
        items = routes.values() if isinstance(routes, Mapping) else routes
        if isinstance(routes, Mapping):
            for dst, route in routes.items():
                if dst != route.dst:
                    raise ValueError(f"route for {route.dst} filed under {dst}")
        new: dict[Key, Route] = {}
        for route in items:
            self._check(route)
            new[route._key] = route
        old = self._desired
        for key, route in old.items():
            if new.get(key) != route:
                self._dirty.add(key)
        for key in new.keys() - old.keys():
            self._dirty.add(key)
        self._desired = new
        self._by_ifname = {}
        for key, route in new.items():
            if route.oif is not None or route.nexthops:
                for name in route.ifnames:
                    self._by_ifname.setdefault(name, set()).add(key)

    def set_route(self, route: Route) -> None:
        """Add or change one desired route."""
        self._check(route)
        key = route._key
        old = self._desired.get(key)
        if old == route:
            return
        if old is not None:
            self._unindex(key, old)
        self._desired[key] = route
        for name in route.ifnames:
            self._by_ifname.setdefault(name, set()).add(key)
        self._dirty.add(key)

    def remove_route(self, dst: IPNetwork) -> None:
        """Stop wanting the route to ``dst`` (it is deleted from the kernel at the next apply)."""
        key = (dst.network_address.packed, dst.prefixlen)
        old = self._desired.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        if old is not None or key in self._actual:
            self._dirty.add(key)

    def resync(self) -> None:
        """Read the kernel back at the next apply (repairs drift: hand-deleted or modified routes)."""
        self._need_readback = True

    def on_link_up(self, ifname: str) -> None:
        """The interface appeared or came up: (re)write its routes at the next apply.

        The kernel deletes IPv4 routes of an interface that goes down or away, so what we believed
        about them is void: they are rewritten even if the belief says they are there.
        """
        self._need_links = True
        keys = self._by_ifname.get(ifname, ())
        self._dirty.update(keys)
        self._force.update(keys)

    def _check(self, route: Route) -> None:
        if route.proto is not None and route.proto != self.proto:
            raise ValueError(f"{route.dst}: protocol {route.proto} is not this table's ({self.proto})")
        if route.table is not None and route.table != self.table:
            raise ValueError(f"{route.dst}: table {route.table} is not this table ({self.table})")

    def _unindex(self, key: Key, route: Route) -> None:
        for name in route.ifnames:
            keys = self._by_ifname.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_ifname[name]

    # -- introspection --

    @property
    def desired(self) -> dict[IPNetwork, Route]:
        return {r.dst: r for r in self._desired.values()}

    @property
    def pending(self) -> dict[IPNetwork, str]:
        """Routes waiting for their interface, with the reason."""
        return {_network(k): why for k, why in self._pending.items()}

    @property
    def failed(self) -> dict[IPNetwork, str]:
        """Routes whose last write failed (they are retried at every apply)."""
        return {_network(k): why for k, why in self._failed.items()}

    @property
    def in_sync(self) -> bool:
        """True when the last apply left nothing dirty."""
        return not self._dirty and not self._need_readback

    def actual_routes(self) -> list[Route]:
        """What we believe the kernel holds with our protocol, as :class:`Route` objects."""
        names = {idx: name for name, idx in (self._links or {}).items()}
        out = []
        for entries in self._actual.values():
            for m in entries:
                out.append(_to_route(m, names))
        return out

    # -- apply --

    def _get_kernel(self) -> Kernel:
        if self._kernel is None:
            self._kernel = rtnl.RtnlSocket(self.netns, batch_size=self._batch_size)
        return self._kernel

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None

    def apply(self) -> ApplyResult:
        """Make the kernel hold the desired routes, with as few writes as possible."""
        start = time.monotonic()
        kernel = self._get_kernel()
        readback = self._need_readback
        if readback:
            self._readback(kernel)
        dirty = self._dirty
        if not dirty:
            return ApplyResult(readback=readback, duration=time.monotonic() - start)
        if self._need_links or any(self._desired[k].ifnames for k in dirty if k in self._desired):
            self._refresh_links(kernel)
        links = self._links or {}

        counts = {"add": 0, "change": 0, "remove": 0, "supersede": 0}
        failed: dict[Key, str] = {}
        pending: dict[Key, str] = {}
        writes = 0
        retry_readback = False

        phase1: list[_Write] = []
        later: dict[Key, list[_Write]] = {}
        done: set[Key] = set()
        for key in dirty:
            route = self._desired.get(key)
            have = self._actual.get(key, ())
            if route is None:
                phase1.extend(_Write(key, "remove", Op.DELETE, _strip(m), m) for m in have)
                if not have:
                    done.add(key)
                continue
            want, missing = self._to_msg(route, links)
            if missing:
                pending[key] = f"interface {missing} does not exist"
                # Whatever we hold for this destination is not what is wanted: sweep it.
                phase1.extend(_Write(key, "remove", Op.DELETE, _strip(m), m) for m in have)
                continue
            assert want is not None
            same = [m for m in have if m.metric == want.metric]
            rest = [_Write(key, "supersede", Op.DELETE, _strip(m), m) for m in have if m.metric != want.metric]
            # Same-metric duplicates (``ip route append``): delete the extras precisely, by nexthop.
            rest += [_Write(key, "supersede", Op.DELETE, m, m) for m in same[1:]]
            need_write = not same or key in self._force or not _matches(want, same[0])
            if need_write:
                if same:
                    phase1.append(_Write(key, "change", Op.REPLACE, want, same[0]))
                else:
                    phase1.append(_Write(key, "add", Op.CREATE, want))
            if rest:
                later[key] = rest  # only once the wanted route is in (make before break)
            elif not need_write:
                done.add(key)

        ok_keys: set[Key] = set()
        bad_keys: set[Key] = set()

        def run(batch: list[_Write]) -> None:
            nonlocal writes, retry_readback
            if not batch:
                return
            acks = kernel.route_batch([RouteRequest(w.op, w.msg) for w in batch])
            writes += len(batch)
            for w, ack in zip(batch, acks, strict=True):
                if self._record(w, ack, counts, failed, pending, readback):
                    ok_keys.add(w.key)
                else:
                    bad_keys.add(w.key)
                    if ack.code is AckCode.LOST or (
                        ack.code is AckCode.EXISTS and not readback and w.key not in self._conflicts
                    ):
                        retry_readback = True

        run(phase1)
        phase2 = [w for key, ws in later.items() if key not in bad_keys for w in ws]
        run(phase2)

        for key in ok_keys | done:
            if key not in bad_keys and key not in pending:
                dirty.discard(key)
                self._force.discard(key)
                self._failed.pop(key, None)
                self._pending.pop(key, None)
        for key, why in pending.items():
            self._pending[key] = why
            self._failed.pop(key, None)
        for key, why in failed.items():
            self._failed[key] = why
            self._pending.pop(key, None)
        for key in list(self._pending):
            if key not in self._desired:
                del self._pending[key]
        if retry_readback:
            self._need_readback = True

        result = ApplyResult(
            added=counts["add"],
            changed=counts["change"],
            removed=counts["remove"],
            failed=len(failed),
            pending=len(self._pending),
            writes=writes,
            readback=readback,
            duration=time.monotonic() - start,
            errors={_network(k): why for k, why in failed.items()},
        )
        if result.did_work:
            log.info(
                "routes applied proto=%d table=%d added=%d changed=%d removed=%d failed=%d pending=%d "
                "writes=%d readback=%s duration=%.3f",
                self.proto, self.table, result.added, result.changed, result.removed, result.failed,
                result.pending, writes, readback, result.duration,
            )  # fmt: skip
        if failed:
            sample = ", ".join(f"{_network(k)}: {why}" for k, why in list(failed.items())[:5])
            log.warning("route writes failed proto=%d count=%d e.g. %s", self.proto, len(failed), sample)
        return result

    def _record(
        self,
        w: _Write,
        ack: Ack,
        counts: dict[str, int],
        failed: dict[Key, str],
        pending: dict[Key, str],
        readback: bool,
    ) -> bool:
        """Fold one acknowledgement into the belief; True if the write took effect."""
        key = w.key
        code = ack.code
        if w.op is Op.DELETE and code in (AckCode.OK, AckCode.NOT_FOUND):
            entries = list(self._actual.get(key, ()))
            if w.old in entries:
                entries.remove(w.old)
            if entries:
                self._actual[key] = tuple(entries)
            else:
                self._actual.pop(key, None)
            counts[w.kind] += 1
            return True
        if code is AckCode.OK:
            entries = list(self._actual.get(key, ()))
            if w.old is not None and w.old in entries:
                entries.remove(w.old)
            entries.append(w.msg)
            self._actual[key] = tuple(entries)
            self._conflicts.discard(key)
            counts[w.kind] += 1
            return True
        route = self._desired.get(key)
        names = ", ".join(sorted(route.ifnames)) if route is not None else "?"
        if code is AckCode.NO_DEVICE:
            self._need_links = True
            pending[key] = f"interface {names} does not exist"
        elif code is AckCode.DEVICE_DOWN:
            pending[key] = f"interface {names} is down"
        elif code is AckCode.EXISTS:
            if readback:
                self._conflicts.add(key)
            failed[key] = "conflict: a route of another owner holds this destination and metric"
        elif code is AckCode.LOST:
            failed[key] = "state unknown: acknowledgement lost, reading the kernel back"
        else:
            failed[key] = f"{w.kind} failed: {ack.describe()}"
        return False

    def _to_msg(self, route: Route, links: Mapping[str, int]) -> tuple[RouteMsg | None, str | None]:
        """The netlink form of ``route``, or (None, name) when interface ``name`` is unknown."""
        family = _FAMILY[route.dst.version]
        metric = route.metric if route.metric is not None else self.metric_default
        rtype = route.type.value
        if route.scope is not None:
            scope = int(route.scope)
        elif rtype == rtnl.RTN_UNICAST and route.gateway is None and not route.nexthops:
            scope = rtnl.RT_SCOPE_LINK
        else:
            scope = rtnl.RT_SCOPE_UNIVERSE
        if family == socket.AF_INET6:
            scope = rtnl.RT_SCOPE_UNIVERSE  # IPv6 has no route scopes
        nexthops = route.nexthops
        oif_name, gateway, onlink = route.oif, route.gateway, route.onlink
        if len(nexthops) == 1:  # the kernel stores a single nexthop as a plain route
            oif_name, gateway, onlink = nexthops[0].oif, nexthops[0].gateway, nexthops[0].onlink
            nexthops = ()
        oif = 0
        if oif_name is not None:
            idx = links.get(oif_name)
            if idx is None:
                return None, oif_name
            oif = idx
        multipath: tuple[rtnl.NextHop, ...] = ()
        if nexthops:
            hops = []
            for nh in nexthops:
                nh_oif = 0
                if nh.oif is not None:
                    idx = links.get(nh.oif)
                    if idx is None:
                        return None, nh.oif
                    nh_oif = idx
                hops.append(
                    rtnl.NextHop(
                        nh_oif,
                        nh.gateway.packed if nh.gateway is not None else None,
                        rtnl.RTNH_F_ONLINK if nh.onlink else 0,
                    )
                )
            multipath = tuple(hops)
        msg = RouteMsg(
            family,
            route.dst.network_address.packed,
            route.dst.prefixlen,
            self.table,
            self.proto,
            scope,
            rtype,
            metric,
            oif,
            gateway.packed if gateway is not None else None,
            rtnl.RTNH_F_ONLINK if onlink else 0,
            multipath,
        )
        return msg, None

    def _readback(self, kernel: Kernel) -> None:
        actual: dict[Key, list[RouteMsg]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in kernel.dump_routes(family, table=self.table, proto=self.proto):
                if m.proto != self.proto or m.table != self.table:
                    continue  # the kernel filters too; never trust one side alone
                key = (m.dst, m.dst_len)
                entry = actual.get(key)
                if entry is None:
                    actual[key] = [m]
                else:
                    entry.append(m)
        self._actual = {k: tuple(v) for k, v in actual.items()}
        self._dirty.update(self._desired.keys())
        self._dirty.update(self._actual.keys())
        self._need_readback = False
        self._need_links = True
        self._conflicts.clear()

    def _refresh_links(self, kernel: Kernel) -> None:
        new = {name: link.ifindex for name, link in kernel.links().items()}
        old = self._links
        if old is not None:
            for name, index in old.items():
                if new.get(name) != index:
                    # Gone or recreated: the kernel dropped the routes of the old index.
                    keys = self._by_ifname.get(name, ())
                    self._dirty.update(keys)
                    self._force.update(keys)
        self._links = new
        self._need_links = False


def _strip(m: RouteMsg) -> RouteMsg:
    """The delete form of a route: destination, table, protocol and metric select it."""
    return RouteMsg(m.family, m.dst, m.dst_len, m.table, m.proto, 0, 0, m.metric)


def _network(key: Key) -> IPNetwork:
    return ipaddress.ip_network((key[0], key[1]))


def _to_route(m: RouteMsg, names: Mapping[int, str]) -> Route:
    def addr(raw: bytes | None) -> IPAddress | None:
        return ipaddress.ip_address(raw) if raw else None

    try:
        rtype = RouteType(m.type)
    except ValueError:
        rtype = RouteType.UNICAST
    unicast = rtype is RouteType.UNICAST
    nexthops = tuple(
        NextHop(addr(nh.gateway), names.get(nh.oif, f"if{nh.oif}") if nh.oif else None,
                bool(nh.flags & rtnl.RTNH_F_ONLINK) and nh.gateway is not None and nh.oif != 0)
        for nh in m.multipath
    ) if unicast else ()  # fmt: skip
    oif = names.get(m.oif, f"if{m.oif}") if m.oif and unicast and not nexthops else None
    gateway = addr(m.gateway) if unicast and not nexthops else None
    scope = Scope(m.scope) if m.scope in Scope._value2member_map_ else None
    return Route(
        dst=ipaddress.ip_network((m.dst, m.dst_len)),
        type=rtype,
        oif=oif,
        gateway=gateway,
        nexthops=nexthops,
        onlink=bool(m.flags & rtnl.RTNH_F_ONLINK) and gateway is not None and oif is not None,
        metric=m.metric,
        proto=m.proto,
        table=m.table,
        scope=scope,
    )
