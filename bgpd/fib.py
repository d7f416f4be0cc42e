"""The FIB manager: turns selected BGP routes into kernel routes with bgpd's protocol (79).

What it owns: every IPv4 route with protocol 79 (``calyx-bgpd``) in the main table of the namespace
bgpd runs in. It finds them by that number only (a dump filtered by protocol) and never writes,
replaces or deletes a route of any other protocol: a new destination is created with
``NLM_F_EXCL``, so a connected, felix, BIRD or FRR route holding the same key is never replaced
(the conflict is counted and retried only after the next readback); only routes we hold ourselves
are replaced in place. Every route carries the configured metric (``bgp_metric``, 20 by default).

How a selection becomes a route (:func:`route_spec`):

- a next hop inside a connected subnet (a link-scope route of the kernel, read back at each
  resync) → ``<prefix> via <next hop>``; several equal next hops → one multipath route;
- a next hop that is not connected, for a prefix inside a pool whose ``ipip_mode`` is ``Always`` (or
  ``CrossSubnet``) → ``<prefix> via <next hop> dev tunl0 onlink`` (tunl0 is felix's device);
- a pool with ``ipip_mode: Always`` tunnels even connected next hops, as Calico does;
- a pool whose ``vxlan_mode`` asks for encapsulation (``Always``; ``CrossSubnet`` and the next hop
  not connected) → ``<prefix> via <remote VTEP address> dev vxlan.calyx onlink``: the BGP next hop
  is mapped to the node whose ``ipv4`` it is, and from there to the ``vxlan_tunnel_address`` that
  node's felix published (:meth:`Fib.set_vteps`); felix keeps the device and its permanent
  neighbour and FDB entries. A next hop with no published VTEP falls back to a direct route when it
  is connected and is unroutable otherwise;
- otherwise the route is not installable here (counted as unroutable).

Why not :class:`calyx.kernel.routetable.RouteTable`: bgpd holds up to hundreds of thousands of
/32s that differ only in their destination. RouteTable keeps a ``Route`` object, a netlink template
and a believed kernel message per destination (about 1.2 KB a route, 1.2 s of object building per
100k) and its callers build ``ipaddress`` objects per route. Here the desired state is one dict
entry per prefix pointing at a shared :class:`Spec` (one per distinct next-hop set), the believed
state one shared ``(metric, signature)`` tuple per prefix, and messages are packed straight from
the prefix string (``inet_aton``) on the same raw netlink socket (:class:`calyx.kernel.rtnl.
RtnlSocket`, batched, one ack per request, errno translated there). Same rules as RouteTable:
read back at start and at every resync, minimal writes, exact ownership by protocol number.

The bulk path (:class:`_Bulk`): a brand-new single-next-hop route without onlink (what a session's
start brings by the 100k) and a removal are the same message for every prefix but the
destination, so :meth:`Fib.apply` groups them — by (gateway, prefix length), by (metric, prefix
length) — and hands every full batch to a :class:`calyx.kernel.rtnl.TemplateWriter`, which sends
it from a writer thread while the loop goes on; results are booked batch by batch with the
outcomes of the generic path (``NLM_F_EXCL`` conflicts, lost acks, ``NOT_FOUND`` on removal).
Everything else — a changed route (``NLM_F_REPLACE``), a metric change (create, then delete the
old metric: make before break), multipath, onlink (``tunl0``/VXLAN, device index looked up after
the writer is done), our duplicates — takes the generic :class:`RouteMsg` path as before. An
exception during an apply leaves the state to a readback at the next one.

Updates are cheap and do no I/O (:meth:`Fib.update` marks prefixes dirty); :meth:`Fib.apply` writes
the difference. At start :meth:`Fib.adopt` reads the kernel back, so a restarted bgpd keeps
forwarding through the routes already there: :meth:`Fib.apply` runs with ``sweep=False`` until the
RIB is complete (every peer sent End-of-RIB or the startup grace ran out), and routes nobody wants
any more are only removed then.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from calyx.kernel import rtnl
from calyx.kernel.routetable import PROTO_BGPD
from calyx.kernel.rtnl import AckCode, NextHop, Op, RouteMsg, RouteRequest, RouteTemplate
from calyx.model import IPPool, Node

log = logging.getLogger(__name__)

TUNL = "tunl0"
VXLAN = "vxlan.calyx"
VXLAN_PREFIX = "VXLAN:"  # pool_mode's spelling of a vxlan_mode ("VXLAN:Always", "VXLAN:CrossSubnet")
TABLE = rtnl.RT_TABLE_MAIN

#: one next hop as compared with the kernel: (gateway bytes, onlink)
Hop = tuple[bytes, bool]
Signature = tuple[Hop, ...]


@dataclass(frozen=True, slots=True)
class PoolEncap:
    """The encapsulation mode of one IPv4 pool."""

    cidr: IPv4Network
    ipip_mode: str
    vxlan_mode: str = "Never"


@dataclass(frozen=True, slots=True)
class Spec:
    """The nexthop part of a route, shared by every prefix with the same next hops and pool mode."""

    hops: Signature  # sorted; onlink hops go through ``dev``
    dev: str = TUNL
    onlink: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "onlink", any(o for _, o in self.hops))

    def describe(self) -> str:
        return ", ".join(socket.inet_ntoa(g) + (f" dev {self.dev} onlink" if o else "") for g, o in self.hops)


@dataclass
class FibStats:
    """What one apply did."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    failed: int = 0
    conflicts: int = 0
    writes: int = 0
    duration: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.failed)


