"""A learned /32 for an address that is a workload of this node is never installed: felix's local
route must carry the traffic (a fixed address that moved here while the old host's announcement
lingers, or a duplicate announcement), and the learned route comes back when the workload leaves."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

import pytest

from bgpd import api
from bgpd.daemon import BgpDaemon
from bgpd.rib import Attrs
from calyx.config import Config
from calyx.datastore import keys
from calyx.datastore.syncer import Delete, InSync, Update
from calyx.model import BGPPeer, ClusterConfig, Node, WorkloadEndpoint

pytestmark = pytest.mark.unit

PEER = "10.10.1.0"
MOVED = "10.1.0.5/32"


def _daemon() -> tuple[BgpDaemon, list[dict[str, tuple[str, ...] | None]]]:
    cfg = replace(Config(), node_name="h1", state_dir="/nonexistent", run_dir="/nonexistent")
    d = BgpDaemon(cfg, None)

    async def apply(_cfg: object) -> str:
        return "reloaded"

    d.exa.apply = apply  # type: ignore[method-assign]
    updates: list[dict[str, tuple[str, ...] | None]] = []
    real_update = d.fib.update

    def update(changes: dict[str, tuple[str, ...] | None]) -> None:
        updates.append(dict(changes))
        real_update(changes)

    d.fib.update = update  # type: ignore[method-assign]
    d.fib.apply = lambda **_kw: None  # type: ignore[assignment,method-assign,return-value]  # no kernel here
    node = Node.from_dict({"ipv4": "10.10.1.1/31", "as_number": 65001}, key=keys.node_key("h1"), name="h1")
    bgp = BGPPeer.from_dict({"peer_ip": PEER, "as_number": 65000, "node": "h1"}, key=keys.bgp_peer_key("tor"),
                            name="tor")
    cluster = ClusterConfig.from_dict({"node_to_node_mesh": False}, key=keys.CLUSTER_CONFIG_KEY, name="cluster")
    d.on_batch([Update(keys.node_key("h1"), node, 1), Update(keys.bgp_peer_key("tor"), bgp, 1),
                Update(keys.CLUSTER_CONFIG_KEY, cluster, 1), InSync(1)])
    asyncio.run(d._configure())
    d.on_event(api.StateEvent(PEER, "up"))
    return d, updates


def _workload(state: str = "active") -> tuple[str, WorkloadEndpoint]:
    key = keys.workload_key("h1", "cni", "moved", "eth0")
    return key, WorkloadEndpoint("h1", "cni", "moved", "eth0", "cali0123456789a",
                                 ipv4_nets=(ipaddress.ip_network(MOVED),), state=state)


def test_a_learned_32_of_a_local_workload_is_not_installed_and_returns_when_it_leaves() -> None:
    d, updates = _daemon()
    d.on_event(api.UpdateEvent(PEER, ((Attrs(as_path=(65000,), as_path_len=1), PEER, (MOVED, "10.1.1.0/26")),), ()))
    d._apply_fib()
    assert updates[-1] == {MOVED: (PEER,), "10.1.1.0/26": (PEER,)}
    # the workload arrives here: the learned /32 is taken out of the kernel, the block stays
    key, wep = _workload()
    d.on_batch([Update(key, wep, 2)])
    asyncio.run(d._configure())
    d._apply_fib()
    assert updates[-1] == {MOVED: None}
    # a fresh announcement of it changes nothing while the workload is here
    d.on_event(api.UpdateEvent(PEER, ((Attrs(as_path=(65000, 65010), as_path_len=2), PEER, (MOVED,)),), ()))
    d._apply_fib()
    assert updates[-1] == {MOVED: None}
    # inactive, then gone: the learned route is installed again
    key, inactive = _workload("inactive")
    d.on_batch([Update(key, inactive, 3)])
    asyncio.run(d._configure())
    d._apply_fib()
    assert updates[-1] == {MOVED: (PEER,)}
    d.on_batch([Update(key, wep, 4)])
    asyncio.run(d._configure())
    d._apply_fib()
    assert updates[-1] == {MOVED: None}
    d.on_batch([Delete(key, 5)])
    asyncio.run(d._configure())
    d._apply_fib()
    assert updates[-1] == {MOVED: (PEER,)}
