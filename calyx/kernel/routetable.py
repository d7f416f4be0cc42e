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
import gc
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from calyx.kernel import rtnl
from calyx.kernel.rtnl import Ack, AckCode, Link, Op, RouteMsg

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
    # The table-independent netlink form, computed at the first apply that needs it (see _template).
    _nl: _Template | None = field(default=None, init=False, repr=False, compare=False, hash=False)

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

    def then(self, later: ApplyResult) -> ApplyResult:
        """This pass followed by ``later`` (a readback pass in the same apply): work adds up, what
        is still failed or pending is ``later``'s."""
        return ApplyResult(
            added=self.added + later.added,
            changed=self.changed + later.changed,
            removed=self.removed + later.removed,
            failed=later.failed,
            pending=later.pending,
            writes=self.writes + later.writes,
            readback=True,
            duration=self.duration + later.duration,
            errors=later.errors,
        )


class Kernel(Protocol):
    """The seam to the kernel (an :class:`rtnl.RtnlSocket`, or an in-memory fake in unit tests)."""

    def dump_routes(
        self, family: int, *, table: int | None = ..., proto: int | None = ..., rtype: int | None = ...
    ) -> list[RouteMsg]: ...

    def links(self) -> dict[str, Link]: ...

    def route_batch(self, requests: Sequence[tuple[Op, RouteMsg]]) -> list[Ack]: ...

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