def pool_encaps(pools: Iterable[IPPool]) -> tuple[PoolEncap, ...]:
    out = [PoolEncap(p.cidr, p.ipip_mode, p.vxlan_mode) for p in pools if isinstance(p.cidr, IPv4Network)]
    return tuple(sorted(out, key=lambda e: -e.cidr.prefixlen))  # most specific first


def _parse(prefix: str) -> tuple[bytes, int] | None:
    """``a.b.c.d/len`` → (packed address, length); None unless a valid IPv4 network."""
    addr, _, plen_text = prefix.partition("/")
    try:
        packed = socket.inet_aton(addr)
        plen = int(plen_text) if plen_text else 32
    except (OSError, ValueError):
        return None
    if plen == 32 and addr.count(".") == 3:
        return packed, 32
    if not 0 <= plen < 32 or addr.count(".") != 3 or int.from_bytes(packed, "big") & ((1 << (32 - plen)) - 1):
        return None
    return packed, plen


def pool_mode(packed: bytes, plen: int, pools: tuple[PoolEncap, ...]) -> str:
    value = int.from_bytes(packed, "big")
    for pool in pools:
        p = pool.cidr
        if plen >= p.prefixlen and (value & int(p.netmask)) == int(p.network_address):
            if pool.ipip_mode == "Never" and pool.vxlan_mode != "Never":
                return VXLAN_PREFIX + pool.vxlan_mode
            return pool.ipip_mode
    return "Never"


def node_vteps(nodes: Iterable[Node]) -> dict[str, IPv4Address]:
    """Underlay address (as text) → VTEP address, for every node that published a VXLAN tunnel address."""
    return {str(n.ipv4.ip): n.vxlan_tunnel_address for n in nodes
            if n.ipv4 is not None and n.vxlan_tunnel_address is not None}


