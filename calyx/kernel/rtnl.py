"""A raw NETLINK_ROUTE socket for routes and links, messages packed and parsed with ``struct``.

What it owns: one netlink socket (created inside a network namespace if asked, and bound to it for
its life). It writes and reads routes exactly as asked; it decides nothing about which routes
should exist (that is :mod:`calyx.kernel.routetable`).

Why not pyroute2 here: encoding one route message costs pyroute2 about 250 µs, ``struct`` about
5 µs, so 100k routes take ~30 s instead of ~3 s (docs/kernel.md has the numbers). pyroute2 stays
fine for links and other cold paths.

The protocol handled here:

* **Batches.** :meth:`RtnlSocket.route_batch` packs up to ``batch_size`` messages into one
  ``sendmsg`` (one skb: the kernel processes all of it before ``sendmsg`` returns), each with a
  unique sequence number and ``NLM_F_ACK``, then reads the acknowledgements and returns one
  :class:`Ack` per request, in order. One bad route never fails the batch.
* **Bulk.** Routes that differ only in their destination (100k learned /32s via one gateway) skip
  :class:`RouteMsg`: a :class:`RouteTemplate` is cut once from :func:`pack_route`'s own bytes and
  fills seq + dst with one ``struct.pack_into`` per route. :class:`TemplateWriter` (and
  :meth:`RtnlSocket.template_batch`) sends such batches from a short-lived writer thread — the
  kernel installs the routes inside ``send``, without the GIL — while the caller's thread packs
  the next batch and reads the acknowledgements of the previous one; it reports failures only
  (a success costs no object) and always ends its thread before returning.
* **Buffers.** ``SO_SNDBUFFORCE``/``SO_RCVBUFFORCE`` (root) or the plain options are raised so that a
  whole batch and its acknowledgements fit. If the receive queue still overflows the kernel drops
  acknowledgements and reports ``ENOBUFS``; the requests whose acknowledgement never came are
  returned as :attr:`AckCode.LOST` (state unknown: the caller must read the kernel back).
* **Acknowledgements.** ``NETLINK_CAP_ACK`` (errors do not echo our request) and ``NETLINK_EXT_ACK``
  (the kernel's error text, e.g. "Nexthop device is not up", is kept in :attr:`Ack.message`).
* **Dumps.** ``NETLINK_GET_STRICT_CHK`` lets the kernel filter a route dump by table, protocol and
  type itself (Linux >= 4.20); we filter again in user space, so older kernels stay correct.
  Multi-part replies are read to ``NLMSG_DONE``; a dump the kernel marks ``NLM_F_DUMP_INTR``
  (changed while dumped) is retried. A dump of a table that does not exist yet (ENOENT) is empty.
* **Errors.** errno is translated here, once: per-request codes (:class:`AckCode`) for what one
  route can cause, exceptions (:class:`NetlinkError` and subclasses) for what breaks the socket
  or the whole request (no permission, a malformed reply, a timeout).
* **EINTR.** Python retries interrupted system calls itself (PEP 475); reads never block without
  a ``poll`` timeout.
"""

from __future__ import annotations

import enum
import errno
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from calyx.kernel import netns as _netns

__all__ = [
    "OK",
    "RTNH_F_ONLINK",
    "RTN_BLACKHOLE",
    "RTN_PROHIBIT",
    "RTN_UNICAST",
    "RTN_UNREACHABLE",
    "RT_SCOPE_LINK",
    "RT_SCOPE_UNIVERSE",
    "RT_TABLE_MAIN",
    "Ack",
    "AckCode",
    "Link",
    "NetlinkError",
    "NetlinkProtocolError",
    "NetlinkTimeoutError",
    "NextHop",
    "Op",
    "PermissionDeniedError",
    "RouteMsg",
    "RouteRequest",
    "RouteTemplate",
    "RtnlSocket",
    "TemplateWriter",
    "pack_route",
    "parse_routes",
]

# --- constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h) -----------------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in NLMSG_ERROR replies
NLM_F_ACK_TLVS = 0x200  # in NLMSG_ERROR replies
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
NLA_TYPE_MASK = 0x3FFF

IFLA_IFNAME = 3

RT_TABLE_UNSPEC = 0
RT_TABLE_COMPAT = 252
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255

RTN_UNSPEC = 0
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8

RTNH_F_DEAD = 1
RTNH_F_PERVASIVE = 2
RTNH_F_ONLINK = 4
RTNH_F_OFFLOAD = 8
RTNH_F_LINKDOWN = 16
RTM_F_CLONED = 0x200

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
_RTA = struct.Struct("=HH")
_RTNH = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_ERR = struct.Struct("=i")
_RTA_U32 = struct.Struct("=HHI")  # an rtattr carrying a u32
_HDR_AND_RTMSG = struct.Struct("=IHHIIBBBBBBBBI")
_HDR_AND_ERR = struct.Struct("=IHHIIi")  # an NLMSG_ERROR header and its errno