# One write: (destination key, kind for the counters, operation, message, the entry it supersedes).
_Write = tuple[Key, str, Op, RouteMsg, RouteMsg | None]


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
        """Make the kernel hold the desired routes, with as few writes as possible.

        The cyclic garbage collector is paused meanwhile: an apply of 100k routes allocates a few
        hundred thousand small tuples that survive, which makes the collector walk the whole heap
        several times over and triples the run time. Nothing here creates reference cycles.
        """
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            result = self._apply()
            if self._need_readback and not result.readback:
                # A write met a kernel that was not what we believed (EEXIST: someone — the CNI
                # plugin, typically — put the route there first; or a lost acknowledgement). Read
                # back now and finish in this apply: only what is still wrong after that is a failure.
                result = result.then(self._apply())
            self._log(result)
            return result
        except BaseException:
            # Writes may have been made whose acknowledgements we never read: trust nothing.
            self._need_readback = True
            raise
        finally:
            if paused:
                gc.enable()

    def _apply(self) -> ApplyResult:
        start = time.monotonic()
        kernel = self._get_kernel()
        readback = self._need_readback
        if readback:
            self._readback(kernel)
        dirty = self._dirty
        if not dirty:
            return ApplyResult(readback=readback, duration=time.monotonic() - start)
        if self._need_links or self._by_ifname:
            self._refresh_links(kernel)
        links = self._links or {}

        desired, actual, force = self._desired, self._actual, self._force
        counts = {"add": 0, "change": 0, "remove": 0, "supersede": 0}
        failed: dict[Key, str] = {}
        pending: dict[Key, str] = {}
        packed: dict[IPAddress, bytes] = {}
        phase1: list[_Write] = []
        later: dict[Key, list[_Write]] = {}
        for key in dirty:
            route = desired.get(key)
            have = actual.get(key)
            if route is None:
                if have:
                    phase1.extend((key, "remove", Op.DELETE, m, m) for m in have)
                continue
            want, missing = self._to_msg(route, links, packed)
            if want is None:
                pending[key] = f"interface {missing} does not exist"
                if have:  # whatever we hold for this destination is not what is wanted: sweep it
                    phase1.extend((key, "remove", Op.DELETE, m, m) for m in have)
                continue
            if not have:
                phase1.append((key, "add", Op.CREATE, want, None))
                continue
            metric = want.metric
            same = [m for m in have if m.metric == metric]
            if len(have) == 1 and same and key not in force:  # the common case
                if not _matches(want, have[0]):
                    phase1.append((key, "change", Op.REPLACE, want, have[0]))
                continue
            if not same:
                phase1.append((key, "add", Op.CREATE, want, None))
            elif key in force or not _matches(want, same[0]):
                phase1.append((key, "change", Op.REPLACE, want, same[0]))
            # Only once the wanted route is in (make before break): the other metrics go, and
            # same-metric duplicates (``ip route append``) are deleted precisely, by nexthop.
            rest: list[_Write] = [(key, "supersede", Op.DELETE, m, m) for m in have if m.metric != metric]
            rest += [(key, "supersede", Op.DELETE_EXACT, m, m) for m in same[1:]]
            if rest:
                later[key] = rest

        bad: set[Key] = set()
        writes = len(phase1)
        retry_readback = self._run(kernel, phase1, counts, failed, pending, bad, readback)
        phase2 = [w for key, ws in later.items() if key not in bad for w in ws]
        writes += len(phase2)
        retry_readback |= self._run(kernel, phase2, counts, failed, pending, bad, readback)

        # Every dirty key is clean now unless a write failed or it waits for its interface.
        still = {k for k in bad | pending.keys() if k in dirty}
        dirty.clear()
        dirty.update(still)
        force.intersection_update(still)
        self._failed = {k: why for k, why in self._failed.items() if k in still and k not in pending}
        self._failed.update(failed)
        self._pending = {k: why for k, why in self._pending.items() if k in still and k not in failed}
        self._pending.update(pending)
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
        return result

    def _log(self, result: ApplyResult) -> None:
        """One summary line for an apply that did work; a warning naming what failed."""
        if result.did_work:
            log.info("routes applied", extra={
                "proto": self.proto, "table": self.table, "added": result.added, "changed": result.changed,
                "removed": result.removed, "failed": result.failed, "pending": result.pending,
                "writes": result.writes, "readback": result.readback, "duration": round(result.duration, 3),
            })  # fmt: skip
        if result.errors:
            sample = ", ".join(f"{net}: {why}" for net, why in list(result.errors.items())[:5])
            log.warning("route writes failed: %s", sample, extra={"proto": self.proto, "count": result.failed})

    def _run(
        self,
        kernel: Kernel,
        batch: list[_Write],
        counts: dict[str, int],
        failed: dict[Key, str],
        pending: dict[Key, str],
        bad: set[Key],
        readback: bool,
    ) -> bool:
        """Send ``batch``, fold the acknowledgements into the belief; True if a readback is needed."""
        if not batch:
            return False
        acks = kernel.route_batch([(w[2], w[3]) for w in batch])
        actual = self._actual
        ok = AckCode.OK
        create = Op.CREATE
        added = 0
        retry_readback = False
        for w, ack in zip(batch, acks, strict=True):
            key = w[0]
            if ack.code is ok and w[2] is create and key not in actual:  # fast path: a new route
                actual[key] = (w[3],)
                added += 1
                continue
            if self._record(w, ack, counts, failed, pending, readback):
                continue
            bad.add(key)
            if ack.code is AckCode.LOST or (ack.code is AckCode.EXISTS and not readback and key not in self._conflicts):
                retry_readback = True
        counts["add"] += added
        if added and self._conflicts:
            self._conflicts.difference_update(w[0] for w in batch)
        return retry_readback

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
        key, kind, op, msg, old = w
        code = ack.code
        actual = self._actual
        deleting = op is Op.DELETE or op is Op.DELETE_EXACT
        if code is AckCode.OK or (code is AckCode.NOT_FOUND and deleting):
            counts[kind] += 1
            cur = actual.get(key)
            if deleting:
                if cur is None:
                    return True
                if len(cur) == 1 and (cur[0] is old or cur[0] == old):
                    del actual[key]
                    return True
                rest = [m for m in cur if m != old]
                if rest:
                    actual[key] = tuple(rest)
                else:
                    del actual[key]
                return True
            actual[key] = (*(m for m in cur or () if m != old), msg)
            self._conflicts.discard(key)
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
            failed[key] = f"{kind} failed: {ack.describe()}"
        return False

    def _to_msg(
        self, route: Route, links: Mapping[str, int], packed: dict[IPAddress, bytes]
    ) -> tuple[RouteMsg | None, str | None]:
        """The netlink form of ``route``, or (None, name) when interface ``name`` is unknown.

        ``packed`` caches packed gateway addresses for one apply (many routes share a gateway).
        """
        tpl = route._nl
        if tpl is None:
            tpl = _template(route, packed)
        family, dst, plen, rtype, scope, gateway, flags, oif_name, hops = tpl
        metric = route.metric
        if metric is None:
            metric = self.metric_default
        oif = 0
        if oif_name is not None:
            idx = links.get(oif_name)
            if idx is None:
                return None, oif_name
            oif = idx
        multipath: tuple[rtnl.NextHop, ...] = ()
        if hops:
            resolved = []
            for nh_name, nh_gw, nh_flags in hops:
                nh_oif = 0
                if nh_name is not None:
                    idx = links.get(nh_name)
                    if idx is None:
                        return None, nh_name
                    nh_oif = idx
                resolved.append(_NH_MAKE((nh_oif, nh_gw, nh_flags, 0)))
            multipath = tuple(resolved)
        msg = _MSG_MAKE(
            (family, dst, plen, self.table, self.proto, scope, rtype, metric, oif, gateway, flags, multipath)
        )
        return msg, None

    def _readback(self, kernel: Kernel) -> None:
        actual: dict[Key, tuple[RouteMsg, ...]] = {}
        proto, table = self.proto, self.table
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in kernel.dump_routes(family, table=table, proto=proto):
                if m.proto != proto or m.table != table:
                    continue  # the kernel filters too; never trust one side alone
                key = (m.dst, m.dst_len)
                entry = actual.get(key)
                actual[key] = (m,) if entry is None else (*entry, m)
        self._actual = actual
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


