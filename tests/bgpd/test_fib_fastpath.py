"""The FIB's bulk path (new single-hop routes written through ``RouteTemplate``, the pipelined writer)
against a real kernel in a throwaway namespace: the same ownership rules as the generic path.

Small netlink batches make every apply here span several sends, so the writer thread is used.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from bgpd.fib import Fib
from calyx.kernel import rtnl
from calyx.kernel.rtnl import NetlinkError, Op, RouteMsg, RouteTemplate
from tests.bgpd.topo import gateways, kernel_routes
from tests.fixtures.netns import Netns, create_veth

pytestmark = pytest.mark.privileged


def host(netns: Callable[[], Netns]) -> Netns:
    h, peer = netns(), netns()
    create_veth(h, peer, "10.99.0.1/24", "10.99.0.2/24")
    return h


def slash32s(base: str, n: int) -> list[str]:
    start = int(IPv4Address(base))
    return [f"{IPv4Address(start + i)}/32" for i in range(n)]


def test_bulk_install_keeps_foreign_routes_and_mixes_with_ecmp(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    h.ip("route", "add", "10.40.0.7/32", "via", "10.99.0.2", "proto", "static", "metric", "20")
    h.ip("route", "add", "10.40.1.0/26", "via", "10.99.0.2", "proto", "static", "metric", "20")
    kernel = rtnl.RtnlSocket(h.name, batch_size=50)
    fib = Fib(20, netns=h.name, kernel=kernel)
    fib.resync()
    prefixes = slash32s("10.40.0.0", 500)
    changes: dict[str, tuple[str, ...] | None] = dict.fromkeys(prefixes, ("10.99.0.2",))
    changes.update({"10.40.1.0/26": ("10.99.0.3",), "10.40.2.0/26": ("10.99.0.3",),
                    "10.40.3.0/24": ("10.99.0.2", "10.99.0.3"), "10.41.0.1/32": ("192.0.2.1",)})
    fib.update(changes)
    stats = fib.apply(sweep=True)
    assert stats.conflicts == 2 and stats.failed == 0
    assert stats.added == 499 + 2  # the /32s but the foreign one, the free /26 and the ECMP /24
    routes = kernel_routes(h)
    assert len(routes) == 501 and "10.40.0.7/32" not in routes and "10.40.1.0/26" not in routes
    assert all(gateways(routes[p]) == ["10.99.0.2"] and routes[p]["metric"] == 20 for p in prefixes if p in routes)
    assert gateways(routes["10.40.2.0/26"]) == ["10.99.0.3"]
    assert gateways(routes["10.40.3.0/24"]) == ["10.99.0.2", "10.99.0.3"]
    foreign = kernel_routes(h, proto=None)
    assert foreign["10.40.0.7/32"].get("protocol") == "static" and foreign["10.40.1.0/26"]["gateway"] == "10.99.0.2"
    assert "10.41.0.1/32" in fib.unroutable
    assert fib.apply(sweep=True).writes == 0
    # the other owner leaves: the next resync installs ours
    h.ip("route", "del", "10.40.0.7/32", "proto", "static", "metric", "20")
    fib.resync()
    assert fib.apply(sweep=True).added == 1
    assert gateways(kernel_routes(h)["10.40.0.7/32"]) == ["10.99.0.2"]
    fib.close()


def test_every_unroutable_slash32_is_reported(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    fib = Fib(20, netns=h.name, kernel=rtnl.RtnlSocket(h.name, batch_size=10))
    fib.resync()
    fib.update(dict.fromkeys(slash32s("10.42.0.0", 30), ("192.0.2.1",)))
    assert fib.apply(sweep=True).writes == 0
    assert len(fib.unroutable) == 30
    fib.close()


def test_lost_acknowledgements_in_bulk_are_repaired_by_readback(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    # A receive buffer far too small for a batch of acknowledgements: the kernel drops most of them.
    kernel = rtnl.RtnlSocket(h.name, rcvbuf=4096, batch_size=1000)
    fib = Fib(20, netns=h.name, kernel=kernel)
    fib.resync()
    prefixes = slash32s("10.43.0.0", 3000)
    fib.update(dict.fromkeys(prefixes, ("10.99.0.2",)))
    first = fib.apply(sweep=True)
    assert kernel.overruns > 0
    assert first.failed > 0 and first.added + first.failed == 3000
    assert len(kernel_routes(h)) == 3000  # they did go in; which ones is unknown, so: read back
    second = fib.apply(sweep=True)
    assert second.writes == 0 and second.failed == 0
    assert fib.kernel_prefixes() == set(prefixes)
    fib.close()


def test_bulk_metric_change_is_make_before_break_and_withdraw_removes(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    fib = Fib(20, netns=h.name, kernel=rtnl.RtnlSocket(h.name, batch_size=40))
    fib.resync()
    prefixes = slash32s("10.44.0.0", 200)
    fib.update(dict.fromkeys(prefixes, ("10.99.0.2",)))
    assert fib.apply(sweep=True).added == 200
    fib.metric = 30
    fib.resync()
    stats = fib.apply(sweep=True)
    assert stats.added == 200 and stats.failed == 0
    routes = h.ip_json("route", "show", "proto", "79")
    assert len(routes) == 200 and {r["metric"] for r in routes} == {30}
    # a restarted bgpd adopts them, re-learns half, and removes the rest once the RIB is complete
    fib.close()
    again = Fib(30, netns=h.name, kernel=rtnl.RtnlSocket(h.name, batch_size=40))
    again.resync()
    assert again.adopt() == 200
    again.update(dict.fromkeys(prefixes[:100], ("10.99.0.2",)))
    assert again.apply(sweep=False).writes == 0
    assert again.apply(sweep=True).removed == 100
    again.update(dict.fromkeys(prefixes[:100]))
    assert again.apply(sweep=True).removed == 100
    assert kernel_routes(h) == {}
    again.close()


def test_template_batch_reports_each_failure_by_index(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    gw = socket.inet_aton("10.99.0.2")
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST, 20,
                     0, gw)
    dsts = [socket.inet_aton(p[:-3]) for p in slash32s("10.45.0.0", 250)]
    with rtnl.RtnlSocket(h.name, batch_size=20) as sock:
        assert sock.template_batch(RouteTemplate(Op.CREATE, route), dsts[::2]) == {}
        failures = sock.template_batch(RouteTemplate(Op.CREATE, route), dsts)
        assert sorted(failures) == list(range(0, 250, 2))
        assert {a.code for a in failures.values()} == {rtnl.AckCode.EXISTS}
        assert sock.template_batch(RouteTemplate(Op.DELETE, route), dsts) == {}
        assert sock.dump_routes(socket.AF_INET, proto=79) == []


def test_writer_failure_raises_and_leaves_no_thread(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    sock = rtnl.RtnlSocket(h.name, batch_size=10)
    sock.close()
    before = threading.active_count()
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, metric=20, gateway=socket.inet_aton("10.99.0.2"))
    with pytest.raises(NetlinkError):
        sock.template_batch(RouteTemplate(Op.CREATE, route), [bytes([10, 46, 0, i]) for i in range(100)])
    assert threading.active_count() == before


def test_template_batch_across_a_sequence_number_wrap(netns: Callable[[], Netns]) -> None:
    h = host(netns)
    gw = socket.inet_aton("10.99.0.2")
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, metric=20, gateway=gw)
    dsts = [socket.inet_aton(p[:-3]) for p in slash32s("10.47.0.0", 600)]
    with rtnl.RtnlSocket(h.name, batch_size=100) as sock:
        sock._seq = 0x7FFFFFFF - 250  # the third batch's numbers wrap
        failures = sock.template_batch(RouteTemplate(Op.CREATE, route), dsts)
        assert failures == {}
        assert sock._seq < 1000
        assert len(sock.dump_routes(socket.AF_INET, proto=79)) == 600
        again = sock.template_batch(RouteTemplate(Op.CREATE, route), dsts)
        assert sorted(again) == list(range(600)) and {a.code for a in again.values()} == {rtnl.AckCode.EXISTS}


def test_without_a_writer_thread_the_batches_go_from_the_callers_thread(
        netns: Callable[[], Netns], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    h = host(netns)
    fib = Fib(20, netns=h.name, kernel=rtnl.RtnlSocket(h.name, batch_size=30))
    fib.resync()
    prefixes = slash32s("10.48.0.0", 200)
    fib.update(dict.fromkeys(prefixes, ("10.99.0.2",)))
    stats = fib.apply(sweep=True)
    assert stats.added == 200 and stats.failed == 0
    assert len(kernel_routes(h)) == 200
    fib.update(dict.fromkeys(prefixes))
    assert fib.apply(sweep=True).removed == 200
    assert kernel_routes(h) == {}
    fib.close()


@pytest.mark.parametrize("rcvbuf", [rtnl.DEFAULT_RCVBUF, 64 << 10])
def test_only_failures_are_reported_with_or_without_an_ack_per_request(netns: Callable[[], Netns],
                                                                        rcvbuf: int) -> None:
    """With a big receive buffer only each batch's last request asks for an acknowledgement; a
    small one (an error could be dropped) keeps one per request. Either way every failed request
    is named, including the last of a batch, and everything else is in the kernel."""
    h = host(netns)
    gw = socket.inet_aton("10.99.0.2")
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, metric=20, gateway=gw)
    dsts = [socket.inet_aton(p[:-3]) for p in slash32s("10.48.0.0", 1000)]
    taken = {i for i in range(1000) if i % 7 == 3 or i % 100 == 99}  # 99: the last of each batch
    with rtnl.RtnlSocket(h.name, batch_size=100, rcvbuf=rcvbuf) as sock:
        assert TemplateWriterFlag(sock) == (rcvbuf == rtnl.DEFAULT_RCVBUF)
        sock.route_batch([(Op.CREATE, route._replace(dst=dsts[i])) for i in sorted(taken)])
        failures = sock.template_batch(RouteTemplate(Op.CREATE, route), dsts)
        if rcvbuf == rtnl.DEFAULT_RCVBUF:
            assert set(failures) == taken and {a.code for a in failures.values()} == {rtnl.AckCode.EXISTS}
        else:  # one ack per request overflows a small buffer under load: those requests are LOST
            assert set(failures) >= taken
            assert all(a.code is (rtnl.AckCode.EXISTS if i in taken else rtnl.AckCode.LOST)
                       or a.code is rtnl.AckCode.LOST for i, a in failures.items())
        assert len(sock.dump_routes(socket.AF_INET, proto=79)) == 1000
        removed = sock.template_batch(RouteTemplate(Op.DELETE, route), dsts[:500])
        assert removed == {} if rcvbuf == rtnl.DEFAULT_RCVBUF else \
            {a.code for a in removed.values()} <= {rtnl.AckCode.LOST}
        assert not [r for r in sock.dump_routes(socket.AF_INET, proto=79) if r.dst in set(dsts[:500])]
        again = sock.template_batch(RouteTemplate(Op.DELETE, route), dsts[:500])
        assert set(again) == set(range(500))
        # 500 errors overflow a small buffer: some are LOST (reported as such: the caller reads back)
        codes = {a.code for a in again.values()}
        assert codes == {rtnl.AckCode.NOT_FOUND} if rcvbuf == rtnl.DEFAULT_RCVBUF else \
            codes <= {rtnl.AckCode.NOT_FOUND, rtnl.AckCode.LOST}


def TemplateWriterFlag(sock: rtnl.RtnlSocket) -> bool:  # noqa: N802
    return rtnl.TemplateWriter(sock).ack_last_only


def test_ack_last_only_sets_the_flag_on_the_last_message_alone() -> None:
    route = RouteMsg(socket.AF_INET, b"", 32, rtnl.RT_TABLE_MAIN, 79, metric=20, gateway=socket.inet_aton("10.0.0.1"))
    t = RouteTemplate(Op.CREATE, route)
    dsts = [bytes([10, 1, 0, i]) for i in range(5)]
    buf = bytearray(t.size * 5)
    t.pack_into(buf, 40, dsts, ack_last_only=True)
    for i, dst in enumerate(dsts):
        want = bytearray(rtnl.pack_route(40 + i, Op.CREATE, route._replace(dst=dst)))
        if i < 4:
            flags = int.from_bytes(want[6:8], "little") & ~rtnl.NLM_F_ACK
            want[6:8] = flags.to_bytes(2, "little")
        assert buf[i * t.size:(i + 1) * t.size] == want, i
