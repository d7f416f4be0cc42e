"""ExaBGP's API text protocol, both ways, as pure functions: line classification and command text.

What it owns: the knowledge of ExaBGP 5.0's wire formats (``docs/bgpd.md`` has samples). Nothing
here does I/O; :mod:`bgpd.exabgp` feeds lines in and writes commands out.

**From ExaBGP** (``encoder json``) every line is one of:

- an acknowledgement, plain text even with the JSON encoder: ``done``, ``error`` or ``shutdown``
  (:class:`Ack`);
- a JSON object: a session ``state`` change (``connected``, ``up``, ``down`` with a reason), an
  ``open`` message (the peer's router id and graceful-restart time), an ``update`` (announced
  prefixes grouped by next hop, withdrawn prefixes), an End-of-RIB, a ``notification``, or ExaBGP's
  own ``shutdown`` notice; or a ``show adj-rib in json`` line in the v2 format
  (``{"peer": ..., "route": {"nlri": {..., "nexthop": ...}, "attributes": ...}}``);
- any other text: the output of a text ``show`` command, or garbage.

:func:`parse_line` never raises: anything it cannot make sense of becomes :class:`Garbage` (logged
and counted by the caller), so a peer or an ExaBGP bug cannot crash bgpd.

**To ExaBGP**: :func:`announce_commands` and :func:`withdraw_commands` group prefixes by attributes
into ``neighbor <ip> announce attributes ... nlri <p1> <p2> ...`` lines of at most ``batch``
prefixes (one line per route is ~5 times slower), :func:`eor_command` sends End-of-RIB.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bgpd.announce import OutAttrs
from bgpd.rib import Attrs

DEFAULT_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Ack:
    """``done``, ``error`` or ``shutdown``."""

    word: str

    @property
    def ok(self) -> bool:
        return self.word == "done"


@dataclass(frozen=True, slots=True)
class StateEvent:
    peer: str
    state: str  # connected, up, down
    reason: str = ""


@dataclass(frozen=True, slots=True)
class OpenEvent:
    """An OPEN received from ``peer``."""

    peer: str
    router_id: str | None
    peer_as: int | None
    hold_time: int | None
    #: the peer's graceful-restart time (None: no GR capability)
    restart_time: int | None


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """An UPDATE received from ``peer``: announcements grouped by (attributes, next hop)."""

    peer: str
    announce: tuple[tuple[Attrs, str, tuple[str, ...]], ...]
    withdraw: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EorEvent:
    peer: str
    family: str


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """A NOTIFICATION (``peer`` None: ExaBGP's own shutdown notice)."""

    peer: str | None
    code: int | None
    subcode: int | None
    message: str


@dataclass(frozen=True, slots=True)
class RibLine:
    """One route of ``show adj-rib in json`` (v2 format)."""

    peer: str
    prefix: str
    next_hop: str
    attrs: Attrs


@dataclass(frozen=True, slots=True)
class TextLine:
    """Text that is not an acknowledgement (``show`` output)."""

    text: str


@dataclass(frozen=True, slots=True)
class Garbage:
    """A line that could not be understood, and why."""

    text: str
    reason: str


Event = StateEvent | OpenEvent | UpdateEvent | EorEvent | NotificationEvent | RibLine
Line = Ack | Event | TextLine | Garbage

ACK_WORDS = frozenset(("done", "error", "shutdown"))


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _as_path(raw: Any) -> tuple[tuple[int, ...], int]:
    """ExaBGP's ``{"0": {"element": "as-sequence", "value": [..]}, ...}`` → (ASNs, path length)."""
    if isinstance(raw, list):  # older formats: a plain list
        flat = tuple(a for a in raw if isinstance(a, int))
        return flat, len(flat)
    if not isinstance(raw, dict):
        return (), 0
    asns: list[int] = []
    length = 0
    for key in sorted(raw, key=lambda k: int(k) if str(k).isdigit() else 0):
        seg = raw[key]
        if not isinstance(seg, dict):
            continue
        values = [a for a in seg.get("value", []) if isinstance(a, int)]
        asns.extend(values)
        element = seg.get("element", "")
        if element in ("as-set", "confed-set"):
            length += 1 if values else 0
        elif element.startswith("confed"):
            continue
        else:
            length += len(values)
    return tuple(asns), length


def _communities(raw: Any) -> tuple[str, ...]:
    out: list[str] = []
    if isinstance(raw, list):
        for c in raw:
            if isinstance(c, list) and all(isinstance(x, int) for x in c):
                out.append(":".join(str(x) for x in c))
            elif isinstance(c, str):
                out.append(c)
    return tuple(out)


_ATTRS_CACHE: dict[str, Attrs] = {}


def parse_attrs(raw: Any) -> Attrs:
    """ExaBGP's ``attribute`` object → :class:`Attrs` (interned: equal attributes share one object)."""
    if not isinstance(raw, dict):
        return Attrs()
    as_path, plen = _as_path(raw.get("as-path"))
    origin = raw.get("origin", "igp")
    cl = raw.get("cluster-list")
    orig = raw.get("originator-id")
    attrs = Attrs(
        origin=origin if origin in ("igp", "egp", "incomplete") else "incomplete",
        as_path=as_path,
        as_path_len=plen,
        local_pref=_int(raw.get("local-preference")),
        med=_int(raw.get("med")),
        communities=_communities(raw.get("community")),
        large_communities=_communities(raw.get("large-community")),
        originator_id=orig if isinstance(orig, str) else None,
        cluster_list=tuple(c for c in cl if isinstance(c, str)) if isinstance(cl, list) else (),
    )
    cached = _ATTRS_CACHE.get(repr(attrs))
    if cached is not None:
        return cached
    if len(_ATTRS_CACHE) > 10000:
        _ATTRS_CACHE.clear()
    _ATTRS_CACHE[repr(attrs)] = attrs
    return attrs


def _nlri_list(items: Any) -> Iterator[str]:
    if not isinstance(items, list):
        return
    for item in items:
        if isinstance(item, dict):
            nlri = item.get("nlri")
            if isinstance(nlri, str):
                yield nlri
        elif isinstance(item, str):
            yield item


def _peer_of(obj: dict[str, Any]) -> str | None:
    nb = obj.get("neighbor")
    if not isinstance(nb, dict):
        return None
    addr = nb.get("address")
    if isinstance(addr, dict) and isinstance(addr.get("peer"), str):
        return str(addr["peer"])
    return None


def _parse_json(obj: Any, text: str) -> Line:
    if not isinstance(obj, dict):
        return Garbage(text, "JSON value is not an object")
    if "route" in obj and "peer" in obj:
        return _parse_rib_line(obj, text)
    kind = obj.get("type")
    peer = _peer_of(obj)
    if kind == "notification" and obj.get("notification") == "shutdown":
        return NotificationEvent(None, None, None, "shutdown")
    if peer is None:
        return Garbage(text, f"message of type {kind!r} without a neighbour address")
    nb = obj["neighbor"]
    if kind == "state":
        state = nb.get("state")
        if not isinstance(state, str):
            return Garbage(text, "state message without a state")
        return StateEvent(peer, state, str(nb.get("reason", "")))
    if kind == "open":
        op = nb.get("open")
        if not isinstance(op, dict):
            return Garbage(text, "open message without its body")
        if nb.get("direction") == "send":
            return TextLine(text)
        restart: int | None = None
        caps = op.get("capabilities")
        if isinstance(caps, dict):
            gr = caps.get("64")
            if isinstance(gr, dict):
                restart = _int(gr.get("time"))
                if restart is None:
                    restart = 0
        rid = op.get("router_id")
        return OpenEvent(peer, rid if isinstance(rid, str) else None, _int(op.get("asn")),
                         _int(op.get("hold_time")), restart)
    if kind == "notification":
        n = nb.get("notification")
        if isinstance(n, dict):
            return NotificationEvent(peer, _int(n.get("code")), _int(n.get("subcode")), str(n.get("message", "")))
        return NotificationEvent(peer, None, None, str(n))
    if kind == "update":
        msg = nb.get("message")
        if not isinstance(msg, dict):
            return Garbage(text, "update without a message")
        if nb.get("direction") == "send":
            return TextLine(text)
        eor = msg.get("eor")
        if isinstance(eor, dict):
            return EorEvent(peer, f"{eor.get('afi')} {eor.get('safi')}")
        upd = msg.get("update")
        if not isinstance(upd, dict):
            return Garbage(text, "update message without an update")
        attrs = parse_attrs(upd.get("attribute"))
        announce: list[tuple[Attrs, str, tuple[str, ...]]] = []
        ann = upd.get("announce")
        if isinstance(ann, dict):
            for family, by_nh in ann.items():
                if family != "ipv4 unicast" or not isinstance(by_nh, dict):
                    continue
                for nh, items in by_nh.items():
                    prefixes = tuple(_nlri_list(items))
                    if prefixes:
                        announce.append((attrs, str(nh), prefixes))
        withdraw: list[str] = []
        wd = upd.get("withdraw")
        if isinstance(wd, dict):
            for family, items in wd.items():
                if family == "ipv4 unicast":
                    withdraw.extend(_nlri_list(items))
        return UpdateEvent(peer, tuple(announce), tuple(withdraw))
    if kind in ("keepalive", "refresh", "operational", "signal"):
        return TextLine(text)
    return Garbage(text, f"unknown message type {kind!r}")


def _parse_rib_line(obj: dict[str, Any], text: str) -> Line:
    peer = obj.get("peer")
    route = obj.get("route")
    if not isinstance(peer, dict) or not isinstance(route, dict):
        return Garbage(text, "adj-rib line without peer or route")
    nlri = route.get("nlri")
    if not isinstance(nlri, dict):
        return Garbage(text, "adj-rib line without nlri")
    fam = nlri.get("family")
    if isinstance(fam, dict) and (fam.get("afi"), fam.get("safi")) != ("ipv4", "unicast"):
        return TextLine(text)
    prefix, nh, addr = nlri.get("prefix"), nlri.get("nexthop"), peer.get("address")
    if not (isinstance(prefix, str) and isinstance(nh, str) and isinstance(addr, str)):
        return Garbage(text, "adj-rib line without prefix, next hop or peer address")
    return RibLine(addr, prefix, nh, parse_attrs(route.get("attributes")))


def parse_line(line: str | bytes) -> Line:
    """Classify one line from ExaBGP. Never raises."""
    try:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        text = text.strip()
        if text in ACK_WORDS:
            return Ack(text)
        if not text.startswith("{") and not text.startswith("["):
            return TextLine(text)
        try:
            obj = json.loads(text)
        except ValueError as exc:
            return Garbage(text, f"invalid JSON: {exc}")
        if isinstance(obj, list):
            return TextLine(text)  # show neighbor json
        return _parse_json(obj, text)
    except Exception as exc:  # a parser bug must not kill the daemon
        return Garbage(str(line)[:200], f"parser error: {exc!r}")


# --- commands -------------------------------------------------------------------------------------


def attrs_text(a: OutAttrs) -> str:
    """ExaBGP's attribute syntax for ``announce attributes``."""
    parts = [f"next-hop {a.next_hop}", f"origin {a.origin}"]
    if a.as_path:
        parts.append("as-path [ " + " ".join(str(x) for x in a.as_path) + " ]")
    if a.local_pref is not None:
        parts.append(f"local-preference {a.local_pref}")
    if a.med is not None:
        parts.append(f"med {a.med}")
    if a.communities:
        parts.append("community [ " + " ".join(a.communities) + " ]")
    if a.large_communities:
        parts.append("large-community [ " + " ".join(a.large_communities) + " ]")
    if a.originator_id is not None:
        parts.append(f"originator-id {a.originator_id}")
    if a.cluster_list:
        parts.append("cluster-list [ " + " ".join(a.cluster_list) + " ]")
    return " ".join(parts)


def _group(routes: Mapping[str, OutAttrs]) -> dict[OutAttrs, list[str]]:
    groups: dict[OutAttrs, list[str]] = {}
    for prefix, attrs in routes.items():
        groups.setdefault(attrs, []).append(prefix)
    return groups


def announce_commands(neighbor: str, routes: Mapping[str, OutAttrs], batch: int = DEFAULT_BATCH) -> list[str]:
    """``neighbor <ip> announce attributes ... nlri ...`` lines, ``batch`` prefixes each at most."""
    out: list[str] = []
    for attrs, prefixes in _group(routes).items():
        head = f"neighbor {neighbor} announce attributes {attrs_text(attrs)} nlri "
        for i in range(0, len(prefixes), batch):
            out.append(head + " ".join(prefixes[i : i + batch]))
    return out


def withdraw_commands(neighbor: str, routes: Mapping[str, OutAttrs], batch: int = DEFAULT_BATCH) -> list[str]:
    """``neighbor <ip> withdraw attributes next-hop ... nlri ...`` lines."""
    out: list[str] = []
    by_nh: dict[str, list[str]] = {}
    for prefix, attrs in routes.items():
        by_nh.setdefault(attrs.next_hop, []).append(prefix)
    for nh, prefixes in by_nh.items():
        head = f"neighbor {neighbor} withdraw attributes next-hop {nh} nlri "
        for i in range(0, len(prefixes), batch):
            out.append(head + " ".join(prefixes[i : i + batch]))
    return out


def route_commands(neighbor: str, routes: Mapping[str, OutAttrs]) -> list[str]:
    """One ``announce route`` per prefix (the slow form; kept for the benchmark)."""
    return [f"neighbor {neighbor} announce route {p} {attrs_text(a)}" for p, a in routes.items()]


def eor_command(neighbor: str) -> str:
    return f"neighbor {neighbor} announce eor ipv4 unicast"


def chunked(items: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for item in items:
        buf.append(item)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
