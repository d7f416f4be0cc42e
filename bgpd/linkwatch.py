"""Kernel change notifications that make bgpd's FIB stale: links, IPv4 addresses, deleted routes.

What it owns: one raw ``NETLINK_ROUTE`` socket subscribed to three rtnetlink multicast groups in
bgpd's network namespace, read from bgpd's asyncio loop (``loop.add_reader``). It changes nothing
in the kernel; it only tells the daemon "resync now" (``on_change``), at most once per burst.

Why: the kernel removes bgpd's routes without telling anyone. IPv4 sends **no RTM_DELROUTE** for
the routes it flushes when their device goes down or is deleted, so when felix recreates
``vxlan.calyx`` (a VNI or port change) or ``tunl0`` flaps, every route through it is gone, and a
connected subnet appearing or disappearing changes which next hops are reachable. Without this
watcher bgpd only noticed at its periodic resync (60 s).

What counts as a change (:class:`KernelState`, pure, fed the raw datagrams):

- ``RTNLGRP_LINK``: a tunnel device (``tunl0``, ``vxlan.calyx``) created, changed or deleted; any
  other link whose ``IFF_UP`` changed or that was deleted, *if it has an IPv4 address* (a link
  without one carries no route of ours: workload veths come and go without a resync);
- ``RTNLGRP_IPV4_IFADDR``: any IPv4 address added or removed (connected subnets);
- ``RTNLGRP_IPV4_ROUTE``: an RTM_DELROUTE of a protocol-79 route in the main table that the FIB
  still believes installed (``holds_routes``, asked once per read: our own deletes are already
  forgotten by the time their notifications are read, so they do not count). A classic BPF
  filter on the socket drops every RTM_NEWROUTE and every other protocol's RTM_DELROUTE in the
  kernel, so installing 100k routes does not flood the socket;
- ``ENOBUFS`` (the socket overflowed: notifications were lost) → resync, since anything may have
  happened.

Links (names, flags) and which of them have addresses are learned from an ``RTM_GETLINK`` dump,
then an ``RTM_GETADDR`` dump, sent on the same socket at start (their replies update the state
without counting as changes), and then from the notifications.

Debounce (:class:`Debounce`, pure): the first change opens a window; the daemon is told once the
kernel has been quiet for ``quiet`` seconds (150 ms) or ``max_wait`` (1 s) after the first change,
whichever comes first, with every reason collected in between.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from calyx.kernel import netns as _netns
from calyx.kernel import rtnl

log = logging.getLogger(__name__)

TUNNEL_DEVICES = frozenset(("tunl0", "vxlan.calyx"))
PROTO_BGPD = 79
QUIET = 0.15
MAX_WAIT = 1.0
RCVBUF = 4 << 20
LINK_DUMP_SEQ = 1
ADDR_DUMP_SEQ = 2

# linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h, linux/filter.h
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
GROUPS = (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE)
NETLINK_ADD_MEMBERSHIP = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
IFA_ADDRESS = 1
IFA_LOCAL = 2
SO_ATTACH_FILTER = 26

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_HDR_LEN = 16


@dataclass
class KernelState:
    """What the watcher knows of the namespace's links and addresses, and what changed.

    :meth:`feed` takes one datagram and returns the reasons to resync it contains (empty: nothing
    that can affect bgpd's routes). ``dump_seqs`` are the sequence numbers of our own dumps: their
    replies update the state and are not changes; ``dumps_done`` collects those that finished.
    """

    devices: frozenset[str] = TUNNEL_DEVICES
    dump_seqs: frozenset[int] = frozenset()
    dumps_done: set[int] = field(default_factory=set)
    links: dict[int, tuple[str, int]] = field(default_factory=dict)  # ifindex → (name, flags)
    addresses: dict[int, set[str]] = field(default_factory=dict)  # ifindex → {"a.b.c.d/len"}
    #: protocol-79 routes deleted since the last :meth:`take_deleted` (not reasons yet: the caller
    #: keeps those the FIB still believes installed)
    deleted: list[str] = field(default_factory=list)

    def feed(self, data: bytes) -> list[str]:
        reasons: list[str] = []
        pos, size = 0, len(data)
        while pos + _HDR_LEN <= size:
            mlen, mtype, mflags, seq, _pid = _HDR.unpack_from(data, pos)
            if mlen < _HDR_LEN or pos + mlen > size:
                reasons.append("malformed netlink message")
                break
            dump = seq in self.dump_seqs and bool(mflags & rtnl.NLM_F_MULTI)
            end = pos + mlen
            if mtype == rtnl.NLMSG_DONE and seq in self.dump_seqs:
                self.dumps_done.add(seq)
            elif mtype in (RTM_NEWLINK, RTM_DELLINK) and mlen >= _HDR_LEN + _IFINFO.size:
                why = self._link(data, pos + _HDR_LEN, end, deleted=mtype == RTM_DELLINK)
                if why and not dump:
                    reasons.append(why)
            elif mtype in (RTM_NEWADDR, RTM_DELADDR) and mlen >= _HDR_LEN + _IFADDR.size:
                why = self._address(data, pos + _HDR_LEN, end, deleted=mtype == RTM_DELADDR)
                if why and not dump:
                    reasons.append(why)
            elif mtype == RTM_DELROUTE and mlen >= _HDR_LEN + _RTMSG.size:
                prefix = self._route(data, pos + _HDR_LEN, end)
                if prefix:
                    self.deleted.append(prefix)
            pos += (mlen + 3) & ~3
        return reasons

    def _link(self, data: bytes, base: int, end: int, *, deleted: bool) -> str | None:
        _family, _type, index, flags, _change = _IFINFO.unpack_from(data, base)
        name = ""
        for atype, value in _attrs(data, base + _IFINFO.size, end):
            if atype == rtnl.IFLA_IFNAME:
                name = value.split(b"\0", 1)[0].decode(errors="replace")
        old = self.links.get(index)
        if not name and old is not None:
            name = old[0]
        addressed = bool(self.addresses.get(index))
        if deleted:
            self.links.pop(index, None)
            self.addresses.pop(index, None)
            if name in self.devices or addressed:
                return f"{name or index} deleted"
            return None
        self.links[index] = (name, flags)
        up = "up" if flags & rtnl.IFF_UP else "down"
        if name in self.devices:
            return f"{name} {up}"
        # IPv4 flushes the routes of a link set down (not on carrier loss: those stay, marked linkdown)
        if addressed and (old is None or (old[1] ^ flags) & rtnl.IFF_UP):
            return f"{name or index} {up}"
        return None

    def _address(self, data: bytes, base: int, end: int, *, deleted: bool) -> str | None:
        family, plen, _flags, _scope, index = _IFADDR.unpack_from(data, base)
        if family != socket.AF_INET:
            return None
        addr = b""
        for atype, value in _attrs(data, base + _IFADDR.size, end):
            if atype == IFA_LOCAL or (atype == IFA_ADDRESS and not addr):
                addr = value
        if len(addr) != 4:
            return None
        text = f"{socket.inet_ntoa(addr)}/{plen}"
        held = self.addresses.setdefault(index, set())
        if deleted:
            held.discard(text)
        else:
            held.add(text)
        name = self.links.get(index, (str(index), 0))[0] or str(index)
        return f"address {text} {'removed from' if deleted else 'added on'} {name}"

    def _route(self, data: bytes, base: int, end: int) -> str | None:
        """The prefix of a deleted protocol-79 IPv4 route of the main table, else None."""
        family, dst_len, _src, _tos, table, proto, _scope, _type, _flags = _RTMSG.unpack_from(data, base)
        if family != socket.AF_INET or proto != PROTO_BGPD:
            return None
        dst = bytes(4)
        for atype, value in _attrs(data, base + _RTMSG.size, end):
            if atype == rtnl.RTA_TABLE and len(value) >= 4:
                table = _U32.unpack_from(value)[0]
            elif atype == rtnl.RTA_DST:
                dst = value
        if table != rtnl.RT_TABLE_MAIN or len(dst) != 4:
            return None
        return f"{socket.inet_ntoa(dst)}/{dst_len}"

    def take_deleted(self) -> list[str]:
        deleted, self.deleted = self.deleted, []
        return deleted


def _attrs(data: bytes, pos: int, end: int) -> Iterable[tuple[int, bytes]]:
    while pos + 4 <= end:
        alen, atype = _RTA.unpack_from(data, pos)
        if alen < 4 or pos + alen > end:
            return
        yield atype & rtnl.NLA_TYPE_MASK, data[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3


@dataclass
class Debounce:
    """Coalesce a burst of changes: due ``quiet`` s after the last one, at most ``max_wait`` s after the first."""

    quiet: float = QUIET
    max_wait: float = MAX_WAIT
    first: float | None = None
    last: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def note(self, now: float, reasons: Iterable[str]) -> float:
        """Record changes seen at ``now``; returns when the burst is due."""
        if self.first is None:
            self.first = now
        self.last = now
        for r in reasons:
            if r not in self.reasons:
                self.reasons.append(r)
        return self.deadline()

    def deadline(self) -> float:
        assert self.first is not None
        return min(self.last + self.quiet, self.first + self.max_wait)

    @property
    def pending(self) -> bool:
        return self.first is not None

    def due(self, now: float) -> bool:
        return self.first is not None and now >= self.deadline() - 1e-6

    def take(self) -> list[str]:
        reasons, self.reasons, self.first = self.reasons, [], None
        return reasons


def _swap16(value: int) -> int:
    """A host-order u16 as BPF's ``ldh`` (network order) reads it."""
    return int.from_bytes(struct.pack("=H", value), "big")


def bpf_program() -> list[tuple[int, int, int, int]]:
    """Pass everything but RTM_NEWROUTE, and RTM_DELROUTE only for protocol 79."""
    # BPF_LD|BPF_H|BPF_ABS, BPF_LD|BPF_B|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    ldh, ldb, jeq, ret = 0x28, 0x30, 0x15, 0x06
    proto_offset = _HDR_LEN + 5  # rtmsg.rtm_protocol
    return [
        (ldh, 0, 0, 4),  # nlmsg_type
        (jeq, 4, 0, _swap16(RTM_NEWROUTE)),  # → drop
        (jeq, 0, 2, _swap16(RTM_DELROUTE)),  # not a delete → accept
        (ldb, 0, 0, proto_offset),
        (jeq, 0, 1, PROTO_BGPD),  # ours → accept, else drop
        (ret, 0, 0, 0xFFFFFFFF),
        (ret, 0, 0, 0),
    ]


def attach_filter(sock: socket.socket) -> bool:
    """Attach :func:`bpf_program` to ``sock``; False if the kernel refused (we filter in Python too)."""
    prog = bpf_program()
    insns = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(insns))  # struct sock_fprog, native alignment
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.warning("cannot attach the netlink route filter (%s): every route notification is read", exc)
        return False
    return True


