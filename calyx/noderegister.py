"""Node self-registration: a host creates or updates its own Node key when felix or bgpd starts.

What it owns: in ``/calyx/v1/nodes/<node>``, the fields this host sets itself and nothing else:

* ``ipv4``, found by ``node_ipv4_autodetection`` (:mod:`calyx.kernel.autodetect`, in the daemon's
  network namespace);
* ``as_number``, from ``node_as_number``;
* ``labels.<name>``, from ``node_labels``;
* ``self_registered``: for each of those fields the value this host wrote (as a string). It is how
  a later start tells the host's values from the operator's.

The rule (docs/datastore.md): a field with no value is set and recorded; a field whose value equals
its record is the host's and follows detection and configuration (a new address; a label or an AS
no longer configured is removed); a field with a value that is not recorded, or that differs from
its record, is the operator's and is never changed (logged once at INFO when the host's own value
differs). So a Node an operator or the lab runner wrote before the host started stays as written.

Writes are compare-and-swap on the key's mod revision, on the stored JSON itself (as felix's tunnel
manager publishes its fields): every other field, known or not, is kept. A write that loses the race
reads again and merges again, :data:`CAS_ATTEMPTS` times.

Layers, each testable alone: :func:`merge` (pure: stored JSON and what the host wants → new JSON),
:func:`register` (the compare-and-swap loop against a :class:`~calyx.datastore.client.Datastore`),
and :class:`NodeRegistration`, which a daemon runs as a task on its event loop (:func:`start`, which
waits up to :data:`FIRST_PASS_WAIT` seconds for the first attempt, before the daemon's syncer starts):
detection and etcd calls run in a thread, so the loop never blocks; an unreachable etcd is retried
with backoff (1 s to 60 s) and logged; a detection that finds nothing is a warning naming the method
and what it found, and leaves ``ipv4`` as it is. Every :data:`RECHECK_INTERVAL` seconds the host
checks again (a moved address, a repaired default route), which costs a netlink dump and one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from calyx.datastore import keys
from calyx.datastore.client import Datastore, DatastoreError
from calyx.kernel.autodetect import Detected, DetectionError, Method, detect_ipv4

if TYPE_CHECKING:
    from calyx.config import Config

log = logging.getLogger(__name__)

RECORD = "self_registered"
CAS_ATTEMPTS = 5
RECHECK_INTERVAL = 300.0
RETRY_MIN = 1.0
RETRY_MAX = 60.0
FIRST_PASS_WAIT = 2.0


class RegistrationError(Exception):
    """The stored Node cannot be merged (not a JSON object...) or every compare-and-swap lost."""


@dataclass(frozen=True)
class Wanted:
    """What this host registers. ``manage_ipv4`` False (``skip``, or detection found nothing): ``ipv4``
    and its record are left as they are; otherwise ``ipv4`` is the detected address."""

    ipv4: ipaddress.IPv4Interface | None = None
    manage_ipv4: bool = False
    as_number: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Merged:
    """The value to store, whether it differs from the stored one, and what to log."""

    value: dict[str, Any]
    changed: bool
    #: what this host changed, e.g. ``ipv4=10.0.1.11/24``, ``labels.rack removed``
    changes: list[str] = field(default_factory=list)
    #: the operator's fields whose value differs from this host's
    operator: list[str] = field(default_factory=list)


def _text(value: Any) -> str:
    """A stored value as its record spells it."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True)


