"""Workload endpoints in kernel terms: routes (proto 78), per-interface sysctls, link events.

What it owns:

* through a :class:`~calyx.kernel.routetable.RouteTable` with protocol 78 (``calyx-felix``) in the
  main table: one ``/32`` (or ``/128``) route per local endpoint address to its host-side veth,
  scope link, and one blackhole route per IPAM block affine to this node (unused addresses of the
  block are dropped here instead of following the default route back out). Routes with another
  protocol are never touched (the route table driver guarantees it);
* the sysctls of each workload interface that a routed veth needs: ``proxy_arp=1`` (the workload's
  default gateway 169.254.1.1 is answered by the host), ``neigh/<if>/proxy_delay=0`` (no random
  delay on those answers) and ``conf/<if>/forwarding=1``; written only when they differ;
* host-wide IP forwarding: checked at every apply; when off, felix logs an ERROR and reports it in
  status, and turns it on when configured with ``ip_forwarding = "enable"``.

The CNI plugin races the datastore: an endpoint may arrive before its interface exists. Its routes
are then *pending* in the route table; :class:`LinkWatcher` listens to netlink link events
(pyroute2) and reports interfaces that appear or come up, which re-queues their routes and sysctls.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from calyx.kernel.routetable import PROTO_FELIX, ApplyResult, IPNetwork, Route, RouteTable, RouteType
from felix.rules import WORKLOAD_PREFIX

log = logging.getLogger(__name__)

_SYSCTLS = (
    ("net/ipv4/conf/{}/proxy_arp", "1"),
    ("net/ipv4/neigh/{}/proxy_delay", "0"),
    ("net/ipv4/conf/{}/forwarding", "1"),
)


@dataclass(frozen=True, slots=True)
class EndpointApply:
    routes: ApplyResult
    sysctl_writes: int
    sysctl_pending: int
    ip_forwarding: bool | None


class EndpointManager:
    """Desired routes and sysctls of local endpoints; :meth:`apply` does the I/O."""

    def __init__(
        self,
        routes: RouteTable | None = None,
        *,
        proc_sys: str = "/proc/sys",
        ip_forwarding: str = "warn",
    ) -> None:
        self.routes = routes if routes is not None else RouteTable(PROTO_FELIX)
        self.proc_sys = Path(proc_sys)
        self.ip_forwarding_mode = ip_forwarding
        self._ifaces: dict[str, str] = {}  # endpoint key -> iface
        self._nets: dict[str, tuple[IPNetwork, ...]] = {}
        self._owner: dict[IPNetwork, str] = {}  # route dst -> endpoint key
        self._blocks: set[IPNetwork] = set()
        self._sysctl_dirty: set[str] = set()
        self._route_dirty: set[IPNetwork] = set()
        self._forwarding_logged = False
        self.ip_forwarding: bool | None = None

    # --- desired state (no I/O) -------------------------------------------------------------------

    def set_endpoint(self, key: str, iface: str, nets: Iterable[IPNetwork]) -> None:
        nets = tuple(nets)
        if self._ifaces.get(key) == iface and self._nets.get(key) == nets:
            return
        if key in self._ifaces:
            self.remove_endpoint(key)
        self._ifaces[key] = iface
        self._nets[key] = nets
        for net in nets:
            other = self._owner.get(net)
            if other is not None and other != key:
                log.warning("address claimed by two local endpoints (last wins)",
                            extra={"net": net, "endpoints": [other, key]})
            self._owner[net] = key
            self._route_dirty.add(net)
        self._sysctl_dirty.add(iface)

    def remove_endpoint(self, key: str) -> None:
        self._ifaces.pop(key, None)
        for net in self._nets.pop(key, ()):
            if self._owner.get(net) == key:
                del self._owner[net]
                self._route_dirty.add(net)

    def set_blocks(self, blocks: Iterable[IPNetwork]) -> None:
        new = set(blocks)
        self._route_dirty |= new ^ self._blocks
        self._blocks = new

    def _flush_routes(self) -> None:
        """Hand the dirty destinations to the route table (the route objects are built here, at
        apply time, so that updates stay cheap)."""
        dirty, self._route_dirty = self._route_dirty, set()
        for net in dirty:
            key = self._owner.get(net)
            if key is not None:
                self.routes.set_route(Route(dst=net, oif=self._ifaces[key]))
            elif net in self._blocks:
                self.routes.set_route(Route(dst=net, type=RouteType.BLACKHOLE))
            else:
                self.routes.remove_route(net)

    @property
    def desired_routes(self) -> dict[IPNetwork, Route]:
        self._flush_routes()
        return self.routes.desired

    def on_link_up(self, ifname: str) -> None:
        """An interface appeared or came up (from :class:`LinkWatcher`)."""
        self.routes.on_link_up(ifname)
        if ifname in self._ifaces.values():
            self._sysctl_dirty.add(ifname)

    def resync(self) -> None:
        """Periodic: read routes back and re-check every interface's sysctls."""
        self.routes.resync()
        self._sysctl_dirty.update(self._ifaces.values())

    @property
    def ifaces(self) -> dict[str, str]:
        return dict(self._ifaces)

    # --- I/O ------------------------------------------------------------------------------------------

    def _write_if_needed(self, rel: str, value: str) -> bool | None:
        """True if written, False if already right, None if the file does not exist (no interface)."""
        path = self.proc_sys / rel
        try:
            if path.read_text().strip() == value:
                return False
            path.write_text(value)
            return True
        except FileNotFoundError:
            return None

    def check_forwarding(self) -> bool | None:
        try:
            on = self._write_if_needed("net/ipv4/ip_forward", "1") if self.ip_forwarding_mode == "enable" else None
            if on is True:
                log.warning("IP forwarding was off: turned it on (ip_forwarding = \"enable\")")
            value = (self.proc_sys / "net/ipv4/ip_forward").read_text().strip() == "1"
        except OSError as exc:
            log.error("cannot read or set net.ipv4.ip_forward: %s", exc)
            return None
        if not value and not self._forwarding_logged:
            log.error("IP FORWARDING IS OFF on this host (net.ipv4.ip_forward=0): workloads cannot reach "
                      "anything beyond this host. Set ip_forwarding = \"enable\" to let felix turn it on.")
            self._forwarding_logged = True
        elif value:
            self._forwarding_logged = False
        self.ip_forwarding = value
        return value

    def apply(self) -> EndpointApply:
        forwarding = self.check_forwarding()
        writes = 0
        pending = 0
        wanted = set(self._ifaces.values())
        for iface in sorted(self._sysctl_dirty):
            if iface not in wanted:
                continue
            missing = False
            for pattern, value in _SYSCTLS:
                try:
                    res = self._write_if_needed(pattern.format(iface), value)
                except OSError as exc:
                    log.warning("sysctl write failed: %s", exc, extra={"iface": iface})
                    missing = True
                    break
                if res is None:
                    missing = True
                    break
                writes += bool(res)
            if missing:
                pending += 1  # retried on the link event
        self._sysctl_dirty = set()
        self._flush_routes()
        result = self.routes.apply()
        return EndpointApply(result, writes, pending, forwarding)


class LinkWatcher:
    """A thread reporting workload interfaces that appear or come up (netlink RTM_NEWLINK)."""

    def __init__(self, callback: Callable[[str], None], prefix: str = WORKLOAD_PREFIX) -> None:
        self._callback = callback
        self._prefix = prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="felix-links", daemon=True)
        self._ipr: object | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        ipr = self._ipr
        if ipr is not None:
            with contextlib.suppress(Exception):
                ipr.close()  # type: ignore[attr-defined]

    def _main(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        while not self._stop.is_set():
            try:
                with IPRoute() as ipr:
                    self._ipr = ipr
                    ipr.bind(groups=RTMGRP_LINK)  # links only: not our own route writes
                    while not self._stop.is_set():
                        for msg in ipr.get():
                            if msg.get("event") != "RTM_NEWLINK":
                                continue
                            name = msg.get_attr("IFLA_IFNAME")
                            if isinstance(name, str) and name.startswith(self._prefix):
                                self._callback(name)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("link event socket failed (reopening): %s", exc)
                time.sleep(1.0)
