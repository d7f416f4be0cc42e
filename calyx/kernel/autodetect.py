"""IPv4 address autodetection: which of this host's addresses is its Node's ``ipv4``.

What it owns: nothing in the kernel. It only reads (links, IPv4 addresses, the main routing table,
``ip route get``) over rtnetlink with pyroute2, in the calling process's network namespace or in
``netns``. :mod:`calyx.noderegister` writes what it finds into the datastore.

The methods (Calico's IP autodetection, ``IP_AUTODETECTION_METHOD``, in spirit):

``default-route``
    the interface of the IPv4 default route in the main table (the one with the lowest metric; the
    first next hop of a multipath route), and its first global-scope IPv4 address;
``interface=REGEX``
    the first interface, in name order, whose **whole** name matches REGEX, that is up and has a
    global-scope IPv4 address; that address (``interface=eth0``, ``interface=ens[0-9]+``);
``can-reach=IP``
    the source address the kernel would use to reach IP (``ip route get IP``), with the prefix
    length it has on its interface;
``skip``
    no detection: the Node's ``ipv4`` is left alone.

"First address" means the kernel's order on the interface (the primary address of the first
subnet comes first). Global scope leaves out loopback and link-local addresses. Every failure is
a :class:`DetectionError` whose message says what the method looked at and what it found.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from calyx.kernel.rtnl import IFF_UP, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN

METHODS = ("default-route", "interface=REGEX", "can-reach=IP", "skip")
DEFAULT = "default-route"


class DetectionError(Exception):
    """Nothing suitable was found; the message says what the method looked at and found."""


@dataclass(frozen=True)
class Method:
    """A parsed autodetection method (see the module docstring)."""

    kind: str  # "default-route", "interface", "can-reach" or "skip"
    regex: re.Pattern[str] | None = None
    target: ipaddress.IPv4Address | None = None

    @classmethod
    def parse(cls, text: str) -> Method:
        """Parse ``text``; ValueError names what would be accepted."""
        kind, sep, arg = text.strip().partition("=")
        kind = kind.strip().lower()
        arg = arg.strip()
        if kind in ("default-route", "skip") and not sep:
            return cls(kind)
        if kind == "interface" and arg:
            try:
                return cls(kind, regex=re.compile(arg))
            except re.error as exc:
                raise ValueError(f"interface={arg}: not a valid regular expression ({exc})") from None
        if kind == "can-reach" and arg:
            try:
                return cls(kind, target=ipaddress.IPv4Address(arg))
            except ValueError:
                raise ValueError(f"can-reach={arg}: not an IPv4 address (a.b.c.d)") from None
        raise ValueError(f"expected one of {', '.join(METHODS)}, got {text!r}")

    def __str__(self) -> str:
        if self.regex is not None:
            return f"interface={self.regex.pattern}"
        if self.target is not None:
            return f"can-reach={self.target}"
        return self.kind


@dataclass(frozen=True)
class Detected:
    """The address found and the interface it is on."""

    address: ipaddress.IPv4Interface
    interface: str


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute  # not at import time: calyx.config validates methods through this module

    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _links(ipr: Any) -> dict[int, tuple[str, bool]]:
    """ifindex → (name, administratively up)."""
    return {int(m["index"]): (str(m.get_attr("IFLA_IFNAME")), bool(m["flags"] & IFF_UP)) for m in ipr.get_links()}


def _addresses(ipr: Any) -> dict[int, list[tuple[ipaddress.IPv4Interface, int]]]:
    """ifindex → [(address with prefix length, scope)] in the kernel's order."""
    out: dict[int, list[tuple[ipaddress.IPv4Interface, int]]] = {}
    for m in ipr.get_addr(family=2):
        addr = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if addr is None:
            continue
        out.setdefault(int(m["index"]), []).append((ipaddress.IPv4Interface(f"{addr}/{m['prefixlen']}"),
                                                    int(m["scope"])))
    return out


def _first_global(addrs: list[tuple[ipaddress.IPv4Interface, int]]) -> ipaddress.IPv4Interface | None:
    for addr, scope in addrs:
        # the scope is what `ip addr add` was told (global unless said otherwise): judge the address too
        if scope == RT_SCOPE_UNIVERSE and not (addr.ip.is_link_local or addr.ip.is_loopback):
            return addr
    return None