# (family, dst, prefix length, type, scope, gateway, flags, interface name, nexthops as
# (interface name, gateway, flags)): everything of the netlink form but what the table decides
# (table, protocol, default metric) and what is only known at apply time (interface indexes).
_Template = tuple[
    int, bytes, int, int, int, bytes | None, int, str | None, tuple[tuple[str | None, bytes | None, int], ...]
]
_MSG_MAKE = RouteMsg._make
_NH_MAKE = rtnl.NextHop._make


def _template(route: Route, packed: dict[IPAddress, bytes]) -> _Template:
    dst, plen = route._key
    family = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
    rtype = route.type.value
    nexthops = route.nexthops
    oif_name, gateway, onlink = route.oif, route.gateway, route.onlink
    if len(nexthops) == 1:  # the kernel stores a single nexthop as a plain route
        oif_name, gateway, onlink = nexthops[0].oif, nexthops[0].gateway, nexthops[0].onlink
        nexthops = ()
    if family == socket.AF_INET6:
        scope = rtnl.RT_SCOPE_UNIVERSE  # IPv6 has no route scopes
    elif route.scope is not None:
        scope = int(route.scope)
    elif rtype == rtnl.RTN_UNICAST and gateway is None and not nexthops:
        scope = rtnl.RT_SCOPE_LINK
    else:
        scope = rtnl.RT_SCOPE_UNIVERSE
    hops = tuple(
        (nh.oif, _pack(nh.gateway, packed) if nh.gateway is not None else None, rtnl.RTNH_F_ONLINK if nh.onlink else 0)
        for nh in nexthops
    )
    tpl: _Template = (
        family,
        dst,
        plen,
        rtype,
        scope,
        _pack(gateway, packed) if gateway is not None else None,
        rtnl.RTNH_F_ONLINK if onlink else 0,
        oif_name,
        hops,
    )
    object.__setattr__(route, "_nl", tpl)
    return tpl


def _pack(addr: IPAddress, cache: dict[IPAddress, bytes]) -> bytes:
    raw = cache.get(addr)
    if raw is None:
        raw = cache[addr] = addr.packed
    return raw


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
