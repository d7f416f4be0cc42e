"""The workload's wiring: a veth pair, its addresses, routes and sysctls (Calico's routed model).

What it owns, per workload: the host-side veth ``cali<11 hex>`` (in the namespace the plugin runs
in, which is the runtime's "host"), found again by that name; the container-side interface
(CNI_IFNAME) inside the container's namespace, which disappears with the veth.

ADD leaves:

- container: the /32 (and /128) addresses, ``default via 169.254.1.1 dev <ifname> onlink`` (and
  ``default via fe80::1 dev <ifname>``) unless another interface of the container already has the
  default route (a second network), a random locally administered MAC;
- host: the veth up with MAC ``ee:ee:ee:ee:ee:ee``, ``proxy_arp=1``, ``neigh/proxy_delay=0`` and
  ``forwarding=1`` (per interface: the global ``ip_forward`` is not touched), ``fe80::1/64`` for
  IPv6 workloads, and a route per workload address ``<addr>/32 dev cali… scope link`` with felix's
  protocol number (78, ``calyx-felix``): felix owns workload routes and takes this one over; the
  plugin installs it so the workload is reachable before felix's next apply.

The veth is created from the host side with the peer born directly inside the container's
namespace (``IFLA_NET_NS_FD``), so the container-side name is checked only there. On any failure
the host veth is deleted, which removes its peer and the routes through it: nothing half-made.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import NamedTuple

from calyx.cni.netlink import IFF_UP, RT_SCOPE_LINK, IPNet, Netlink, NetlinkError
from calyx.cni.spec import CHECK_FAILED, PLUGIN_ERROR, UNKNOWN_CONTAINER, CNIError

GATEWAY4 = ipaddress.IPv4Address("169.254.1.1")
GATEWAY6 = ipaddress.IPv6Address("fe80::1")
HOST_MAC = "ee:ee:ee:ee:ee:ee"
FELIX_PROTO = 78
#: felix's route metric (calyx.kernel.routetable.DEFAULT_METRIC, not imported: start-up cost). The same
#: (destination, metric) key makes felix adopt this route instead of adding a second one beside it.
FELIX_METRIC = 1024
DEFAULT4 = ipaddress.IPv4Network("0.0.0.0/0")
DEFAULT6 = ipaddress.IPv6Network("::/0")


class Wired(NamedTuple):
    """What ADD created (for the result)."""

    host_iface: str
    host_mac: str
    ifname: str
    mac: str
    nets: tuple[IPNet, ...]
    defaults: tuple[IPNet, ...]  #: default routes installed (not when another interface has one)


def _random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def open_netns(path: str) -> int:
    """An fd of the container's network namespace (code 3 if it is gone)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist (has the container exited?)") \
            from None
    except OSError as exc:
        raise CNIError(UNKNOWN_CONTAINER, f"cannot open network namespace {path}: {exc.strerror}") from None


def _container_socket(path: str) -> Netlink:
    from calyx.kernel.netns import NamespaceError

    try:
        return Netlink.open(path)
    except NamespaceError as exc:
        raise CNIError(UNKNOWN_CONTAINER, f"{path} is not a usable network namespace: {exc.strerror}") from None


def setup(netns: str, ifname: str, host_iface: str, nets: Sequence[IPNet], *, mtu: int = 0) -> Wired:
    """Create the veth pair and everything on both ends; undo it all if any step fails."""
    fd = open_netns(netns)
    try:
        cont = _container_socket(netns)
        host = Netlink.open()
        try:
            existing = cont.link(ifname)
            if existing is not None:
                raise CNIError(PLUGIN_ERROR, f"interface {ifname} already exists in {netns}: ADD was called twice "
                                             f"for this container, or another plugin owns {ifname}")
            host.delete_link(host_iface)  # left over from an ADD that crashed, or from an older container
            mac = _random_mac()
            try:
                host.create_veth(host_iface, ifname, fd, mtu=mtu, mac=HOST_MAC, peer_mac=mac)
            except NetlinkError as exc:
                raise CNIError(PLUGIN_ERROR, f"cannot create veth {host_iface}: {exc}") from None
            try:
                defaults = _configure(host, cont, host_iface, ifname, nets)
            except BaseException:
                host.delete_link(host_iface)
                raise
            return Wired(host_iface, HOST_MAC, ifname, mac, tuple(nets), defaults)
        finally:
            cont.close()
            host.close()
    finally:
        os.close(fd)


