"""bgpd's link watch: message parsing and debounce (pure), the socket and its BPF filter, and the FIB
repaired within a second when felix recreates or flaps ``vxlan.calyx`` (throwaway namespaces)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from bgpd import linkwatch
from bgpd.fib import Fib
from bgpd.linkwatch import Debounce, KernelState, LinkWatch
from calyx.kernel import netns as calyx_netns
from calyx.kernel import rtnl
from calyx.model import IPPool
from tests.bgpd.topo import kernel_routes
from tests.fixtures.netns import Netns, create_veth

# --- messages as the kernel sends them ---------------------------------------------------------------


def _rta(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) & 3)


def _msg(mtype: int, body: bytes, *, seq: int = 0, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def link(index: int, name: str, flags: int, *, deleted: bool = False, change: int = 0) -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, change)
    body += _rta(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    return _msg(linkwatch.RTM_DELLINK if deleted else linkwatch.RTM_NEWLINK, body)


def address(index: int, cidr: str, *, deleted: bool = False, seq: int = 0, flags: int = 0,
            family: int = socket.AF_INET) -> bytes:
    addr, plen = cidr.split("/")
    packed = socket.inet_aton(addr) if family == socket.AF_INET else bytes(16)
    body = struct.pack("=BBBBi", family, int(plen), 0, 0, index) + _rta(linkwatch.IFA_LOCAL, packed)
    return _msg(linkwatch.RTM_DELADDR if deleted else linkwatch.RTM_NEWADDR, body, seq=seq, flags=flags)


def route_deleted(prefix: str, proto: int = 79, table: int = rtnl.RT_TABLE_MAIN) -> bytes:
    addr, plen = prefix.split("/")
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, int(plen), 0, 0, min(table, 252), proto, 0, 1, 0)
    body += _rta(rtnl.RTA_TABLE, struct.pack("=I", table)) + _rta(rtnl.RTA_DST, socket.inet_aton(addr))
    return _msg(linkwatch.RTM_DELROUTE, body)


UP = rtnl.IFF_UP | rtnl.IFF_LOWER_UP


# --- pure ------------------------------------------------------------------------------------------------


def test_link_dump_replies_are_state_not_changes() -> None:
    st = KernelState(dump_seqs=frozenset((1, 2)))
    dumped = link(2, "up0", UP)
    dumped = dumped[:6] + struct.pack("=H", rtnl.NLM_F_MULTI) + struct.pack("=I", 1) + dumped[12:]
    assert st.feed(dumped) == [] and st.links == {2: ("up0", UP)}
    assert st.feed(address(2, "10.99.0.1/24")) == ["address 10.99.0.1/24 added on up0"]
    assert st.feed(link(2, "up0", UP)) == []  # known and unchanged


def test_tunnel_devices_always_count_other_links_only_with_an_address() -> None:
    st = KernelState()
    assert st.feed(link(7, "vxlan.calyx", 0)) == ["vxlan.calyx down"]
    assert st.feed(link(7, "vxlan.calyx", UP)) == ["vxlan.calyx up"]
    assert st.feed(link(7, "vxlan.calyx", UP, deleted=True)) == ["vxlan.calyx deleted"]
    assert st.feed(link(3, "tunl0", UP)) == ["tunl0 up"]
    # a workload veth: no IPv4 address, so it carries no route of ours
    assert st.feed(link(9, "cali1234", UP)) == []
    assert st.feed(link(9, "cali1234", 0)) == []
    assert st.feed(link(9, "cali1234", 0, deleted=True)) == []


def test_addresses_from_the_dump_are_state_and_later_ones_are_changes() -> None:
    st = KernelState(dump_seqs=frozenset((1, 2)))
    data = address(2, "10.99.0.1/24", seq=1, flags=rtnl.NLM_F_MULTI) + address(4, "192.0.2.1/32", seq=1,
                                                                                flags=rtnl.NLM_F_MULTI)
    assert st.feed(data) == []  # several messages in one datagram, none of them a change
    assert st.addresses == {2: {"10.99.0.1/24"}, 4: {"192.0.2.1/32"}}
    assert st.feed(_msg(rtnl.NLMSG_DONE, b"\0" * 4, seq=1)) == [] and st.dumps_done == {1}
    assert st.feed(link(2, "up0", UP)) == ["up0 up"]  # first sight of an addressed link: conservative
    assert st.feed(link(2, "up0", UP)) == []  # nothing changed
    assert st.feed(link(2, "up0", rtnl.IFF_UP)) == []  # carrier only: the kernel keeps the routes
    assert st.feed(link(2, "up0", 0)) == ["up0 down"]
    assert st.feed(address(2, "10.98.0.1/24")) == ["address 10.98.0.1/24 added on up0"]
    assert st.feed(address(2, "10.98.0.1/24", deleted=True)) == ["address 10.98.0.1/24 removed from up0"]
    assert st.feed(address(2, "::1/128", family=socket.AF_INET6)) == []
    assert st.feed(link(2, "up0", 0, deleted=True)) == ["up0 deleted"]
    assert 2 not in st.addresses and 2 not in st.links


def test_only_deleted_protocol_79_routes_of_the_main_table_are_collected() -> None:
    st = KernelState()
    data = route_deleted("10.65.1.0/26") + route_deleted("10.65.2.0/26", proto=3) + route_deleted(
        "10.65.3.0/26", table=100) + route_deleted("10.65.4.1/32")
    assert st.feed(data) == []  # not reasons by themselves: the caller asks the FIB which it still holds
    assert st.take_deleted() == ["10.65.1.0/26", "10.65.4.1/32"]
    assert st.take_deleted() == []


def test_malformed_datagram_is_a_reason_to_resync() -> None:
    st = KernelState()
    good = link(7, "vxlan.calyx", UP)
    assert st.feed(struct.pack("=I", 999) + good[4:]) == ["malformed netlink message"]
    assert st.feed(b"\0" * 7) == []  # shorter than a header: nothing to read


def test_debounce_coalesces_a_burst_and_bounds_the_wait() -> None:
    d = Debounce(quiet=0.15, max_wait=1.0)
    assert not d.pending and not d.due(0.0)
    assert d.note(10.0, ["a"]) == pytest.approx(10.15)
    assert d.note(10.1, ["b", "a"]) == pytest.approx(10.25)  # quiet restarts from the last change
    assert not d.due(10.2) and d.due(10.25)
    assert d.take() == ["a", "b"] and not d.pending
    # a change every 100 ms never lets it go quiet: due max_wait after the first
    t = 20.0
    deadline = d.note(t, ["x"])
    while t < 20.95:
        t += 0.1
        deadline = d.note(t, ["x"])
    assert deadline == pytest.approx(21.0) and d.due(21.0)
    assert d.take() == ["x"]


def test_bpf_program_compares_host_order_message_types() -> None:
    prog = linkwatch.bpf_program()
    assert len(prog) == 7 and prog[-1] == (0x06, 0, 0, 0) and prog[-2] == (0x06, 0, 0, 0xFFFFFFFF)
    newroute = struct.pack("=H", linkwatch.RTM_NEWROUTE)
    assert prog[1][3] == int.from_bytes(newroute, "big")  # what `ldh [4]` reads from a host-order u16
    # every jump lands inside the program
    assert all(i + 1 + max(jt, jf) < len(prog) for i, (code, jt, jf, _k) in enumerate(prog) if code == 0x15)


# --- privileged: the real socket -------------------------------------------------------------------------


@pytest.mark.privileged
def test_filter_drops_new_routes_and_foreign_deletes_in_the_kernel(netns: Callable[[], Netns]) -> None:
    h = netns()
    create_veth(h, h, "10.9.0.1/24", "10.9.0.2/24", name_a="a0", name_b="b0")
    sock = calyx_netns.socket_in(h.name, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    try:
        sock.bind((0, 0))
        assert linkwatch.attach_filter(sock)
        sock.setsockopt(rtnl.SOL_NETLINK, linkwatch.NETLINK_ADD_MEMBERSHIP, linkwatch.RTNLGRP_IPV4_ROUTE)
        batch = "".join(f"route add 10.8.{i}.0/24 via 10.9.0.2 proto 79\n" for i in range(20))
        batch += "route add 10.7.0.0/24 via 10.9.0.2 proto static\nroute del 10.7.0.0/24\n"
        batch += "route del 10.8.3.0/24 proto 79\n"
        h.ip("-batch", "-", input=batch)
        types = []
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            types.append(struct.unpack_from("=IH", data)[1])
        assert types == [linkwatch.RTM_DELROUTE]  # 20 adds, a static add and delete: all dropped
    finally:
        sock.close()


async def _poll(cond: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``cond`` held (polling every 50 ms while the loop runs), None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await asyncio.to_thread(cond):
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    return None


@pytest.mark.privileged
def test_overflow_triggers_one_resync(netns: Callable[[], Netns]) -> None:
    h = netns()
    create_veth(h, h, "10.9.0.1/24", "10.9.0.2/24", name_a="a0", name_b="b0")
    fired: list[list[str]] = []

    async def scenario() -> None:
        watch = LinkWatch(fired.append, netns=h.name, rcvbuf=1)  # the kernel's minimum: a few messages
        watch.start()
        try:
            # the loop is blocked while ip runs: every notification queues up and most are lost
            h.ip("-batch", "-", input="".join(f"addr add 10.10.{i}.1/24 dev a0\n" for i in range(200)))
            assert await _poll(lambda: bool(fired), 5) is not None
            await asyncio.sleep(0.3)  # and nothing more comes after the burst
            assert watch.overflows >= 1
        finally:
            watch.close()

    asyncio.run(scenario())
    assert len(fired) == 1
    assert any("overflow" in r for r in fired[0])


# --- privileged: the FIB repaired through a recreated vxlan.calyx ----------------------------------------

VXLAN = "vxlan.calyx"


def _vxlan_host(netns: Callable[[], Netns]) -> Netns:
    h, peer = netns(), netns()
    create_veth(h, peer, "10.99.0.1/24", "10.99.0.2/24", name_a="up0", name_b="up0")
    _add_vxlan(h)
    return h


def _add_vxlan(h: Netns, vni: int = 4096) -> None:
    h.ip("link", "add", VXLAN, "type", "vxlan", "id", str(vni), "dstport", "4789", "local", "10.99.0.1",
         "nolearning")
    h.ip("link", "set", VXLAN, "up")


def _vxlan_fib(h: Netns) -> Fib:
    fib = Fib(20, netns=h.name)
    fib.resync()
    fib.set_pools([IPPool.from_dict({"cidr": "10.65.0.0/16", "vxlan_mode": "Always"}, key="k", name="p")])
    fib.set_vteps({"10.99.0.2": IPv4Address("10.65.2.192")})
    fib.update({"10.65.2.0/26": ("10.99.0.2",), "10.65.2.77/32": ("10.99.0.2",)})
    fib.apply(sweep=True)
    return fib


def _routed(h: Netns) -> bool:
    routes = kernel_routes(h)
    r = routes.get("10.65.2.0/26")
    return (r is not None and r.get("dev") == VXLAN and r.get("gateway") == "10.65.2.192"
            and "onlink" in r.get("flags", []) and "10.65.2.77/32" in routes)


def _repair_scenario(h: Netns, fib: Fib, *, watch: bool, change: Callable[[], None], timeout: float = 2.0,
                     check: Callable[[Netns], bool] = _routed, removes: bool = True,
                     ) -> tuple[float | None, list[list[str]]]:
    """What the daemon does, minus BGP: on a change, ``fib.resync()`` then apply. Returns how long
    the route took to come back after ``change`` (None: not within ``timeout``) and the reasons."""
    fired: list[list[str]] = []

    def on_change(reasons: list[str]) -> None:
        fired.append(reasons)
        fib.resync()
        fib.apply(sweep=True)

    async def scenario() -> float | None:
        w = LinkWatch(on_change, netns=h.name, holds_routes=lambda ps: set(ps) & fib.kernel_prefixes())
        if watch:
            w.start()
        try:
            await asyncio.to_thread(change)
            if removes:
                assert not await asyncio.to_thread(check, h), "the change did not remove the routes"
            return await _poll(lambda: check(h), timeout)
        finally:
            w.close()

    return asyncio.run(scenario()), fired


@pytest.mark.privileged
def test_vxlan_device_recreated_routes_back_within_a_second(netns: Callable[[], Netns]) -> None:
    h = _vxlan_host(netns)
    fib = _vxlan_fib(h)
    try:
        assert _routed(h)

        def recreate() -> None:  # felix changing the VNI: delete, create, set up
            h.ip("link", "del", VXLAN)
            _add_vxlan(h, vni=4097)

        took, fired = _repair_scenario(h, fib, watch=True, change=recreate)
        assert took is not None and took < 1.5, f"routes not back (reasons {fired})"
        assert any(f"{VXLAN} deleted" in r for rs in fired for r in rs)
        assert 1 <= len(fired) <= 3  # one burst (delete, create, up) unless the machine is very slow between them
    finally:
        fib.close()


@pytest.mark.privileged
def test_vxlan_device_flap_and_foreign_delete_are_repaired(netns: Callable[[], Netns]) -> None:
    h = _vxlan_host(netns)
    fib = _vxlan_fib(h)
    try:
        def flap() -> None:  # IPv4 flushes the routes silently when the device goes down
            h.ip("link", "set", VXLAN, "down")
            h.ip("link", "set", VXLAN, "up")

        took, _ = _repair_scenario(h, fib, watch=True, change=flap)
        assert took is not None and took < 1.5

        def foreign_delete() -> None:
            h.ip("route", "del", "10.65.2.77/32", "proto", "79")

        took, fired = _repair_scenario(h, fib, watch=True, change=foreign_delete)
        assert took is not None and took < 1.5
        assert fired[0] == ["route 10.65.2.77/32 (protocol 79) deleted by someone else"]
        # our own delete (a withdraw) is not a change
        fib.update({"10.65.2.77/32": None})

        def withdraw() -> None:
            fib.apply(sweep=True)

        _, fired = _repair_scenario(h, fib, watch=True, change=withdraw, timeout=0.5)
        assert fired == []
    finally:
        fib.close()


@pytest.mark.privileged
def test_a_next_hop_that_becomes_connected_is_routed_at_once(netns: Callable[[], Netns]) -> None:
    h, peer = netns(), netns()
    create_veth(h, peer, None, "10.98.0.2/24", name_a="up1", name_b="up1")
    fib = Fib(20, netns=h.name)
    try:
        fib.resync()
        fib.update({"10.66.0.0/24": ("10.98.0.2",)})
        fib.apply(sweep=True)
        assert "10.66.0.0/24" in fib.unroutable  # 10.98.0.2 is not on a connected subnet yet

        def routed(_h: Netns) -> bool:
            r = kernel_routes(h).get("10.66.0.0/24")
            return r is not None and r.get("gateway") == "10.98.0.2"

        def add_address() -> None:  # an operator (or DHCP) adds the uplink's address
            h.ip("addr", "add", "10.98.0.1/24", "dev", "up1")

        took, fired = _repair_scenario(h, fib, watch=True, change=add_address, check=routed,
                                       removes=False)
        assert took is not None and took < 1.5
        assert any("address 10.98.0.1/24 added on up1" in r for rs in fired for r in rs)
    finally:
        fib.close()


@pytest.mark.privileged
def test_without_the_watcher_the_route_stays_missing(netns: Callable[[], Netns]) -> None:
    """The control: the same recreation without the watcher is not repaired (until the 60 s resync)."""
    h = _vxlan_host(netns)
    fib = _vxlan_fib(h)
    try:
        def recreate() -> None:
            h.ip("link", "del", VXLAN)
            _add_vxlan(h, vni=4097)

        took, fired = _repair_scenario(h, fib, watch=False, change=recreate, timeout=2.0)
        assert took is None and fired == []
        fib.resync()  # what the periodic resync would do, much later
        fib.apply(sweep=True)
        assert _routed(h)
    finally:
        fib.close()