class LinkWatch:
    """The multicast socket on bgpd's loop (see the module docstring)."""

    def __init__(
        self,
        on_change: Callable[[list[str]], None],
        *,
        netns: str | None = None,
        devices: Iterable[str] = TUNNEL_DEVICES,
        holds_routes: Callable[[list[str]], Iterable[str]] | None = None,
        quiet: float = QUIET,
        max_wait: float = MAX_WAIT,
        rcvbuf: int = RCVBUF,
    ) -> None:
        self.on_change = on_change
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.state = KernelState(frozenset(devices))
        self.holds_routes = holds_routes
        self.debounce = Debounce(quiet, max_wait)
        self.overflows = 0
        self.fired = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open and subscribe, dump links then addresses, and read on ``loop`` (default: the running one)."""
        self._loop = loop or asyncio.get_running_loop()
        sock = _netns.socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                | socket.SOCK_CLOEXEC, rtnl.NETLINK_ROUTE)
        try:
            sock.bind((0, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, rtnl.SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            attach_filter(sock)
            for group in GROUPS:
                sock.setsockopt(rtnl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            self.state.dump_seqs = frozenset((LINK_DUMP_SEQ, ADDR_DUMP_SEQ))
            sock.send(_HDR.pack(_HDR_LEN + _IFINFO.size, rtnl.RTM_GETLINK, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP,
                                LINK_DUMP_SEQ, 0) + _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        log.info("watching links, IPv4 addresses and deleted protocol-79 routes%s",
                 f" in {self.netns}" if self.netns else "")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        reasons: list[str] = []
        for _ in range(1000):  # bounded: let the loop breathe during a flood
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    reasons.append("netlink notifications lost (socket overflow)")
                    continue
                log.warning("netlink watch socket failed: %s", exc)
                break
            if not data:
                break
            reasons.extend(self.state.feed(data))
            if LINK_DUMP_SEQ in self.state.dumps_done:  # one dump at a time per socket: addresses next
                self.state.dumps_done.discard(LINK_DUMP_SEQ)
                self._send_addr_dump(sock)
        deleted = self.state.take_deleted()
        if deleted:
            # our own deletes are already forgotten by the FIB when their notifications are read
            held = sorted(self.holds_routes(deleted)) if self.holds_routes is not None else deleted
            reasons.extend(f"route {p} (protocol 79) deleted by someone else" for p in held[:3])
            if len(held) > 3:
                reasons.append(f"{len(held) - 3} more protocol-79 routes deleted by someone else")
        if reasons:
            self.note(reasons)

    @staticmethod
    def _send_addr_dump(sock: socket.socket) -> None:
        try:
            sock.send(_HDR.pack(_HDR_LEN + _IFADDR.size, RTM_GETADDR, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP,
                                ADDR_DUMP_SEQ, 0) + _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0))
        except OSError as exc:  # then addressed links are learned from notifications only
            log.warning("netlink address dump failed: %s", exc)

    def note(self, reasons: list[str]) -> None:
        """Changes seen now: (re)arm the debounce timer."""
        assert self._loop is not None
        deadline = self.debounce.note(self._loop.time(), reasons)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        reasons = self.debounce.take()
        if not reasons:
            return
        self.fired += 1
        try:
            self.on_change(reasons)
        except Exception:  # a bug in the callback must not kill the reader
            log.exception("link watch callback failed")
