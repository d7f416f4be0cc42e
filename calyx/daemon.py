"""What every Calyx daemon shares: logging, the metrics endpoint, crash-only lifecycle, leased status.

Lifecycle (uvicorn's shape): start → main loop → graceful stop on SIGTERM/SIGINT (a second signal
forces the exit). Crash-only: an unexpected exception is logged with its traceback, the process
sleeps briefly (so a crash loop does not spin) and exits non-zero; systemd restarts it, and the
restarted daemon reads the kernel and the datastore back instead of trusting memory.

:class:`LeasedStatus` keeps a set of status keys alive on one etcd lease: when the daemon stops
refreshing (it died, or its host did), the keys expire and ``calyxctl node status`` stops showing
it as healthy. When the lease is lost (etcd restarted, a long outage) it grants a new one and
rewrites every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable

from calyx import health, logfmt
from calyx.datastore.client import Datastore, DatastoreError, Lease

log = logging.getLogger(__name__)

EXIT_CRASH = 1
CRASH_SLEEP = 2.0


def setup_logging(level: str, name: str, *, log_format: str = "text", node: str = "") -> None:
    """Log every record at ``level`` or above to stderr, one line each, in ``log_format`` (:mod:`calyx.logfmt`).

    ``name`` is the component (``felix``, ``bgpd``, ``calyx-cni-server``) and ``node`` the node name
    that JSON lines carry. When stderr is the journal (JOURNAL_STREAM), lines get their syslog
    priority prefix and no timestamp or pid of their own.
    """
    try:
        journal = logfmt.stderr_is_journal(fd=sys.stderr.fileno())
    except (OSError, ValueError):  # stderr replaced by something without a descriptor (a test's capture)
        journal = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logfmt.formatter(log_format, name, node, journal=journal))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    # grpc and pyroute2 are chatty at INFO
    for noisy in ("grpc", "pyroute2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on http://host:port/metrics, and the process's /livez and /readyz
    (:mod:`calyx.health`) on the same listener (port 0: disabled)."""
    if not port:
        return
    health.serve(host, port, health.current())
    log.info("metrics on http://%s:%d/metrics, health on /livez and /readyz", host, port)


def run(main: Callable[[asyncio.Event], Awaitable[int | None]], *, name: str) -> int:
    """Run ``main(stop_event)`` in a fresh event loop, with signals and crash-only handling.

    ``main`` should return when ``stop_event`` is set (graceful shutdown). Returns the exit code.
    """
    stop_count = 0

    async def runner() -> int:
        nonlocal stop_count
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            nonlocal stop_count
            stop_count += 1
            if stop_count > 1:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(EXIT_CRASH)
            log.info("%s: shutting down", signal.Signals(signum).name)
            health.current().stopping()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        rc = await main(stop)
        return rc or 0

    try:
        return asyncio.run(runner())
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("%s: unexpected error; exiting so that the supervisor restarts us", name)
        time.sleep(CRASH_SLEEP)
        return EXIT_CRASH


class LeasedStatus:
    """Status keys kept alive on one lease, refreshed from a background thread."""

    def __init__(self, ds: Datastore, ttl: int) -> None:
        self.ds = ds
        self.ttl = ttl
        self._values: dict[str, bytes] = {}
        self._written: dict[str, bytes] = {}
        self._lease: Lease | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, key: str, value: bytes) -> None:
        """Desired value of a status key (written by the background thread, coalesced)."""
        with self._lock:
            self._values[key] = value
        self._wake.set()

    def delete(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="status", daemon=True)
        self._thread.start()

    def stop(self, *, revoke: bool = True) -> None:
        """Stop refreshing; with ``revoke`` the keys vanish at once (clean shutdown)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if revoke and self._lease is not None:
            with contextlib.suppress(DatastoreError):
                self._lease.revoke()

    def _loop(self) -> None:
        """Refresh the lease every ttl/3 and write what changed. A failure is retried every second
        with a new lease (the old one may have expired meanwhile); it is logged at INFO, and at
        WARNING only once it has lasted half the TTL — from then on the keys may expire — so that
        one slow answer (an election, a busy member) is no warning."""
        period = max(1.0, self.ttl / 3)
        next_refresh = 0.0
        failing_since: float | None = None
        warned = False
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                if self._lease is None:
                    self._lease = self.ds.grant_lease(self.ttl)
                    self._written.clear()
                    next_refresh = now + period
                elif now >= next_refresh:
                    self._lease.refresh()
                    next_refresh = now + period
                self._flush()
                if failing_since is not None:
                    log.info("status reporting recovered after %.1f s", time.monotonic() - failing_since)
                failing_since, warned = None, False
            except DatastoreError as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.info("status reporting failed: %s; retrying", exc)
                elif not warned and now - failing_since >= self.ttl / 2:
                    warned = True
                    log.warning("status reporting failing for %.0f s (lease TTL %d s: this node's status keys "
                                "may expire): %s; will retry", now - failing_since, self.ttl, exc)
                # the lease may have expired during the outage: start over with a new one
                self._lease = None
                next_refresh = 0.0
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._wake.wait(max(0.05, next_refresh - time.monotonic()))
            self._wake.clear()

    def _flush(self) -> None:
        with self._lock:
            want = dict(self._values)
        assert self._lease is not None
        for key, value in want.items():
            if self._written.get(key) != value:
                self.ds.put(key, value, lease=self._lease.id)
                self._written[key] = value
        for key in list(self._written):
            if key not in want:
                self.ds.delete(key)
                del self._written[key]
