"""The few rtnetlink operations the CNI plugin needs, packed with ``struct`` (no pyroute2).

What it owns: one NETLINK_ROUTE socket per :class:`Netlink`, bound for its life to the network
namespace it was created in (:func:`Netlink.open` can create it inside another namespace). It
creates and deletes links (a veth pair whose peer is born directly in another namespace, so the
container's interface name is only ever checked there), sets them up, adds addresses and routes,
and reads links, addresses and routes back for CHECK.

Why not pyroute2: importing it costs 250-400 ms here, several times the whole budget of a CNI ADD;
:mod:`calyx.kernel.rtnl` (the daemons' batched route socket) handles routes only.

Every request asks for an acknowledgement; a kernel error becomes :class:`NetlinkError` with the
errno and a message naming the operation (``EEXIST``, ``ENODEV``... stay inspectable).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD, IFA_F_PERMANENT = 0x02, 0x80
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RT_TABLE_MAIN, RTN_UNICAST = 254, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTNH_F_ONLINK = 4
IFF_UP = 1
NLA_F_NESTED = 0x8000

_HDR = struct.Struct("=LHHLL")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetlinkError(OSError):
    """The kernel refused a request (``errno`` says why)."""


class LinkInfo(NamedTuple):
    ifindex: int
    name: str
    flags: int
    mac: str | None
    mtu: int
    link: int  # the peer's ifindex for a veth (in the peer's namespace)


class AddrInfo(NamedTuple):
    ifindex: int
    network: IPNet  # address with its prefix length (host bits kept in ``address``)
    address: IPAddr


class RouteInfo(NamedTuple):
    dst: IPNet
    oif: int
    gateway: IPAddr | None
    proto: int
    scope: int
    flags: int


def _rta(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _attrs(data: bytes, pos: int, end: int) -> Iterator[tuple[int, bytes]]:
    while pos + 4 <= end:
        alen, atype = _RTA.unpack_from(data, pos)
        if alen < 4:
            return
        yield atype & ~NLA_F_NESTED, data[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Netlink:
    """A NETLINK_ROUTE socket in one network namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0

    @classmethod
    def open(cls, netns_path: str | None = None) -> Netlink:
        """A socket in the current namespace, or inside ``netns_path`` (any nsfs path)."""
        if netns_path is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        else:
            from calyx.kernel import netns

            with netns.enter(netns_path):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        sock.bind((0, 0))
        sock.settimeout(10.0)
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---

    def _request(self, mtype: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        """Send one request; return the (type, message) replies (for a dump, all of them)."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_HDR.pack(16 + len(body), mtype, flags | NLM_F_REQUEST, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(1 << 20)
            pos = 0
            while pos + 16 <= len(data):
                mlen, rtype, rflags, rseq, _pid = _HDR.unpack_from(data, pos)
                if mlen < 16:
                    raise NetlinkError(errno.EBADMSG, f"{what}: malformed netlink reply")
                msg = data[pos : pos + mlen]
                pos += (mlen + 3) & ~3
                if rseq != seq:
                    continue
                if rtype == NLMSG_ERROR:
                    err = -_ERR.unpack_from(msg, 16)[0]
                    if err:
                        raise NetlinkError(err, f"{what}: {os.strerror(err)}")
                    return out
                if rtype == NLMSG_DONE:
                    return out
                out.append((rtype, msg))
                if not (rflags & NLM_F_MULTI) and not (flags & NLM_F_ACK):
                    return out

    # --- links ---

    def create_veth(
        self, name: str, peer_name: str, peer_netns_fd: int, *, mtu: int = 0, mac: str | None = None,
        peer_mac: str | None = None,
    ) -> None:
        """A veth pair: ``name`` here, ``peer_name`` created directly in the namespace of the fd."""
        peer = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _rta(IFLA_IFNAME, peer_name.encode() + b"\0")
        peer += _rta(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
        if mtu:
            peer += _rta(IFLA_MTU, struct.pack("=I", mtu))
        if peer_mac:
            peer += _rta(IFLA_ADDRESS, _mac_bytes(peer_mac))
        info = _rta(IFLA_INFO_KIND, b"veth") + _rta(IFLA_INFO_DATA | NLA_F_NESTED, _rta(VETH_INFO_PEER, peer))
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _rta(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            body += _rta(IFLA_MTU, struct.pack("=I", mtu))
        if mac:
            body += _rta(IFLA_ADDRESS, _mac_bytes(mac))
        body += _rta(IFLA_LINKINFO | NLA_F_NESTED, info)
        self._request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {name}/{peer_name}")

    def set_up(self, index: int) -> None:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self._request(RTM_NEWLINK, NLM_F_ACK, body, f"set link {index} up")

    def delete_link(self, name: str) -> bool:
        """Delete the link called ``name``; False if there is none."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _rta(IFLA_IFNAME, name.encode() + b"\0")
        try:
            self._request(RTM_DELLINK, NLM_F_ACK, body, f"delete link {name}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    @staticmethod
    def _parse_link(msg: bytes) -> LinkInfo:
        _fam, _type, index, flags, _chg = _IFINFO.unpack_from(msg, 16)
        name, mac, mtu, link = "", None, 0, 0
        for atype, payload in _attrs(msg, 32, len(msg)):
            if atype == IFLA_IFNAME:
                name = payload.split(b"\0", 1)[0].decode(errors="replace")
            elif atype == IFLA_ADDRESS:
                mac = _mac_text(payload)
            elif atype == IFLA_MTU:
                mtu = struct.unpack_from("=I", payload)[0]
            elif atype == IFLA_LINK:
                link = struct.unpack_from("=i", payload)[0]
        return LinkInfo(index, name, flags, mac, mtu, link)

    def link(self, name: str) -> LinkInfo | None:
        """The link called ``name``, or None."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _rta(IFLA_IFNAME, name.encode() + b"\0")
        try:
            replies = self._request(RTM_GETLINK, 0, body, f"look up link {name}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return next((self._parse_link(m) for t, m in replies if t == RTM_NEWLINK), None)

    # --- addresses ---

    def add_address(self, index: int, network: IPNet, address: IPAddr) -> None:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        flags = IFA_F_PERMANENT | (IFA_F_NODAD if address.version == 6 else 0)
        body = _IFADDR.pack(family, network.prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE if not
                            address.is_link_local else RT_SCOPE_LINK, index)
        body += _rta(IFA_LOCAL, address.packed) + _rta(IFA_ADDRESS, address.packed)
        body += _rta(IFA_FLAGS, struct.pack("=I", flags))
        self._request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add address {address}")

    def addresses(self, index: int | None = None) -> list[AddrInfo]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for t, msg in self._request(RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(family, 0, 0, 0, 0), "list addresses"):
                if t != RTM_NEWADDR:
                    continue
                _fam, plen, _fl, _scope, idx = _IFADDR.unpack_from(msg, 16)
                if index is not None and idx != index:
                    continue
                raw = None
                for atype, payload in _attrs(msg, 24, len(msg)):
                    if atype == IFA_LOCAL or (atype == IFA_ADDRESS and raw is None):
                        raw = payload
                if raw is None:
                    continue
                addr = ipaddress.ip_address(raw)
                out.append(AddrInfo(idx, ipaddress.ip_network(f"{addr}/{plen}", strict=False), addr))
        return out

    # --- routes ---

    def add_route(
        self, dst: IPNet, *, oif: int, gateway: IPAddr | None = None, onlink: bool = False, proto: int = 3,
        scope: int | None = None, replace: bool = False, metric: int | None = None,
    ) -> None:
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        if scope is None:
            scope = RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE
        body = _RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST,
                           RTNH_F_ONLINK if onlink else 0)
        if dst.prefixlen:
            body += _rta(RTA_DST, dst.network_address.packed)
        body += _rta(RTA_OIF, struct.pack("=i", oif))
        if gateway is not None:
            body += _rta(RTA_GATEWAY, gateway.packed)
        if metric is not None:
            body += _rta(RTA_PRIORITY, struct.pack("=I", metric))
        flags = NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        self._request(RTM_NEWROUTE, flags, body, f"add route {dst}" + (f" via {gateway}" if gateway else ""))

    def routes(self, family: int) -> list[RouteInfo]:
        out = []
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for t, msg in self._request(RTM_GETROUTE, NLM_F_DUMP, body, "list routes"):
            if t != RTM_NEWROUTE:
                continue
            fam, dst_len, _s, _tos, table, proto, scope, rtype, flags = _RTMSG.unpack_from(msg, 16)
            dst = b"\0" * (4 if fam == socket.AF_INET else 16)
            oif, gw, tbl = 0, None, table
            for atype, payload in _attrs(msg, 28, len(msg)):
                if atype == RTA_DST:
                    dst = payload
                elif atype == RTA_OIF:
                    oif = struct.unpack_from("=i", payload)[0]
                elif atype == RTA_GATEWAY:
                    gw = ipaddress.ip_address(payload)
                elif atype == RTA_TABLE:
                    tbl = struct.unpack_from("=I", payload)[0]
            if tbl != RT_TABLE_MAIN or rtype != RTN_UNICAST:
                continue
            net = ipaddress.ip_network(f"{ipaddress.ip_address(dst)}/{dst_len}", strict=False)
            out.append(RouteInfo(net, oif, gw, proto, scope, flags))
        return out
