"""The fast packing path (:class:`calyx.kernel.rtnl.RouteTemplate`) against the generic ``pack_route``.

Every message a template writes must be byte for byte what ``pack_route`` writes for the same route
with that destination and sequence number, for any route shape: random families, prefix lengths,
operations, tables (also above 255), metrics, gateways, interfaces, flags and multipath next hops.
"""

from __future__ import annotations

import random
import socket

import pytest

from calyx.kernel import rtnl
from calyx.kernel.rtnl import NextHop, Op, RouteMsg, RouteTemplate, pack_route

pytestmark = pytest.mark.unit


def _addr(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def random_route(rng: random.Random) -> RouteMsg:
    family = rng.choice([socket.AF_INET, socket.AF_INET, socket.AF_INET6])
    size = 4 if family == socket.AF_INET else 16
    dst_len = rng.choice([size * 8, size * 8, rng.randint(1, size * 8)])
    multipath: tuple[NextHop, ...] = ()
    gateway: bytes | None = None
    if rng.random() < 0.25:
        multipath = tuple(
            NextHop(rng.choice([0, rng.randint(1, 5000)]), rng.choice([None, _addr(rng, size)]),
                    rng.choice([0, rtnl.RTNH_F_ONLINK]), rng.randint(0, 3))
            for _ in range(rng.randint(1, 4))
        )
    elif rng.random() < 0.8:
        gateway = _addr(rng, size)
    return RouteMsg(
        family=family,
        dst=_addr(rng, size),
        dst_len=dst_len,
        table=rng.choice([rtnl.RT_TABLE_MAIN, rng.randint(1, 252), rng.randint(256, 1 << 31)]),
        proto=rng.choice([79, 80, 4, rng.randint(0, 255)]),
        scope=rng.choice([rtnl.RT_SCOPE_UNIVERSE, rtnl.RT_SCOPE_LINK]),
        type=rng.choice([rtnl.RTN_UNICAST, rtnl.RTN_BLACKHOLE, rtnl.RTN_UNREACHABLE]),
        metric=rng.choice([None, 0, 20, 1024, rng.randint(0, (1 << 32) - 1)]),
        oif=rng.choice([0, 0, rng.randint(1, 1 << 20)]),
        gateway=gateway,
        flags=rng.choice([0, rtnl.RTNH_F_ONLINK]),
        multipath=multipath,
    )


@pytest.mark.parametrize("seed", range(8))
def test_template_bytes_equal_pack_route_for_random_routes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(250):
        route = random_route(rng)
        op = rng.choice(list(Op))
        template = RouteTemplate(op, route)
        size = len(route.dst)
        dsts = [_addr(rng, size) for _ in range(rng.randint(1, 20))]
        first = rng.randint(1, 0x7FFFFFFF - 100)
        expected = [pack_route(first + i, op, route._replace(dst=d)) for i, d in enumerate(dsts)]
        assert [template.pack(first + i, d) for i, d in enumerate(dsts)] == expected
        assert template.size == len(expected[0])
        buf = bytearray(template.size * len(dsts))
        template.pack_into(buf, first, dsts)
        assert bytes(buf) == b"".join(expected)


def test_the_common_bgpd_route() -> None:
    """A learned /32 via one gateway, created with NLM_F_EXCL: bgpd's FIB hot path."""
    gw = socket.inet_aton("10.99.0.2")
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST, 20,
                     0, gw)
    template = RouteTemplate(Op.CREATE, route)
    for i in range(1000):
        dst = (0x0A800000 + i * 7919).to_bytes(4, "big")
        assert template.pack(i + 1, dst) == pack_route(i + 1, Op.CREATE, route._replace(dst=dst))


def test_template_refuses_routes_without_a_destination_field() -> None:
    with pytest.raises(ValueError):
        RouteTemplate(Op.CREATE, RouteMsg(socket.AF_INET, b"\0\0\0\0", 0))  # a default route has no RTA_DST
    with pytest.raises(ValueError):
        RouteTemplate(Op.CREATE, RouteMsg(socket.AF_UNSPEC, b"", 8))
