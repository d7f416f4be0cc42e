"""The ipset driver: felix's sets, programmed with ``ipset restore`` and read back with ``ipset save``.

What it owns: every ipset whose name starts with ``calyx4-`` or ``calyx6-`` (at most 31 characters),
all of type ``hash:net``. Sets of any other name are never read, changed or destroyed.

How it works:

* Desired members per set are given with :meth:`IpsetTable.set_members` / :meth:`remove_set`
  (no I/O; a set whose members did not change is not marked dirty).
* The kernel is read back (``ipset save``, filtered to our names) at the first apply, after
  :meth:`resync` and after any failure; otherwise the belief is built from what was written.
* :meth:`apply_updates` creates new sets and updates changed ones in one ``ipset restore``: small
  deltas in place (``add``/``del``), large ones by filling a temporary set (``calyx4-tmp``) and
  swapping it in atomically, so a rule never sees a half-filled set.
* :meth:`apply_deletes` destroys our sets that are no longer wanted. The daemon calls it last in an
  apply, after iptables stopped referencing them; a set still referenced fails to destroy and is
  retried at the next apply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from calyx.kernel import cmd

log = logging.getLogger(__name__)

PREFIXES = ("calyx4-", "calyx6-")
MAX_NAME = 31
MAXELEM = 1048576
Runner = Callable[..., cmd.CommandResult]


class IpsetError(Exception):
    pass


def _family(name: str) -> str:
    return "inet6" if name.startswith("calyx6-") else "inet"


def _tmp(name: str) -> str:
    return name[:7] + "tmp"


@dataclass(frozen=True, slots=True)
class IpsetStats:
    created: int = 0
    updated: int = 0
    swapped: int = 0
    destroyed: int = 0
    added: int = 0
    removed: int = 0
    failed: int = 0
    readback: bool = False
    duration: float = 0.0

    @property
    def did_work(self) -> bool:
        return bool(self.created or self.updated or self.swapped or self.destroyed or self.failed)


class IpsetTable:
    """Our ipsets of one namespace (see the module docstring). ``swap_threshold``: a delta larger
    than this fraction of the set's size is applied by temp set + swap."""

    def __init__(self, *, runner: Runner = cmd.run, swap_threshold: float = 0.5, min_swap: int = 64) -> None:
        self._run = runner
        self._swap_threshold = swap_threshold
        self._min_swap = min_swap
        self._desired: dict[str, frozenset[str]] = {}
        self._actual: dict[str, set[str]] = {}
        self._dirty: set[str] = set()
        self._need_readback = True

    def set_members(self, name: str, members: Iterable[str]) -> None:
        if not name.startswith(PREFIXES) or len(name) > MAX_NAME:
            raise ValueError(f"ipset {name!r} is not ours or longer than {MAX_NAME} characters")
        new = frozenset(members)
        if self._desired.get(name) != new:
            self._desired[name] = new
            self._dirty.add(name)

    def remove_set(self, name: str) -> None:
        if self._desired.pop(name, None) is not None or name in self._actual:
            self._dirty.add(name)

    def resync(self) -> None:
        self._need_readback = True

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._desired)

    def members(self, name: str) -> frozenset[str] | None:
        return self._desired.get(name)

    @property
    def in_sync(self) -> bool:
        return not self._dirty and not self._need_readback

    def save(self) -> str:
        res = self._run(["ipset", "save"], check=False, timeout=60)
        if res.returncode != 0:
            raise IpsetError(f"ipset save failed: {res.stderr.strip()}")
        return res.stdout

    def read_actual(self) -> dict[str, set[str]]:
        actual: dict[str, set[str]] = {}
        for line in self.save().splitlines():
            parts = line.split()
            if len(parts) < 3 or not parts[1].startswith(PREFIXES):
                continue
            if parts[0] == "create":
                actual.setdefault(parts[1], set())
            elif parts[0] == "add":
                actual.setdefault(parts[1], set()).add(parts[2])
        return actual

    def readback(self) -> None:
        self._actual = self.read_actual()
        self._dirty.update(self._desired)
        self._dirty.update(self._actual)
        self._need_readback = False

    def _restore(self, lines: list[str]) -> None:
        self._run(["ipset", "-exist", "restore"], input="\n".join(lines) + "\n", timeout=120)

    def _create(self, name: str) -> str:
        return f"create {name} hash:net family {_family(name)} hashsize 1024 maxelem {MAXELEM}"

    def plan_updates(self) -> tuple[list[str], dict[str, set[str]], IpsetStats]:
        lines: list[str] = []
        written: dict[str, set[str]] = {}
        created = updated = swapped = added = removed = 0
        tmp_cleared: set[str] = set()
        for name in sorted(self._dirty):
            want = self._desired.get(name)
            if want is None:
                continue
            have = self._actual.get(name)
            if have is None:
                lines.append(self._create(name))
                lines.extend(f"add {name} {m}" for m in sorted(want))
                created += 1
                added += len(want)
            else:
                add = want - have
                rem = have - want
                if not add and not rem:
                    continue
                if len(add) + len(rem) > max(self._min_swap, self._swap_threshold * len(want)):
                    tmp = _tmp(name)
                    if tmp in self._actual and tmp not in tmp_cleared:
                        lines.append(f"destroy {tmp}")
                    tmp_cleared.add(tmp)
                    lines.append(self._create(tmp))
                    lines.extend(f"add {tmp} {m}" for m in sorted(want))
                    lines.append(f"swap {name} {tmp}")
                    lines.append(f"destroy {tmp}")
                    swapped += 1
                else:
                    lines.extend(f"del {name} {m}" for m in sorted(rem))
                    lines.extend(f"add {name} {m}" for m in sorted(add))
                    updated += 1
                added += len(add)
                removed += len(rem)
            written[name] = set(want)
        return lines, written, IpsetStats(created=created, updated=updated, swapped=swapped, added=added,
                                          removed=removed)

    def apply_updates(self) -> IpsetStats:
        """Create new sets and update changed ones (first step of an apply)."""
        start = time.monotonic()
        readback = self._need_readback
        if readback:
            self.readback()
        lines, written, stats = self.plan_updates()
        if lines:
            try:
                self._restore(lines)
            except cmd.CommandError as exc:
                self._need_readback = True
                log.warning("ipset restore failed: %s", exc)
                raise IpsetError(str(exc)) from None
        for name, members in written.items():
            self._actual[name] = members
            self._actual.pop(_tmp(name), None)
        self._dirty -= set(written)
        self._dirty -= {n for n in self._dirty if n in self._desired}
        res = IpsetStats(created=stats.created, updated=stats.updated, swapped=stats.swapped, added=stats.added,
                         removed=stats.removed, readback=readback, duration=time.monotonic() - start)
        if res.did_work:
            log.debug("ipsets updated created=%d updated=%d swapped=%d added=%d removed=%d duration=%.3f",
                     res.created, res.updated, res.swapped, res.added, res.removed, res.duration)
        return res

    def apply_deletes(self) -> IpsetStats:
        """Destroy our sets that are not wanted (last step of an apply)."""
        start = time.monotonic()
        doomed = sorted(n for n in self._actual if n not in self._desired)
        destroyed = failed = 0
        for name in doomed:
            res = self._run(["ipset", "destroy", name], check=False, timeout=30)
            if res.returncode == 0 or "does not exist" in res.stderr:
                self._actual.pop(name, None)
                self._dirty.discard(name)
                destroyed += 1
            else:
                failed += 1
                log.warning("ipset destroy failed (will retry): %s", res.stderr.strip(), extra={"ipset": name})
        stats = IpsetStats(destroyed=destroyed, failed=failed, duration=time.monotonic() - start)
        if destroyed:
            log.debug("ipsets destroyed count=%d duration=%.3f", destroyed, stats.duration)
        return stats

    def dump_actual(self) -> str:
        return "\n".join(
            line for line in self.save().splitlines()
            if len(line.split()) > 1 and line.split()[1].startswith(PREFIXES)
        ) + "\n"

    def dump_desired(self) -> str:
        out = []
        for name in sorted(self._desired):
            out.append(self._create(name))
            out.extend(f"add {name} {m}" for m in sorted(self._desired[name]))
        return "\n".join(out) + "\n"
