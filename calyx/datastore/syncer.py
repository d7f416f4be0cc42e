"""The syncer: a consumer's complete, deduplicated view of some datastore prefixes.

A :class:`Syncer` owns one thread. It reads every key under its prefixes at one revision R (the
snapshot), hands the decoded objects to the consumer, then an explicit :class:`InSync` marker, then
watches from R+1 and hands over every change. The consumer receives batches (``list[Event]``) through
one callback and never needs logic of its own for outages or compaction:

- **Outages.** When the watch breaks (etcd restarted, the member died, the network failed), the syncer
  watches again from the last revision it delivered + 1, with jittered exponential backoff, forever.
  It logs one WARNING per outage (not per retry) and one INFO when etcd answers again. Until the first
  snapshot succeeds it keeps retrying too: etcd may start after the daemon.
- **Compaction.** If that revision has been compacted away, the syncer reads a new snapshot and
  delivers only the difference from what it delivered before: updates for new or changed keys, deletes
  for keys that vanished in the gap, then :class:`InSync` again.
- **Dedup.** It remembers ``key -> mod_revision`` of everything it delivered and the revision its view
  has reached; an event at or below either is dropped, so no update is delivered twice.
- **Bad values.** Values go through the consumer's ``decoder(key, value)``, which returns the object,
  None for keys the consumer ignores, or raises :class:`~calyx.model.errors.ModelError`. A malformed
  value is logged (key and field), counted in ``calyx_datastore_errors_total{kind="malformed"}``, kept
  in :attr:`Syncer.errors` until the key becomes valid or is deleted, and is otherwise treated as a
  delete of the key: a key that was valid and turns malformed disappears from the consumer's view (fail
  closed). A decoder that raises anything else is a bug; it is logged with its traceback, counted as
  ``decoder_exception`` and handled the same way. Nothing a value holds can stop the syncer.

All prefixes are watched through one stream on their longest common prefix, filtered here, so events
arrive in revision order across prefixes (several streams would interleave arbitrarily).

The consumer callback runs in the syncer's thread and should be quick (queue the batch). If it raises,
that is a bug: the syncer logs it, stores it in :attr:`Syncer.failure` and stops (crash-only: the
daemon notices and exits). :class:`AsyncSyncer` feeds an asyncio queue instead of a callback.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter

from calyx.datastore.client import KV, Compacted, Datastore, DatastoreError, Watch
from calyx.model.errors import ModelError

_log = logging.getLogger(__name__)


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Update:
    """``key`` now holds ``obj`` (new or changed)."""

    key: str
    obj: object
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Delete:
    """``key`` is gone from the consumer's view (deleted, vanished during a gap, or now malformed)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class InSync:
    """The consumer's view now equals the datastore's at ``revision``."""

    revision: int


Event = Update | Delete | InSync
Decoder = Callable[[str, bytes], object | None]
Callback = Callable[[list[Event]], None]


# --- metrics ---------------------------------------------------------------------------------------


def _counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Any:
    """A Counter in the default registry, created once per process even if this module is imported
    twice (a second registration of the same name would raise)."""
    try:
        return Counter(name, documentation, labelnames)
    except ValueError:
        existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
        if existing is None:
            raise
        return existing


#: Bad values and failed datastore attempts, by kind: ``malformed`` (ModelError), ``decoder_exception``
#: (the decoder crashed), ``unavailable`` (a snapshot or watch attempt failed).
ERRORS = _counter("calyx_datastore_errors_total", "Datastore values skipped and failed attempts", ["kind"])
#: Full resyncs after the watch revision was compacted.
RESYNCS = _counter("calyx_datastore_resyncs_total", "Full resyncs after etcd compacted the watched revision")


def _normalise(prefixes: Sequence[str]) -> tuple[str, ...]:
    """Sorted prefixes without duplicates or prefixes covered by another."""
    out: list[str] = []
    for p in sorted(set(prefixes)):
        if not any(p.startswith(q) for q in out):
            out.append(p)
    return tuple(out)


def _common_prefix(prefixes: Sequence[str]) -> str:
    """The longest string every prefix starts with (character-wise: keys are not paths)."""
    first, last = min(prefixes), max(prefixes)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


# --- the syncer ------------------------------------------------------------------------------------


