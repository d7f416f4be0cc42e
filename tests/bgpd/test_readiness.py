"""bgpd's readiness decision without I/O (the real process is tests/bgpd/test_bgpd_liveness.py):
start-up needs the datastore, this node's address, ExaBGP's channel and one FIB apply; /readyz needs,
besides, every session established or reporting why not."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from bgpd import api
from bgpd.daemon import BgpDaemon
from calyx.config import Config
from calyx.datastore import keys
from calyx.datastore.syncer import InSync, Update
from calyx.model import BGPPeer, ClusterConfig, Node

pytestmark = pytest.mark.unit

TOR, RR = "10.10.1.0", "10.10.9.9"


def _daemon(outcome: str = "started") -> BgpDaemon:
    cfg = replace(Config(), node_name="h1", state_dir="/nonexistent", run_dir="/nonexistent")
    d = BgpDaemon(cfg, None)

    async def apply(_cfg: object) -> str:
        return outcome

    d.exa.apply = apply  # type: ignore[method-assign]
    d.fib.apply = lambda **_kw: None  # type: ignore[assignment,method-assign,return-value]  # no kernel here
    return d


def _sync(d: BgpDaemon, *, node: bool = True, passive: bool = False) -> None:
    updates: list[object] = [
        Update(keys.bgp_peer_key("tor"), BGPPeer.from_dict({"peer_ip": TOR, "as_number": 65000, "node": "h1"},
                                                           key=keys.bgp_peer_key("tor"), name="tor"), 1),
        Update(keys.bgp_peer_key("rr"), BGPPeer.from_dict({"peer_ip": RR, "as_number": 65001, "node": "h1",
                                                           "passive": passive},
                                                          key=keys.bgp_peer_key("rr"), name="rr"), 1),
        Update(keys.CLUSTER_CONFIG_KEY, ClusterConfig.from_dict({"node_to_node_mesh": False},
                                                                key=keys.CLUSTER_CONFIG_KEY, name="cluster"), 1),
    ]
    if node:
        updates.append(Update(keys.node_key("h1"), Node.from_dict({"ipv4": "10.10.1.1/31", "as_number": 65001},
                                                                  key=keys.node_key("h1"), name="h1"), 1))
    d.on_batch([*updates, InSync(1)])


def test_start_up_waits_for_the_datastore_the_node_exabgp_and_the_fib() -> None:
    d = _daemon()
    assert d.readiness(False) == (False, "waiting for the datastore (etcd unreachable, or the snapshot is loading)",
                                  False)
    _sync(d, node=False)
    asyncio.run(d.reconcile())
    assert d.readiness(True) == (False, "node h1 has no IPv4 address in the datastore (/calyx/v1/nodes/h1): "
                                        "not peering", False)
    _sync(d)
    asyncio.run(d.reconcile())
    assert d.fib_programmed
    assert d.readiness(True) == (False, "ExaBGP is not running or its API channel is not connected yet", False)
    d.exa._connected.set()  # what the helper's connection does
    ready, why, started = d.readiness(True)
    assert started and not ready and why.startswith("BGP sessions neither established nor reporting why: ")
    assert d.readiness(False)[::2] == (False, True)  # etcd lost later: not ready, start-up stays complete


def test_every_session_established_or_reporting_why_not() -> None:
    d = _daemon()
    _sync(d)
    asyncio.run(d.reconcile())
    d.exa._connected.set()
    assert d.readiness(True)[1] == f"BGP sessions neither established nor reporting why: {TOR} idle, {RR} idle"
    d.on_event(api.StateEvent(TOR, "up"))
    d.on_event(api.StateEvent(RR, "connected"))
    assert d.readiness(True)[1] == f"BGP sessions neither established nor reporting why: {RR} connect"
    d.on_event(api.StateEvent(RR, "down", "closing connection"))
    assert d.readiness(True) == (True, "in sync; FIB programmed; 1/2 BGP sessions established, 1 down with a reason "
                                       "(calyxctl node status)", True)
    d.on_event(api.StateEvent(RR, "up"))
    assert d.readiness(True) == (True, "in sync; FIB programmed; 2/2 BGP sessions established", True)


def test_a_refused_exabgp_configuration_is_not_ready() -> None:
    d = _daemon("invalid")  # ExaBGP keeps running the configuration it had
    _sync(d)
    asyncio.run(d.reconcile())
    d.exa._connected.set()
    assert d.readiness(True) == (False, "ExaBGP refused the configuration rendered for it (see the log)", True)


def test_a_passive_session_waiting_for_its_peer_is_accounted_for() -> None:
    d = _daemon()
    _sync(d, passive=True)
    asyncio.run(d.reconcile())
    d.exa._connected.set()
    assert d.readiness(True)[1] == f"BGP sessions neither established nor reporting why: {TOR} idle"
    d.on_event(api.StateEvent(TOR, "up"))
    assert d.readiness(True) == (True, "in sync; FIB programmed; 1/2 BGP sessions established, 1 passive waiting "
                                       "for the peer", True)
