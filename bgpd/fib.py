"""The FIB manager: turns selected BGP routes into kernel routes with bgpd's protocol (79).

What it owns: every route with protocol 79 (``calyx-bgpd``) in the main table of the namespace bgpd
runs in, through a :class:`calyx.kernel.routetable.RouteTable` (which never writes, replaces or
deletes a route of any other protocol: connected routes, felix's, BIRD's or FRR's stay untouched).
Every route carries the configured metric (``bgp_metric``, 20 by default).

How a selection becomes a route (:func:`kernel_route`):

- a next hop inside a connected subnet (a link-scope route of the kernel, read back at each
  resync) → ``<prefix> via <next hop>``; several equal next hops → one multipath route;
- a next hop that is not connected, for a prefix inside a pool whose ``ipip_mode`` is ``Always`` (or
  ``CrossSubnet``) → ``<prefix> via <next hop> dev tunl0 onlink`` (tunl0 is felix's device);
- a pool with ``ipip_mode: Always`` tunnels even connected next hops, as Calico does;
- otherwise the route is not installable here (counted, logged once per apply).

Prefixes that equal a connected subnet are never installed. Updates are cheap and do no I/O
(:meth:`Fib.update` marks prefixes dirty); :meth:`Fib.apply` computes their routes and lets the
RouteTable write the minimum in batched netlink messages. On start, the RouteTable reads the
kernel's protocol-79 routes back, so a restarted bgpd keeps forwarding through the routes already
there: :meth:`Fib.apply` is called with ``sweep=False`` until the RIB is complete (every peer sent
End-of-RIB or the startup grace ran out), and routes we no longer want are only removed then.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from calyx.kernel import rtnl
from calyx.kernel.routetable import PROTO_BGPD, ApplyResult, NextHop, Route, RouteTable
from calyx.model import IPPool

log = logging.getLogger(__name__)

TUNL = "tunl0"


@dataclass(frozen=True, slots=True)
class PoolEncap:
    """The encapsulation mode of one IPv4 pool."""

    cidr: IPv4Network
    ipip_mode: str


def pool_encaps(pools: Iterable[IPPool]) -> tuple[PoolEncap, ...]:
    out = [PoolEncap(p.cidr, p.ipip_mode) for p in pools if isinstance(p.cidr, IPv4Network)]
    return tuple(sorted(out, key=lambda e: -e.cidr.prefixlen))  # most specific first


def _connected(addr: IPv4Address, subnets: Iterable[IPv4Network]) -> bool:
    return any(addr in n for n in subnets)


def kernel_route(
    prefix: IPv4Network,
    next_hops: Iterable[str],
    *,
    connected: tuple[IPv4Network, ...],
    pools: tuple[PoolEncap, ...],
    metric: int,
) -> Route | None:
    """The kernel route for ``prefix`` reached through ``next_hops``, or None if none can be built."""
    mode = "Never"
    for pool in pools:
        if prefix.subnet_of(pool.cidr):
            mode = pool.ipip_mode
            break
    hops: list[NextHop] = []
    for text in next_hops:
        try:
            nh = IPv4Address(text)
        except ValueError:
            continue
        direct = _connected(nh, connected)
        if mode == "Always" or (mode == "CrossSubnet" and not direct):
            hops.append(NextHop(gateway=nh, oif=TUNL, onlink=True))
        elif direct:
            hops.append(NextHop(gateway=nh))
    if not hops:
        return None
    if len(hops) == 1:
        h = hops[0]
        return Route(prefix, gateway=h.gateway, oif=h.oif, onlink=h.onlink, metric=metric, proto=PROTO_BGPD)
    return Route(prefix, nexthops=tuple(hops), metric=metric, proto=PROTO_BGPD)


class Fib:
    """bgpd's routes in the kernel."""

    def __init__(self, metric: int, *, netns: str | None = None, table: RouteTable | None = None) -> None:
        self.metric = metric
        self.table = table if table is not None else RouteTable(PROTO_BGPD, netns=netns, metric_default=metric)
        self.netns = netns
        self.pools: tuple[PoolEncap, ...] = ()
        self.connected: tuple[IPv4Network, ...] = ()
        self._next_hops: dict[IPv4Network, tuple[str, ...]] = {}
        self._dirty: set[IPv4Network] = set()
        self._unroutable: dict[IPv4Network, str] = {}
        self._inherited: set[IPv4Network] = set()
        self._net_cache: dict[str, IPv4Network] = {}

    # --- inputs (no I/O) ---

    def set_pools(self, pools: Iterable[IPPool]) -> None:
        enc = pool_encaps(pools)
        if enc != self.pools:
            self.pools = enc
            self._dirty.update(self._next_hops)

    def set_connected(self, subnets: Iterable[IPv4Network]) -> None:
        conn = tuple(sorted(set(subnets), key=lambda n: (int(n.network_address), n.prefixlen)))
        if conn != self.connected:
            self.connected = conn
            self._dirty.update(self._next_hops)

    def _net(self, prefix: str) -> IPv4Network | None:
        net = self._net_cache.get(prefix)
        if net is None:
            try:
                net = IPv4Network(prefix)
            except ValueError:
                return None
            self._net_cache[prefix] = net
        return net

    def update(self, changes: Mapping[str, tuple[str, ...] | None]) -> None:
        """prefix → next hops of its selection (None: no route any more)."""
        for prefix, hops in changes.items():
            net = self._net(prefix)
            if net is None:
                continue
            if hops:
                if self._next_hops.get(net) != hops:
                    self._next_hops[net] = hops
                    self._dirty.add(net)
            elif net in self._next_hops:
                del self._next_hops[net]
                self._net_cache.pop(prefix, None)
                self._dirty.add(net)

    # --- kernel ---

    def read_connected(self) -> tuple[IPv4Network, ...]:
        """The IPv4 subnets the kernel has link-scope routes for (connected subnets)."""
        with rtnl.RtnlSocket(self.netns) as sock:
            routes = sock.dump_routes(socket.AF_INET, table=rtnl.RT_TABLE_MAIN)
        out = []
        for r in routes:
            if r.scope == rtnl.RT_SCOPE_LINK and r.type == rtnl.RTN_UNICAST and r.proto != PROTO_BGPD and not r.gateway:
                out.append(IPv4Network((IPv4Address(r.dst), r.dst_len)))
        return tuple(out)

    def resync(self) -> None:
        """Re-read connected subnets and the kernel's protocol-79 routes at the next apply."""
        try:
            self.set_connected(self.read_connected())
        except OSError as exc:
            log.warning("cannot read connected subnets: %s", exc)
        self.table.resync()

    def adopt(self) -> int:
        """Take over the protocol-79 routes the kernel already holds (a restart of bgpd).

        They become desired as they are, so the first apply changes nothing; those the RIB does not
        learn again are removed by the first apply with ``sweep``. Returns how many were adopted.
        """
        with rtnl.RtnlSocket(self.netns) as sock:
            msgs = sock.dump_routes(socket.AF_INET, table=rtnl.RT_TABLE_MAIN, proto=PROTO_BGPD)
            names = {link.ifindex: name for name, link in sock.links().items()}
        n = 0
        for m in msgs:
            route = _route_from_kernel(m, names)
            if route is None or route.dst in self._next_hops:
                continue
            self.table.set_route(route)
            self._inherited.add(route.dst)  # type: ignore[arg-type]
            n += 1
        return n

    def apply(self, *, sweep: bool) -> ApplyResult:
        """Write the dirty prefixes. Without ``sweep``, adopted routes nobody re-learned stay."""
        start = time.monotonic()
        dirty, self._dirty = self._dirty, set()
        for net in dirty:
            hops = self._next_hops.get(net)
            route = None
            if hops and net not in self.connected:
                route = kernel_route(net, hops, connected=self.connected, pools=self.pools, metric=self.metric)
                if route is None:
                    self._unroutable[net] = ", ".join(hops)
                else:
                    self._unroutable.pop(net, None)
            else:
                self._unroutable.pop(net, None)
            self._inherited.discard(net)
            if route is not None:
                self.table.set_route(route)
            else:
                self.table.remove_route(net)
        swept = 0
        if sweep and self._inherited:
            for net in self._inherited:
                if net not in self._next_hops:
                    self.table.remove_route(net)
                    swept += 1
            self._inherited.clear()
        result = self.table.apply()
        if result.did_work or swept:
            log.info(
                "fib apply: added=%d changed=%d removed=%d (stale after restart: %d) failed=%d unroutable=%d "
                "routes=%d in %.3f s",
                result.added, result.changed, result.removed, swept, result.failed, len(self._unroutable),
                len(self._next_hops), time.monotonic() - start,
            )  # fmt: skip
        return result

    @property
    def adopted(self) -> int:
        """Routes taken over from the kernel at start that are still waiting to be re-learned."""
        return len(self._inherited)

    @property
    def unroutable(self) -> dict[IPv4Network, str]:
        return dict(self._unroutable)

    def installed(self) -> int:
        return len(self._next_hops)

    def close(self) -> None:
        self.table.close()


def _route_from_kernel(m: rtnl.RouteMsg, names: Mapping[int, str]) -> Route | None:
    """A protocol-79 kernel route as a :class:`Route` (None for shapes bgpd never writes)."""
    if m.family != socket.AF_INET or m.type != rtnl.RTN_UNICAST:
        return None
    dst = IPv4Network((IPv4Address(m.dst), m.dst_len))
    if m.multipath:
        hops = []
        for nh in m.multipath:
            if nh.gateway is None:
                return None
            onlink = bool(nh.flags & rtnl.RTNH_F_ONLINK)
            hops.append(NextHop(gateway=IPv4Address(nh.gateway), oif=names.get(nh.oif) if onlink else None,
                                onlink=onlink))
        return Route(dst, nexthops=tuple(hops), metric=m.metric, proto=PROTO_BGPD)
    if m.gateway is None:
        return None
    onlink = bool(m.flags & rtnl.RTNH_F_ONLINK)
    return Route(dst, gateway=IPv4Address(m.gateway), oif=names.get(m.oif) if onlink else None, onlink=onlink,
                 metric=m.metric, proto=PROTO_BGPD)