def _configure(
    host: Netlink, cont: Netlink, host_iface: str, ifname: str, nets: Sequence[IPNet]
) -> tuple[IPNet, ...]:
    defaults: list[IPNet] = []
    try:
        hl = host.link(host_iface)
        cl = cont.link(ifname)
        if hl is None or cl is None:
            raise CNIError(PLUGIN_ERROR, f"veth {host_iface}/{ifname} vanished right after it was created")
        has6 = any(n.version == 6 for n in nets)
        conf4 = f"/proc/sys/net/ipv4/conf/{host_iface}"
        _sysctl(f"{conf4}/proxy_arp", "1")
        _sysctl(f"{conf4}/forwarding", "1")
        _sysctl(f"/proc/sys/net/ipv4/neigh/{host_iface}/proxy_delay", "0")
        if has6:
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_iface}/forwarding", "1")
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_iface}/accept_ra", "0")
        host.set_up(hl.ifindex)
        if has6:
            host.add_address(hl.ifindex, ipaddress.IPv6Network("fe80::/64"), GATEWAY6)
        cont.set_up(cl.ifindex)
        for n in nets:
            cont.add_address(cl.ifindex, n, n.network_address)
        for dflt, gw, wanted in ((DEFAULT4, GATEWAY4, any(n.version == 4 for n in nets)), (DEFAULT6, GATEWAY6, has6)):
            if not wanted:
                continue
            try:
                cont.add_route(dflt, oif=cl.ifindex, gateway=gw, onlink=dflt.version == 4)
                defaults.append(dflt)
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                # another interface of this container (another network) has the default route: keep it
        for n in nets:
            host.add_route(n, oif=hl.ifindex, proto=FELIX_PROTO, scope=RT_SCOPE_LINK, replace=True,
                           metric=FELIX_METRIC)
        return tuple(defaults)
    except NetlinkError as exc:
        raise CNIError(PLUGIN_ERROR, f"wiring {host_iface}/{ifname} failed: {exc}") from None
    except OSError as exc:
        raise CNIError(PLUGIN_ERROR, f"setting sysctls of {host_iface} failed: {exc}") from None


def teardown(host_iface: str) -> bool:
    """Delete the host veth (and with it the container side and its routes); False if absent."""
    with Netlink.open() as host:
        try:
            return host.delete_link(host_iface)
        except NetlinkError as exc:
            raise CNIError(PLUGIN_ERROR, f"cannot delete {host_iface}: {exc}") from None


def check(netns: str, ifname: str, host_iface: str, nets: Sequence[IPNet], defaults: Sequence[IPNet]) -> None:
    """Raise CNIError (104) naming the first thing that is not as ADD left it (``defaults``: the
    default routes ADD reported)."""
    os.close(open_netns(netns))

    def bad(msg: str) -> CNIError:
        return CNIError(CHECK_FAILED, msg)

    with Netlink.open() as host:
        hl = host.link(host_iface)
        if hl is None:
            raise bad(f"host interface {host_iface} does not exist")
        if not hl.flags & IFF_UP:
            raise bad(f"host interface {host_iface} is down")
        host_routes = {(r.dst, r.oif) for fam in (socket.AF_INET, socket.AF_INET6) for r in host.routes(fam)}
        for n in nets:
            if (n, hl.ifindex) not in host_routes:
                raise bad(f"the host has no route {n} dev {host_iface}")
    try:
        cont = _container_socket(netns)
    except CNIError as exc:
        raise bad(exc.msg) from None
    with cont:
        cl = cont.link(ifname)
        if cl is None:
            raise bad(f"interface {ifname} does not exist in {netns}")
        if not cl.flags & IFF_UP:
            raise bad(f"interface {ifname} in {netns} is down")
        have = {a.network for a in cont.addresses(cl.ifindex) if not a.address.is_link_local}
        for n in nets:
            if n not in have:
                raise bad(f"{ifname} in {netns} lacks address {n} (has {', '.join(map(str, sorted(have, key=str)))})")
        for dflt in defaults:
            fam = socket.AF_INET if dflt.version == 4 else socket.AF_INET6
            gw = GATEWAY4 if dflt.version == 4 else GATEWAY6
            if not any(r.dst == dflt and r.gateway == gw and r.oif == cl.ifindex for r in cont.routes(fam)):
                raise bad(f"{netns} has no default route via {gw} dev {ifname}")