_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}
_NLMSGHDR_LEN = 16
_RTMSG_LEN = 12
_IFINFO_LEN = 16

DEFAULT_BATCH = 1000
DEFAULT_RCVBUF = 8 << 20
DEFAULT_SNDBUF = 4 << 20
DEFAULT_TIMEOUT = 10.0
#: what one error message can take of a netlink socket's receive buffer (skb overhead included), generously
_ERROR_TRUESIZE = 2048
_PIPELINE_WINDOW = 2  # TemplateWriter: batches sent or being sent whose acknowledgements are unread, at most
_RECV_SIZE = 1 << 16
_DUMP_RETRIES = 5


# --- errors ---------------------------------------------------------------------------------------


class NetlinkError(OSError):
    """A netlink request as a whole failed (not a single route in a batch)."""


class PermissionDeniedError(NetlinkError):
    """The kernel refused the request: ``CAP_NET_ADMIN`` is missing (EPERM/EACCES)."""


class NetlinkProtocolError(NetlinkError):
    """The kernel's reply could not be understood (truncated or malformed)."""


class NetlinkTimeoutError(NetlinkError):
    """No reply within the socket's timeout."""


class AckCode(enum.Enum):
    """What one route request came to: the small set of outcomes callers act on."""

    OK = "ok"
    NO_DEVICE = "no-device"  # ENODEV: the interface (index) does not exist (any more)
    DEVICE_DOWN = "device-down"  # ENETDOWN: the interface exists but is down
    EXISTS = "exists"  # EEXIST: another route already holds this destination and metric
    NOT_FOUND = "not-found"  # ESRCH/ENOENT: nothing to delete
    UNREACHABLE = "unreachable"  # ENETUNREACH/EHOSTUNREACH: the gateway is not reachable
    INVALID = "invalid"  # EINVAL and friends: the kernel rejects the route itself
    LOST = "lost"  # the acknowledgement never arrived (ENOBUFS): state unknown
    OTHER = "other"  # any other errno (ENOMEM, ...): retry later


_ERRNO_CODES = {
    0: AckCode.OK,
    errno.ENODEV: AckCode.NO_DEVICE,
    errno.ENETDOWN: AckCode.DEVICE_DOWN,
    errno.EEXIST: AckCode.EXISTS,
    errno.ESRCH: AckCode.NOT_FOUND,
    errno.ENOENT: AckCode.NOT_FOUND,
    errno.ENETUNREACH: AckCode.UNREACHABLE,
    errno.EHOSTUNREACH: AckCode.UNREACHABLE,
    errno.EINVAL: AckCode.INVALID,
    errno.ERANGE: AckCode.INVALID,
    errno.EOPNOTSUPP: AckCode.INVALID,
    errno.EAFNOSUPPORT: AckCode.INVALID,
    errno.EPROTONOSUPPORT: AckCode.INVALID,
    errno.EMSGSIZE: AckCode.INVALID,
}


class Ack(NamedTuple):
    """The kernel's answer to one request: a code, the raw errno (0: success) and its error text."""

    code: AckCode
    errno: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is AckCode.OK

    def describe(self) -> str:
        if self.ok:
            return "ok"
        text = os.strerror(self.errno) if self.errno else self.code.value
        return f"{text} ({self.message})" if self.message else text


OK = Ack(AckCode.OK)
LOST = Ack(AckCode.LOST, errno.ENOBUFS, "acknowledgement lost (netlink receive queue overflow)")


def _ack_for(err: int, message: str) -> Ack:
    if err in (errno.EPERM, errno.EACCES):
        raise PermissionDeniedError(err, os.strerror(err) + (f": {message}" if message else ""))
    return Ack(_ERRNO_CODES.get(err, AckCode.OTHER), err, message)


# --- messages ---------------------------------------------------------------------------------------


class NextHop(NamedTuple):
    """One nexthop of a multipath route: interface index (0: let the kernel pick), gateway, flags."""

    oif: int
    gateway: bytes | None
    flags: int = 0
    hops: int = 0


class RouteMsg(NamedTuple):
    """A route as netlink carries it. Addresses are packed bytes (4 or 16); ``dst`` is the network.

    In dumps ``metric`` is always an int (IPv4 omits a zero priority) and ``flags`` holds the
    kernel's ``rtm_flags`` (RTNH_F_ONLINK of a single-path route shows there).
    """

    family: int
    dst: bytes
    dst_len: int
    table: int = RT_TABLE_MAIN
    proto: int = 0
    scope: int = RT_SCOPE_UNIVERSE
    type: int = RTN_UNICAST
    metric: int | None = None
    oif: int = 0
    gateway: bytes | None = None
    flags: int = 0
    multipath: tuple[NextHop, ...] = ()


