"""RIB: best path order, ECMP, loop checks, graceful-restart stale handling, route reflection."""

from __future__ import annotations

import pytest

from bgpd.rib import Attrs, LocalInfo, PeerInfo, Rib, reflect

pytestmark = pytest.mark.unit

LOCAL = LocalInfo(as_number=64512, router_id="10.0.0.1", addresses=frozenset({"10.0.0.1"}))


def rib_with(*peers: PeerInfo, local: LocalInfo = LOCAL) -> Rib:
    rib = Rib(local)
    for p in peers:
        rib.set_peer(p)
    return rib


def ebgp(addr: str, rid: str | None = None) -> PeerInfo:
    return PeerInfo(addr, ibgp=False, router_id=rid or addr)


def ibgp(addr: str, rid: str | None = None, client: bool = False) -> PeerInfo:
    return PeerInfo(addr, ibgp=True, router_id=rid or addr, rr_client=client)


def path(*asns: int, **kw: object) -> Attrs:
    return Attrs(as_path=asns, as_path_len=len(asns), **kw)  # type: ignore[arg-type]


P = "10.65.0.0/26"


def selected(rib: Rib) -> dict[str, tuple[str, ...]]:
    rib.take_dirty()
    return {p: s.next_hops for p, s in rib.selected().items()}


def test_ecmp_over_equal_paths_and_withdraw() -> None:
    rib = rib_with(ebgp("10.0.1.1"), ebgp("10.0.2.1"))
    rib.announce("10.0.1.1", path(65001, 64600), "10.0.1.1", [P])
    rib.announce("10.0.2.1", path(65002, 64600), "10.0.2.1", [P])
    assert selected(rib) == {P: ("10.0.1.1", "10.0.2.1")}
    rib.withdraw("10.0.2.1", [P])
    assert selected(rib) == {P: ("10.0.1.1",)}
    rib.withdraw("10.0.1.1", [P])
    assert rib.take_dirty() == {P} and rib.selection(P) is None


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (path(65001, local_pref=200), path(65001, local_pref=100)),
        (path(65001), path(65001, 65009)),
        (path(65001, origin="igp"), path(65001, origin="incomplete")),
        (path(65001, med=5), path(65001, med=10)),
    ],
)
def test_best_path_order(better: Attrs, worse: Attrs) -> None:
    rib = rib_with(ebgp("10.0.1.1"), ebgp("10.0.2.1"))
    rib.announce("10.0.1.1", worse, "10.0.1.1", [P])
    rib.announce("10.0.2.1", better, "10.0.2.1", [P])
    assert selected(rib) == {P: ("10.0.2.1",)}


def test_med_only_compared_within_the_same_neighbour_as() -> None:
    rib = rib_with(ebgp("10.0.1.1"), ebgp("10.0.2.1"))
    rib.announce("10.0.1.1", path(65001, med=50), "10.0.1.1", [P])
    rib.announce("10.0.2.1", path(65002, med=5), "10.0.2.1", [P])
    assert selected(rib) == {P: ("10.0.1.1", "10.0.2.1")}


def test_ebgp_beats_ibgp_and_tiebreak_by_router_id() -> None:
    rib = rib_with(ebgp("10.0.9.1"), ibgp("10.0.1.2", rid="9.9.9.9"), ibgp("10.0.1.3", rid="1.1.1.1"))
    rib.announce("10.0.1.2", path(65000), "10.0.1.2", [P])
    rib.announce("10.0.1.3", path(65000), "10.0.1.3", [P])
    rib.take_dirty()
    sel = rib.selection(P)
    assert sel is not None and sel.best.peer == "10.0.1.3" and sel.next_hops == ("10.0.1.2", "10.0.1.3")
    rib.announce("10.0.9.1", path(65000), "10.0.9.1", [P])
    assert selected(rib) == {P: ("10.0.9.1",)}


def test_loop_checks() -> None:
    local = LocalInfo(64512, "10.0.0.1", "7.7.7.7", frozenset({"10.0.0.1"}))
    rib = rib_with(ebgp("10.0.1.1"), ibgp("10.0.0.2"), local=local)
    assert rib.announce("10.0.1.1", path(65000, 64512), "10.0.1.1", ["10.1.0.0/24"]) == 0  # own AS over eBGP
    assert rib.announce("10.0.0.2", path(originator_id="10.0.0.1"), "10.0.0.2", ["10.2.0.0/24"]) == 0
    assert rib.announce("10.0.0.2", path(cluster_list=("8.8.8.8", "7.7.7.7")), "10.0.0.2", ["10.3.0.0/24"]) == 0
    assert rib.announce("10.0.1.1", path(65000), "10.0.0.1", ["10.4.0.0/24"]) == 0  # next hop is us
    assert rib.announce("10.0.0.2", path(64512), "10.0.0.2", ["10.5.0.0/24"]) == 1  # iBGP: no AS check
    assert selected(rib) == {"10.5.0.0/24": ("10.0.0.2",)}
    # a path replaced by one we refuse is withdrawn
    rib.announce("10.0.1.1", path(65000), "10.0.1.1", ["10.6.0.0/24"])
    rib.announce("10.0.1.1", path(65000, 64512), "10.0.1.1", ["10.6.0.0/24"])
    assert "10.6.0.0/24" not in selected(rib)