def route_spec(next_hops: Iterable[str], mode: str, connected: tuple[IPv4Network, ...],
               vteps: Mapping[str, IPv4Address] | None = None) -> Spec | None:
    """How to reach next hops ``next_hops`` for a prefix in a pool of ``mode`` (``pool_mode``'s
    spelling); ``vteps`` maps next hops to remote VTEP addresses. None if not possible."""
    hops: set[Hop] = set()
    vxlan = mode.startswith(VXLAN_PREFIX)
    if vxlan:
        mode = mode[len(VXLAN_PREFIX):]
    for text in next_hops:
        try:
            nh = IPv4Address(text)
        except ValueError:
            continue
        direct = any(nh in n for n in connected)
        if mode == "Always" or (mode == "CrossSubnet" and not direct):
            if not vxlan:
                hops.add((nh.packed, True))
                continue
            vtep = vteps.get(text) if vteps else None
            if vtep is not None:
                hops.add((vtep.packed, True))
            elif direct:  # the node has not published its VTEP yet: a connected next hop still works
                hops.add((nh.packed, False))
        elif direct:
            hops.add((nh.packed, False))
    if not hops:
        return None
    return Spec(tuple(sorted(hops)), VXLAN if vxlan else TUNL)


def _signature(m: RouteMsg) -> Signature | None:
    """A kernel route of ours in the form :class:`Spec` compares with (None: a shape we never write)."""
    if m.type != rtnl.RTN_UNICAST:
        return None
    if m.multipath:
        hops = []
        for nh in m.multipath:
            if nh.gateway is None:
                return None
            hops.append((bytes(nh.gateway), bool(nh.flags & rtnl.RTNH_F_ONLINK)))
        return tuple(sorted(hops))
    if m.gateway is None:
        return None
    return ((bytes(m.gateway), bool(m.flags & rtnl.RTNH_F_ONLINK)),)


class _Bulk:
    """The bulk writes of one :meth:`Fib.apply`: batches of routes that differ only in their
    destination, each written through one :class:`RouteTemplate` by a :class:`rtnl.TemplateWriter`
    (the kernel installs a batch while the apply loop fills the next), and their results taken
    into the FIB's state as soon as the writer has them (:meth:`book`), with the same outcomes as
    the generic path's: success, ``NOT_FOUND`` for a removal, or :meth:`Fib._record`.
    """

    def __init__(self, fib: Fib, stats: FibStats, followups: list[RouteRequest]) -> None:
        self.fib = fib
        self.stats = stats
        self.followups = followups
        self.writer = rtnl.TemplateWriter(fib._sock())
        self.batch = self.writer.batch
        self.templates: dict[tuple[Op, bytes, int, int], RouteTemplate] = {}
        self.submitted: list[tuple[int, list[str], list[bytes], RouteTemplate]] = []  # (first index, ...)
        self.offset = 0  # submission index of the next batch's first route
        self.booked = 0  # submitted batches whose results are in the FIB's state

    def submit(self, op: Op, gw: bytes, metric: int, plen: int, prefixes: list[str], dsts: list[bytes]) -> None:
        """``op`` (CREATE via ``gw`` at ``metric``, or DELETE at ``metric``) for /``plen`` ``dsts``."""
        key = (op, gw, metric, plen)
        template = self.templates.get(key)
        if template is None:
            if op is Op.CREATE:
                route = RouteMsg(socket.AF_INET, bytes(4), plen, TABLE, PROTO_BGPD, rtnl.RT_SCOPE_UNIVERSE,
                                 rtnl.RTN_UNICAST, metric, 0, gw, 0)
            else:
                route = RouteMsg(socket.AF_INET, bytes(4), plen, TABLE, PROTO_BGPD, metric=metric)
            template = self.templates[key] = RouteTemplate(op, route)
        self.writer.submit(template, dsts)
        self.submitted.append((self.offset, prefixes, dsts, template))
        self.offset += len(dsts)
        self.book()

    def finish(self) -> None:
        self.writer.finish()
        self.book()

    def close(self) -> None:
        self.writer.close()

    def book(self) -> None:
        """Take in the results of the batches the writer has settled."""
        fib, stats, followups = self.fib, self.stats, self.followups
        actual, failed, intern, metric = fib._actual, fib._failed, fib._sig_intern, fib.metric
        failures, settled, submitted = self.writer.failures, self.writer.settled, self.submitted
        while self.booked < len(submitted) and submitted[self.booked][0] + len(submitted[self.booked][2]) <= settled:
            first, prefixes, dsts, template = submitted[self.booked]
            self.booked += 1
            stats.writes += len(dsts)
            if template.op is Op.DELETE:  # done also when already gone (NOT_FOUND), as _record does
                for i, prefix in enumerate(prefixes):
                    ack = failures.get(first + i) if failures else None
                    if ack is None or ack.code is AckCode.NOT_FOUND:
                        actual.pop(prefix, None)
                        if failed:
                            failed.pop(prefix, None)
                        stats.removed += 1
                    else:
                        fib._record(prefix, "remove", None, ack, template.route._replace(dst=dsts[i]), stats,
                                    followups)
                continue
            value: tuple[int, Signature | None] = (metric, ((template.route.gateway or b"", False),))
            value = intern.setdefault(value, value)
            if not failures:
                actual.update(dict.fromkeys(prefixes, value))
                stats.added += len(prefixes)
                if failed:
                    for prefix in prefixes:
                        failed.pop(prefix, None)
                continue
            for i, prefix in enumerate(prefixes):
                ack = failures.get(first + i)
                if ack is None:
                    actual[prefix] = value
                    if failed:
                        failed.pop(prefix, None)
                    stats.added += 1
                else:
                    fib._record(prefix, "add", None, ack, template.route._replace(dst=dsts[i]), stats, followups)


