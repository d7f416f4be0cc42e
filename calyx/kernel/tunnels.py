"""Tunnel devices: IP-in-IP ``tunl0`` and the VXLAN device ``vxlan.calyx``, with their peers.

What it owns, and how it finds it:

* ``tunl0`` is the ipip module's fallback device: the kernel creates it in every namespace once the
  module is loaded, so it is never deleted. We own its MTU, its up/down state and **every address on
  it** (the tunnel address from the pool, so that traffic the host itself sends to remote workloads
  has a routable source; Calico's felix owns tunl0's addresses the same way). When no pool needs
  IP-in-IP, its addresses are removed and it is set down.
* ``vxlan.calyx`` is ours by name: created with VNI 4096, UDP port 4789, learning off, a fixed MAC
  and the underlay address as local source; recreated when a parameter that cannot change in place
  (VNI, port, local address) differs; deleted when no pool needs VXLAN. Its permanent neighbour
  entries (remote VTEP address → remote VTEP MAC) and FDB entries (remote MAC → remote underlay
  address) are all ours: the desired set is written and everything else on the device is swept.

Changes are made with pyroute2 (a few messages per change: not a hot path). Every ``ensure``
reads the kernel back and changes only what differs, and returns a list of what it changed so the
caller can log one summary line.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_NOARP, NUD_PERMANENT

log = logging.getLogger(__name__)

IPIP_DEVICE = "tunl0"
VXLAN_DEVICE = "vxlan.calyx"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
IPIP_OVERHEAD = 20
VXLAN_OVERHEAD = 50


class TunnelError(Exception):
    """A tunnel device cannot be set up (e.g. the kernel has no ipip support)."""


@dataclass(frozen=True)
class VxlanPeer:
    """A remote node's VTEP: its tunnel address and MAC, reached at its underlay address."""

    vtep_ip: ipaddress.IPv4Address
    mac: str
    underlay_ip: ipaddress.IPv4Address


def vtep_mac(node_name: str) -> str:
    """A stable, locally administered unicast MAC for a node's VTEP (derived from its name)."""
    digest = hashlib.sha256(node_name.encode()).digest()
    octets = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]
    return ":".join(f"{b:02x}" for b in octets)


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _link(ipr: Any, name: str) -> Any | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    return ipr.get_links(found[0])[0]


def _addresses(ipr: Any, index: int) -> set[ipaddress.IPv4Interface]:
    out = set()
    for msg in ipr.get_addr(family=2, index=index):
        out.add(ipaddress.IPv4Interface(f"{_attr(msg, 'IFA_ADDRESS')}/{msg['prefixlen']}"))
    return out


def interface_mtu(ifname: str, netns: str | None = None) -> int | None:
    with _ipr(netns) as ipr:
        link = _link(ipr, ifname)
        return None if link is None else int(_attr(link, "IFLA_MTU"))


def default_route_mtu(netns: str | None = None) -> int | None:
    """The MTU of the interface the IPv4 default route leaves by (the host's uplink)."""
    with _ipr(netns) as ipr:
        for route in ipr.get_routes(family=2, dst_len=0, table=254):
            oif = _attr(route, "RTA_OIF")
            if oif is None:
                mp = _attr(route, "RTA_MULTIPATH")
                oif = mp[0]["oif"] if mp else None
            if oif is not None:
                links = ipr.get_links(oif)
                if links:
                    return int(_attr(links[0], "IFLA_MTU"))
    return None


def _sync_addresses(ipr: Any, index: int, want: set[ipaddress.IPv4Interface], name: str, changes: list[str]) -> None:
    have = _addresses(ipr, index)
    for addr in sorted(have - want):
        ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        changes.append(f"{name}: removed address {addr}")
    for addr in sorted(want - have):
        ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        changes.append(f"{name}: added address {addr}")


def ensure_ipip(address: ipaddress.IPv4Address | None, mtu: int, *, netns: str | None = None) -> list[str]:
    """Make ``tunl0`` up with ``mtu`` and exactly ``address``/32; returns what changed."""
    changes: list[str] = []
    with _ipr(netns) as ipr:
        link = _link(ipr, IPIP_DEVICE)
        if link is None:
            try:
                ipr.link("add", ifname=IPIP_DEVICE, kind="ipip")
            except NetlinkError as exc:
                if exc.code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
                    raise TunnelError(
                        "this kernel has no IP-in-IP support (module ipip): pools with ipip_mode need it"
                    ) from None
                if exc.code != errno.EEXIST:
                    raise
            changes.append(f"{IPIP_DEVICE}: created")
            link = _link(ipr, IPIP_DEVICE)
            if link is None:
                raise TunnelError(f"{IPIP_DEVICE} did not appear")
        index = link["index"]
        if int(_attr(link, "IFLA_MTU")) != mtu:
            ipr.link("set", index=index, mtu=mtu)
            changes.append(f"{IPIP_DEVICE}: mtu {mtu}")
        want = {ipaddress.IPv4Interface(f"{address}/32")} if address is not None else set()
        _sync_addresses(ipr, index, want, IPIP_DEVICE, changes)
        if _attr(link, "IFLA_OPERSTATE") == "DOWN" and not (link["flags"] & 1):
            ipr.link("set", index=index, state="up")
            changes.append(f"{IPIP_DEVICE}: up")
    return changes


