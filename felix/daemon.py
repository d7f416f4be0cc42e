"""``felix run``: the asyncio daemon that keeps this host's dataplane equal to the datastore.

What it owns: the event loop and its one task, the syncer thread (datastore → batches), the link
watcher thread (netlink → interface names), the lease thread (status), and one worker thread that
runs the dataplane's blocking apply. The loop:

1. drains every queued batch into the :class:`~felix.calc.Calculator` (cheap, no I/O) and every
   link event into the endpoint manager;
2. does nothing to the kernel until the syncer's first ``InSync``: nothing is written and nothing
   swept before the datastore view is complete (so a restart never flaps established traffic);
3. then hands the dirty results to the managers and runs :meth:`Dataplane.apply` (ipsets created →
   routes and sysctls → iptables → ipsets deleted) in the worker thread;
4. retries failures with exponential backoff (0.1 s to 30 s), and triggers jittered periodic
   resyncs (route, iptables and ipset refresh intervals) that read the kernel back and repair drift;
5. reports status (leased key, per-endpoint keys, metrics);
6. turns at least as often as :class:`calyx.health.Health` asks: every turn is a heartbeat (systemd's
   watchdog ping, ``/livez``), and ends by saying whether felix is ready (``/readyz``, ``READY=1``
   once, ``STATUS=``): in sync with the datastore and the dataplane programmed. A turn includes the
   apply it awaits, so an apply that never returns stops the pings.

Crash-only: any unexpected exception (a dead syncer included) propagates to
:func:`calyx.daemon.run`, which logs it and exits non-zero; the restarted felix reads the kernel
back and makes the minimal change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from calyx import config as calyx_config
from calyx import health, model, noderegister
from calyx.daemon import LeasedStatus
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.datastore.syncer import ERRORS as SYNC_ERRORS
from calyx.datastore.syncer import Delete, Event, InSync, Syncer, Update
from calyx.model.status import now_iso
from felix import iptables, status
from felix.calc import Calculator
from felix.dataplane import Dataplane
from felix.endpoints import EndpointManager, LinkWatcher
from felix.tunnels import TunnelManager

log = logging.getLogger(__name__)

VERSION = "0.1.0"
PREFIXES = (
    keys.WORKLOADS_PREFIX,
    keys.PROFILES_PREFIX,
    keys.POLICIES_PREFIX,
    keys.IPPOOLS_PREFIX,
    keys.IPAM_BLOCKS_PREFIX,
    keys.NODES_PREFIX,  # tunnel peers, the hosts ipset, this node's labels and address
)
RETRY_MIN = 0.1
MAX_STATUS_ERRORS = 20
PREFETCH_MAX_AGE = 30.0  # an early readback older than this is redone before the first apply
RETRY_MAX = 30.0


def _jitter(interval: float) -> float:
    return interval * random.uniform(0.9, 1.1)


@dataclass
class _Timer:
    interval: float
    what: str
    action: Callable[[], None]
    due: float = field(default=0.0)

    def schedule(self, now: float) -> None:
        self.due = now + _jitter(self.interval) if self.interval > 0 else float("inf")


def build_dataplane(cfg: calyx_config.Config, calc: Calculator, ds: Datastore | None = None) -> Dataplane:
    """felix's dataplane; ``ds`` lets the tunnel manager allocate and publish tunnel addresses (without
    it, e.g. for ``felix dump``, tunnels are only rendered)."""
    backend = iptables.detect_backend(cfg.iptables_backend)
    versions = (4, 6) if iptables.available(backend, 6) else (4,)
    log.info("iptables backend=%s versions=%s", backend, ",".join(map(str, versions)))

    def on_restore(table: str, ok: bool) -> None:
        status.RESTORE_CALLS.labels(table=table).inc()
        if not ok:
            status.RESTORE_FAILURES.labels(table=table).inc()

    tunnels = TunnelManager(cfg.node_name, ds, state_dir=cfg.state_dir, tunnel_mtu=cfg.tunnel_mtu)
    return Dataplane(calc, backend=backend, versions=versions,
                     endpoints=EndpointManager(ip_forwarding=cfg.ip_forwarding), on_restore=on_restore,
                     tunnels=tunnels)


class Felix:
    """The daemon's state and its loop (see the module docstring)."""

    def __init__(self, cfg: calyx_config.Config, ds: Datastore) -> None:
        self._started = time.monotonic()
        self.health = health.current()
        self.cfg = cfg
        self.ds = ds
        self.calc = Calculator(cfg.node_name)
        self.dataplane = build_dataplane(cfg, self.calc, ds)
        self.leased = LeasedStatus(ds, cfg.status_ttl)
        self.reporter = status.StatusReporter(self.leased, cfg.node_name, endpoint_status=cfg.endpoint_status,
                                              version=VERSION)
        self._batches: list[list[Event]] = []
        self._links: set[str] = set()
        self._wake = asyncio.Event()
        self._syncer_failure: BaseException | None = None
        self._syncer_done = False
        self.in_sync = False
        self.last_apply: str | None = None
        self.apply_errors: list[str] = []
        self._retry_delay = RETRY_MIN
        self._retry_at: float | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="felix-apply")
        self._timers = [
            _Timer(cfg.route_refresh_interval, "routes", self._resync_routes),
            _Timer(cfg.iptables_refresh_interval, "iptables", self._resync_iptables),
            _Timer(cfg.ipset_refresh_interval, "ipsets", self.dataplane.ipsets.resync),
        ]

    def _resync_routes(self) -> None:
        self.dataplane.endpoints.resync()
        if self.dataplane.tunnels is not None:
            self.dataplane.tunnels.resync()

    def _resync_iptables(self) -> None:
        for table in self.dataplane.tables.values():
            table.resync()

    # --- thread → loop hand-offs --------------------------------------------------------------------

    def _on_batch(self, loop: asyncio.AbstractEventLoop, batch: list[Event]) -> None:
        loop.call_soon_threadsafe(self._push_batch, batch)

    def _push_batch(self, batch: list[Event]) -> None:
        self._batches.append(batch)
        self._wake.set()

    def _on_syncer_exit(self, loop: asyncio.AbstractEventLoop, failure: BaseException | None) -> None:
        def note() -> None:
            self._syncer_failure = failure
            self._syncer_done = True
            self._wake.set()

        if not loop.is_closed():
            loop.call_soon_threadsafe(note)

    def _on_link(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        def note() -> None:
            self._links.add(name)
            self._wake.set()

        if not loop.is_closed():
            loop.call_soon_threadsafe(note)

    # --- the loop -------------------------------------------------------------------------------------

    def _drain(self) -> bool:
        """Feed queued batches and link events in; True if there were link events."""
        batches, self._batches = self._batches, []
        calc = self.calc
        for batch in batches:
            for ev in batch:
                if isinstance(ev, Update):
                    calc.on_update(ev.key, ev.obj)
                elif isinstance(ev, Delete):
                    calc.on_delete(ev.key)
                elif isinstance(ev, InSync):
                    if not self.in_sync:
                        log.info("datastore in sync at revision %d: programming the dataplane", ev.revision)
                    self.in_sync = True
        links, self._links = self._links, set()
        for name in links:
            self.dataplane.endpoints.on_link_up(name)
        return bool(links)

    def _errors(self, syncer: Syncer) -> list[str]:
        bad = sorted(syncer.errors.items())
        errors = [f"malformed {k}: {msg}" for k, msg in bad[:MAX_STATUS_ERRORS]]
        if len(bad) > MAX_STATUS_ERRORS:  # keep the status value small (etcd limits value sizes)
            errors.append(f"... and {len(bad) - MAX_STATUS_ERRORS} more malformed keys (see felix's log)")
        status.MALFORMED.set(len(syncer.errors))
        for kind in ("malformed", "decoder_exception", "unavailable"):
            status.DATASTORE_ERRORS.labels(kind=kind).set(SYNC_ERRORS.labels(kind=kind)._value.get())
        errors += self.apply_errors
        if self.dataplane.endpoints.ip_forwarding is False:
            errors.append("IP forwarding is off (net.ipv4.ip_forward=0)")
        return errors

    async def run(self, stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        syncer = Syncer(self.ds, PREFIXES, model.decode, lambda b: self._on_batch(loop, b), name="felix",
                        on_exit=lambda f: self._on_syncer_exit(loop, f))
        links = LinkWatcher(lambda n: self._on_link(loop, n))
        registration = await noderegister.start(self.cfg, self.ds)  # this host's Node (then in the background)
        self.leased.start()
        syncer.start()
        links.start()
        # Read the kernel back while the snapshot loads (reading is allowed before in-sync; writing
        # and sweeping are not): on nft, iptables-save of a large ruleset takes seconds.
        prefetch: asyncio.Future[None] | None = loop.run_in_executor(self._executor, self.dataplane.read_back)
        prefetched_at = time.monotonic()
        stop_task = asyncio.ensure_future(stop.wait())
        next_status = 0.0
        first = True
        try:
            while not stop.is_set():
                self.health.beat()
                now = time.monotonic()
                deadlines = [next_status, now + self.health.next_turn()]
                if self.in_sync:
                    deadlines += [t.due for t in self._timers]
                    if self._retry_at is not None:
                        deadlines.append(self._retry_at)
                timeout = max(0.0, min(deadlines) - now)
                wake_task = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({wake_task, stop_task}, timeout=min(timeout, 3600.0),
                                   return_when=asyncio.FIRST_COMPLETED)
                wake_task.cancel()
                self._wake.clear()
                if stop.is_set():
                    break
                if self._syncer_done:
                    if self._syncer_failure is not None:
                        raise RuntimeError("the datastore syncer died") from self._syncer_failure
                    raise RuntimeError("the datastore syncer stopped unexpectedly")
                had_links = self._drain()
                self._update_health(syncer)  # the first apply may take long: say it is programming
                now = time.monotonic()
                if self.in_sync:
                    if prefetch is not None:
                        try:
                            await prefetch
                        except Exception as exc:  # the first apply reads back again
                            log.warning("early kernel readback failed: %s", exc)
                            self.dataplane.resync_all()
                        if time.monotonic() - prefetched_at > PREFETCH_MAX_AGE:
                            self.dataplane.resync_all()  # too old to trust
                        prefetch = None
                    if first:
                        for t in self._timers:
                            t.schedule(now)
                        self.calc.mark_all_dirty()
                    fired = False
                    for t in self._timers:
                        if now >= t.due:
                            log.debug("periodic resync what=%s", t.what)
                            status.RESYNCS.labels(what=t.what).inc()
                            t.action()
                            t.schedule(now)
                            fired = True
                    dirty = self.calc.take_dirty()
                    self.dataplane.update(dirty)
                    retry_due = self._retry_at is not None and now >= self._retry_at
                    # Routes waiting for an interface stay dirty in the route table; they are retried
                    # on link events and resyncs, not in a loop.
                    if first or dirty or had_links or fired or retry_due:
                        first = False
                        await self._apply(loop)
                if now >= next_status or self._status_changed:
                    self._report(syncer)
                    next_status = now + self.cfg.status_interval
                self._update_health(syncer)
        finally:
            registration.cancel()
            stop_task.cancel()
            if prefetch is not None:
                with contextlib.suppress(Exception):
                    await prefetch
            links.stop()
            await loop.run_in_executor(None, syncer.stop)
            self.leased.stop(revoke=True)
            self._executor.shutdown(wait=True)
        return 0

    _status_changed = False
    applied_once = False

    async def _apply(self, loop: asyncio.AbstractEventLoop) -> None:
        with status.APPLY_SECONDS.time():
            report = await loop.run_in_executor(self._executor, self.dataplane.apply)
        if report.did_work:
            log.info("apply %s", report.summary())
            self.last_apply = now_iso()
        self._status_changed = True
        if report.errors:
            for e in report.errors:
                status.APPLY_FAILURES.labels(what=e.split(":", 1)[0]).inc()
            self.apply_errors = report.errors
            self._retry_at = time.monotonic() + self._retry_delay
            log.warning("apply left work to retry in %.1f s: %s", self._retry_delay, "; ".join(report.errors))
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        else:
            self.apply_errors = []
            self._retry_at = None
            self._retry_delay = RETRY_MIN
        if not self.applied_once:
            log.info("first apply complete %.2f s after start (%s)", time.monotonic() - self._started,
                     "changes made" if report.did_work else "the kernel was already right")
        self.applied_once = True

    def _update_health(self, syncer: Syncer) -> None:
        """Ready: in sync with the datastore now, the dataplane programmed, the last apply clean.
        Start-up (``READY=1``) is complete once the first apply after the first in-sync is done."""
        h = self.health
        if not self.applied_once:
            h.set_not_ready("in sync with the datastore; programming the dataplane" if self.in_sync
                            else "waiting for the datastore (etcd unreachable, or the snapshot is loading)")
        elif not syncer.in_sync:
            h.set_not_ready("datastore not in sync (etcd unreachable, or a snapshot is loading)", started=True)
        elif self.apply_errors:
            h.set_not_ready(f"the last apply left {len(self.apply_errors)} error(s), retrying: {self.apply_errors[0]}",
                            started=True)
        else:
            h.set_ready(f"in sync; dataplane programmed for {len(self.calc.local_endpoints)} local endpoints")

    def _report(self, syncer: Syncer) -> None:
        self._status_changed = False
        self.reporter.felix(
            in_sync=self.in_sync and syncer.in_sync and self.applied_once and not self.apply_errors,
            last_apply=self.last_apply,
            endpoints=len(self.calc.local_endpoints),
            errors=self._errors(syncer),
            ip_forwarding=self.dataplane.endpoints.ip_forwarding,
        )
        if self.in_sync:
            self.reporter.endpoints(self.dataplane.endpoint_states())


async def run(cfg: calyx_config.Config, stop: asyncio.Event) -> int:
    ds = Datastore(cfg.etcd_endpoints, **calyx_config.datastore_kwargs(cfg))
    try:
        return await Felix(cfg, ds).run(stop)
    finally:
        ds.close()