def merge(stored: Mapping[str, Any] | None, want: Wanted) -> Merged:
    """Apply the self-registration rule (module docstring) to ``stored`` (None: no key yet)."""
    data: dict[str, Any] = dict(stored) if stored is not None else {}
    raw_labels = data.get("labels")
    if raw_labels is not None and not isinstance(raw_labels, Mapping):
        raise RegistrationError(f"labels is not an object ({type(raw_labels).__name__}): left to the operator")
    labels: dict[str, Any] = dict(raw_labels or {})
    raw_records = data.get(RECORD)
    records: dict[str, str] = {}
    if isinstance(raw_records, Mapping):  # anything else is unusable: nothing is provably ours
        records = {k: v for k, v in raw_records.items() if isinstance(k, str) and isinstance(v, str)}
    changes: list[str] = []
    operator: list[str] = []

    def decide(path: str, current: Any, desired: Any, managed: bool) -> tuple[str, Any]:
        """("keep" | "set" | "remove", value) for one field; updates ``records``."""
        rec = records.get(path)
        if current is not None and rec is not None and _text(current) != rec:
            del records[path]  # someone changed what this host wrote: the field is theirs now
            rec = None
        if not managed:
            return "keep", None
        if current is None:
            if desired is None:
                records.pop(path, None)
                return "keep", None
            records[path] = _text(desired)
            changes.append(f"{path}={_text(desired)}")
            return "set", desired
        if rec is not None:
            if desired is None:
                del records[path]
                changes.append(f"{path} removed")
                return "remove", None
            if _text(desired) != rec:
                records[path] = _text(desired)
                changes.append(f"{path}={_text(desired)} (was {rec})")
                return "set", desired
            return "keep", None
        if desired is not None and _text(desired) != _text(current):
            operator.append(f"{path}: the operator's {_text(current)} is kept (this host's would be "
                            f"{_text(desired)})")
        return "keep", None

    ipv4 = str(want.ipv4) if want.ipv4 is not None else None
    for name, desired, managed in (("ipv4", ipv4, want.manage_ipv4), ("as_number", want.as_number, True)):
        action, value = decide(name, data.get(name), desired, managed)
        if action == "set":
            data[name] = value
        elif action == "remove":
            data.pop(name, None)
    label_names = set(want.labels) | {p.removeprefix("labels.") for p in records if p.startswith("labels.")}
    labels_changed = False
    for name in sorted(label_names):
        action, value = decide(f"labels.{name}", labels.get(name), want.labels.get(name), True)
        if action == "set":
            labels[name] = value
            labels_changed = True
        elif action == "remove":
            labels.pop(name, None)
            labels_changed = True
    if labels_changed:
        data["labels"] = labels
    if records:
        data[RECORD] = dict(sorted(records.items()))
    else:
        data.pop(RECORD, None)
    before = dict(stored) if stored is not None else {}
    return Merged(data, data != before, changes, operator)


def register(ds: Datastore, node: str, want: Wanted, *, attempts: int = CAS_ATTEMPTS) -> Merged:
    """Merge ``want`` into ``node``'s key by compare-and-swap (creating it if there is something to write).

    Raises :class:`RegistrationError` (a stored value that is not a JSON object; every attempt lost
    to a concurrent writer) or :class:`~calyx.datastore.client.DatastoreError`.
    """
    key = keys.node_key(node)
    for _ in range(attempts):
        kv = ds.get(key)
        stored: Any = None
        if kv is not None:
            try:
                stored = json.loads(kv.value)
            except ValueError:
                raise RegistrationError(f"{key} does not hold valid JSON: left to the operator") from None
            if not isinstance(stored, dict):
                raise RegistrationError(f"{key} does not hold a JSON object: left to the operator")
        try:
            merged = merge(stored, want)
        except RegistrationError as exc:
            raise RegistrationError(f"{key}: {exc}") from None
        if not merged.changed:
            return merged
        body = json.dumps(merged.value).encode()
        if kv is None:
            if ds.create(key, body):
                return merged
        elif ds.update(key, body, kv.mod_revision):
            return merged
        log.debug("node registration: %s changed while writing it; merging again", key)
    raise RegistrationError(f"{key} changed under every one of {attempts} compare-and-swap attempts")