class Op(enum.Enum):
    """What to do with a route: create-or-replace, create only (never clobber), delete."""

    REPLACE = "replace"  # RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE
    CREATE = "create"  # RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL: EEXIST if the key is taken
    DELETE = "delete"  # RTM_DELROUTE matching dst, table, metric and protocol
    DELETE_EXACT = "delete-exact"  # the same, and only the route with exactly these nexthops


class RouteRequest(NamedTuple):
    op: Op
    route: RouteMsg


class Link(NamedTuple):
    ifindex: int
    name: str
    flags: int

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


_OP_HEADER = {
    Op.REPLACE: (RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE),
    Op.CREATE: (RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    Op.DELETE: (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK),
    Op.DELETE_EXACT: (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK),
}


def _rta(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    pad = (-length) & 3
    return _RTA.pack(length, kind) + payload + b"\0" * pad


def pack_route(seq: int, op: Op, r: RouteMsg) -> bytes:
    """One complete netlink message (header included) for ``op`` on route ``r``."""
    mtype, nlflags = _OP_HEADER[op]
    table = r.table
    rtm_table = table if table < 256 else RT_TABLE_COMPAT
    deleting = op is Op.DELETE or op is Op.DELETE_EXACT
    if deleting:
        # Match any scope and type; the protocol, metric and table select exactly our route.
        scope = RT_SCOPE_NOWHERE if r.family == socket.AF_INET else RT_SCOPE_UNIVERSE
        rtype = RTN_UNSPEC
        flags = 0
    else:
        scope, rtype, flags = r.scope, r.type, r.flags
    parts = [_RTA_U32.pack(8, RTA_TABLE, table)]
    if r.dst_len:
        parts.append(_rta(RTA_DST, r.dst))
    if r.metric is not None:
        parts.append(_RTA_U32.pack(8, RTA_PRIORITY, r.metric))
    if op is Op.DELETE:
        pass  # no nexthops: any route of ours with this destination and metric
    elif r.multipath:
        hops = []
        for nh in r.multipath:
            gw = _rta(RTA_GATEWAY, nh.gateway) if nh.gateway else b""
            hops.append(_RTNH.pack(8 + len(gw), nh.flags, nh.hops, nh.oif) + gw)
        parts.append(_rta(RTA_MULTIPATH, b"".join(hops)))
    else:
        if r.oif:
            parts.append(_RTA_U32.pack(8, RTA_OIF, r.oif))
        if r.gateway:
            parts.append(_rta(RTA_GATEWAY, r.gateway))
    body = b"".join(parts)
    return (
        _HDR_AND_RTMSG.pack(
            _NLMSGHDR_LEN + _RTMSG_LEN + len(body),
            mtype,
            nlflags,
            seq,
            0,
            r.family,
            r.dst_len,
            0,
            0,
            rtm_table,
            r.proto,
            scope,
            rtype,
            flags,
        )
        + body
    )


class RouteTemplate:
    """The message of one operation on routes that differ only in their destination (and sequence number).

    Built from :func:`pack_route`'s own output for ``route`` (its ``dst`` is ignored): packed twice
    with two different destinations, the bytes that differ are the destination's and everything
    else is kept as constant pieces. :meth:`pack_into` then writes a complete message with one
    ``struct`` call instead of building a :class:`RouteMsg` and packing it attribute by attribute;
    its bytes are :func:`pack_route`'s by construction (tests compare them on random routes).
    """

    __slots__ = ("_head", "_head_noack", "_mid", "_packer", "_tail", "dst_size", "op", "route", "size")

    def __init__(self, op: Op, route: RouteMsg) -> None:
        size = 4 if route.family == socket.AF_INET else 16 if route.family == socket.AF_INET6 else 0
        if not size or not route.dst_len:
            raise ValueError("a route template needs an IPv4 or IPv6 destination with a prefix length")
        zeros = pack_route(0, op, route._replace(dst=bytes(size)))
        ones = pack_route(0, op, route._replace(dst=b"\xff" * size))
        diff = [i for i in range(len(zeros)) if zeros[i] != ones[i]]
        at = diff[0] if diff else -1
        if len(zeros) != len(ones) or diff != list(range(at, at + size)) or at < _NLMSGHDR_LEN + _RTMSG_LEN:
            raise ValueError("the destination is not one fixed field of this message")  # never for pack_route
        self.op = op
        self.route = route
        self.size = len(zeros)
        self.dst_size = size
        self._head = zeros[:8]  # length, type, flags
        mlen, mtype, mflags = struct.unpack("=IHH", self._head)
        self._head_noack = struct.pack("=IHH", mlen, mtype, mflags & ~NLM_F_ACK)
        self._mid = zeros[12:at]  # pid, rtmsg, attributes before RTA_DST's payload
        self._tail = zeros[at + size :]
        self._packer = struct.Struct(f"=8sI{at - 12}s{size}s{len(self._tail)}s")

    def pack(self, seq: int, dst: bytes) -> bytes:
        """The same bytes as ``pack_route(seq, op, route._replace(dst=dst))``."""
        return self._packer.pack(self._head, seq, self._mid, dst, self._tail)

    def pack_into(self, buf: bytearray, first_seq: int, dsts: Sequence[bytes], *, ack_last_only: bool = False,
                  ) -> None:
        """Write one message per destination into ``buf`` (``size * len(dsts)`` bytes), sequence
        numbers ``first_seq`` upwards.

        ``ack_last_only``: only the last message asks for an acknowledgement (``NLM_F_ACK``); the
        kernel still answers every *failed* request with its error, in order, so once the last
        one's acknowledgement is read, every request without an error message has succeeded.
        """
        pack, mid, tail, size = self._packer.pack_into, self._mid, self._tail, self.size
        head = self._head_noack if ack_last_only else self._head
        off, seq = 0, first_seq
        for dst in dsts:
            pack(buf, off, head, seq, mid, dst, tail)
            off += size
            seq += 1
        if ack_last_only and dsts:
            pack(buf, off - size, self._head, seq - 1, mid, dsts[-1], tail)


def _parse_multipath(buf: bytes, pos: int, end: int) -> tuple[NextHop, ...]:
    hops = []
    rtnh = _RTNH.unpack_from
    rta = _RTA.unpack_from
    while pos + 8 <= end:
        length, flags, nhops, ifindex = rtnh(buf, pos)
        if length < 8:
            break
        gw: bytes | None = None
        apos, aend = pos + 8, min(pos + length, end)
        while apos + 4 <= aend:
            alen, atype = rta(buf, apos)
            if alen < 4:
                break
            if atype & NLA_TYPE_MASK == RTA_GATEWAY:
                gw = buf[apos + 4 : apos + alen]
            apos += (alen + 3) & ~3
        hops.append(NextHop(ifindex, gw, flags, nhops))
        pos += (length + 3) & ~3
    return tuple(hops)


def parse_routes(
    buf: bytes,
    out: list[RouteMsg],
    *,
    proto: int | None = None,
    table: int | None = None,
    rtype: int | None = None,
) -> tuple[bool, bool, int]:
    """Append the RTM_NEWROUTE messages of ``buf`` that pass the filters to ``out``.

    Returns ``(done, interrupted, error)``: ``done`` once NLMSG_DONE was seen, ``interrupted`` if a
    message carried NLM_F_DUMP_INTR, ``error`` a positive errno from NLMSG_ERROR/NLMSG_DONE (0: none).
    """
    hdr = _NLMSGHDR.unpack_from
    rtm = _RTMSG.unpack_from
    rta = _RTA.unpack_from
    u32 = _U32.unpack_from
    pos, size = 0, len(buf)
    interrupted = False
    while pos + _NLMSGHDR_LEN <= size:
        mlen, mtype, mflags, _seq, _pid = hdr(buf, pos)
        if mlen < _NLMSGHDR_LEN or pos + mlen > size:
            raise NetlinkProtocolError(errno.EBADMSG, f"truncated netlink message ({mlen} bytes at {pos})")
        if mflags & NLM_F_DUMP_INTR:
            interrupted = True
        if mtype == RTM_NEWROUTE:
            base = pos + _NLMSGHDR_LEN
            family, dst_len, _src, _tos, rtm_table, rproto, scope, kind, rflags = rtm(buf, base)
            if (
                (proto is None or rproto == proto)
                and (rtype is None or kind == rtype)
                and not rflags & RTM_F_CLONED
                and (table is None or rtm_table == table or table > 255)
            ):
                end = pos + mlen
                apos = base + _RTMSG_LEN
                dst = b""
                oif = 0
                metric = 0
                gw: bytes | None = None
                mp: tuple[NextHop, ...] = ()
                tbl = rtm_table
                while apos + 4 <= end:
                    alen, atype = rta(buf, apos)
                    if alen < 4:
                        break
                    if atype == RTA_DST:
                        dst = buf[apos + 4 : apos + alen]
                    elif atype == RTA_OIF:
                        oif = u32(buf, apos + 4)[0]
                    elif atype == RTA_GATEWAY:
                        gw = buf[apos + 4 : apos + alen]
                    elif atype == RTA_PRIORITY:
                        metric = u32(buf, apos + 4)[0]
                    elif atype == RTA_TABLE:
                        tbl = u32(buf, apos + 4)[0]
                    elif atype & NLA_TYPE_MASK == RTA_MULTIPATH:
                        mp = _parse_multipath(buf, apos + 4, apos + alen)
                    apos += (alen + 3) & ~3
                if table is None or tbl == table:
                    if not dst:
                        dst = bytes(_ADDR_LEN.get(family, 0))
                    out.append(RouteMsg(family, dst, dst_len, tbl, rproto, scope, kind, metric, oif, gw, rflags, mp))
        elif mtype == NLMSG_DONE:
            err = _I32.unpack_from(buf, pos + _NLMSGHDR_LEN)[0] if mlen >= _NLMSGHDR_LEN + 4 else 0
            return True, interrupted, -err if err < 0 else 0
        elif mtype == NLMSG_ERROR:
            err = _I32.unpack_from(buf, pos + _NLMSGHDR_LEN)[0]
            return True, interrupted, -err if err < 0 else errno.EBADMSG
        pos += (mlen + 3) & ~3
    return False, interrupted, 0


def _parse_error(buf: bytes | bytearray, pos: int, mlen: int, mflags: int) -> Ack:
    err = -_ERR.unpack_from(buf, pos + _NLMSGHDR_LEN)[0]
    if err == 0:
        return OK
    message = ""
    if mflags & NLM_F_ACK_TLVS:
        # nlmsgerr = error (4) + the original header (16), + its payload unless NLM_F_CAPPED.
        tlv = pos + _NLMSGHDR_LEN + 4 + _NLMSGHDR_LEN
        if not mflags & NLM_F_CAPPED:
            orig_len = _U32.unpack_from(buf, pos + _NLMSGHDR_LEN + 4)[0]
            tlv = pos + _NLMSGHDR_LEN + 4 + ((orig_len + 3) & ~3)
        end = pos + mlen
        while tlv + 4 <= end:
            alen, atype = _RTA.unpack_from(buf, tlv)
            if alen < 4:
                break
            if atype & NLA_TYPE_MASK == NLMSGERR_ATTR_MSG:
                message = bytes(buf[tlv + 4 : tlv + alen]).rstrip(b"\0").decode(errors="replace")
            tlv += (alen + 3) & ~3
    return _ack_for(err, message)


def _chunks(seq: Sequence[tuple[Op, RouteMsg]], size: int) -> Iterator[Sequence[tuple[Op, RouteMsg]]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


# --- the socket -------------------------------------------------------------------------------------


class RtnlSocket:
    """A NETLINK_ROUTE socket, in ``netns`` if given (name under /run/netns or a path).

    Not thread-safe: one user at a time (a lock is the caller's business).
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH,
        rcvbuf: int = DEFAULT_RCVBUF,
        sndbuf: int = DEFAULT_SNDBUF,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.netns = netns
        self.batch_size = batch_size
        self.timeout = timeout
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        sock = _netns.socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            sock.bind((0, 0))
            self._set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
            self._set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
                try:
                    sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # older kernels: fuller acks, no kernel-side dump filter; still correct
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.overruns = 0  # how many times acknowledgements were lost (ENOBUFS)

    @staticmethod
    def _set_buffer(sock: socket.socket, plain: int, force: int, size: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)  # capped by net.core.[rw]mem_max

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --

    def _next_seq(self, count: int = 1) -> int:
        """Reserve ``count`` sequence numbers; returns the first."""
        first = self._seq + 1
        self._seq = (self._seq + count) & 0x7FFFFFFF
        if self._seq < first:  # wrapped: start again low
            first, self._seq = 1, count
        return first

    def _send(self, data: bytes | bytearray) -> None:
        try:
            sent = self._sock.send(data)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDeniedError(exc.errno, exc.strerror)
            raise NetlinkError(exc.errno, f"netlink send failed: {exc.strerror}")
        if sent != len(data):
            raise NetlinkError(errno.EMSGSIZE, f"netlink sent {sent} of {len(data)} bytes")

    def _wait(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def _recv(self, timeout: float) -> bytes:
        while True:
            try:
                return self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self._wait(timeout):
                    raise NetlinkTimeoutError(errno.ETIMEDOUT, f"no netlink reply within {timeout:g} s")

    # -- routes --

    def route_batch(self, requests: Sequence[tuple[Op, RouteMsg]]) -> list[Ack]:
        """Apply every ``(op, route)`` request; return one :class:`Ack` per request, in order."""
        acks: list[Ack] = []
        for chunk in _chunks(requests, self.batch_size):
            acks.extend(self._route_chunk(chunk))
        return acks

    def template_batch(self, template: RouteTemplate, dsts: Sequence[bytes]) -> dict[int, Ack]:
        """``template``'s operation for every destination of ``dsts`` (packed addresses of the
        template's family), in order, in batches of ``batch_size``.

        Returns only the failures: index in ``dsts`` → :class:`Ack` (an empty dict: every request
        succeeded). Only each batch's last message asks for an acknowledgement when the receive
        buffer can hold every possible error (:attr:`TemplateWriter.ack_last_only`); failures are
        reported per request either way. Several batches go through a
        :class:`TemplateWriter` (a writer thread sends while this one reads acknowledgements).
        """
        writer = TemplateWriter(self)
        with writer:
            for start in range(0, len(dsts), writer.batch):
                writer.submit(template, dsts[start : start + writer.batch])
            return writer.finish()

    def _route_chunk(self, chunk: Sequence[tuple[Op, RouteMsg]]) -> list[Ack]:
        first = self._next_seq(len(chunk))
        msgs = [pack_route(first + i, op, route) for i, (op, route) in enumerate(chunk)]
        data = b"".join(msgs)
        if len(data) > self.sndbuf - 64 and len(chunk) > 1:
            half = len(chunk) // 2
            return self._route_chunk(chunk[:half]) + self._route_chunk(chunk[half:])
        self._send(data)
        seen = bytearray(len(chunk))
        failures: dict[int, Ack] = {}
        self._collect(first, seen, failures, 0, len(chunk))
        acks = [OK] * len(chunk)
        for idx, ack in failures.items():
            acks[idx] = ack
        if 0 in seen:
            for idx, acked in enumerate(seen):
                if not acked:
                    acks[idx] = LOST
        return acks

    def _collect(self, first: int, seen: bytearray, failures: dict[int, Ack], since: int, upto: int,
                 overrun: bool = False, terminals: Mapping[int, int] | None = None) -> bool:
        """Read acknowledgements of requests ``first`` .. ``first + len(seen) - 1`` (sent: the
        kernel handled them inside ``send``) until those from ``since`` to ``upto`` are all in.

        Marks each acknowledged request in ``seen`` (also later ones that come meanwhile) and puts
        failures into ``failures`` (index from ``first``). Acknowledgements the kernel dropped
        (``ENOBUFS``) stay unseen: the caller reports those requests as :data:`LOST`. Returns
        whether drops were reported (``overrun``: known drops already, so never wait).

        ``terminals`` (last index → first index of a range sent with ``ack_last_only``): the
        acknowledgement of a range's last request settles the whole range — requests without an
        error message succeeded — unless drops were reported, when they are :data:`LOST`.
        """
        count = len(seen)
        missing = seen[since:upto].count(0)
        buf = self._buf
        recv_into, dontwait, bufsize = self._sock.recv_into, socket.MSG_DONTWAIT, len(buf)
        head = _HDR_AND_ERR.unpack_from
        while missing:
            try:
                size = recv_into(buf, bufsize, dontwait)
            except BlockingIOError:
                # Every acknowledgement that was not dropped is queued already. Wait only if one
                # is not (never seen in practice).
                if overrun or not self._wait(self.timeout):
                    break
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overrun = True
                    self.overruns += 1
                    continue
                raise NetlinkError(exc.errno, f"netlink receive failed: {exc.strerror}")
            if size == 0:
                break
            pos = 0
            while pos + _NLMSGHDR_LEN <= size:
                if pos + _NLMSGHDR_LEN + 4 <= size:
                    mlen, mtype, mflags, seq, _pid, err = head(buf, pos)
                else:
                    mlen, mtype, mflags, seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
                    err = 0
                if mlen < _NLMSGHDR_LEN or pos + mlen > size:
                    raise NetlinkProtocolError(errno.EBADMSG, "truncated netlink acknowledgement")
                idx = seq - first
                if mtype == NLMSG_ERROR and 0 <= idx < count and not seen[idx]:
                    if mlen < _NLMSGHDR_LEN + 4:
                        raise NetlinkProtocolError(errno.EBADMSG, "truncated netlink acknowledgement")
                    seen[idx] = 1
                    if since <= idx < upto:
                        missing -= 1
                    if err:
                        failures[idx] = _parse_error(buf, pos, mlen, mflags)
                    if terminals is not None and idx in terminals:
                        start = terminals[idx]
                        lo, hi = max(start, since), min(idx, upto)
                        if lo < hi:
                            missing -= seen[lo:hi].count(0)
                        if overrun:  # an error message may have been dropped: nothing is known
                            for j in range(start, idx):
                                if not seen[j]:
                                    failures[j] = LOST
                        seen[start:idx] = b"\x01" * (idx - start)
                # Anything else (a stale reply to an older request) is ignored.
                pos += (mlen + 3) & ~3
        return overrun

    def dump_routes(
        self,
        family: int,
        *,
        table: int | None = RT_TABLE_MAIN,
        proto: int | None = None,
        rtype: int | None = None,
    ) -> list[RouteMsg]:
        """Every route of ``family`` in ``table`` (None: all tables) with protocol ``proto``."""
        for _attempt in range(_DUMP_RETRIES):
            out: list[RouteMsg] = []
            interrupted = self._dump(family, table, proto, rtype, out)
            if not interrupted:
                return out
        return out  # still changing under us: the best we have; the next resync catches up

    def _dump(self, family: int, table: int | None, proto: int | None, rtype: int | None, out: list[RouteMsg]) -> bool:
        seq = self._next_seq()
        tbl = table or 0
        attrs = _RTA_U32.pack(8, RTA_TABLE, tbl) if tbl else b""
        req = (
            _HDR_AND_RTMSG.pack(
                _NLMSGHDR_LEN + _RTMSG_LEN + len(attrs),
                RTM_GETROUTE,
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                0,
                family,
                0,
                0,
                0,
                tbl if tbl < 256 else RT_TABLE_UNSPEC,
                proto or 0,
                0,
                rtype or 0,
                0,
            )
            + attrs
        )
        self._send(req)
        interrupted = False
        while True:
            data = self._recv_checked()
            # Drop replies to older requests (their sequence number is not ours).
            if len(data) >= _NLMSGHDR_LEN and _NLMSGHDR.unpack_from(data, 0)[3] != seq:
                continue
            done, intr, err = parse_routes(data, out, proto=proto, table=table, rtype=rtype)
            interrupted = interrupted or intr
            if done:
                if err == errno.ENOENT and table:
                    out.clear()  # the table does not exist (yet): it holds no routes
                    return False
                if err == errno.EINTR:
                    return True
                if err:
                    if err in (errno.EPERM, errno.EACCES):
                        raise PermissionDeniedError(err, os.strerror(err))
                    if err == errno.EAFNOSUPPORT:
                        out.clear()  # e.g. IPv6 disabled: no routes of that family
                        return False
                    raise NetlinkError(err, f"route dump failed: {os.strerror(err)}")
                return interrupted

    def _recv_checked(self) -> bytes:
        try:
            return self._recv(self.timeout)
        except OSError as exc:
            if isinstance(exc, NetlinkError):
                raise
            raise NetlinkError(exc.errno, f"netlink receive failed: {exc.strerror}")

    # -- links --

    def links(self) -> dict[str, Link]:
        """Every interface of the namespace by name."""
        seq = self._next_seq()
        self._send(
            _NLMSGHDR.pack(_NLMSGHDR_LEN + _IFINFO_LEN, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
            + _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        )
        result: dict[str, Link] = {}
        while True:
            data = self._recv_checked()
            pos = 0
            while pos + _NLMSGHDR_LEN <= len(data):
                mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if mlen < _NLMSGHDR_LEN or pos + mlen > len(data):
                    raise NetlinkProtocolError(errno.EBADMSG, "truncated link message")
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return result
                    if mtype == NLMSG_ERROR:
                        err = -_ERR.unpack_from(data, pos + _NLMSGHDR_LEN)[0]
                        if err in (errno.EPERM, errno.EACCES):
                            raise PermissionDeniedError(err, os.strerror(err))
                        raise NetlinkError(err, f"link dump failed: {os.strerror(err)}")
                    if mtype == RTM_NEWLINK:
                        link = _parse_link(data, pos, mlen)
                        if link is not None:
                            result[link.name] = link
                pos += (mlen + 3) & ~3

    def link(self, name: str) -> Link | None:
        """The interface called ``name``, or None if there is none."""
        seq = self._next_seq()
        attr = _rta(IFLA_IFNAME, name.encode() + b"\0")
        self._send(
            _NLMSGHDR.pack(_NLMSGHDR_LEN + _IFINFO_LEN + len(attr), RTM_GETLINK, NLM_F_REQUEST, seq, 0)
            + _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            + attr
        )
        while True:
            data = self._recv_checked()
            pos = 0
            while pos + _NLMSGHDR_LEN <= len(data):
                mlen, mtype, mflags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                if mlen < _NLMSGHDR_LEN or pos + mlen > len(data):
                    raise NetlinkProtocolError(errno.EBADMSG, "truncated link message")
                if mseq == seq:
                    if mtype == NLMSG_ERROR:
                        ack = _parse_error(data, pos, mlen, mflags)
                        if ack.code in (AckCode.NO_DEVICE, AckCode.NOT_FOUND):
                            return None
                        raise NetlinkError(ack.errno, f"link lookup failed: {ack.describe()}")
                    if mtype == RTM_NEWLINK:
                        return _parse_link(data, pos, mlen)
                pos += (mlen + 3) & ~3


class TemplateWriter:
    """Batches of template messages (:class:`RouteTemplate`) for one :class:`RtnlSocket`, written
    while the caller prepares the next batch.

    The kernel does a route's work inside ``send`` (about 5 µs a route, without the GIL), so from
    the second :meth:`submit` on a short-lived writer thread sends the batches in order while the
    caller's thread packs the next batch and reads the acknowledgements of those already sent
    (at most :data:`_PIPELINE_WINDOW` batches unread, so the receive buffer cannot overflow where
    one synchronous batch would not). A single batch is sent without a thread.

    :meth:`finish` returns the failures of every batch by submission index (position over all
    submitted destinations, in order). Results come in batch by batch: those below :attr:`settled`
    are final already (:attr:`failures`), so a caller can book them while the kernel works on the
    next batches. :meth:`close` (or leaving the ``with`` block) always ends the thread, also on
    error. One writer per call; the socket is not used by anything else meanwhile.
    """

    def __init__(self, sock: RtnlSocket) -> None:
        self._sock = sock
        self.batch = sock.batch_size
        self._base = 0  # the sequence number of submission index 0
        self._seen = bytearray()  # per submission index: acknowledged (or given up as LOST)
        self.failures: dict[int, Ack] = {}  # submission index → failure, final below ``settled``
        self.settled = 0  # submission indexes below this have their final result
        self._bounds: list[tuple[int, int]] = []  # per batch: submission index range
        self._held: bytearray | None = None  # the first batch, sent once a second one comes or at finish
        self._queue: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._sent = threading.Semaphore(0)
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._serial = False  # no thread could be started: every batch is sent from the caller's thread
        self._queued = 0  # batches handed to the writer thread (or sent)
        self._collected = 0  # batches whose acknowledgements were read
        self._overrun = False
        # Only the last request of a batch asks for an acknowledgement when the receive buffer can
        # hold an error for every request in flight (so no error message can be dropped); reading
        # 1 acknowledgement instead of 1,000 per batch is a fifth of the CPU of a bulk install.
        self.ack_last_only = sock.rcvbuf >= (_PIPELINE_WINDOW + 1) * self.batch * _ERROR_TRUESIZE
        self._terminals: dict[int, int] = {}  # last submission index of a batch → its first

    def __enter__(self) -> TemplateWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, template: RouteTemplate, dsts: Sequence[bytes]) -> None:
        """Queue ``template``'s operation for ``dsts`` (at most ``sndbuf`` bytes: split bigger ones)."""
        if not dsts:
            return
        limit = max(1, (self._sock.sndbuf - 64) // template.size)
        for part_start in range(0, len(dsts), limit):
            self._submit(template, dsts[part_start : part_start + limit])

    def _submit(self, template: RouteTemplate, dsts: Sequence[bytes]) -> None:
        n = len(dsts)
        start = len(self._seen)
        first = self._sock._next_seq(n)
        if start and first != self._base + start:  # sequence numbers wrapped: read what is out, restart
            self._drain()
        self._base = first - start
        data = bytearray(template.size * n)
        template.pack_into(data, first, dsts, ack_last_only=self.ack_last_only)
        self._seen.extend(bytes(n))
        self._bounds.append((start, start + n))
        if self.ack_last_only:
            self._terminals[start + n - 1] = start
        if self._held is None and not self._queued:
            self._held = data  # maybe the only batch: no thread for that
            return
        if self._thread is None and not self._serial:
            thread = threading.Thread(target=self._write, name="rtnl-writer", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": the same work, without the overlap
                self._serial = True
            else:
                self._thread = thread
        if self._serial:
            self._drain()
            self._send_now(data)
            return
        if self._held is not None:
            self._queue.put(self._held)
            self._held = None
            self._queued += 1
        while self._queued - self._collected >= _PIPELINE_WINDOW:
            self._collect_next()
        self._queue.put(data)
        self._queued += 1

    def _write(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                self._sock._send(data)
                self._sent.release()
        except BaseException as exc:  # raised again in the caller's thread
            self._errors.append(exc)
            self._sent.release()

    def _collect_next(self) -> None:
        self._sent.acquire()
        if self._errors:  # the writer stopped: its error, once
            exc, self._errors = self._errors[0], []
            raise exc
        # Batches up to this one are handled by the kernel: their acknowledgements are queued.
        since, upto = self._bounds[self._collected]
        seen = self._seen
        self._overrun = self._sock._collect(self._base, seen, self.failures, since, upto, self._overrun,
                                            self._terminals if self.ack_last_only else None)
        if 0 in seen[since:upto]:  # dropped (ENOBUFS): state unknown, and a late ack is not taken
            for idx in range(since, upto):
                if not seen[idx]:
                    seen[idx] = 1
                    self.failures[idx] = LOST
        self._collected += 1
        self.settled = upto

    def _send_now(self, data: bytearray) -> None:
        """Send from the caller's thread and read the acknowledgements (nothing else is in flight)."""
        self._sock._send(data)
        self._queued += 1
        self._sent.release()
        self._collect_next()

    def _drain(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._send_now(held)
        while self._collected < self._queued:
            self._collect_next()

    def finish(self) -> dict[int, Ack]:
        """Send what is left, read every acknowledgement; the failures by submission index."""
        self._drain()
        self.close()
        return self.failures

    def close(self) -> None:
        """End the writer thread (after the batches it holds); idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._errors:
            exc, self._errors = self._errors[0], []
            raise exc


def _parse_link(data: bytes, pos: int, mlen: int) -> Link | None:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(data, pos + _NLMSGHDR_LEN)
    apos, end = pos + _NLMSGHDR_LEN + _IFINFO_LEN, pos + mlen
    while apos + 4 <= end:
        alen, atype = _RTA.unpack_from(data, apos)
        if alen < 4:
            break
        if atype & NLA_TYPE_MASK == IFLA_IFNAME:
            name = data[apos + 4 : apos + alen].split(b"\0", 1)[0].decode(errors="replace")
            return Link(index, name, flags)
        apos += (alen + 3) & ~3
    return None