class Fib:
    """bgpd's routes in the kernel (see the module docstring)."""

    def __init__(self, metric: int, *, netns: str | None = None, kernel: rtnl.RtnlSocket | None = None) -> None:
        self.metric = metric
        self.netns = netns
        self._kernel = kernel
        self.pools: tuple[PoolEncap, ...] = ()
        self.connected: tuple[IPv4Network, ...] = ()
        self.vteps: dict[str, IPv4Address] = {}  # next hop (a node's underlay address) → its VTEP address
        self._next_hops: dict[str, tuple[str, ...]] = {}  # prefix → next hops of its selection
        self._want: dict[str, Spec] = {}  # prefix → what the kernel should hold
        self._actual: dict[str, tuple[int, Signature | None]] = {}  # prefix → (metric, signature) held
        self._extra: list[RouteMsg] = []  # our duplicates at other metrics, deleted at the next apply
        self._withdrawing: set[str] = set()  # removals of the apply under way (see kernel_prefixes)
        self._dirty: set[str] = set()
        self._unroutable: dict[str, str] = {}
        self._conflicts: set[str] = set()
        self._failed: dict[str, str] = {}
        self._spec_cache: dict[tuple[tuple[str, ...], str], Spec | None] = {}
        self._sig_intern: dict[tuple[int, Signature | None], tuple[int, Signature | None]] = {}
        self._need_readback = True
        self._adopted: set[str] = set()

    # --- inputs (no I/O) ---

    def set_pools(self, pools: Iterable[IPPool]) -> None:
        enc = pool_encaps(pools)
        if enc != self.pools:
            self.pools = enc
            self._spec_cache.clear()
            self._dirty.update(self._next_hops)

    def set_vteps(self, vteps: Mapping[str, IPv4Address]) -> None:
        """Next hop → remote VTEP address (:func:`node_vteps`); VXLAN routes follow changes."""
        if dict(vteps) != self.vteps:
            self.vteps = dict(vteps)
            self._spec_cache.clear()
            self._dirty.update(self._next_hops)

    def set_connected(self, subnets: Iterable[IPv4Network]) -> None:
        conn = tuple(sorted(set(subnets), key=lambda n: (int(n.network_address), n.prefixlen)))
        if conn != self.connected:
            self.connected = conn
            self._spec_cache.clear()
            self._dirty.update(self._next_hops)

    def update(self, changes: Mapping[str, tuple[str, ...] | None]) -> None:
        """prefix → next hops of its selection (None: no route any more)."""
        next_hops, dirty = self._next_hops, self._dirty
        get = next_hops.get
        new = {prefix: hops for prefix, hops in changes.items() if hops and get(prefix) != hops}
        next_hops.update(new)
        dirty.update(new)
        if len(new) != len(changes):
            gone = [prefix for prefix, hops in changes.items() if not hops and prefix in next_hops]
            for prefix in gone:
                del next_hops[prefix]
            dirty.update(gone)

    # --- kernel ---

    def _sock(self) -> rtnl.RtnlSocket:
        if self._kernel is None:
            self._kernel = rtnl.RtnlSocket(self.netns)
        return self._kernel

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None

    def read_connected(self) -> tuple[IPv4Network, ...]:
        """The IPv4 subnets the kernel has link-scope routes for (connected subnets)."""
        routes = self._sock().dump_routes(socket.AF_INET, table=TABLE)
        out = []
        for r in routes:
            if r.scope == rtnl.RT_SCOPE_LINK and r.type == rtnl.RTN_UNICAST and r.proto != PROTO_BGPD and not r.gateway:
                out.append(IPv4Network((int.from_bytes(r.dst, "big"), r.dst_len)))
        return tuple(out)

    def resync(self) -> None:
        """Re-read connected subnets now, and our routes at the next apply (repairs drift)."""
        try:
            self.set_connected(self.read_connected())
        except OSError as exc:
            log.warning("cannot read connected subnets: %s", exc)
        self._need_readback = True

    def _readback(self) -> None:
        actual: dict[str, tuple[int, Signature | None]] = {}
        extra: list[RouteMsg] = []
        intern = self._sig_intern
        for m in self._sock().dump_routes(socket.AF_INET, table=TABLE, proto=PROTO_BGPD):
            if m.proto != PROTO_BGPD or m.table != TABLE:
                continue
            prefix = f"{socket.inet_ntoa(m.dst)}/{m.dst_len}"
            value = (m.metric or 0, _signature(m))
            value = intern.setdefault(value, value)
            old = actual.get(prefix)
            if old is not None:  # two of ours for one destination: keep the one at our metric
                if old[0] == self.metric:
                    extra.append(m)
                    continue
                extra.append(RouteMsg(socket.AF_INET, m.dst, m.dst_len, TABLE, PROTO_BGPD, metric=old[0]))
            actual[prefix] = value
        self._actual = actual
        self._extra = extra
        self._need_readback = False
        self._conflicts.clear()

    def adopt(self) -> int:
        """Read the kernel back and keep what it holds until the RIB is complete (a restart of bgpd).

        Returns how many routes of ours were found. Those the RIB does not learn again are removed
        by the first apply with ``sweep``.
        """
        self._readback()
        self._adopted = set(self._actual) - set(self._next_hops)
        return len(self._actual)

    def apply(self, *, sweep: bool) -> FibStats:
        """Write the dirty prefixes; with ``sweep`` also remove our routes that nobody wants."""
        try:
            return self._apply(sweep)
        finally:
            self._withdrawing.clear()  # booked (or to be read back): the belief says it now

    def _apply(self, sweep: bool) -> FibStats:
        start = time.monotonic()
        stats = FibStats()
        if self._need_readback:
            self._readback()
            self._dirty.update(p for p in self._actual if p not in self._want or p in self._adopted)
            self._dirty.update(self._want)
        if sweep and self._adopted:
            self._dirty.update(self._adopted)
            self._adopted = set()
        dirty, self._dirty = self._dirty, set()
        requests: list[tuple[Op, RouteMsg]] = []
        meta: list[tuple[str, str, tuple[int, Signature | None] | None]] = []
        metric = self.metric
        # The two bulk cases skip the RouteMsg: new single-hop routes without onlink (nearly every
        # route at a session's start), grouped by (gateway, prefix length), and removals, grouped by
        # (metric, prefix length). Every full batch goes to the kernel at once (_Bulk), so it is
        # installed while this loop goes on.
        followups: list[RouteRequest] = []
        bulk = _Bulk(self, stats, followups)
        batch = bulk.batch
        fresh: dict[tuple[bytes, int], tuple[list[str], list[bytes]]] = {}
        gone: dict[tuple[int, int], tuple[list[str], list[bytes]]] = {}
        # Onlink routes need the device's index (a netlink request): done once the writer is finished.
        onlink: list[tuple[str, bytes, int, Spec, tuple[int, Signature | None] | None]] = []
        # hot loop (100k routes at a session's start): locals, no per-route method calls on the common path
        next_hops, actual, want_map, adopted = self._next_hops, self._actual, self._want, self._adopted
        conflicts, cache, pools, unroutable = self._conflicts, self._spec_cache, self.pools, self._unroutable
        create, delete, af, scope, unicast = Op.CREATE, Op.DELETE, socket.AF_INET, \
            rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST
        inet_aton = socket.inet_aton
        # prefixes whose delete is on its way: the link watch reads the kernel's notification of it
        # on another thread, maybe before the acknowledgement is booked, and must not take it for
        # someone else's delete (kernel_prefixes leaves them out)
        withdrawing = self._withdrawing
        last_hops: tuple[str, ...] | None = None  # the RIB shares next-hop tuples: one spec lookup per run
        last_spec: Spec | None = None
        last_fresh: Spec | None = None  # the spec whose group fresh_* are
        fresh_key = (b"", 0)
        fresh_prefixes: list[str] = []
        fresh_dsts: list[bytes] = []
        try:
            for prefix in dirty:
                hops = next_hops.get(prefix)
                have = actual.get(prefix)
                spec: Spec | None = None
                if hops is not None and not pools and prefix.endswith("/32") and prefix.count(".") == 3:
                    try:  # the common case: a learned /32
                        packed, plen = inet_aton(prefix[:-3]), 32
                    except OSError:
                        continue
                    if hops is last_hops:
                        spec = last_spec
                    else:
                        key = (hops, "Never")
                        spec = cache[key] if key in cache else self._spec_for(prefix, packed, plen)
                        last_hops, last_spec = hops, spec
                    if spec is None:
                        unroutable[prefix] = ", ".join(hops)
                    elif unroutable:
                        unroutable.pop(prefix, None)
                elif hops is None and prefix.endswith("/32") and prefix.count(".") == 3:
                    try:  # a withdrawn /32
                        packed, plen = inet_aton(prefix[:-3]), 32
                    except OSError:
                        continue
                    if unroutable:
                        unroutable.pop(prefix, None)
                else:
                    parsed = _parse(prefix)
                    if parsed is None:
                        continue
                    packed, plen = parsed
                    spec = self._spec_for(prefix, packed, plen)
                if spec is None:
                    want_map.pop(prefix, None)
                    if have is None or (not sweep and prefix in adopted and prefix not in next_hops):
                        continue  # nothing there, or kept from before a restart until the RIB is complete
                    removal = gone.get((have[0], plen))
                    if removal is None:
                        removal = gone[have[0], plen] = ([], [])
                    removal[0].append(prefix)
                    removal[1].append(packed)
                    withdrawing.add(prefix)
                    if len(removal[1]) >= batch:
                        bulk.submit(delete, b"", have[0], plen, *removal)
                        gone[have[0], plen] = ([], [])
                    continue
                want_map[prefix] = spec
                if adopted:
                    adopted.discard(prefix)
                if have is not None:
                    if have[0] == metric and have[1] == spec.hops:
                        continue
                elif not spec.onlink and len(spec.hops) == 1 and not (conflicts and prefix in conflicts):
                    if spec is not last_fresh or plen != 32:
                        fresh_key = (spec.hops[0][0], plen)
                        group = fresh.get(fresh_key)
                        if group is None:
                            group = fresh[fresh_key] = ([], [])
                        fresh_prefixes, fresh_dsts = group
                        last_fresh = spec if plen == 32 else None
                    fresh_prefixes.append(prefix)
                    fresh_dsts.append(packed)
                    if len(fresh_dsts) >= batch:
                        bulk.submit(create, fresh_key[0], metric, fresh_key[1], fresh_prefixes, fresh_dsts)
                        fresh_prefixes, fresh_dsts = fresh[fresh_key] = ([], [])
                    continue
                if prefix in conflicts:
                    continue
                if spec.onlink:
                    onlink.append((prefix, packed, plen, spec, have))
                    continue
                if len(spec.hops) == 1:
                    msg = RouteMsg(af, packed, plen, TABLE, PROTO_BGPD, scope, unicast, metric, 0, spec.hops[0][0], 0)
                else:
                    msg = self._message(packed, plen, spec, 0)
                self._queue_write(requests, meta, prefix, msg, have)
            for (gw, plen), (prefixes, dsts) in fresh.items():
                if dsts:
                    bulk.submit(create, gw, metric, plen, prefixes, dsts)
            for (old_metric, plen), (prefixes, dsts) in gone.items():
                if dsts:
                    bulk.submit(delete, b"", old_metric, plen, prefixes, dsts)
            bulk.finish()
        except BaseException:
            # Some of the batches may be in the kernel: trust nothing we hold until read back.
            self._need_readback = True
            self._dirty.update(dirty)
            with contextlib.suppress(Exception):
                bulk.close()
            raise
        devices: dict[str, int] = {}  # tunnel device → ifindex, looked up once per apply
        for prefix, packed, plen, spec, have in onlink:
            tunl = devices.get(spec.dev, 0)
            if not tunl:
                link = self._sock().link(spec.dev)
                if link is None:
                    self._unroutable[prefix] = f"{spec.describe()} (no {spec.dev})"
                    self._dirty.add(prefix)  # felix creates the device: retried at the next apply
                    continue
                tunl = devices[spec.dev] = link.ifindex
            self._queue_write(requests, meta, prefix, self._message(packed, plen, spec, tunl), have)
        for m in self._extra:
            requests.append((Op.DELETE_EXACT, m))
            meta.append(("", "extra", None))
        self._extra = []
        if requests:
            acks = self._sock().route_batch(requests)
            stats.writes += len(requests)
            ok, actual, want_map, intern, metric = AckCode.OK, self._actual, self._want, self._sig_intern, self.metric
            for (prefix, what, old), ack, req in zip(meta, acks, requests, strict=True):
                if ack.code is ok and what == "add" and old is None:  # a new route
                    value = (metric, want_map[prefix].hops)
                    actual[prefix] = intern.setdefault(value, value)
                    stats.added += 1
                    continue
                self._record(prefix, what, old, ack, req[1], stats, followups)
        if followups:  # the old metric's route, once the new one is in (make before break)
            self._sock().route_batch(followups)
        stats.duration = time.monotonic() - start
        if stats.did_work:
            log.info("fib apply: added=%d changed=%d removed=%d failed=%d conflicts=%d unroutable=%d routes=%d "
                     "writes=%d in %.3f s", stats.added, stats.changed, stats.removed, stats.failed, stats.conflicts,
                     len(self._unroutable), len(self._want), stats.writes, stats.duration)
        for prefix, why in list(stats.errors.items())[:5]:
            log.warning("fib: route not installed: %s", why, extra={"prefix": prefix})
        return stats

    def _spec_for(self, prefix: str, packed: bytes, plen: int) -> Spec | None:
        hops = self._next_hops.get(prefix)
        if not hops:
            self._unroutable.pop(prefix, None)
            return None
        if plen == 32 or not any(int.from_bytes(packed, "big") == int(n.network_address) and plen == n.prefixlen
                                 for n in self.connected):
            mode = pool_mode(packed, plen, self.pools) if self.pools else "Never"
            key = (hops, mode)
            if key in self._spec_cache:
                spec = self._spec_cache[key]
            else:
                spec = self._spec_cache[key] = route_spec(hops, mode, self.connected, self.vteps)
        else:
            spec = None  # never shadow a connected subnet
        if spec is None:
            self._unroutable[prefix] = ", ".join(hops)
        else:
            self._unroutable.pop(prefix, None)
        return spec

    def _queue_write(self, requests: list[tuple[Op, RouteMsg]],
                     meta: list[tuple[str, str, tuple[int, Signature | None] | None]], prefix: str, msg: RouteMsg,
                     have: tuple[int, Signature | None] | None) -> None:
        """A route of ours that is not there at our metric is created (its old metric's twin goes
        after it: make before break); one that is, is replaced in place."""
        if have is None or have[0] != self.metric:
            requests.append((Op.CREATE, msg))
            meta.append((prefix, "add", have))
        else:
            requests.append((Op.REPLACE, msg))
            meta.append((prefix, "change", have))

    def _message(self, packed: bytes, plen: int, spec: Spec, tunl: int) -> RouteMsg:
        if len(spec.hops) == 1:
            gw, onlink = spec.hops[0]
            return RouteMsg(socket.AF_INET, packed, plen, TABLE, PROTO_BGPD, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST,
                            self.metric, tunl if onlink else 0, gw, rtnl.RTNH_F_ONLINK if onlink else 0)
        hops = tuple(NextHop(tunl if o else 0, g, rtnl.RTNH_F_ONLINK if o else 0) for g, o in spec.hops)
        return RouteMsg(socket.AF_INET, packed, plen, TABLE, PROTO_BGPD, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST,
                        self.metric, multipath=hops)

    def _record(self, prefix: str, what: str, old: tuple[int, Signature | None] | None, ack: rtnl.Ack,
                msg: RouteMsg, stats: FibStats, followups: list[RouteRequest]) -> None:
        if what == "extra":
            return
        if ack.ok or (what == "remove" and ack.code is AckCode.NOT_FOUND):
            self._failed.pop(prefix, None)
            if what == "remove":
                self._actual.pop(prefix, None)
                stats.removed += 1
                return
            value = (self.metric, self._want[prefix].hops)
            self._actual[prefix] = self._sig_intern.setdefault(value, value)
            if what == "add":
                stats.added += 1
                if old is not None and old[0] != self.metric:
                    m = msg
                    followups.append(RouteRequest(Op.DELETE, RouteMsg(socket.AF_INET, m.dst, m.dst_len, TABLE,
                                                                      PROTO_BGPD, metric=old[0])))
            else:
                stats.changed += 1
            return
        if ack.code is AckCode.EXISTS and what == "add":
            # another owner holds this destination and metric: never replace it; look again after a readback
            self._conflicts.add(prefix)
            stats.conflicts += 1
            stats.errors[prefix] = "a route of another protocol holds this destination and metric"
            return
        if ack.code is AckCode.LOST:
            self._need_readback = True
        stats.failed += 1
        stats.errors[prefix] = ack.describe()
        self._failed[prefix] = ack.describe()
        self._dirty.add(prefix)  # retried at the next apply

    # --- introspection ---

    @property
    def unroutable(self) -> dict[str, str]:
        return dict(self._unroutable)

    @property
    def adopted(self) -> int:
        """Routes found in the kernel at start that are still waiting to be re-learned."""
        return len(self._adopted)

    def installed(self) -> int:
        return len(self._want)

    def kernel_prefixes(self) -> set[str]:
        """What we believe the kernel holds with our protocol (less what an apply is removing now)."""
        return set(self._actual) - set(self._withdrawing)
