"""The daemon's decisions without I/O: max_prefixes closes and holds down a session, the rendered
ExaBGP configuration leaves a held peer out, the keepalive warning, and the link watch's kick."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest

from bgpd import api
from bgpd.daemon import BgpDaemon
from bgpd.exaconf import ExaConfig
from bgpd.rib import Attrs
from calyx.config import Config
from calyx.datastore import keys
from calyx.datastore.syncer import InSync, Update
from calyx.model import BGPPeer, ClusterConfig, Node

PEER = "10.10.1.0"


def _daemon(**peer: Any) -> tuple[BgpDaemon, list[ExaConfig]]:
    cfg = replace(Config(), node_name="h1", bgp_max_prefixes_hold_down=3.0, state_dir="/nonexistent",
                  run_dir="/nonexistent")
    d = BgpDaemon(cfg, None)
    applied: list[ExaConfig] = []

    async def apply(exa_cfg: ExaConfig) -> str:
        applied.append(exa_cfg)
        return "reloaded"

    d.exa.apply = apply  # type: ignore[method-assign]
    node = Node.from_dict({"ipv4": "10.10.1.1/31", "as_number": 65001}, key=keys.node_key("h1"), name="h1")
    bgp = BGPPeer.from_dict({"peer_ip": PEER, "as_number": 65000, "node": "h1", **peer},
                            key=keys.bgp_peer_key("tor"), name="tor")
    cluster = ClusterConfig.from_dict({"node_to_node_mesh": False}, key=keys.CLUSTER_CONFIG_KEY, name="cluster")
    d.on_batch([Update(keys.node_key("h1"), node, 1), Update(keys.bgp_peer_key("tor"), bgp, 1),
                Update(keys.CLUSTER_CONFIG_KEY, cluster, 1), InSync(1)])
    asyncio.run(d._configure())
    return d, applied


def _update(*prefixes: str) -> api.UpdateEvent:
    return api.UpdateEvent(PEER, ((Attrs(as_path=(65000,), as_path_len=1), PEER, prefixes),), ())


def test_over_max_prefixes_closes_the_session_drops_routes_and_holds_it_down() -> None:
    d, applied = _daemon(max_prefixes=3)
    assert [n.peer_ip for n in applied[-1].neighbors] == [PEER]
    sess = d.sessions[PEER]
    d.on_event(api.StateEvent(PEER, "up"))
    d.on_event(api.OpenEvent(PEER, "10.10.255.254", 65000, 30, 120))  # graceful restart negotiated
    d.on_event(_update("10.1.0.0/24", "10.1.1.0/24"))
    assert d.rib is not None and d.rib.received(PEER) == 2 and sess.up
    d.on_event(_update("10.1.2.0/24", "10.1.3.0/24", "10.1.4.0/24"))
    assert sess.state == "idle" and sess.held_until is not None and sess.limit_trips == 1
    assert d.rib.paths(PEER) == {}  # dropped at once, not kept as stale for graceful restart
    d.rib.take_dirty()
    assert d.rib.selected() == {}
    assert d.config_dirty
    status = d.statuses()[0]
    assert status.state == "idle" and status.prefixes_received == 0
    assert status.last_error == "max_prefixes (3) exceeded: session closed, held down for 3 s"
    # the reload leaves the peer out of ExaBGP's configuration; its last words change nothing
    asyncio.run(d._configure())
    assert applied[-1].neighbors == ()
    d.on_event(api.StateEvent(PEER, "down", "stop, message [removed]"))
    d.on_event(_update("10.1.5.0/24"))
    assert d.rib.received(PEER) == 0 and sess.last_error is not None and sess.last_error.startswith("max_prefixes")
    # after the hold-down the peer is configured again
    d.config_dirty = False
    d._release_holds(sess.held_until - 0.1)
    assert sess.held_until is not None and not d.config_dirty
    d._release_holds(sess.held_until + 0.1)
    assert sess.held_until is None and d.config_dirty
    asyncio.run(d._configure())
    assert [n.peer_ip for n in applied[-1].neighbors] == [PEER]
    d.on_event(api.StateEvent(PEER, "up"))
    d.on_event(_update("10.1.0.0/24"))
    assert sess.up and d.rib.received(PEER) == 1


def test_at_the_limit_is_fine_and_withdraws_make_room() -> None:
    d, _ = _daemon(max_prefixes=2)
    d.on_event(api.StateEvent(PEER, "up"))
    d.on_event(_update("10.1.0.0/24", "10.1.1.0/24"))
    d.on_event(_update("10.1.0.0/24"))  # an implicit replace is not a new prefix
    d.on_event(api.UpdateEvent(PEER, (), ("10.1.1.0/24",)))
    d.on_event(_update("10.1.2.0/24"))
    sess = d.sessions[PEER]
    assert sess.up and sess.held_until is None and d.statuses()[0].last_error is None


def test_hold_down_is_a_deadline_of_the_main_loop() -> None:
    d, _ = _daemon(max_prefixes=1)
    assert d._next_release() is None
    d.on_event(api.StateEvent(PEER, "up"))
    d.on_event(_update("10.1.0.0/24", "10.1.1.0/24"))
    assert d._next_release() == d.sessions[PEER].held_until


def test_keepalive_other_than_a_third_of_hold_time_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bgpd.daemon"):
        d, _ = _daemon(hold_time=30, keepalive=5)
        asyncio.run(d._configure())
    warnings = [r.getMessage() for r in caplog.records if "keepalive" in r.getMessage()]
    assert len(warnings) == 1 and "keepalive 5 is not applied" in warnings[0] and "10 s" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bgpd.daemon"):
        _daemon(hold_time=30, keepalive=10)
    assert not [r for r in caplog.records if "keepalive" in r.getMessage()]


def test_kernel_change_asks_for_a_resync() -> None:
    d, _ = _daemon()
    d.kick.clear()
    d.on_kernel_change(["vxlan.calyx deleted"])
    assert d.fib_resync_needed and d.kick.is_set()
