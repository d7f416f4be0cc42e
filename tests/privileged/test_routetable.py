"""RouteTable against the real kernel, inside throwaway network namespaces.

Every assertion reads the kernel back with ``ip -j route show`` inside the namespace; nothing here
looks at what we sent. The machine's own routes and links are never touched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

import pytest

from calyx.kernel.routetable import PROTO_BGPD, PROTO_FELIX, NextHop, Route, RouteTable, RouteType
from tests.fixtures.netns import Netns, create_veth

pytestmark = pytest.mark.privileged


def kernel_routes(ns: Netns, proto: int | str, *, v6: bool = False, table: str = "main") -> dict[Any, dict[str, Any]]:
    """``ip -j route show proto X`` keyed by destination network."""
    fam = ["-6"] if v6 else ["-4"]
    out: dict[Any, dict[str, Any]] = {}
    for entry in ns.ip_json(*fam, "route", "show", "table", table, "proto", str(proto)):
        dst = entry["dst"]
        if dst == "default":
            dst = "::/0" if v6 else "0.0.0.0/0"
        out[ip_network(dst)] = entry
    return out


def count_routes(ns: Netns, proto: int, v6: bool = False) -> int:
    fam = "-6" if v6 else "-4"
    return len(ns.ip(fam, "route", "show", "proto", str(proto)).splitlines())


def ifindex(ns: Netns, name: str) -> int:
    [link] = ns.ip_json("link", "show", "dev", name)
    return int(link["ifindex"])


def workload_if() -> str:
    return "cali" + secrets.token_hex(5)[:10]


@dataclass
class Host:
    ns: Netns
    peer: Netns
    up1: str  # 10.99.0.1/24, fd99::1/64 towards peer 10.99.0.2 / fd99::2
    up2: str  # 10.99.1.1/24, fd98::1/64 towards peer 10.99.1.2 / fd98::2

    def add_workload_if(self, name: str | None = None) -> str:
        """A veth whose host side is ``name`` (both ends stay in the host namespace)."""
        name = name or workload_if()
        self.ns.ip("link", "add", name, "type", "veth", "peer", "name", "p" + name[4:])
        self.ns.ip("link", "set", name, "up")
        self.ns.ip("link", "set", "p" + name[4:], "up")
        return name


@pytest.fixture
def host(netns: Callable[[], Netns]) -> Iterator[Host]:
    ns, peer = netns(), netns()
    v1 = create_veth(ns, peer, "10.99.0.1/24", "10.99.0.2/24")
    v2 = create_veth(ns, peer, "10.99.1.1/24", "10.99.1.2/24")
    ns.ip("-6", "addr", "add", "fd99::1/64", "dev", v1.name_a, "nodad")
    ns.ip("-6", "addr", "add", "fd98::1/64", "dev", v2.name_a, "nodad")
    yield Host(ns, peer, v1.name_a, v2.name_a)


@pytest.fixture
def tables(host: Host) -> Iterator[tuple[RouteTable, RouteTable]]:
    felix = RouteTable(PROTO_FELIX, netns=host.ns.name)
    bgpd = RouteTable(PROTO_BGPD, netns=host.ns.name, metric_default=1100)
    yield felix, bgpd
    felix.close()
    bgpd.close()


def n(text: str) -> IPv4Network | IPv6Network:
    return ip_network(text)


def test_install_every_kind_then_change_and_remove(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, bgpd = tables
    wl = host.add_workload_if()
    felix.set_routes(
        [
            Route(n("10.65.0.5/32"), oif=wl),
            Route(n("10.65.0.0/26"), type=RouteType.BLACKHOLE),
            Route(n("10.65.0.64/26"), type=RouteType.UNREACHABLE),
        ]
    )
    bgpd.set_routes(
        [
            Route(n("10.70.0.0/26"), gateway=ip_address("10.99.0.2")),
            Route(
                n("10.71.0.0/26"),
                nexthops=(NextHop(ip_address("10.99.0.2"), host.up1), NextHop(ip_address("10.99.1.2"), host.up2)),
            ),
            Route(n("10.72.0.0/26"), gateway=ip_address("192.0.2.77"), oif=host.up1, onlink=True),
        ]
    )
    r1, r2 = felix.apply(), bgpd.apply()
    assert (r1.added, r1.failed, r2.added, r2.failed) == (3, 0, 3, 0)

    mine = kernel_routes(host.ns, PROTO_FELIX)
    assert set(mine) == {n("10.65.0.5/32"), n("10.65.0.0/26"), n("10.65.0.64/26")}
    dev = mine[n("10.65.0.5/32")]
    assert dev["dev"] == wl and dev["scope"] == "link" and dev["metric"] == 1024
    assert mine[n("10.65.0.0/26")]["type"] == "blackhole"
    assert mine[n("10.65.0.64/26")]["type"] == "unreachable"

    learned = kernel_routes(host.ns, PROTO_BGPD)
    assert learned[n("10.70.0.0/26")]["gateway"] == "10.99.0.2"
    assert learned[n("10.70.0.0/26")]["dev"] == host.up1 and learned[n("10.70.0.0/26")]["metric"] == 1100
    hops = {(h["gateway"], h["dev"]) for h in learned[n("10.71.0.0/26")]["nexthops"]}
    assert hops == {("10.99.0.2", host.up1), ("10.99.1.2", host.up2)}
    onlink = learned[n("10.72.0.0/26")]
    assert onlink["gateway"] == "192.0.2.77" and "onlink" in onlink["flags"]

    # The kernel's own rendering of every kind reads back as equal: nothing to write.
    for table in (felix, bgpd):
        assert table.apply().writes == 0
        table.resync()
        again = table.apply()
        assert again.readback and again.writes == 0, again

    # Change one, remove one.
    bgpd.set_route(Route(n("10.70.0.0/26"), gateway=ip_address("10.99.1.2")))
    bgpd.remove_route(n("10.72.0.0/26"))
    result = bgpd.apply()
    assert (result.changed, result.removed, result.writes) == (1, 1, 2)
    learned = kernel_routes(host.ns, PROTO_BGPD)
    assert set(learned) == {n("10.70.0.0/26"), n("10.71.0.0/26")}
    assert learned[n("10.70.0.0/26")]["gateway"] == "10.99.1.2"
    # ECMP down to one path, and back.
    bgpd.set_route(Route(n("10.71.0.0/26"), nexthops=(NextHop(ip_address("10.99.1.2"), host.up2),)))
    assert bgpd.apply().changed == 1
    single = kernel_routes(host.ns, PROTO_BGPD)[n("10.71.0.0/26")]
    assert "nexthops" not in single and single["gateway"] == "10.99.1.2"
    # Felix's routes were not touched by any of this.
    assert kernel_routes(host.ns, PROTO_FELIX) == mine


def test_foreign_and_connected_routes_are_never_touched(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, _ = tables
    host.ns.ip("route", "add", "10.55.0.0/24", "via", "10.99.0.2", "proto", "static")
    host.ns.ip("route", "add", "10.65.0.9/32", "via", "10.99.0.2", "proto", "static", "metric", "1024")
    host.ns.ip("route", "add", "10.56.0.0/24", "via", "10.99.0.2", "proto", str(PROTO_BGPD))
    before = host.ns.ip_json("-4", "route", "show", "table", "all")
    # A stale route of ours is swept; the rest stays.
    host.ns.ip("route", "add", "blackhole", "10.65.1.0/26", "proto", str(PROTO_FELIX), "metric", "1024")
    # Desired: a blackhole on top of the connected subnet (same key as the connected route) and
    # a /32 whose key a static route holds. Both must be refused, never replace the owner's route.
    felix.set_routes(
        [
            Route(n("10.99.0.0/24"), type=RouteType.BLACKHOLE, metric=0),
            Route(n("10.65.0.9/32"), type=RouteType.BLACKHOLE),
        ]
    )
    result = felix.apply()
    assert result.removed == 1 and result.failed == 2
    assert set(result.errors) == {n("10.99.0.0/24"), n("10.65.0.9/32")}
    after = host.ns.ip_json("-4", "route", "show", "table", "all")
    assert sorted(map(str, after)) == sorted(map(str, before))
    assert kernel_routes(host.ns, PROTO_FELIX) == {}
    # Retrying (after the readback that EEXIST asks for) changes nothing either.
    felix.apply()
    felix.set_routes([])
    assert felix.apply().writes == 0
    assert sorted(map(str, host.ns.ip_json("-4", "route", "show", "table", "all"))) == sorted(map(str, before))


def test_resync_repairs_hand_deleted_and_hand_modified_routes(
    host: Host, tables: tuple[RouteTable, RouteTable]
) -> None:
    _, bgpd = tables
    bgpd.set_routes(
        [
            Route(n("10.70.0.0/26"), gateway=ip_address("10.99.0.2")),
            Route(n("10.70.0.64/26"), gateway=ip_address("10.99.0.2")),
        ]
    )
    bgpd.apply()
    host.ns.ip("route", "del", "10.70.0.0/26", "proto", str(PROTO_BGPD), "metric", "1100")
    host.ns.ip("route", "replace", "10.70.0.64/26", "via", "10.99.1.2", "proto", str(PROTO_BGPD), "metric", "1100")
    assert bgpd.apply().writes == 0  # no readback without a resync
    bgpd.resync()
    result = bgpd.apply()
    assert (result.added, result.changed) == (1, 1)
    learned = kernel_routes(host.ns, PROTO_BGPD)
    assert {str(k): v["gateway"] for k, v in learned.items()} == {
        "10.70.0.0/26": "10.99.0.2",
        "10.70.0.64/26": "10.99.0.2",
    }


def test_resync_repairs_a_changed_scope_and_type(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, _ = tables
    wl = host.add_workload_if()
    felix.set_routes([Route(n("10.65.0.5/32"), oif=wl), Route(n("10.65.0.0/26"), type=RouteType.BLACKHOLE)])
    felix.apply()
    proto = ("proto", str(PROTO_FELIX), "metric", "1024")
    host.ns.ip("route", "replace", "10.65.0.5/32", "dev", wl, "scope", "global", *proto)
    host.ns.ip("route", "replace", "unreachable", "10.65.0.0/26", *proto)
    felix.resync()
    assert felix.apply().changed == 2
    mine = kernel_routes(host.ns, PROTO_FELIX)
    assert mine[n("10.65.0.5/32")]["scope"] == "link"
    assert mine[n("10.65.0.0/26")]["type"] == "blackhole"


def test_metric_change_leaves_one_route(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    _, bgpd = tables
    bgpd.set_route(Route(n("10.70.0.0/26"), gateway=ip_address("10.99.0.2")))
    bgpd.apply()
    bgpd.set_route(Route(n("10.70.0.0/26"), gateway=ip_address("10.99.0.2"), metric=50))
    bgpd.apply()
    entries = host.ns.ip_json("-4", "route", "show", "proto", str(PROTO_BGPD))
    assert [(e["dst"], e["metric"]) for e in entries] == [("10.70.0.0/26", 50)]


def test_interface_appearing_later_gets_its_pending_route(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, _ = tables
    later, other = workload_if(), workload_if()
    felix.set_routes([Route(n("10.65.0.7/32"), oif=later), Route(n("10.65.0.8/32"), oif=other)])
    result = felix.apply()
    assert result.pending == 2 and result.failed == 0 and result.writes == 0
    assert set(felix.pending) == {n("10.65.0.7/32"), n("10.65.0.8/32")}
    assert kernel_routes(host.ns, PROTO_FELIX) == {}

    host.add_workload_if(later)
    felix.on_link_up(later)
    result = felix.apply()
    assert result.added == 1 and result.pending == 1
    assert kernel_routes(host.ns, PROTO_FELIX)[n("10.65.0.7/32")]["dev"] == later

    # Without being told: pending routes are retried at every apply.
    host.add_workload_if(other)
    result = felix.apply()
    assert result.added == 1 and result.pending == 0
    assert set(kernel_routes(host.ns, PROTO_FELIX)) == {n("10.65.0.7/32"), n("10.65.0.8/32")}


def test_interface_created_down_is_pending_until_up(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, _ = tables
    name = workload_if()
    host.ns.ip("link", "add", name, "type", "veth", "peer", "name", "p" + name[4:])
    felix.set_route(Route(n("10.65.0.7/32"), oif=name))
    result = felix.apply()
    assert result.pending == 1 and result.failed == 0
    assert "down" in felix.pending[n("10.65.0.7/32")]
    host.ns.ip("link", "set", name, "up")
    host.ns.ip("link", "set", "p" + name[4:], "up")
    felix.on_link_up(name)
    assert felix.apply().added == 1
    assert kernel_routes(host.ns, PROTO_FELIX)[n("10.65.0.7/32")]["dev"] == name


@pytest.mark.parametrize("notify", [True, False], ids=["on_link_up", "resync"])
def test_recreated_interface_gets_its_route_back(
    host: Host, tables: tuple[RouteTable, RouteTable], notify: bool
) -> None:
    felix, _ = tables
    name = host.add_workload_if()
    felix.set_routes([Route(n("10.65.0.5/32"), oif=name), Route(n("fd65::5/128"), oif=name)])
    assert felix.apply().added == 2
    old = ifindex(host.ns, name)
    host.ns.ip("link", "del", name)
    host.ns.ip("link", "add", "cxtdummy0", "type", "veth", "peer", "name", "cxtdummy1")  # burn an index
    host.add_workload_if(name)
    assert ifindex(host.ns, name) != old
    assert kernel_routes(host.ns, PROTO_FELIX) == {}  # the kernel dropped them with the old link
    if notify:
        felix.on_link_up(name)
    else:
        felix.resync()
    result = felix.apply()
    assert result.failed == 0 and result.writes == 2
    assert kernel_routes(host.ns, PROTO_FELIX)[n("10.65.0.5/32")]["dev"] == name
    assert kernel_routes(host.ns, PROTO_FELIX, v6=True)[n("fd65::5/128")]["dev"] == name


def test_link_down_and_up_restores_ipv4_routes(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, _ = tables
    name = host.add_workload_if()
    felix.set_route(Route(n("10.65.0.5/32"), oif=name))
    felix.apply()
    host.ns.ip("link", "set", name, "down")
    assert kernel_routes(host.ns, PROTO_FELIX) == {}  # IPv4 flushes routes of a downed link
    host.ns.ip("link", "set", name, "up")
    felix.on_link_up(name)
    assert felix.apply().writes == 1
    assert n("10.65.0.5/32") in kernel_routes(host.ns, PROTO_FELIX)


def test_ipv6_routes(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    felix, bgpd = tables
    wl = host.add_workload_if()
    felix.set_routes([Route(n("fd65::5/128"), oif=wl), Route(n("fd65::/122"), type=RouteType.BLACKHOLE)])
    bgpd.set_routes(
        [
            Route(n("fd70::/122"), gateway=ip_address("fd99::2")),
            Route(
                n("fd71::/122"),
                nexthops=(NextHop(ip_address("fd98::2"), host.up2), NextHop(ip_address("fd99::2"), host.up1)),
            ),
        ]
    )
    assert felix.apply().added == 2
    assert bgpd.apply().added == 2
    mine = kernel_routes(host.ns, PROTO_FELIX, v6=True)
    assert mine[n("fd65::5/128")]["dev"] == wl and mine[n("fd65::5/128")]["metric"] == 1024
    assert mine[n("fd65::/122")]["type"] == "blackhole"
    learned = kernel_routes(host.ns, PROTO_BGPD, v6=True)
    assert learned[n("fd70::/122")]["gateway"] == "fd99::2"
    assert {h["gateway"] for h in learned[n("fd71::/122")]["nexthops"]} == {"fd98::2", "fd99::2"}
    for table in (felix, bgpd):
        table.resync()
        assert table.apply().writes == 0
    # Change the single-path route to ECMP and the ECMP route to single path; then remove.
    bgpd.set_routes(
        [
            Route(
                n("fd70::/122"),
                nexthops=(NextHop(ip_address("fd99::2"), host.up1), NextHop(ip_address("fd98::2"), host.up2)),
            ),
            Route(n("fd71::/122"), gateway=ip_address("fd98::2")),
        ]
    )
    assert bgpd.apply().changed == 2
    learned = kernel_routes(host.ns, PROTO_BGPD, v6=True)
    assert {h["gateway"] for h in learned[n("fd70::/122")]["nexthops"]} == {"fd98::2", "fd99::2"}
    assert learned[n("fd71::/122")]["gateway"] == "fd98::2" and "nexthops" not in learned[n("fd71::/122")]
    bgpd.resync()
    assert bgpd.apply().writes == 0
    bgpd.set_routes([])
    felix.set_routes([])
    assert bgpd.apply().removed == 2 and felix.apply().removed == 2
    assert kernel_routes(host.ns, PROTO_BGPD, v6=True) == {} and kernel_routes(host.ns, PROTO_FELIX, v6=True) == {}


def test_10k_routes_add_readback_and_no_op(host: Host, tables: tuple[RouteTable, RouteTable]) -> None:
    _, bgpd = tables
    base = int(ip_address("10.128.0.0"))
    gw = ip_address("10.99.0.2")
    routes = [Route(IPv4Network((base + i, 32)), gateway=gw) for i in range(10_000)]
    bgpd.set_routes(routes)
    first = bgpd.apply()
    assert first.added == 10_000 and first.failed == 0
    assert count_routes(host.ns, PROTO_BGPD) == 10_000
    second = bgpd.apply()
    assert second.writes == 0 and not second.readback
    bgpd.resync()
    third = bgpd.apply()
    assert third.readback and third.writes == 0 and third.added == third.changed == third.removed == 0
    # Half of them go: exactly those are deleted.
    bgpd.set_routes(routes[::2])
    fourth = bgpd.apply()
    assert fourth.removed == 5_000 and fourth.writes == 5_000
    assert count_routes(host.ns, PROTO_BGPD) == 5_000


# -- the helpers RouteTable stands on: namespace switching and the command runner --------------------


def _my_netns() -> str:
    import os

    return os.readlink("/proc/thread-self/ns/net")


def test_enter_moves_only_this_thread_and_always_comes_back(netns: Callable[[], Netns]) -> None:
    import socket
    import threading

    from calyx.kernel import netns as knetns

    ns = netns()
    ns.ip("link", "add", "cxtprobe0", "type", "veth", "peer", "name", "cxtprobe1")
    home = _my_netns()
    with knetns.enter(ns.name):
        inside = _my_netns()
        names = {name for _, name in socket.if_nameindex()}
    assert inside != home and _my_netns() == home
    assert {"lo", "cxtprobe0", "cxtprobe1"} <= names
    assert "cxtprobe0" not in {name for _, name in socket.if_nameindex()}

    with pytest.raises(RuntimeError), knetns.enter(ns.path):
        raise RuntimeError("boom")
    assert _my_netns() == home

    seen: list[str] = []

    def worker() -> None:
        with knetns.enter(ns.name):
            seen.append(_my_netns())
            seen.append(main_view[0])

    main_view = [_my_netns()]
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [inside, home] and _my_netns() == home

    assert knetns.run_in_netns(ns.name, _my_netns) == inside
    sock = knetns.socket_in(ns.name, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind(("127.0.0.1", 0))  # lo of the namespace (it is up)
    with pytest.raises(knetns.NamespaceNotFoundError):
        knetns.enter("cxt-does-not-exist").__enter__()
    assert _my_netns() == home


def test_command_runner_and_ip_batch(netns: Callable[[], Netns]) -> None:
    from calyx.kernel import cmd

    ns = netns()
    ns.ip("link", "add", "cxtv0", "type", "veth", "peer", "name", "cxtv1")
    ns.ip("addr", "add", "10.98.0.1/24", "dev", "cxtv0")
    ns.ip("link", "set", "cxtv0", "up")
    ns.ip("link", "set", "cxtv1", "up")
    cmd.ip_batch([f"route add 10.97.0.{i}/32 via 10.98.0.2 proto {PROTO_BGPD}" for i in range(1, 4)], ns.name)
    assert count_routes(ns, PROTO_BGPD) == 3
    assert "10.97.0.2" in cmd.run(["ip", "route", "show", "proto", str(PROTO_BGPD)], netns=ns.name).stdout

    with pytest.raises(cmd.CommandError) as err:
        cmd.ip_batch(["route add 10.97.1.0/24 via 10.250.0.1"], ns.name)
    assert err.value.returncode == 1 and "Nexthop has invalid gateway" in err.value.stderr
    assert err.value.cmd[:3] == ("ip", "-n", ns.name)
    assert "Nexthop has invalid gateway" in str(err.value)

    result = cmd.run(["cat"], input="hello\n")
    assert result.stdout == "hello\n" and result.returncode == 0
    assert cmd.run(["false"], check=False).returncode == 1
    with pytest.raises(cmd.CommandTimeoutError) as timeout:
        cmd.run(["sleep", "5"], timeout=0.2)
    assert timeout.value.returncode is None
    with pytest.raises(cmd.CommandError, match="cannot run"):
        cmd.run(["/nonexistent/cxt-binary"])


def test_lost_acknowledgements_are_reported_and_repaired_by_readback(host: Host) -> None:
    from calyx.kernel import rtnl

    # A receive buffer far too small for 1,000 acknowledgements: the kernel drops most of them.
    sock = rtnl.RtnlSocket(host.ns.name, rcvbuf=4096, batch_size=1000)
    table = RouteTable(PROTO_BGPD, netns=host.ns.name, kernel=sock)
    try:
        base = int(ip_address("10.129.0.0"))
        table.set_routes([Route(IPv4Network((base + i, 32)), gateway=ip_address("10.99.0.2")) for i in range(2000)])
        first = table.apply()
        assert sock.overruns > 0
        assert first.failed > 0 and first.added + first.failed == 2000
        assert any("acknowledgement lost" in why for why in first.errors.values())
        # The routes did go in; the table does not know which, so it reads the kernel back.
        assert count_routes(host.ns, PROTO_BGPD) == 2000
        second = table.apply()
        assert second.readback and second.writes == 0 and second.failed == 0
        assert table.in_sync
    finally:
        table.close()


def test_rtnl_batch_reports_each_error_and_dumps_filter(host: Host) -> None:
    import socket

    from calyx.kernel import rtnl
    from calyx.kernel.rtnl import AckCode, Op, RouteMsg

    def v4(text: str) -> bytes:
        return ip_address(text).packed

    gw = v4("10.99.0.2")
    good = RouteMsg(socket.AF_INET, v4("10.70.0.1"), 32, 254, PROTO_BGPD, 0, rtnl.RTN_UNICAST, 1100, 0, gw)
    with rtnl.RtnlSocket(host.ns.name) as sock:
        acks = sock.route_batch(
            [
                (Op.CREATE, good),
                (Op.CREATE, good),  # the same key again: EEXIST
                (Op.CREATE, good._replace(dst=v4("10.70.0.2"), gateway=v4("10.250.0.1"))),  # not on-link
                (Op.CREATE, good._replace(dst=v4("10.70.0.3"), gateway=None, oif=999999)),  # no such index
                (Op.DELETE, good._replace(dst=v4("10.70.0.4"))),  # nothing to delete
                (Op.REPLACE, good._replace(dst=v4("10.70.0.5"), table=1000)),  # a table above 255
                (Op.CREATE, good._replace(dst=v4("10.70.0.6"), proto=PROTO_FELIX)),
            ]
        )
        assert [a.code for a in acks] == [
            AckCode.OK,
            AckCode.EXISTS,
            AckCode.UNREACHABLE,
            AckCode.NO_DEVICE,
            AckCode.NOT_FOUND,
            AckCode.OK,
            AckCode.OK,
        ]
        assert "gateway" in acks[2].message.lower()  # the kernel's extended ack text is kept
        mine = sock.dump_routes(socket.AF_INET, proto=PROTO_BGPD)
        assert [(m.dst, m.gateway, m.metric, m.oif) for m in mine] == [
            (v4("10.70.0.1"), gw, 1100, ifindex(host.ns, host.up1))
        ]
        assert [m.dst for m in sock.dump_routes(socket.AF_INET, table=1000, proto=PROTO_BGPD)] == [v4("10.70.0.5")]
        assert sock.dump_routes(socket.AF_INET, table=1001) == []  # a table that does not exist
        assert sock.dump_routes(socket.AF_INET6, table=1001) == []
        everything = sock.dump_routes(socket.AF_INET, table=None)
        assert {m.proto for m in everything} >= {PROTO_BGPD, PROTO_FELIX, 2}  # 2: kernel (connected)
        links = sock.links()
        assert links[host.up1].ifindex == ifindex(host.ns, host.up1) and links[host.up1].up
        assert sock.link(host.up1) == links[host.up1]
        assert sock.link("cxt-nope") is None
    assert kernel_routes(host.ns, PROTO_BGPD, table="1000") != {}