class Syncer:
    """Snapshot, in-sync marker, then watch, for ``prefixes``; see the module docstring.

    ``name`` labels the thread and log lines. ``batch_size`` bounds the batches of a snapshot.
    ``backoff_initial``/``backoff_max`` bound the pause between retries while etcd is unreachable.
    ``on_exit`` is called in the syncer thread when it ends, with the failure (or None after stop).
    """

    def __init__(
        self,
        datastore: Datastore,
        prefixes: Sequence[str],
        decoder: Decoder,
        callback: Callback,
        *,
        name: str = "syncer",
        batch_size: int = 1000,
        page_size: int = 1000,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        on_exit: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        if not prefixes:
            raise ValueError("a syncer needs at least one prefix")
        self.name = name
        self.prefixes = _normalise(prefixes)
        self._watch_prefix = _common_prefix(self.prefixes)
        self._ds = datastore
        self._decoder = decoder
        self._callback = callback
        self._on_exit = on_exit
        self._batch_size = max(1, batch_size)
        self._page_size = page_size
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Watch | None = None

        # What the consumer has been told. Only the syncer thread writes these.
        self._revs: dict[str, int] = {}  # key -> mod revision last processed (valid or not)
        self._visible: set[str] = set()  # keys the consumer currently holds
        self._errors: dict[str, str] = {}  # malformed keys -> why
        self._revision = 0  # the view reflects every change up to here
        self._in_sync = False
        self._synced_once = False
        self._outage_since: float | None = None
        self.failure: BaseException | None = None

    # --- status ---

    @property
    def in_sync(self) -> bool:
        """True when a snapshot has been delivered and the watch is live (false during outages and
        resyncs)."""
        return self._in_sync

    @property
    def revision(self) -> int:
        """The revision the consumer's view has reached (0 before the first snapshot)."""
        return self._revision

    @property
    def errors(self) -> dict[str, str]:
        """Malformed keys and why (a copy)."""
        with self._lock:
            return dict(self._errors)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- lifecycle ---

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"syncer {self.name} was already started")
        self._thread = threading.Thread(target=self._main, name=f"calyx-syncer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it (an RPC in flight ends within the client's timeout)."""
        self._stop.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                _log.warning("syncer %s did not stop within %.1f s", self.name, timeout)

    # --- the loop ---

    def _main(self) -> None:
        failure: BaseException | None = None
        try:
            self._loop()
        except BaseException as exc:
            failure = exc
            self.failure = exc
            self._in_sync = False
            _log.exception("syncer %s failed; it has stopped", self.name)
        finally:
            if self._on_exit is not None:
                try:
                    self._on_exit(failure)
                except Exception:
                    _log.exception("syncer %s: on_exit hook failed", self.name)

    def _loop(self) -> None:
        backoff = self._backoff_initial
        need_snapshot = True
        while not self._stop.is_set():
            try:
                if need_snapshot:
                    self._snapshot()
                    need_snapshot = False
                    backoff = self._backoff_initial
                self._follow()
            except Compacted as exc:
                RESYNCS.inc()
                self._in_sync = False
                _log.info(
                    "syncer %s: revision %d compacted (compact revision %d), resyncing",
                    self.name,
                    self._revision + 1,
                    exc.compact_revision,
                )
                need_snapshot = True
            except DatastoreError as exc:
                ERRORS.labels(kind="unavailable").inc()
                self._in_sync = False
                if self._stop.is_set():
                    return
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    _log.warning(
                        "syncer %s: datastore unavailable, retrying until it answers: %s", self.name, exc
                    )
                else:
                    _log.debug("syncer %s: still unavailable: %s", self.name, exc)
                self._stop.wait(random.uniform(0.5, 1.0) * backoff)
                backoff = min(backoff * 2, self._backoff_max)
            else:
                backoff = self._backoff_initial

    def _reachable(self) -> None:
        if self._outage_since is not None:
            _log.info(
                "syncer %s: datastore reachable again after %.1f s",
                self.name,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def _snapshot(self) -> None:
        """Read every prefix at one revision and deliver the difference from the current view."""
        kvs: list[KV] = []
        rev: int | None = None
        t0 = time.monotonic()
        for prefix in self.prefixes:
            page, rev = self._ds.get_prefix(prefix, revision=rev, page_size=self._page_size)
            kvs.extend(page)
        assert rev is not None
        self._reachable()
        first = not self._synced_once
        events: list[Event] = []
        present: set[str] = set()
        for kv in kvs:
            present.add(kv.key)
            if self._revs.get(kv.key) == kv.mod_revision:
                continue  # unchanged since we delivered it
            ev = self._on_put(kv)
            if ev is not None:
                events.append(ev)
        for key in [k for k in self._revs if k not in present]:
            ev = self._on_delete(key, rev)
            if ev is not None:
                events.append(ev)
        self._revision = rev
        for i in range(0, len(events), self._batch_size):
            self._deliver(events[i : i + self._batch_size])
        # the flag first: a consumer that has the InSync event must find the syncer in sync (an
        # AsyncSyncer's consumer runs on another thread and, on a loaded machine, got there first)
        self._in_sync = True
        self._synced_once = True
        self._deliver([InSync(rev)])
        _log.info(
            "syncer %s: %s at revision %d: %d keys read, %d events, %d malformed, %.2f s",
            self.name,
            "snapshot" if first else "resync",
            rev,
            len(kvs),
            len(events),
            len(self._errors),
            time.monotonic() - t0,
        )

    def _follow(self) -> None:
        """Watch from the view's revision + 1 until stopped or the stream breaks."""
        watch = self._ds.watch_prefix(self._watch_prefix, self._revision + 1)
        with self._lock:
            self._watch = watch
        try:
            if self._stop.is_set():
                return
            self._reachable()
            self._in_sync = True
            for batch in watch:
                events: list[Event] = []
                floor = self._revision
                for we in batch:
                    kv = we.kv
                    if kv.mod_revision <= floor or not self._covered(kv.key):
                        continue
                    if we.type == "put":
                        if self._revs.get(kv.key, 0) >= kv.mod_revision:
                            continue  # already delivered
                        ev = self._on_put(kv)
                    else:
                        ev = self._on_delete(kv.key, kv.mod_revision) if kv.key in self._revs else None
                    if ev is not None:
                        events.append(ev)
                self._revision = max(self._revision, watch.revision)
                if events:
                    self._deliver(events)
        finally:
            with self._lock:
                self._watch = None
            watch.cancel()

    def _covered(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.prefixes)

    def _deliver(self, events: list[Event]) -> None:
        if events:
            self._callback(events)

    # --- per-key state ---

    def _on_put(self, kv: KV) -> Event | None:
        key = kv.key
        self._revs[key] = kv.mod_revision
        try:
            obj = self._decoder(key, kv.value)
        except ModelError as exc:
            ERRORS.labels(kind="malformed").inc()
            _log.warning(
                "syncer %s: malformed value skipped",
                self.name,
                extra={"key": key, "field": exc.field or "-", "mod_revision": kv.mod_revision, "error": exc.message},
            )
            return self._hide(key, kv.mod_revision, str(exc))
        except Exception as exc:
            ERRORS.labels(kind="decoder_exception").inc()
            _log.exception(
                "syncer %s: decoder failed (a bug)", self.name, extra={"key": key, "mod_revision": kv.mod_revision}
            )
            return self._hide(key, kv.mod_revision, f"decoder failed: {exc!r}")
        if obj is None:
            return self._hide(key, kv.mod_revision, None)
        with self._lock:
            self._errors.pop(key, None)
        self._visible.add(key)
        return Update(key, obj, kv.mod_revision)

    def _hide(self, key: str, mod_revision: int, error: str | None) -> Event | None:
        with self._lock:
            if error is None:
                self._errors.pop(key, None)
            else:
                self._errors[key] = error
        if key in self._visible:
            self._visible.discard(key)
            return Delete(key, mod_revision)
        return None

    def _on_delete(self, key: str, mod_revision: int) -> Event | None:
        self._revs.pop(key, None)
        return self._hide(key, mod_revision, None)


# --- asyncio ---------------------------------------------------------------------------------------


class _End:
    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure


class AsyncSyncer:
    """A :class:`Syncer` whose batches arrive through ``async for batch in syncer``.

    The syncer thread hands each batch to the event loop with ``call_soon_threadsafe``; the iteration
    ends after :meth:`stop`, and re-raises the syncer's failure if it died.
    """

    def __init__(
        self, datastore: Datastore, prefixes: Sequence[str], decoder: Decoder, **kwargs: Any
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[Event] | _End] = asyncio.Queue()
        self.syncer = Syncer(datastore, prefixes, decoder, self._push, on_exit=self._exited, **kwargs)

    def _push(self, batch: list[Event]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)

    def _exited(self, failure: BaseException | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._queue.put_nowait, _End(failure))

    def start(self) -> None:
        """Start the syncer thread; call from the event loop that will consume the batches."""
        self._loop = asyncio.get_running_loop()
        self.syncer.start()

    async def stop(self) -> None:
        """Stop the thread without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.syncer.stop)

    @property
    def in_sync(self) -> bool:
        return self.syncer.in_sync

    @property
    def revision(self) -> int:
        return self.syncer.revision

    @property
    def errors(self) -> dict[str, str]:
        return self.syncer.errors

    def __aiter__(self) -> AsyncSyncer:
        return self

    async def __anext__(self) -> list[Event]:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # later calls end too
            if item.failure is not None:
                raise item.failure
            raise StopAsyncIteration
        return item