def test_graceful_restart_stale_until_eor() -> None:
    rib = rib_with(ebgp("10.0.1.1"), ebgp("10.0.2.1"))
    rib.announce("10.0.1.1", path(65001), "10.0.1.1", [P, "10.9.0.0/24"])
    rib.announce("10.0.2.1", path(65002), "10.0.2.1", [P])
    rib.take_dirty()
    rib.peer_down("10.0.1.1", 120, now=1000.0)
    # stale paths lose to fresh ones but still forward where they are the only ones
    assert selected(rib) == {P: ("10.0.2.1",), "10.9.0.0/24": ("10.0.1.1",)}
    assert rib.expire(1100.0) == 0
    rib.announce("10.0.1.1", path(65001), "10.0.1.1", [P])  # re-sent after reconnecting
    assert rib.peer_eor("10.0.1.1") == 1  # 10.9.0.0/24 was not re-sent
    assert selected(rib) == {P: ("10.0.1.1", "10.0.2.1")}


def test_graceful_restart_timer_and_hard_down() -> None:
    rib = rib_with(ebgp("10.0.1.1"), ebgp("10.0.2.1"))
    rib.announce("10.0.1.1", path(65001), "10.0.1.1", [P])
    rib.announce("10.0.2.1", path(65002), "10.0.2.1", ["10.9.0.0/24"])
    rib.peer_down("10.0.1.1", 60, now=0.0)
    assert rib.next_deadline() == 60.0
    assert rib.expire(59.0) == 0 and rib.expire(60.0) == 1
    rib.peer_down("10.0.2.1", None, now=0.0)  # no graceful restart: gone at once
    assert selected(rib) == {}


def test_max_prefixes() -> None:
    rib = Rib(LOCAL)
    rib.set_peer(PeerInfo("10.0.1.1", ibgp=False, max_prefixes=2))
    assert rib.announce("10.0.1.1", path(65001), "10.0.1.1", ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24"]) == 2
    assert rib.over_limit("10.0.1.1") and rib.received("10.0.1.1") == 2


def test_replace_peer_from_adj_rib_dump() -> None:
    rib = rib_with(ebgp("10.0.1.1"))
    rib.announce("10.0.1.1", path(65001), "10.0.1.1", ["10.1.0.0/24", "10.2.0.0/24"])
    rib.replace_peer("10.0.1.1", {"10.2.0.0/24": (path(65001), "10.0.1.1"), "10.3.0.0/24": (path(65001), "10.0.1.1")})
    assert sorted(selected(rib)) == ["10.2.0.0/24", "10.3.0.0/24"]


def test_reflection() -> None:
    local = LocalInfo(64512, "10.0.0.10", "1.1.1.1", frozenset({"10.0.0.10"}))
    c1, c2 = ibgp("10.0.0.1", client=True), ibgp("10.0.0.2", client=True)
    nc, ext = ibgp("10.0.0.11"), ebgp("10.0.9.1")
    rib = rib_with(c1, c2, nc, ext, local=local)
    rib.announce("10.0.0.1", path(local_pref=100), "10.0.0.1", ["10.65.1.0/26"])
    rib.announce("10.0.0.11", path(originator_id="10.0.0.7", cluster_list=("2.2.2.2",)), "10.0.0.7", ["10.65.7.0/26"])
    rib.announce("10.0.9.1", path(65000), "10.0.9.1", ["10.99.0.0/16"])
    rib.take_dirty()
    out = reflect(rib, [c1, c2, nc, ext])
    assert set(out) == {"10.0.0.1", "10.0.0.2", "10.0.0.11"}  # iBGP peers only
    # from a client: to the other client and to the non-client, never back
    assert "10.65.1.0/26" not in out["10.0.0.1"]
    a = out["10.0.0.2"]["10.65.1.0/26"]
    assert (a.next_hop, a.originator_id, a.cluster_list) == ("10.0.0.1", "10.0.0.1", ("1.1.1.1",))
    assert "10.65.1.0/26" in out["10.0.0.11"]
    # from a non-client: to clients only, with the cluster list prepended and the originator kept
    b = out["10.0.0.1"]["10.65.7.0/26"]
    assert (b.next_hop, b.originator_id, b.cluster_list) == ("10.0.0.7", "10.0.0.7", ("1.1.1.1", "2.2.2.2"))
    assert "10.65.7.0/26" not in out["10.0.0.11"]
    # eBGP-learned routes are not reflected
    assert all("10.99.0.0/16" not in routes for routes in out.values())
    # not a reflector: nothing
    assert reflect(rib_with(c1, c2), [c1, c2]) == {}