def _describe(addrs: list[tuple[ipaddress.IPv4Interface, int]]) -> str:
    if not addrs:
        return "no IPv4 address"
    scopes = {0: "global", 253: "link", 254: "host"}
    return "no global IPv4 address, only " + ", ".join(f"{a} (scope {scopes.get(s, s)})" for a, s in addrs)


def _default_route(ipr: Any, links: dict[int, tuple[str, bool]],
                   addrs: dict[int, list[tuple[ipaddress.IPv4Interface, int]]]) -> Detected:
    best: tuple[int, int] | None = None  # (metric, oif)
    for route in ipr.get_routes(family=2, dst_len=0, table=RT_TABLE_MAIN):
        if route["type"] != 1:  # unicast only: a blackhole/unreachable default leads nowhere
            continue
        oif = route.get_attr("RTA_OIF")
        if oif is None:
            mp = route.get_attr("RTA_MULTIPATH")
            oif = mp[0]["oif"] if mp else None
        if oif is None:
            continue
        metric = int(route.get_attr("RTA_PRIORITY") or 0)
        if best is None or metric < best[0]:
            best = (metric, int(oif))
    if best is None:
        raise DetectionError("no IPv4 default route in the main table")
    oif = best[1]
    name = links.get(oif, (f"ifindex {oif}", False))[0]
    found = addrs.get(oif, [])
    addr = _first_global(found)
    if addr is None:
        raise DetectionError(f"the default route leaves by {name}, which has {_describe(found)}")
    return Detected(addr, name)


def _interface(regex: re.Pattern[str], links: dict[int, tuple[str, bool]],
               addrs: dict[int, list[tuple[ipaddress.IPv4Interface, int]]]) -> Detected:
    matching = sorted((name, up, index) for index, (name, up) in links.items() if regex.fullmatch(name))
    if not matching:
        names = sorted(name for name, _ in links.values())
        raise DetectionError(f"no interface name matches {regex.pattern!r} (interfaces: {', '.join(names)})")
    why = []
    for name, up, index in matching:
        addr = _first_global(addrs.get(index, []))
        if not up:
            why.append(f"{name} is down")
        elif addr is None:
            why.append(f"{name} has {_describe(addrs.get(index, []))}")
        else:
            return Detected(addr, name)
    raise DetectionError("no matching interface is up with a global IPv4 address: " + "; ".join(why))


def _can_reach(ipr: Any, target: ipaddress.IPv4Address, links: dict[int, tuple[str, bool]],
               addrs: dict[int, list[tuple[ipaddress.IPv4Interface, int]]]) -> Detected:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        routes = ipr.route("get", dst=str(target))
    except NetlinkError as exc:
        raise DetectionError(f"no route to {target} ({os.strerror(exc.code)})") from None
    if not routes:
        raise DetectionError(f"no route to {target}")
    route = routes[0]
    src = route.get_attr("RTA_PREFSRC")
    oif = route.get_attr("RTA_OIF")
    name = links.get(int(oif), (f"ifindex {oif}", False))[0] if oif is not None else "no interface"
    if src is None:
        raise DetectionError(f"the route to {target} (via {name}) has no source address")
    ip = ipaddress.IPv4Address(src)
    # the address on the route's interface first; then anywhere (a target that is a local address
    # is reached through lo, with the source on another interface)
    order = ([int(oif)] if oif is not None else []) + sorted(addrs)
    for index in order:
        for addr, _scope in addrs.get(index, []):
            if addr.ip == ip:
                return Detected(addr, links.get(index, (f"ifindex {index}", False))[0])
    raise DetectionError(f"the route to {target} leaves by {name} from {ip}, which no interface holds")


def detect_ipv4(method: Method, *, netns: str | None = None) -> Detected | None:
    """This host's IPv4 address by ``method`` (None for ``skip``); raises :class:`DetectionError`."""
    if method.kind == "skip":
        return None
    with _ipr(netns) as ipr:
        links = _links(ipr)
        addrs = _addresses(ipr)
        if method.kind == "default-route":
            return _default_route(ipr, links, addrs)
        if method.kind == "interface":
            assert method.regex is not None
            return _interface(method.regex, links, addrs)
        if method.kind == "can-reach":
            assert method.target is not None
            return _can_reach(ipr, method.target, links, addrs)
    raise ValueError(f"unknown autodetection method {method.kind!r}")