def disable_ipip(*, netns: str | None = None) -> list[str]:
    """No pool needs IP-in-IP: remove tunl0's addresses and set it down (the device stays)."""
    changes: list[str] = []
    with _ipr(netns) as ipr:
        link = _link(ipr, IPIP_DEVICE)
        if link is None:
            return changes
        _sync_addresses(ipr, link["index"], set(), IPIP_DEVICE, changes)
        if link["flags"] & 1:
            ipr.link("set", index=link["index"], state="down")
            changes.append(f"{IPIP_DEVICE}: down")
    return changes


def ensure_vxlan(
    *,
    local_ip: ipaddress.IPv4Address,
    mac: str,
    address: ipaddress.IPv4Address,
    mtu: int,
    netns: str | None = None,
    name: str = VXLAN_DEVICE,
    vni: int = VXLAN_VNI,
    port: int = VXLAN_PORT,
) -> list[str]:
    """Make the VXLAN device exist with these parameters, up, with exactly ``address``/32."""
    changes: list[str] = []
    with _ipr(netns) as ipr:
        link = _link(ipr, name)
        if link is not None:
            info = _attr(link, "IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            same = (
                kind == "vxlan"
                and data is not None
                and data.get_attr("IFLA_VXLAN_ID") == vni
                and data.get_attr("IFLA_VXLAN_PORT") == port
                and data.get_attr("IFLA_VXLAN_LOCAL") == str(local_ip)
                and not data.get_attr("IFLA_VXLAN_LEARNING")
            )
            if not same:
                ipr.link("del", index=link["index"])
                changes.append(f"{name}: deleted (parameters changed)")
                link = None
        if link is None:
            ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=str(local_ip),
                vxlan_port=port,
                vxlan_learning=0,
                address=mac,
                mtu=mtu,
            )
            changes.append(f"{name}: created (vni {vni}, port {port}, local {local_ip})")
            link = _link(ipr, name)
            assert link is not None
        index = link["index"]
        if _attr(link, "IFLA_ADDRESS") != mac:
            ipr.link("set", index=index, address=mac)
            changes.append(f"{name}: mac {mac}")
        if int(_attr(link, "IFLA_MTU")) != mtu:
            ipr.link("set", index=index, mtu=mtu)
            changes.append(f"{name}: mtu {mtu}")
        _sync_addresses(ipr, index, {ipaddress.IPv4Interface(f"{address}/32")}, name, changes)
        if not link["flags"] & 1:
            ipr.link("set", index=index, state="up")
            changes.append(f"{name}: up")
    return changes


def remove_vxlan(*, netns: str | None = None, name: str = VXLAN_DEVICE) -> list[str]:
    with _ipr(netns) as ipr:
        link = _link(ipr, name)
        if link is None:
            return []
        ipr.link("del", index=link["index"])
    return [f"{name}: deleted"]


def sync_vxlan_peers(
    peers: Mapping[ipaddress.IPv4Address, VxlanPeer], *, netns: str | None = None, name: str = VXLAN_DEVICE
) -> list[str]:
    """Make the device's permanent neighbour and FDB entries exactly ``peers`` (keyed by VTEP IP)."""
    changes: list[str] = []
    with _ipr(netns) as ipr:
        link = _link(ipr, name)
        if link is None:
            raise TunnelError(f"{name} does not exist")
        index = link["index"]
        have_neigh: dict[str, str] = {}
        for msg in ipr.get_neighbours(family=2, ifindex=index):
            dst, lladdr = _attr(msg, "NDA_DST"), _attr(msg, "NDA_LLADDR")
            if dst and msg["state"] & NUD_PERMANENT:
                have_neigh[dst] = lladdr or ""
        have_fdb: dict[str, str] = {}
        for msg in ipr.fdb("dump", ifindex=index):
            if msg["ifindex"] != index:
                continue
            lladdr, dst = _attr(msg, "NDA_LLADDR"), _attr(msg, "NDA_DST")
            if lladdr and dst and lladdr != "00:00:00:00:00:00":
                have_fdb[lladdr] = dst
        want_neigh = {str(p.vtep_ip): p.mac for p in peers.values()}
        want_fdb = {p.mac: str(p.underlay_ip) for p in peers.values()}
        for mac, dst in want_fdb.items():
            if have_fdb.get(mac) != dst:
                if mac in have_fdb:
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=have_fdb[mac])
                ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst, state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)
                changes.append(f"{name}: fdb {mac} -> {dst}")
        for ip, mac in want_neigh.items():
            if have_neigh.get(ip) != mac:
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                changes.append(f"{name}: neighbour {ip} is {mac}")
        for ip in set(have_neigh) - set(want_neigh):
            ipr.neigh("del", dst=ip, ifindex=index)
            changes.append(f"{name}: removed neighbour {ip}")
        for mac, dst in have_fdb.items():
            if mac not in want_fdb:
                ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
                changes.append(f"{name}: removed fdb {mac}")
    return changes
