"""bgpd's main loop: datastore in, ExaBGP and the kernel FIB out.

What it owns: the wiring, and the state of each BGP session as ExaBGP reports it. Everything it
decides is computed by pure modules (:mod:`bgpd.peering`, :mod:`bgpd.announce`, :mod:`bgpd.rib`,
:mod:`bgpd.exaconf`); everything it touches is owned by a driver (:mod:`bgpd.exabgp` for the child,
:mod:`bgpd.fib` for routes with protocol 79, :mod:`bgpd.status` for status keys).

One asyncio loop. The datastore syncer (a thread) and ExaBGP's API events only update state and set
a one-slot "kick"; :meth:`BgpDaemon.reconcile` does the work, one pass at a time, in a fixed order:

1. peers: the desired neighbours → ExaBGP's configuration (validated; SIGUSR1 or restart);
2. recovery: after the API helper respawned, re-learn received routes (``show adj-rib in``) and
   what ExaBGP still announces (``show adj-rib out``);
3. announcements: for every established session, the difference between what it should hear
   (our blocks and borrowed /32s, plus reflected routes on a reflector) and what we sent; a session
   that just came up gets everything again and then End-of-RIB (``manual-eor``: a peer doing
   graceful restart flushes our stale routes only once it has the new ones);
4. RIB → FIB for the prefixes whose selection changed; stale paths swept by timer;
5. status keys and metrics;
6. health (:mod:`calyx.health`): every turn of the loop is a heartbeat (systemd's watchdog ping,
   ``/livez``) — the loop turns at least as often as it asks — and ends with :meth:`BgpDaemon.readiness`:
   start-up is complete (``READY=1``) once bgpd is in sync, ExaBGP runs this node's configuration
   with its API channel up, and the FIB has been programmed; ready (``/readyz``) when, besides, every
   configured session is established or reports why not (its status key's ``last_error``).

Kernel changes: :class:`bgpd.linkwatch.LinkWatch` (rtnetlink multicast, read on this loop) reports
bursts of link, address and foreign route-delete changes; the loop then resyncs the FIB at once
instead of at the periodic resync.

max_prefixes: a peer that sends more than its limit is closed, its paths dropped (no graceful
restart), and left out of ExaBGP's configuration for ``bgp_max_prefixes_hold_down`` seconds.

Restarts: bgpd adopts the protocol-79 routes already in the kernel and removes the ones nobody
re-announces only once every peer sent End-of-RIB or the graceful-restart time ran out, so a
restart drops no traffic. When ExaBGP dies, learned paths become stale (kept in the FIB) and are
swept per peer at its End-of-RIB after the restarted ExaBGP re-establishes the session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgpd import api
from bgpd.announce import OutAttrs, desired_announcements
from bgpd.exabgp import ChannelError, ExaBGP
from bgpd.exaconf import build as build_exaconf
from bgpd.fib import Fib, node_vteps
from bgpd.linkwatch import LinkWatch
from bgpd.peering import LocalIdentity, Neighbor, desired_peers, local_identity
from bgpd.rib import LocalInfo, PeerInfo, Rib, reflect
from bgpd.status import EXABGP_RESTARTS, FIB_APPLY_SECONDS, GARBAGE_LINES, PREFIXES, StatusReporter
from calyx import config as calyx_config
from calyx import health, model, noderegister
from calyx.config import Config
from calyx.daemon import LeasedStatus, setup_logging, start_metrics
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.datastore.syncer import AsyncSyncer, Delete, InSync, Update
from calyx.model import BGPPeer, BGPPeerStatus, ClusterConfig, IPAMBlock, IPPool, Node, WorkloadEndpoint
from calyx.model.status import now_iso

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 60.0
STATUS_INTERVAL = 5.0


@dataclass
class Session:
    """One neighbour as ExaBGP reports it."""

    neighbor: Neighbor
    state: str = "idle"
    since: str | None = None
    router_id: str | None = None
    restart_time: int | None = None  # the peer's graceful-restart time (from its OPEN)
    sent: dict[str, OutAttrs] = field(default_factory=dict)
    full_needed: bool = False
    eor_received: bool = False
    last_error: str | None = None
    #: monotonic time until which the peer is left out of ExaBGP's configuration (max_prefixes)
    held_until: float | None = None
    limit_trips: int = 0

    @property
    def up(self) -> bool:
        return self.state == "established"


def _prefixes(cfg: Config) -> list[str]:
    return [
        keys.CLUSTER_CONFIG_KEY,
        keys.NODES_PREFIX,
        keys.BGP_PEERS_PREFIX,
        keys.IPPOOLS_PREFIX,
        keys.IPAM_BLOCKS_PREFIX,
        keys.workloads_prefix(cfg.node_name),
    ]


class BgpDaemon:
    """See the module docstring."""

    def __init__(self, cfg: Config, ds: Datastore | None) -> None:
        self.cfg = cfg
        self.ds = ds
        self.node = cfg.node_name
        self.objects: dict[str, Any] = {}
        self.in_sync = False
        self.config_dirty = True
        self.kick = asyncio.Event()
        state_dir = Path(cfg.state_dir)
        run_dir = Path(cfg.run_dir)
        self.exa = ExaBGP(cfg.exabgp_bin, state_dir, run_dir, on_event=self.on_event, on_helper=self.on_helper,
                          on_exit=self.on_exabgp_exit)
        self.fib = Fib(cfg.bgp_metric)
        self.rib: Rib | None = None
        self.me: LocalIdentity | None = None
        self.cluster = ClusterConfig()
        self.sessions: dict[str, Session] = {}
        self.local_routes: dict[str, OutAttrs] = {}
        #: /32s of this node's active workloads: never installed from BGP (felix's local route must
        #: win, and at metric 1024 it would lose to ours at 20 while a stale announcement lingers,
        #: e.g. a workload with a fixed address that has just moved here from another node)
        self.local_hosts: frozenset[str] = frozenset()
        self._local_dirty: set[str] = set()
        self.relearn = False
        self.started = time.monotonic()
        self.fib_complete = False
        self.leased = LeasedStatus(ds, cfg.status_ttl) if ds is not None else None
        self.status = StatusReporter(self.leased, self.node)
        self._last_status = 0.0
        self._no_identity_logged = False
        self._restarts_seen = 0
        self._garbage_seen = 0
        self.hold_down = cfg.bgp_max_prefixes_hold_down
        self.linkwatch: LinkWatch | None = None
        self.fib_resync_needed = False
        self._keepalive_warned: set[tuple[str, int, int]] = set()
        self.health = health.current()
        #: the FIB has been applied at least once since bgpd started
        self.fib_programmed = False
        #: ExaBGP refused the last configuration rendered for it (it runs the one before, if any)
        self.exa_refused = False

    # --- inputs ---

    def on_batch(self, batch: list[Any]) -> None:
        for ev in batch:
            if isinstance(ev, Update):
                self.objects[ev.key] = ev.obj
            elif isinstance(ev, Delete):
                self.objects.pop(ev.key, None)
            elif isinstance(ev, InSync):
                if not self.in_sync:
                    log.info("datastore in sync at revision %d (%d objects)", ev.revision, len(self.objects))
                self.in_sync = True
        self.config_dirty = True
        self.kick.set()

    def on_event(self, ev: api.Event) -> None:
        """An event from ExaBGP (called by the channel; no I/O here)."""
        rib = self.rib
        peer = getattr(ev, "peer", None)
        sess = self.sessions.get(peer) if isinstance(peer, str) else None
        if isinstance(ev, api.UpdateEvent):
            if rib is None or sess is None or sess.held_until is not None:
                return  # a session held down for max_prefixes: whatever still arrives is dropped
            for attrs, nh, prefixes in ev.announce:
                rib.announce(ev.peer, attrs, nh, prefixes)
            if ev.withdraw:
                rib.withdraw(ev.peer, ev.withdraw)
            if rib.over_limit(ev.peer):
                self._close_over_limit(sess)
        elif isinstance(ev, api.StateEvent):
            if sess is None:
                return
            self._on_state(sess, ev)
        elif isinstance(ev, api.OpenEvent):
            if sess is None:
                return
            sess.router_id = ev.router_id
            sess.restart_time = ev.restart_time
            if rib is not None and ev.router_id:
                rib.set_router_id(ev.peer, ev.router_id)
        elif isinstance(ev, api.EorEvent):
            if sess is None:
                return
            sess.eor_received = True
            if rib is not None:
                swept = rib.peer_eor(ev.peer)
                if swept:
                    log.info("peer %s End-of-RIB: swept %d stale paths", ev.peer, swept)
        elif isinstance(ev, api.NotificationEvent) and sess is not None:
            sess.last_error = f"notification {ev.code}/{ev.subcode} {ev.message}".strip()
        self.kick.set()

    def _on_state(self, sess: Session, ev: api.StateEvent) -> None:
        peer = sess.neighbor.peer_ip
        if sess.held_until is not None:
            # held down for max_prefixes: its paths are gone already and the reload that removes
            # it from ExaBGP is on its way; keep the error and ignore the session's last words
            if ev.state == "down":
                log.info("session %s closed (%s): held down for max_prefixes", peer, ev.reason or "no reason")
            return
        if ev.state == "up":
            sess.state = "established"
            sess.since = now_iso()
            sess.full_needed = True
            sess.eor_received = False
            log.info("session %s established (%s)", peer, sess.neighbor.peer_type)
        elif ev.state == "down":
            was_up = sess.up
            sess.state = "idle"
            sess.since = now_iso()
            if ev.reason and "graceful restart" not in ev.reason:
                sess.last_error = ev.reason
            # Graceful restart covers a lost TCP session, not a NOTIFICATION (RFC 4724): then the
            # peer's routes go at once.
            keep = sess.restart_time if sess.neighbor.graceful_restart and sess.restart_time else None
            if "notification" in ev.reason:
                keep = None
            if self.rib is not None:
                self.rib.peer_down(peer, keep, time.monotonic())
            if was_up:
                log.info("session %s down (%s); its routes %s", peer, ev.reason or "no reason",
                         f"kept as stale for {keep} s" if keep else "removed")
        elif ev.state == "connected" and not sess.up:
            sess.state = "connect"

    async def on_helper(self, respawned: bool) -> None:
        if respawned:
            self.relearn = True
        self.kick.set()

    def on_exabgp_exit(self) -> None:
        now = time.monotonic()
        gr = self.cluster.graceful_restart_time
        for peer, sess in self.sessions.items():
            sess.state = "idle"
            sess.since = now_iso()
            sess.sent = {}
            if sess.held_until is None:
                sess.last_error = "ExaBGP restarted"
            if self.rib is not None:
                self.rib.peer_down(peer, gr if sess.neighbor.graceful_restart and gr else None, now)
        self.kick.set()

    # --- the model ---

    def _typed(self) -> tuple[dict[str, Node], list[BGPPeer], ClusterConfig, list[IPPool], list[IPAMBlock],
                              list[WorkloadEndpoint]]:
        nodes: dict[str, Node] = {}
        peers: list[BGPPeer] = []
        cluster = ClusterConfig()
        pools: list[IPPool] = []
        blocks: list[IPAMBlock] = []
        weps: list[WorkloadEndpoint] = []
        for obj in self.objects.values():
            if isinstance(obj, Node):
                nodes[obj.name] = obj
            elif isinstance(obj, BGPPeer):
                peers.append(obj)
            elif isinstance(obj, ClusterConfig):
                cluster = obj
            elif isinstance(obj, IPPool):
                pools.append(obj)
            elif isinstance(obj, IPAMBlock):
                blocks.append(obj)
            elif isinstance(obj, WorkloadEndpoint):
                weps.append(obj)
        return nodes, peers, cluster, pools, blocks, weps

    # --- reconcile ---

    def _close_over_limit(self, sess: Session) -> None:
        """The peer sent more than ``max_prefixes``: close the session, drop its paths, hold it down.

        Like FRR's ``maximum-prefix`` and BIRD's ``receive limit … action restart``: the peer is
        left out of ExaBGP's configuration (a reload takes only that session down) until the
        hold-down is over, then peered again; no graceful-restart retention for its routes.
        """
        assert self.rib is not None
        peer = sess.neighbor.peer_ip
        now = time.monotonic()
        sess.held_until = now + self.hold_down
        sess.limit_trips += 1
        sess.last_error = (f"max_prefixes ({sess.neighbor.max_prefixes}) exceeded: session closed, "
                           f"held down for {self.hold_down:g} s")
        sess.state = "idle"
        sess.since = now_iso()
        sess.sent = {}
        sess.full_needed = False
        self.rib.peer_down(peer, None, now)
        self.config_dirty = True
        self.kick.set()
        log.warning("peer sent more than max_prefixes (%s): session closed, its routes removed, held down for "
                    "%g s (time %d)", sess.neighbor.max_prefixes, self.hold_down, sess.limit_trips,
                    extra={"peer": peer})

    def _release_holds(self, now: float) -> None:
        for peer, sess in self.sessions.items():
            if sess.held_until is not None and now >= sess.held_until:
                sess.held_until = None
                self.config_dirty = True
                log.info("peer %s: max_prefixes hold-down over, peering again", peer)

    def _next_release(self) -> float | None:
        holds = [s.held_until for s in self.sessions.values() if s.held_until is not None]
        return min(holds) if holds else None

    def on_kernel_change(self, reasons: list[str]) -> None:
        """The link watch saw links, addresses or our routes change: resync the FIB at once."""
        more = f" (+{len(reasons) - 4} more)" if len(reasons) > 4 else ""
        log.info("kernel changed: %s%s; resyncing the FIB", "; ".join(reasons[:4]), more)
        self.fib_resync_needed = True
        self.kick.set()

    def _held_routes(self, prefixes: list[str]) -> set[str]:
        """Those of ``prefixes`` the FIB believes are in the kernel."""
        return set(prefixes) & self.fib.kernel_prefixes()

    def _warn_keepalive(self, neighbors: Mapping[str, Neighbor]) -> None:
        for peer, nb in neighbors.items():
            if nb.keepalive is None or nb.keepalive == nb.hold_time // 3:
                continue
            key = (peer, nb.keepalive, nb.hold_time)
            if key not in self._keepalive_warned:
                self._keepalive_warned.add(key)
                log.warning("peer %s: keepalive %d is not applied: ExaBGP 5 has no keepalive setting and sends "
                            "keepalives every hold time / 3 (%d s with hold_time %d)", peer, nb.keepalive,
                            nb.hold_time // 3, nb.hold_time)

    async def reconcile(self) -> None:
        if not self.in_sync:
            return
        self._release_holds(time.monotonic())
        if self.config_dirty:
            self.config_dirty = False
            if not await self._configure():
                return
        if self.rib is None or self.me is None:
            return
        if self.relearn and self.exa.connected:
            await self._relearn()
            for sess in self.sessions.values():
                if sess.held_until is None and self.rib.over_limit(sess.neighbor.peer_ip):
                    self._close_over_limit(sess)
        await self._announce()
        self._apply_fib()
        self._report()

    async def _configure(self) -> bool:
        nodes, peers, cluster, pools, blocks, weps = self._typed()
        self.cluster = cluster
        node = nodes.get(self.node)
        me = local_identity(node, cluster, self.cfg.bgp_router_id) if node is not None else None
        if me is None:
            if not self._no_identity_logged:
                log.warning("node %s has no IPv4 address in the datastore (%s): not peering yet",
                            self.node, keys.node_key(self.node))
                self._no_identity_logged = True
            return False
        self._no_identity_logged = False
        self.me = me
        local = LocalInfo(me.as_number, me.router_id, me.cluster_id,
                          frozenset({me.address, me.router_id}))
        if self.rib is None:
            self.rib = Rib(local)
        else:
            self.rib.set_local(local)
        neighbors = desired_peers(self.node, nodes, peers, cluster, router_id=self.cfg.bgp_router_id)
        for peer in list(self.sessions):
            if peer not in neighbors:
                log.info("peer %s removed", peer)
                del self.sessions[peer]
                self.rib.remove_peer(peer)
        for peer, nb in neighbors.items():
            sess = self.sessions.get(peer)
            if sess is None:
                self.sessions[peer] = Session(nb)
                log.info("peer %s added (%s, AS %d%s)", peer, nb.peer_type, nb.peer_as,
                         ", passive" if nb.passive else "")
            else:
                sess.neighbor = nb
            self.rib.set_peer(PeerInfo(peer, nb.ibgp, self.sessions[peer].router_id, nb.rr_client, nb.max_prefixes))
        self.fib.set_pools(pools)
        self.fib.set_vteps(node_vteps(nodes.values()))
        self.local_routes = desired_announcements(self.node, blocks, weps, cluster)
        local_hosts = frozenset(str(net) for w in weps if w.node == self.node and w.state == "active"
                                for net in w.ipv4_nets if net.version == 4 and net.prefixlen == 32)
        if local_hosts != self.local_hosts:
            self._local_dirty |= local_hosts ^ self.local_hosts
            self.local_hosts = local_hosts
        self._warn_keepalive(neighbors)
        active = {p: nb for p, nb in neighbors.items() if self.sessions[p].held_until is None}
        exa_cfg = build_exaconf(self.node, active, helper=self.exa.helper, bind=me.address,
                                port=self.cfg.bgp_listen_port, restart_time=cluster.graceful_restart_time,
                                reactor_speed=self.cfg.reactor_speed)
        outcome = await self.exa.apply(exa_cfg)
        self.exa_refused = outcome == "invalid"
        if outcome in ("started", "restarted"):
            for sess in self.sessions.values():
                sess.state, sess.sent = "idle", {}
        return True

    def _desired_out(self) -> dict[str, dict[str, OutAttrs]]:
        assert self.rib is not None
        reflected = reflect(self.rib, (self.rib.peers[p] for p in self.sessions if p in self.rib.peers))
        out: dict[str, dict[str, OutAttrs]] = {}
        for peer, _sess in self.sessions.items():
            routes = dict(reflected.get(peer, {}))
            routes.update(self.local_routes)  # our own routes win over reflected ones
            out[peer] = routes
        return out

    async def _announce(self) -> None:
        if not self.exa.connected:
            return
        desired = self._desired_out()
        for peer, sess in self.sessions.items():
            if not sess.up:
                continue
            want = desired.get(peer, {})
            try:
                if sess.full_needed:
                    stale = {p: a for p, a in sess.sent.items() if p not in want}
                    await self._send(api.withdraw_commands(peer, stale))
                    await self._send(api.announce_commands(peer, want))
                    await self._send([api.eor_command(peer)])
                    sess.sent = dict(want)
                    sess.full_needed = False
                    log.info("announced %d prefixes to %s, then End-of-RIB", len(want), peer)
                    continue
                gone = {p: a for p, a in sess.sent.items() if p not in want}
                changed = {p: a for p, a in want.items() if sess.sent.get(p) != a}
                if gone:
                    await self._send(api.withdraw_commands(peer, gone))
                    for p in gone:
                        sess.sent.pop(p, None)
                if changed:
                    await self._send(api.announce_commands(peer, changed))
                    sess.sent.update(changed)
                if gone or changed:
                    log.info("peer %s: announced %d, withdrew %d", peer, len(changed), len(gone))
            except ChannelError as exc:
                log.warning("announcing failed: %s (will retry)", exc, extra={"peer": peer})
                sess.full_needed = True
                return

    async def _send(self, commands: list[str]) -> None:
        for line in commands:
            res = await self.exa.command(line)
            if not res.ok:
                log.warning("ExaBGP refused command: %.200s", line)

    async def _relearn(self) -> None:
        """After a helper respawn: read back what ExaBGP received and what it still announces."""
        assert self.rib is not None
        try:
            res_in = await self.exa.command("show adj-rib in json")
            res_out = await self.exa.command("show adj-rib out json")
            res_nb = await self.exa.command("show neighbor json")
        except ChannelError as exc:
            log.warning("re-learning state failed: %s", exc)
            return
        self.relearn = False
        up = set()
        for line in res_nb.lines:
            if isinstance(line, api.TextLine):
                up |= _up_peers(line.text)
        received: dict[str, dict[str, tuple[Any, str]]] = {p: {} for p in self.sessions}
        for line in res_in.lines:
            if isinstance(line, api.RibLine) and line.peer in received:
                received[line.peer][line.prefix] = (line.attrs, line.next_hop)
        sent: dict[str, dict[str, OutAttrs]] = {p: {} for p in self.sessions}
        for line in res_out.lines:
            if isinstance(line, api.RibLine) and line.peer in sent:
                sent[line.peer][line.prefix] = OutAttrs(next_hop=line.next_hop)
        for peer, sess in self.sessions.items():
            if peer in up:
                if not sess.up:
                    sess.state, sess.since = "established", now_iso()
                self.rib.replace_peer(peer, received[peer])
                sess.sent = sent[peer]
                sess.full_needed = True
        log.info("re-learned state after helper respawn: %d sessions up, %d routes received",
                 len(up), sum(len(v) for v in received.values()))

    def _apply_fib(self) -> None:
        assert self.rib is not None
        rib = self.rib
        rib.expire(time.monotonic())
        dirty = rib.take_dirty()
        if self._local_dirty:
            dirty = set(dirty) | self._local_dirty
            self._local_dirty = set()
        if dirty:
            changes: dict[str, tuple[str, ...] | None] = {}
            local = self.local_hosts
            for prefix in dirty:
                sel = rib.selection(prefix) if prefix not in local else None
                changes[prefix] = sel.next_hops if sel is not None else None
            self.fib.update(changes)
        if not self.fib_complete and self._rib_complete():
            self.fib_complete = True
            log.info("RIB complete (End-of-RIB from every peer or grace time over): sweeping leftover routes")
            self.fib.set_connected(self.fib.read_connected())
        start = time.monotonic()
        self.fib.apply(sweep=self.fib_complete)
        FIB_APPLY_SECONDS.observe(time.monotonic() - start)
        self.fib_programmed = True

    def _rib_complete(self) -> bool:
        grace = max(self.cluster.graceful_restart_time, 1)
        if time.monotonic() - self.started > grace:
            return True
        return all(s.eor_received for s in self.sessions.values())

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.exa.restarts != self._restarts_seen:
            EXABGP_RESTARTS.inc(self.exa.restarts - self._restarts_seen)
            self._restarts_seen = self.exa.restarts
        if self.exa.garbage != self._garbage_seen:
            GARBAGE_LINES.inc(self.exa.garbage - self._garbage_seen)
            self._garbage_seen = self.exa.garbage
        if not force and now - self._last_status < 0.5:
            return
        self._last_status = now
        PREFIXES.labels("installed").set(self.fib.installed())
        self.status.publish(self.statuses())

    def readiness(self, datastore_in_sync: bool) -> tuple[bool, str, bool]:
        """(ready now, summary or reason, start-up complete): see the module docstring, point 6."""
        if self.me is None:
            why = ("waiting for the datastore (etcd unreachable, or the snapshot is loading)" if not self.in_sync
                   else f"node {self.node} has no IPv4 address in the datastore ({keys.node_key(self.node)}): "
                        "not peering")
            return False, why, False
        started = self.fib_programmed and self.exa.connected
        if not datastore_in_sync:
            return False, "datastore not in sync (etcd unreachable, or a snapshot is loading)", started
        if self.exa_refused:
            return False, "ExaBGP refused the configuration rendered for it (see the log)", started
        if not self.exa.connected:
            return False, "ExaBGP is not running or its API channel is not connected yet", started
        if not self.fib_programmed:
            return False, "in sync; programming the FIB", False
        up = down = passive = 0
        silent = []
        for peer, sess in sorted(self.sessions.items()):
            if sess.up:
                up += 1
            elif sess.last_error:
                down += 1
            elif sess.neighbor.passive:
                passive += 1  # its reason is its configuration: it waits for the peer to connect
            else:
                silent.append(f"{peer} {sess.state}")
        if silent:
            return False, f"BGP sessions neither established nor reporting why: {', '.join(silent)}", True
        summary = f"in sync; FIB programmed; {up}/{len(self.sessions)} BGP sessions established"
        if down:
            summary += f", {down} down with a reason (calyxctl node status)"
        if passive:
            summary += f", {passive} passive waiting for the peer"
        return True, summary, True

    def _update_health(self, datastore_in_sync: bool) -> None:
        ready, text, started = self.readiness(datastore_in_sync)
        if ready:
            self.health.set_ready(text)
        else:
            self.health.set_not_ready(text, started=started)

    def statuses(self) -> list[BGPPeerStatus]:
        out = []
        for peer, sess in sorted(self.sessions.items()):
            out.append(BGPPeerStatus(
                node=self.node, peer_ip=peer, state=sess.state, since=sess.since,
                prefixes_received=self.rib.received(peer) if self.rib is not None else 0,
                prefixes_sent=len(sess.sent), last_error=sess.last_error, peer_type=sess.neighbor.peer_type,
                peer_as=sess.neighbor.peer_as,
            ))  # fmt: skip
        return out

    # --- main ---

    async def run(self, stop: asyncio.Event) -> int:
        await self.exa.open()
        self.fib.resync()
        adopted = self.fib.adopt()
        if adopted:
            log.info("adopted %d routes already in the kernel (protocol 79); kept until the RIB is complete", adopted)
        if self.cfg.bgp_link_watch:
            watch = LinkWatch(self.on_kernel_change, holds_routes=self._held_routes)
            try:
                watch.start()
                self.linkwatch = watch
            except OSError as exc:
                log.warning("cannot watch rtnetlink (%s): the FIB is repaired at the periodic resync only", exc)
        assert self.ds is not None
        registration = await noderegister.start(self.cfg, self.ds)  # this host's Node (then in the background)
        syncer = AsyncSyncer(self.ds, _prefixes(self.cfg), model.decode, name="bgpd")
        syncer.start()
        if self.leased is not None:
            self.leased.start()
        consumer = asyncio.create_task(self._consume(syncer))
        stopper = asyncio.create_task(stop.wait())
        last_resync = time.monotonic()
        try:
            while not stop.is_set():
                self.health.beat()
                timeout = min(STATUS_INTERVAL, self.health.next_turn())
                deadlines = [self._next_release(), self.rib.next_deadline() if self.rib is not None else None]
                for deadline in deadlines:
                    if deadline is not None:
                        timeout = max(0.05, min(timeout, deadline - time.monotonic()))
                kick = asyncio.create_task(self.kick.wait())
                done, _ = await asyncio.wait({kick, stopper, consumer}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                kick.cancel()
                if consumer in done:
                    consumer.result()  # the syncer died: crash-only
                    raise RuntimeError("datastore syncer ended")
                if stop.is_set():
                    break
                self.kick.clear()
                periodic = time.monotonic() - last_resync > RESYNC_INTERVAL
                if periodic or self.fib_resync_needed:
                    if periodic:
                        last_resync = time.monotonic()
                    self.fib_resync_needed = False
                    self.fib.resync()
                await self.reconcile()
                self._report(force=True)
                self._update_health(syncer.in_sync)
        finally:
            registration.cancel()
            stopper.cancel()
            consumer.cancel()
            if self.linkwatch is not None:
                self.linkwatch.close()
            await syncer.stop()
            await self.exa.stop()
            self.fib.close()
            if self.leased is not None:
                self.leased.stop(revoke=True)
        return 0

    async def _consume(self, syncer: AsyncSyncer) -> None:
        async for batch in syncer:
            self.on_batch(batch)


def _up_peers(text: str) -> set[str]:
    """Established peers in ``show neighbor json`` output."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return set()
    out = set()
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and item.get("state") == "up":
                peer = item.get("peer")
                if isinstance(peer, dict) and isinstance(peer.get("address"), str):
                    out.add(peer["address"])
    return out


def main(cfg: Config) -> int:
    """``bgpd run``."""
    from calyx import daemon as calyx_daemon

    setup_logging(cfg.log_level, "bgpd", log_format=cfg.log_format, node=cfg.node_name)
    start_metrics(cfg.metrics_host, cfg.metrics_port)
    ds = Datastore(cfg.etcd_endpoints, **calyx_config.datastore_kwargs(cfg))
    bgpd = BgpDaemon(cfg, ds)
    try:
        return calyx_daemon.run(bgpd.run, name="bgpd")
    finally:
        ds.close()


def describe(sessions: Mapping[str, Session]) -> str:
    return ", ".join(f"{p}={s.state}" for p, s in sorted(sessions.items()))