class NodeRegistration:
    """Detection and :func:`register`, once (:meth:`once`) or as a daemon's background task (:meth:`run`)."""

    def __init__(
        self,
        ds: Datastore,
        node: str,
        *,
        method: Method,
        as_number: int | None = None,
        labels: Mapping[str, str] | None = None,
        netns: str | None = None,
        recheck_interval: float = RECHECK_INTERVAL,
    ) -> None:
        self.ds = ds
        self.node = node
        self.method = method
        self.as_number = as_number
        self.labels = dict(labels or {})
        self.netns = netns
        self.recheck_interval = recheck_interval
        self._detect_error: str | None = None
        self._etcd_error: str | None = None
        self._said: set[str] = set()
        #: set once the first attempt is over, whatever its outcome
        self.first_pass = asyncio.Event()
        #: the last successful detection
        self.detected: Detected | None = None

    @classmethod
    def from_config(cls, cfg: Config, ds: Datastore) -> NodeRegistration:
        return cls(ds, cfg.node_name, method=Method.parse(cfg.node_ipv4_autodetection),
                   as_number=cfg.node_as_number, labels=dict(cfg.node_labels))

    def wanted(self) -> Wanted:
        """Detect the address now; a failure is logged (once until it changes) and leaves ``ipv4`` alone."""
        if self.method.kind == "skip":
            return Wanted(None, False, self.as_number, self.labels)
        try:
            found = detect_ipv4(self.method, netns=self.netns)
        except (DetectionError, OSError) as exc:
            self.detected = None
            msg = str(exc)
            if msg != self._detect_error:
                self._detect_error = msg
                log.warning("node registration: ipv4 autodetection %s found nothing: %s; %s left as it is, tried "
                            "again in %.0f s", self.method, msg, keys.node_key(self.node), self.recheck_interval)
            return Wanted(None, False, self.as_number, self.labels)
        assert found is not None
        if self._detect_error is not None:
            log.info("node registration: ipv4 autodetection %s found %s on %s", self.method, found.address,
                     found.interface)
        self._detect_error = None
        self.detected = found
        return Wanted(found.address, True, self.as_number, self.labels)

    def once(self) -> Merged:
        """Detect and register (blocking). Raises DatastoreError or RegistrationError."""
        merged = register(self.ds, self.node, self.wanted())
        key = keys.node_key(self.node)
        if merged.changed:
            moved = self.detected is not None and any(c.startswith("ipv4=") for c in merged.changes)
            how = f" ({self.method} on {self.detected.interface})" if moved and self.detected is not None else ""
            log.info("node registration: %s %s: %s%s", "updated" if merged.changes else "tidied", key,
                     ", ".join(merged.changes) or "records of fields the operator changed dropped", how)
        for note in merged.operator:
            if note not in self._said:
                self._said.add(note)
                log.info("node registration: %s: %s", key, note)
        return merged

    async def run(self) -> None:
        """Register now and every ``recheck_interval`` seconds (0: once) until cancelled."""
        delay = RETRY_MIN
        while True:
            wait = self.recheck_interval * random.uniform(0.9, 1.1)
            try:
                await asyncio.to_thread(self.once)
                if self._etcd_error is not None:
                    log.info("node registration: the datastore answers again")
                self._etcd_error = None
                delay = RETRY_MIN
            except DatastoreError as exc:
                if str(exc) != self._etcd_error:
                    self._etcd_error = str(exc)
                    log.warning("node registration: cannot reach the datastore (%s); retrying in the background",
                                exc)
                wait, delay = delay, min(delay * 2, RETRY_MAX)
            except RegistrationError as exc:
                log.warning("node registration: %s", exc)
            except Exception:  # registration is not on the dataplane's path: a bug here must not stop it
                log.exception("node registration failed unexpectedly; trying again in %.0f s", wait)
            self.first_pass.set()
            if wait <= 0:
                return
            await asyncio.sleep(wait)


async def start(cfg: Config, ds: Datastore, *, wait: float = FIRST_PASS_WAIT) -> asyncio.Task[None]:
    """Run :class:`NodeRegistration` for ``cfg`` on the running loop; cancel the task to stop it.

    Returns once the first attempt is over or after ``wait`` seconds (etcd down: it goes on in the
    background), so that a daemon that starts its syncer next usually finds its own Node in the
    snapshot instead of warning that it has none.
    """
    reg = NodeRegistration.from_config(cfg, ds)
    task = asyncio.create_task(reg.run(), name="node-registration")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reg.first_pass.wait(), wait)
    return task
