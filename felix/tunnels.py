"""The tunnel manager: this node's IP-in-IP and VXLAN devices, tunnel addresses and workload MTU.

What it owns (the routes through the tunnels are bgpd's):

* the decision whether this node needs IP-in-IP and/or VXLAN: an enabled IPv4 pool whose
  ``ipip_mode`` (``vxlan_mode``) is not ``Never`` and whose ``node_selector`` selects this node
  (:func:`plan_tunnels`, pure);
* the tunnel addresses, allocated through IPAM from those pools under the handles
  ``ipip-tunnel-addr-<node>`` and ``vxlan-tunnel-addr-<node>`` (idempotent per handle: a restart
  gets the same address back) and released when no pool needs the tunnel any more;
* the fields ``ipip_tunnel_address``, ``vxlan_tunnel_address`` and ``vxlan_tunnel_mac`` of this
  node's key ``/calyx/v1/nodes/<node>``, written by compare-and-swap on the raw JSON so that every
  other field (known or not) is kept. A node key that does not exist is never created here: the
  host's registration (:mod:`calyx.noderegister`) or the operator creates it; until then the error
  says so in the log and in felix's status;
* the devices, through :mod:`calyx.kernel.tunnels`: ``tunl0`` up with MTU = uplink - 20 (or
  ``tunnel_mtu``) and exactly the tunnel address, or down without addresses; ``vxlan.calyx``
  (VNI 4096, port 4789, learning off, MAC :func:`~calyx.kernel.tunnels.vtep_mac`, local = this
  node's ``ipv4``, MTU uplink - 50) with a permanent neighbour and FDB entry for every other node
  that published its VTEP, or no device at all;
* ``<state_dir>/mtu``: the MTU workloads should use while a tunnel is in use (the smallest tunnel
  MTU). The CNI plugin reads it when its network configuration sets no ``mtu`` (Calico writes
  ``/var/lib/calico/mtu`` the same way). Without tunnels the file is removed and workloads get the
  plugin's default (or the configuration's ``mtu``, e.g. for a jumbo-frame underlay): unlike
  Calico, felix writes nothing to the state directory of a host that needs no encapsulation.

The uplink MTU is that of the interface the IPv4 default route leaves by (1500 if there is none).

:meth:`TunnelManager.update` is cheap and does no I/O; :meth:`TunnelManager.apply` (in felix's
apply thread) does the datastore and kernel work, only when something it depends on changed or a
resync asked for it, and keeps itself dirty on failure. A kernel without ``ipip`` (or ``vxlan``)
is an error in the log and in the status; the rest of felix carries on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from calyx.datastore import keys
from calyx.datastore.client import Datastore, DatastoreError
from calyx.ipam.allocator import IPAM
from calyx.ipam.logic import IPAMError, pool_selects
from calyx.ipam.store import DatastoreStore, StoreError
from calyx.kernel import tunnels as kt
from calyx.model import IPPool, Node

log = logging.getLogger(__name__)

IPIP_HANDLE = "ipip-tunnel-addr-{}"
VXLAN_HANDLE = "vxlan-tunnel-addr-{}"
DEFAULT_UPLINK_MTU = 1500
PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class TunnelPlan:
    """Which encapsulations this node needs, and the pools (names) its tunnel addresses come from."""

    ipip_pools: tuple[str, ...] = ()
    vxlan_pools: tuple[str, ...] = ()


def plan_tunnels(node: str, pools: Mapping[str, IPPool], nodes: Mapping[str, Node]) -> TunnelPlan:
    me = nodes.get(node)
    labels = me.labels_with_name if me is not None else {"calyx/node": node}
    ipip: list[str] = []
    vxlan: list[str] = []
    for name, pool in sorted(pools.items()):
        if pool.disabled or not isinstance(pool.cidr, ipaddress.IPv4Network):
            continue
        if pool.ipip_mode == "Never" and pool.vxlan_mode == "Never":
            continue
        try:
            selected = pool_selects(pool, labels)
        except ValueError:  # a selector that does not parse selects nothing (validated at the boundary)
            selected = False
        if not selected:
            continue
        if pool.ipip_mode != "Never":
            ipip.append(name)
        if pool.vxlan_mode != "Never":
            vxlan.append(name)
    return TunnelPlan(tuple(ipip), tuple(vxlan))


def vxlan_peers(node: str, nodes: Mapping[str, Node]) -> dict[ipaddress.IPv4Address, kt.VxlanPeer]:
    """Every other node that published its VTEP (address and MAC) and has an IPv4 address."""
    out: dict[ipaddress.IPv4Address, kt.VxlanPeer] = {}
    for name, n in sorted(nodes.items()):
        if name == node or n.ipv4 is None or n.vxlan_tunnel_address is None or not n.vxlan_tunnel_mac:
            continue
        out[n.vxlan_tunnel_address] = kt.VxlanPeer(n.vxlan_tunnel_address, n.vxlan_tunnel_mac, n.ipv4.ip)
    return out


def host_addresses(nodes: Mapping[str, Node]) -> set[str]:
    """The IPv4 addresses of every node (ipset members): the sources tunnel traffic may come from."""
    return {str(n.ipv4.ip) for n in nodes.values() if n.ipv4 is not None}


@dataclass
class TunnelApply:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(self.changes or self.errors)


class TunnelManager:
    """See the module docstring."""

    def __init__(
        self,
        node: str,
        ds: Datastore | None,
        *,
        state_dir: str,
        tunnel_mtu: int = 0,
        netns: str | None = None,
        uplink_mtu: Callable[[], int | None] | None = None,
    ) -> None:
        self.node = node
        self.ds = ds
        self.ipam = IPAM(DatastoreStore(ds)) if ds is not None else None
        self.state_dir = state_dir
        self.tunnel_mtu = tunnel_mtu
        self.netns = netns
        self._uplink_mtu = uplink_mtu or (lambda: kt.default_route_mtu(netns))
        self.plan = TunnelPlan()
        self.pools: dict[str, IPPool] = {}
        self.nodes: dict[str, Node] = {}
        self._peers: dict[ipaddress.IPv4Address, kt.VxlanPeer] = {}
        self._dirty = True
        self._logged: set[str] = set()
        self.workload_mtu: int | None = None

    @property
    def ipip(self) -> bool:
        return bool(self.plan.ipip_pools)

    @property
    def vxlan(self) -> bool:
        return bool(self.plan.vxlan_pools)

    # --- no I/O ------------------------------------------------------------------------------------

    def update(self, pools: Mapping[str, IPPool], nodes: Mapping[str, Node]) -> None:
        """The current pools and nodes (the calculator's dicts): marks the manager dirty if it matters."""
        me_before = self.nodes.get(self.node)
        self.pools, self.nodes = dict(pools), dict(nodes)
        plan = plan_tunnels(self.node, self.pools, self.nodes)
        peers = vxlan_peers(self.node, self.nodes)
        if plan != self.plan or peers != self._peers or self.nodes.get(self.node) != me_before:
            self.plan, self._peers = plan, peers
            self._dirty = True

    def resync(self) -> None:
        """Check the kernel, the datastore and the uplink MTU again at the next apply."""
        self._dirty = True

    # --- I/O (felix's apply thread) ----------------------------------------------------------------

    def apply(self) -> TunnelApply:
        result = TunnelApply()
        if not self._dirty:
            return result
        uplink = self._uplink_mtu() or DEFAULT_UPLINK_MTU
        mtus = [uplink]
        steps: list[tuple[str, Callable[[], list[str]]]] = []
        if self.ipip:
            mtu = self.tunnel_mtu or uplink - kt.IPIP_OVERHEAD
            mtus.append(mtu)
            steps.append(("ipip", lambda: self._enable_ipip(mtu)))
        else:
            steps.append(("ipip", self._disable_ipip))
        if self.vxlan:
            vmtu = self.tunnel_mtu or uplink - kt.VXLAN_OVERHEAD
            mtus.append(vmtu)
            steps.append(("vxlan", lambda: self._enable_vxlan(vmtu)))
        else:
            steps.append(("vxlan", self._disable_vxlan))
        steps.append(("mtu file", lambda: self._write_mtu(min(mtus) if len(mtus) > 1 else None)))
        for what, step in steps:
            try:
                result.changes += step()
            except (kt.TunnelError, IPAMError, StoreError, DatastoreError, NetlinkError, OSError, ValueError) as exc:
                msg = f"tunnels: {what}: {exc}"
                result.errors.append(msg)
                if msg not in self._logged:  # loud once per distinct error; the retries repeat it at WARNING
                    self._logged.add(msg)
                    log.error("%s", msg)
        if not result.errors:
            self._dirty = False
            self._logged.clear()
        if result.changes:
            log.info("tunnels: %s", "; ".join(result.changes))
        return result

    def _allocate(self, handle_fmt: str, pool_names: tuple[str, ...]) -> ipaddress.IPv4Address:
        if self.ipam is None:
            raise kt.TunnelError("no datastore to allocate a tunnel address from")
        handle = handle_fmt.format(self.node)
        nets = [self.pools[n].cidr for n in pool_names if n in self.pools]
        for _ in range(2):
            got = [a.address for a in self.ipam.allocate(handle, self.node, pools=list(pool_names),
                                                         attributes={"type": "tunnel"})
                   if isinstance(a.address, ipaddress.IPv4Address)]
            good = [a for a in got if any(a in n for n in nets)]
            if good:
                return good[0]
            # the handle holds an address of a pool that no longer asks for this tunnel: start again
            self.ipam.release(handle)
        raise kt.TunnelError(f"IPAM gave {handle} no address in pools {', '.join(pool_names)}")

    def _release(self, handle_fmt: str) -> list[str]:
        if self.ipam is None:
            return []
        handle = handle_fmt.format(self.node)
        freed = self.ipam.release(handle)
        return [f"released {', '.join(map(str, freed))} ({handle})"] if freed else []

    def _publish(self, fields: Mapping[str, str | None]) -> list[str]:
        """Set (or, with None, remove) ``fields`` in this node's key by compare-and-swap."""
        if self.ds is None:
            return []
        key = keys.node_key(self.node)
        for _ in range(PUBLISH_ATTEMPTS):
            kv = self.ds.get(key)
            if kv is None:
                if all(v is None for v in fields.values()):
                    return []
                raise kt.TunnelError(f"node key {key} does not exist (yet: the host's registration or the "
                                     f"operator creates it): cannot publish {', '.join(fields)}")
            data: Any = json.loads(kv.value)
            if not isinstance(data, dict):
                raise kt.TunnelError(f"node key {key} does not hold a JSON object")
            new = dict(data)
            for k, v in fields.items():
                if v is None:
                    new.pop(k, None)
                else:
                    new[k] = v
            if new == data:
                return []
            if self.ds.update(key, json.dumps(new).encode(), kv.mod_revision):
                return [f"node {self.node}: " + ", ".join(f"{k}={v}" for k, v in fields.items())]
        raise kt.TunnelError(f"{key} changed under every one of {PUBLISH_ATTEMPTS} compare-and-swap attempts")

    def _enable_ipip(self, mtu: int) -> list[str]:
        addr = self._allocate(IPIP_HANDLE, self.plan.ipip_pools)
        changes = kt.ensure_ipip(addr, mtu, netns=self.netns)
        return changes + self._publish({"ipip_tunnel_address": str(addr)})

    def _disable_ipip(self) -> list[str]:
        changes = kt.disable_ipip(netns=self.netns)
        changes += self._publish({"ipip_tunnel_address": None})
        return changes + self._release(IPIP_HANDLE)

    def _enable_vxlan(self, mtu: int) -> list[str]:
        me = self.nodes.get(self.node)
        if me is None or me.ipv4 is None:
            raise kt.TunnelError(f"node {self.node} has no ipv4 in {keys.node_key(self.node)}: "
                                 "the VXLAN device needs it as its local address")
        addr = self._allocate(VXLAN_HANDLE, self.plan.vxlan_pools)
        mac = kt.vtep_mac(self.node)
        changes = kt.ensure_vxlan(local_ip=me.ipv4.ip, mac=mac, address=addr, mtu=mtu, netns=self.netns)
        changes += self._publish({"vxlan_tunnel_address": str(addr), "vxlan_tunnel_mac": mac})
        return changes + kt.sync_vxlan_peers(self._peers, netns=self.netns)

    def _disable_vxlan(self) -> list[str]:
        changes = kt.remove_vxlan(netns=self.netns)
        changes += self._publish({"vxlan_tunnel_address": None, "vxlan_tunnel_mac": None})
        return changes + self._release(VXLAN_HANDLE)

    def _write_mtu(self, mtu: int | None) -> list[str]:
        self.workload_mtu = mtu
        path = os.path.join(self.state_dir, "mtu")
        if mtu is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return []
            return [f"removed {path} (no tunnel in use)"]
        try:
            with open(path) as f:
                if f.read().strip() == str(mtu):
                    return []
        except FileNotFoundError:
            pass
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{mtu}\n")
        os.replace(tmp, path)
        return [f"workload mtu {mtu} ({path})"]
