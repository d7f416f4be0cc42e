"""RouteTable's diff, pending and failure logic against an in-memory kernel (no root needed).

The fake kernel keeps routes under the kernel's own key (table, destination, metric), answers
NLM_F_EXCL creates with EEXIST, deletes by protocol and metric, refuses unknown interface indexes
with ENODEV and down ones with ENETDOWN, and can be told to fail chosen destinations.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
from collections.abc import Sequence
from ipaddress import ip_address, ip_network

import pytest

from calyx.kernel import rtnl
from calyx.kernel.routetable import (
    PROTO_BGPD,
    PROTO_FELIX,
    NextHop,
    Route,
    RouteTable,
    RouteType,
)
from calyx.kernel.rtnl import Ack, Link, Op, RouteMsg, RouteRequest

pytestmark = pytest.mark.unit

STATIC = 4


class FakeKernel:
    def __init__(self) -> None:
        self.routes: list[RouteMsg] = []
        self.link_map: dict[str, Link] = {"lo": Link(1, "lo", rtnl.IFF_UP)}
        self.next_index = 2
        self.fail: dict[str, int] = {}  # "10.0.0.1/32" -> errno for any write to it
        self.lose: set[str] = set()  # writes whose acknowledgement is "lost"
        self.log: list[tuple[Op, str, int | None]] = []
        self.dumps = 0
        self.link_dumps = 0

    # -- test helpers --
    def add_link(self, name: str, up: bool = True) -> int:
        idx = self.next_index
        self.next_index += 1
        self.link_map[name] = Link(idx, name, rtnl.IFF_UP if up else 0)
        return idx

    def del_link(self, name: str) -> None:
        idx = self.link_map.pop(name).ifindex
        self.routes = [r for r in self.routes if r.oif != idx and all(nh.oif != idx for nh in r.multipath)]

    def find(self, dst: str, proto: int | None = None) -> list[RouteMsg]:
        net = ip_network(dst)
        return [
            r
            for r in self.routes
            if r.dst == net.network_address.packed
            and r.dst_len == net.prefixlen
            and (proto is None or r.proto == proto)
        ]

    def inject(self, msg: RouteMsg) -> None:
        self.routes.append(msg)

    # -- the Kernel seam --
    def dump_routes(
        self, family: int, *, table: int | None = 254, proto: int | None = None, rtype: int | None = None
    ) -> list[RouteMsg]:
        self.dumps += 1
        return [
            r
            for r in self.routes
            if r.family == family and (table is None or r.table == table) and (proto is None or r.proto == proto)
        ]

    def links(self) -> dict[str, Link]:
        self.link_dumps += 1
        return dict(self.link_map)

    def route_batch(self, requests: Sequence[tuple[Op, RouteMsg]]) -> list[Ack]:
        return [self._one(RouteRequest(op, m)) for op, m in requests]

    def close(self) -> None:
        pass

    def _one(self, req: RouteRequest) -> Ack:
        m = req.route
        name = f"{ip_address(m.dst)}/{m.dst_len}"
        self.log.append((req.op, name, m.metric))
        if name in self.fail:
            err = self.fail[name]
            return Ack(rtnl._ERRNO_CODES.get(err, rtnl.AckCode.OTHER), err)
        if name in self.lose:
            return rtnl.LOST
        same_key = [
            r
            for r in self.routes
            if (r.family, r.dst, r.dst_len, r.table, r.metric) == (m.family, m.dst, m.dst_len, m.table, m.metric)
        ]
        if req.op is Op.DELETE:
            for r in same_key:
                if r.proto == m.proto and (not m.gateway or r.gateway == m.gateway):
                    self.routes.remove(r)
                    return rtnl.OK
            return Ack(rtnl.AckCode.NOT_FOUND, errno.ESRCH)
        indexes = {link.ifindex: link for link in self.link_map.values()}
        for oif in [m.oif] + [nh.oif for nh in m.multipath]:
            if oif and oif not in indexes:
                return Ack(rtnl.AckCode.NO_DEVICE, errno.ENODEV)
            if oif and not indexes[oif].up:
                return Ack(rtnl.AckCode.DEVICE_DOWN, errno.ENETDOWN)
        if req.op is Op.CREATE and same_key:
            return Ack(rtnl.AckCode.EXISTS, errno.EEXIST)
        if req.op is Op.REPLACE and same_key:
            self.routes[self.routes.index(same_key[0])] = m
        else:
            self.routes.append(m)
        return rtnl.OK


def dev_route(dst: str, ifname: str, **kw: object) -> Route:
    return Route(ip_network(dst), oif=ifname, **kw)  # type: ignore[arg-type]


def gw_route(dst: str, gw: str, **kw: object) -> Route:
    return Route(ip_network(dst), gateway=ip_address(gw), **kw)  # type: ignore[arg-type]


def writes(k: FakeKernel) -> int:
    return len(k.log)


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    k.add_link("cali1")
    k.add_link("cali2")
    return k


def test_first_apply_adds_and_second_apply_writes_nothing(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_routes(
        [
            dev_route("10.65.0.1/32", "cali1"),
            dev_route("10.65.0.2/32", "cali2"),
            Route(ip_network("10.65.0.0/26"), type=RouteType.BLACKHOLE),
            dev_route("fd00:65::1/128", "cali1"),
        ]
    )
    result = table.apply()
    assert (result.added, result.changed, result.removed, result.failed) == (4, 0, 0, 0)
    assert result.readback and result.writes == 4
    assert len(kernel.routes) == 4
    dev = kernel.find("10.65.0.1/32")[0]
    assert dev.scope == rtnl.RT_SCOPE_LINK and dev.oif == kernel.link_map["cali1"].ifindex
    assert dev.proto == PROTO_FELIX and dev.metric == table.metric_default
    assert kernel.find("10.65.0.0/26")[0].type == rtnl.RTN_BLACKHOLE

    before = writes(kernel)
    again = table.apply()
    assert again.writes == 0 and not again.did_work
    assert writes(kernel) == before
    table.resync()
    after_resync = table.apply()
    assert after_resync.readback and after_resync.writes == 0
    assert table.in_sync


def test_failed_route_stays_dirty_while_others_proceed(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    kernel.fail["10.70.0.2/32"] = errno.EINVAL
    table.set_routes([gw_route(f"10.70.0.{i}/32", "10.99.0.2") for i in range(1, 5)])
    result = table.apply()
    assert result.added == 3 and result.failed == 1
    assert set(result.errors) == {ip_network("10.70.0.2/32")}
    assert "Invalid argument" in result.errors[ip_network("10.70.0.2/32")]
    assert ip_network("10.70.0.2/32") in table.failed
    assert len(kernel.find("10.70.0.3/32")) == 1

    # Retried at the next apply, and only it.
    kernel.log.clear()
    still = table.apply()
    assert still.failed == 1 and [entry[1] for entry in kernel.log] == ["10.70.0.2/32"]

    del kernel.fail["10.70.0.2/32"]
    fixed = table.apply()
    assert fixed.added == 1 and fixed.failed == 0
    assert table.failed == {} and table.in_sync
    assert len(kernel.routes) == 4


def test_route_for_missing_interface_is_pending_then_written(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_routes([dev_route("10.65.0.9/32", "cali9"), dev_route("10.65.0.1/32", "cali1")])
    result = table.apply()
    assert result.added == 1 and result.failed == 0 and result.pending == 1
    assert ip_network("10.65.0.9/32") in table.pending
    assert not kernel.find("10.65.0.9/32")
    # No netlink write for a route whose interface is unknown.
    assert [entry[1] for entry in kernel.log] == ["10.65.0.1/32"]

    # Still missing: still pending, still no write.
    kernel.log.clear()
    assert table.apply().pending == 1 and kernel.log == []

    idx = kernel.add_link("cali9")
    table.on_link_up("cali9")
    done = table.apply()
    assert done.added == 1 and done.pending == 0
    assert kernel.find("10.65.0.9/32")[0].oif == idx
    assert table.pending == {} and table.in_sync


def test_interface_down_is_pending_not_failed(kernel: FakeKernel) -> None:
    kernel.add_link("cali3", up=False)
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_route(dev_route("10.65.0.3/32", "cali3"))
    result = table.apply()
    assert result.failed == 0 and result.pending == 1
    assert "down" in table.pending[ip_network("10.65.0.3/32")]
    kernel.link_map["cali3"] = kernel.link_map["cali3"]._replace(flags=rtnl.IFF_UP)
    table.on_link_up("cali3")
    assert table.apply().added == 1
    assert table.pending == {}


def test_recreated_interface_gets_its_route_back(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_route(dev_route("10.65.0.1/32", "cali1"))
    table.apply()
    kernel.del_link("cali1")  # the kernel drops the route with the link
    new_idx = kernel.add_link("cali1")
    assert not kernel.find("10.65.0.1/32")
    table.on_link_up("cali1")
    result = table.apply()
    assert result.writes == 1
    assert kernel.find("10.65.0.1/32")[0].oif == new_idx


def test_recreated_interface_noticed_by_link_map(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_routes([dev_route("10.65.0.1/32", "cali1"), dev_route("10.65.0.2/32", "cali2")])
    table.apply()
    kernel.del_link("cali1")
    new_idx = kernel.add_link("cali1")
    # Another change makes the table read the link map: it sees cali1's new index by itself.
    table.set_route(dev_route("10.65.0.3/32", "cali2"))
    table.apply()
    assert kernel.find("10.65.0.1/32")[0].oif == new_idx


def test_sweeps_only_our_protocol(kernel: FakeKernel) -> None:
    fam = socket.AF_INET
    stale = RouteMsg(fam, ip_network("10.65.0.7/32").network_address.packed, 32, 254, PROTO_FELIX, 253, 1, 1024, 2)
    foreign = RouteMsg(fam, ip_network("10.66.0.0/24").network_address.packed, 24, 254, STATIC, 0, 1, 0, 2)
    bgp = RouteMsg(fam, ip_network("10.65.0.7/32").network_address.packed, 32, 254, PROTO_BGPD, 0, 1, 1024, 0,
                   ip_address("10.99.0.2").packed)  # fmt: skip
    for m in (stale, foreign):
        kernel.inject(m)
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_routes([])
    result = table.apply()
    assert result.removed == 1
    assert kernel.routes == [foreign]
    # The other daemon's route for the same destination is never ours to delete.
    kernel.inject(bgp)
    table.resync()
    assert table.apply().writes == 0
    assert bgp in kernel.routes


def test_foreign_route_with_same_key_is_a_conflict_not_clobbered(kernel: FakeKernel) -> None:
    dst = ip_network("10.66.0.0/24")
    connected = RouteMsg(socket.AF_INET, dst.network_address.packed, 24, 254, 2, 253, 1, 1024, 2)
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.apply()  # the initial readback
    kernel.inject(connected)
    table.set_route(Route(dst, type=RouteType.BLACKHOLE))
    dumps = kernel.dumps
    # EEXIST without a fresh readback reads back at once, in the same apply (the route might be
    # ours after all), and the second attempt confirms the conflict
    first = table.apply()
    assert kernel.dumps > dumps and first.readback
    assert first.failed == 1 and "conflict" in first.errors[dst]
    assert kernel.routes == [connected]
    assert [op for op, _, _ in kernel.log] == [Op.CREATE, Op.CREATE]  # NLM_F_EXCL, never a replace
    # a confirmed conflict asks for no more readbacks: the route stays failed and is retried
    dumps = kernel.dumps
    second = table.apply()
    assert kernel.dumps == dumps and second.failed == 1 and not second.readback
    assert kernel.routes == [connected]
    assert ip_network("10.66.0.0/24") in table.failed


def test_own_route_added_by_hand_is_adopted_after_eexist(kernel: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.apply()
    dst = ip_network("10.65.0.4/32")
    ours = RouteMsg(socket.AF_INET, dst.network_address.packed, 32, 254, PROTO_FELIX, 253, 1, 1024,
                    kernel.link_map["cali1"].ifindex)  # fmt: skip
    kernel.inject(ours)  # e.g. written by the CNI plugin with felix's protocol
    table.set_route(dev_route(str(dst), "cali1"))
    with caplog.at_level(logging.INFO, logger="calyx.kernel.routetable"):
        result = table.apply()
    # the create meets EEXIST, the same apply reads back, finds it ours and identical: adopted
    assert result.readback and result.failed == 0 and not result.errors
    assert result.writes == 1 and [op for op, _, _ in kernel.log] == [Op.CREATE]
    assert table.in_sync and kernel.routes == [ours]
    # nothing went wrong, so nothing is logged as if it had (a CNI ADD on a quiet host warns of nothing)
    assert [r.levelname for r in caplog.records] == ["INFO"], [r.getMessage() for r in caplog.records]
    assert table.apply().writes == 0


def test_hand_modified_route_is_repaired_on_resync(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2"))
    table.apply()
    [mine] = kernel.find("10.80.0.0/26")
    kernel.routes[kernel.routes.index(mine)] = mine._replace(gateway=ip_address("10.99.0.3").packed)
    table.resync()
    result = table.apply()
    assert result.changed == 1
    assert kernel.find("10.80.0.0/26")[0].gateway == ip_address("10.99.0.2").packed
    assert kernel.log[-1][0] is Op.REPLACE


def test_hand_deleted_route_comes_back_on_resync(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2"))
    table.apply()
    kernel.routes.clear()
    assert table.apply().writes == 0  # believed present: no I/O until a resync
    table.resync()
    assert table.apply().added == 1
    assert len(kernel.find("10.80.0.0/26")) == 1


def test_metric_change_is_make_before_break(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2", metric=100))
    table.apply()
    kernel.log.clear()
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2", metric=200))
    result = table.apply()
    assert [(op, metric) for op, _, metric in kernel.log] == [(Op.CREATE, 200), (Op.DELETE, 100)]
    assert [m.metric for m in kernel.find("10.80.0.0/26")] == [200]
    assert result.added == 1

    # If the new route cannot go in, the old one stays.
    kernel.fail["10.80.0.0/26"] = errno.ENOMEM
    kernel.log.clear()
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2", metric=300))
    failed = table.apply()
    assert failed.failed == 1
    assert [op for op, _, _ in kernel.log] == [Op.CREATE]
    assert [m.metric for m in kernel.find("10.80.0.0/26")] == [200]


def test_ecmp_order_is_irrelevant(kernel: FakeKernel) -> None:
    a = NextHop(ip_address("10.99.0.2"), "cali1")
    b = NextHop(ip_address("10.99.1.2"), "cali2")
    dst = ip_network("10.90.0.0/24")
    assert Route(dst, nexthops=(a, b)) == Route(dst, nexthops=(b, a))
    assert hash(Route(dst, nexthops=(a, b))) == hash(Route(dst, nexthops=(b, a)))
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    table.set_route(Route(dst, nexthops=(a, b)))
    assert table.apply().added == 1
    # The kernel hands the nexthops back in another order: still equal, no write.
    [m] = kernel.find(str(dst))
    kernel.routes[kernel.routes.index(m)] = m._replace(multipath=tuple(reversed(m.multipath)))
    table.set_route(Route(dst, nexthops=(b, a)))
    table.resync()
    assert table.apply().writes == 0
    # One nexthop fewer is a change.
    table.set_route(Route(dst, nexthops=(a,)))
    assert table.apply().changed == 1
    [single] = kernel.find(str(dst))
    assert single.multipath == () and single.gateway == ip_address("10.99.0.2").packed


def test_lost_acknowledgement_forces_readback(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    kernel.lose.add("10.80.0.0/26")
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2"))
    result = table.apply()
    assert result.failed == 1 and not table.in_sync
    kernel.lose.clear()
    dumps = kernel.dumps
    again = table.apply()
    assert kernel.dumps == dumps + 2 and again.readback  # IPv4 and IPv6 dumped
    assert len(kernel.find("10.80.0.0/26")) == 1 and table.in_sync


def test_remove_and_full_replace(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_routes({ip_network("10.65.0.1/32"): dev_route("10.65.0.1/32", "cali1"),
                      ip_network("10.65.0.2/32"): dev_route("10.65.0.2/32", "cali2")})  # fmt: skip
    table.apply()
    table.remove_route(ip_network("10.65.0.1/32"))
    assert table.apply().removed == 1
    assert not kernel.find("10.65.0.1/32")
    table.set_routes([dev_route("10.65.0.3/32", "cali1")])
    result = table.apply()
    assert (result.added, result.removed) == (1, 1)
    assert [ip_address(m.dst) for m in kernel.routes] == [ip_address("10.65.0.3")]
    # Unchanged desired state: set again, nothing dirty.
    table.set_routes([dev_route("10.65.0.3/32", "cali1")])
    assert table.apply().writes == 0


def test_changing_interface_replaces_in_place(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    table.set_route(dev_route("10.65.0.1/32", "cali1"))
    table.apply()
    kernel.log.clear()
    table.set_route(dev_route("10.65.0.1/32", "cali2"))
    result = table.apply()
    assert result.changed == 1 and [op for op, _, _ in kernel.log] == [Op.REPLACE]
    assert kernel.find("10.65.0.1/32")[0].oif == kernel.link_map["cali2"].ifindex


def test_actual_routes_round_trip(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_BGPD, kernel=kernel)
    want = {
        gw_route("10.80.0.0/26", "10.99.0.2", metric=7),
        Route(ip_network("10.81.0.0/26"), gateway=ip_address("192.0.2.9"), oif="cali1", onlink=True, metric=7),
        Route(ip_network("fd00:1::/64"), type=RouteType.BLACKHOLE, metric=7),
    }
    table.set_routes(want)
    table.apply()
    got = {dataclasses.replace(r, proto=None, table=None, scope=None) for r in table.actual_routes()}
    assert got == want
    assert {r.proto for r in table.actual_routes()} == {PROTO_BGPD}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": RouteType.BLACKHOLE, "oif": "cali1"},
        {},
        {"oif": "cali1", "onlink": True},
        {"gateway": ip_address("fd00::1")},
        {"nexthops": (NextHop(ip_address("10.0.0.1")),), "gateway": ip_address("10.0.0.2")},
        {"oif": "cali1", "metric": -1},
    ],
)
def test_route_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Route(ip_network("10.0.0.0/24"), **kwargs)  # type: ignore[arg-type]


def test_table_rejects_other_owners_routes(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    with pytest.raises(ValueError):
        table.set_route(dev_route("10.65.0.1/32", "cali1", proto=PROTO_BGPD))
    with pytest.raises(ValueError):
        RouteTable(STATIC, kernel=kernel)


def test_pack_and_parse_round_trip() -> None:
    msg = RouteMsg(socket.AF_INET6, ip_address("fd00::5").packed, 128, 1000, PROTO_BGPD, 0, rtnl.RTN_UNICAST, 33,
                   0, None, 0, (rtnl.NextHop(3, ip_address("fe80::1").packed, rtnl.RTNH_F_ONLINK),
                                rtnl.NextHop(4, ip_address("fe80::2").packed, 0)))  # fmt: skip
    data = rtnl.pack_route(7, Op.REPLACE, msg)
    # A dump reply carries RTM_NEWROUTE: flip the type to read it back with the dump parser.
    reply = data[:4] + rtnl._NLMSGHDR.pack(0, rtnl.RTM_NEWROUTE, 0, 7, 0)[4:6] + data[6:]
    out: list[RouteMsg] = []
    done, interrupted, err = rtnl.parse_routes(reply, out, proto=PROTO_BGPD, table=1000)
    assert not done and not interrupted and err == 0
    assert out == [msg._replace(metric=33)]
    assert rtnl.parse_routes(reply, [], proto=PROTO_FELIX) == (False, False, 0)


def test_apply_restores_the_garbage_collector(kernel: FakeKernel) -> None:
    import gc

    table = RouteTable(PROTO_BGPD, kernel=kernel)
    table.set_route(gw_route("10.80.0.0/26", "10.99.0.2"))
    assert gc.isenabled()
    table.apply()
    assert gc.isenabled()

    def broken(requests: Sequence[tuple[Op, RouteMsg]]) -> list[Ack]:
        raise rtnl.NetlinkError(errno.EIO, "socket gone")

    kernel.route_batch = broken  # type: ignore[method-assign]
    table.set_route(gw_route("10.81.0.0/26", "10.99.0.2"))
    with pytest.raises(rtnl.NetlinkError):
        table.apply()
    assert gc.isenabled()
    del kernel.route_batch  # the socket works again
    gc.disable()
    try:
        result = table.apply()
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
    # Acknowledgements may have been lost with the exception: the next apply reads the kernel back.
    assert result.readback and result.added == 1
    assert len(kernel.find("10.81.0.0/26")) == 1


def test_set_routes_mapping_must_be_keyed_by_destination(kernel: FakeKernel) -> None:
    table = RouteTable(PROTO_FELIX, kernel=kernel)
    with pytest.raises(ValueError):
        table.set_routes({ip_network("10.65.0.2/32"): dev_route("10.65.0.1/32", "cali1")})
