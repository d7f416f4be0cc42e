"""The iptables driver: one table (filter or nat) of one IP version, programmed by restore/save.

What it owns: every chain whose name starts with ``calyx-`` in its table, and the rules carrying a
``calyx:<16 hex>`` comment in the built-in chains it hooks (FORWARD, INPUT, OUTPUT, POSTROUTING).
It never touches another rule or chain. Every rule it writes carries the comment; the hash covers the
chain name, the rule text and the rule's occurrence number among identical rules of that chain, so
a rule's identity survives insertions and deletions around it.

How it works (Calico felix's ``table.go`` shape):

* Desired chains live in memory (:meth:`IptablesTable.set_chain`, :meth:`remove_chain`,
  :meth:`set_hooks`); these calls compare the rules with the previous ones and mark the chain dirty,
  with no I/O. Rules are rendered (hash, comment) at apply time, through a cache shared by every
  chain: at scale most endpoint chains are identical.
* The kernel is read back with ``iptables-save -t <table>`` at the first apply, after
  :meth:`resync` (periodic, jittered, by the daemon) and after a failed restore; only chain names and
  our hashes are parsed. Other applies trust the belief built from what was written.
* :meth:`apply` diffs each dirty chain: rules are deleted by index (highest first) and inserted at
  their position, so a one-rule change is a one-line restore; a chain whose kept rules are out of
  order is rewritten whole (declaring it flushes it). Hook rules sit at the top of their built-in
  chain; if they are not exactly there they are deleted by their full spec and re-inserted. Chains of
  ours that are no longer wanted are flushed, then deleted, at the end of the same transaction.
* Everything goes through one ``iptables-restore --noflush`` per apply, whose input is streamed
  to it while it is generated (rendering overlaps the restore's parsing). A failed COMMIT (the
  table changed under us, a referenced ipset is missing...) is retried after a fresh readback, up to
  :data:`MAX_RETRIES` times; then :class:`IptablesError` is raised and the chains stay dirty.

Backends: ``legacy`` (``iptables-legacy-*``) or ``nft`` (``iptables-nft-*``); :func:`detect_backend`
picks the one the host uses. python-iptables is not used: it drives only the legacy backend and is
more than twenty times slower than restore at scale (DESIGN.md).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from calyx.kernel import cmd
from felix.rules import CHAIN_PREFIX, IptRule

log = logging.getLogger(__name__)

MAX_RETRIES = 3
_HASH_RE = re.compile(r"calyx:([0-9a-f]{16})")
_RESTORE_TIMEOUT = 300.0

Runner = Callable[..., cmd.CommandResult]


class IptablesError(Exception):
    """A restore failed even after retries; the chains stay dirty and are retried later."""


def command(backend: str, version: int, what: str) -> str:
    """``iptables-legacy-restore``, ``ip6tables-nft-save``..."""
    return f"{'ip6tables' if version == 6 else 'iptables'}-{backend}-{what}"


def _count_rules(runner: Runner, backend: str) -> int:
    total = 0
    for version in (4, 6):
        try:
            res = runner([command(backend, version, "save")], check=False, timeout=30)
        except cmd.CommandError:
            continue
        total += sum(1 for line in res.stdout.splitlines() if line.startswith("-A "))
    return total


def detect_backend(mode: str = "auto", runner: Runner = cmd.run) -> str:
    """The backend to use: ``mode`` itself unless it is ``auto``.

    ``auto`` (Calico's rule): the backend that holds more rules wins (an existing ruleset, ours from
    a previous run included, tells what the host uses); on a tie, the one ``iptables`` points to.
    A save of a large nft ruleset takes seconds, so nft is only counted when the answer depends on it.
    """
    if mode in ("legacy", "nft"):
        return mode
    target = os.path.realpath(shutil.which("iptables") or "/usr/sbin/iptables")
    default = "legacy" if "legacy" in os.path.basename(target) else "nft"
    legacy = _count_rules(runner, "legacy")
    if legacy == 0 and default == "nft":
        return "nft"  # nft wins or ties
    nft = _count_rules(runner, "nft")
    if legacy != nft:
        return "legacy" if legacy > nft else "nft"
    return default


def rule_hash(rule: IptRule, occurrence: int) -> str:
    """The 16-hex identity of a rule: its text and its occurrence number among identical rules of its
    chain. The chain name is not part of it (a rule's line names its chain), so the many identical
    endpoint chains share one rendering."""
    h = hashlib.blake2b(f"{rule[0]}\0{rule[1]}\0{occurrence}".encode(), digest_size=8)
    return h.hexdigest()


_CACHE_MAX = 500_000
_rendered: dict[tuple[IptRule, int], tuple[str, str]] = {}


def _render(rule: IptRule, occurrence: int) -> tuple[str, str]:
    """(hash, line) of a rule, memoised: at scale most rules repeat across endpoint chains."""
    key = (rule, occurrence)
    hit = _rendered.get(key)
    if hit is not None:
        return hit
    if len(_rendered) >= _CACHE_MAX:
        _rendered.clear()
    h = rule_hash(rule, occurrence)
    match, target = rule
    line = f'{match} -m comment --comment "calyx:{h}" {target}' if match else \
        f'-m comment --comment "calyx:{h}" {target}'
    _rendered[key] = (h, line)
    return h, line


@dataclass(slots=True)
class _Chain:
    hashes: list[str]
    lines: list[str]  # the rule as written after "-A <chain> "


_chains: dict[tuple[IptRule, ...], _Chain] = {}


def render_chain(rules: Sequence[IptRule]) -> _Chain:
    """The hashes and lines of a chain's rules (memoised: identical endpoint chains are common; the
    result is shared and must not be modified)."""
    key = tuple(rules)
    hit = _chains.get(key)
    if hit is not None:
        return hit
    if len(_chains) >= _CACHE_MAX // 8:
        _chains.clear()
    chain = _render_chain(key)
    _chains[key] = chain
    return chain


def _render_chain(rules: Sequence[IptRule]) -> _Chain:
    hashes: list[str] = []
    lines: list[str] = []
    seen: dict[IptRule, int] | None = None
    for rule in rules:
        n = 0
        if seen is None:
            seen = {rule: 1}
        else:
            n = seen.get(rule, 0)
            seen[rule] = n + 1
        h, line = _render(rule, n)
        hashes.append(h)
        lines.append(line)
    return _Chain(hashes, lines)


@dataclass(frozen=True, slots=True)
class ApplyStats:
    chains_written: int = 0  # created or rewritten whole
    chains_deleted: int = 0
    rules_inserted: int = 0
    rules_deleted: int = 0
    restores: int = 0
    failures: int = 0
    readback: bool = False
    duration: float = 0.0

    @property
    def did_work(self) -> bool:
        return bool(self.chains_written or self.chains_deleted or self.rules_inserted or self.rules_deleted
                    or self.failures)


@dataclass(slots=True)
class _Plan:
    """What one restore will have done once it succeeds (filled while its input is generated)."""

    written: dict[str, Sequence[str | None]] = field(default_factory=dict)  # chain -> hashes after it
    deleted: list[str] = field(default_factory=list)
    hooks: dict[str, list[tuple[str | None, str]]] = field(default_factory=dict)
    chains_written: int = 0
    rules_inserted: int = 0
    rules_deleted: int = 0


class IptablesTable:
    """Desired chains of one table, and the minimal restore that makes the kernel hold them."""

    def __init__(
        self,
        table: str,
        version: int,
        backend: str,
        *,
        runner: Runner = cmd.run,
        on_restore: Callable[[bool], None] | None = None,
    ) -> None:
        self.table = table
        self.version = version
        self.backend = backend
        self._run = runner
        self._on_restore = on_restore
        self._desired: dict[str, tuple[IptRule, ...]] = {}
        self._rendered: dict[str, _Chain] = {}  # rendered on demand (at apply time)
        self._hooks: dict[str, _Chain] = {}
        # stream the restore input to the process while it is generated (the real command only)
        self._streaming = runner is cmd.run
        self._actual: dict[str, Sequence[str | None]] = {}
        self._actual_hooks: dict[str, list[tuple[str | None, str]]] = {}
        self._dirty: set[str] = set()
        self._hooks_dirty = True
        self._need_readback = True

    # --- desired state (no I/O) -------------------------------------------------------------------

    def set_chain(self, name: str, rules: Sequence[IptRule]) -> None:
        """Desired rules of chain ``name``. Rendering (hashes, comments) happens at apply time,
        through a cache shared by every chain, so many chains with the same rules cost one."""
        if not name.startswith(CHAIN_PREFIX) or len(name) > 28:
            raise ValueError(f"chain {name!r} is not ours or longer than 28 characters")
        want = rules if isinstance(rules, tuple) else tuple(rules)
        old = self._desired.get(name)
        if old is want or old == want:
            return
        self._desired[name] = want
        self._rendered.pop(name, None)
        self._dirty.add(name)

    def _chain(self, name: str) -> _Chain:
        chain = self._rendered.get(name)
        if chain is None:
            chain = self._rendered[name] = render_chain(self._desired[name])
        return chain

    def set_chains(self, chains: Mapping[str, Sequence[IptRule]]) -> None:
        for name, rules in chains.items():
            self.set_chain(name, rules)

    def remove_chain(self, name: str) -> None:
        self._rendered.pop(name, None)
        if self._desired.pop(name, None) is not None or name in self._actual:
            self._dirty.add(name)

    def set_hooks(self, hooks: Mapping[str, Sequence[IptRule]]) -> None:
        """Our rules at the top of built-in chains (``FORWARD``: jump to ``calyx-FORWARD``...)."""
        new = {name: render_chain(rules) for name, rules in hooks.items()}
        if {k: v.hashes for k, v in new.items()} != {k: v.hashes for k, v in self._hooks.items()}:
            self._hooks = new
            self._hooks_dirty = True

    def resync(self) -> None:
        """Read the kernel back at the next apply (repairs hand-made changes)."""
        self._need_readback = True

    @property
    def chain_names(self) -> frozenset[str]:
        return frozenset(self._desired)

    def desired_rules(self, name: str) -> list[str]:
        return list(self._chain(name).lines) if name in self._desired else []

    @property
    def in_sync(self) -> bool:
        return not self._dirty and not self._hooks_dirty and not self._need_readback

    # --- kernel I/O ---------------------------------------------------------------------------------

    def _cmd(self, what: str) -> str:
        return command(self.backend, self.version, what)

    def save(self, *, all_tables: bool = False) -> str:
        """``iptables-save -t <table>`` (empty when the table does not exist yet); ``all_tables``: every
        table of this IP version (split it with :func:`split_save`)."""
        args = [self._cmd("save")] if all_tables else [self._cmd("save"), "-t", self.table]
        res = self._run(args, check=False, timeout=60)
        if res.returncode != 0:
            log.debug("iptables save failed table=%s rc=%d: %s", self.table, res.returncode, res.stderr.strip())
            return ""
        return res.stdout

    @property
    def needs_readback(self) -> bool:
        return self._need_readback

    def _readback(self) -> None:
        self.load_saved(self.save())

    def load_saved(self, text: str) -> None:
        """Take ``iptables-save`` output of this table as the kernel's state (the readback)."""
        actual: dict[str, list[str | None]] = {}
        hooks: dict[str, list[tuple[str | None, str]]] = {}
        hooked = set(self._hooks)
        search = _HASH_RE.search
        for line in text.splitlines():
            if line.startswith("-A "):
                name, _, rest = line[3:].partition(" ")
                if name.startswith(CHAIN_PREFIX):
                    m = search(rest)
                    actual.setdefault(name, []).append(m.group(1) if m else None)
                elif name in hooked:
                    m = search(rest)
                    hooks.setdefault(name, []).append((m.group(1) if m else None, rest))
            elif line.startswith(":" + CHAIN_PREFIX):
                actual.setdefault(line[1:].split(" ", 1)[0], [])
        self._actual = dict(actual)
        self._actual_hooks = hooks
        self._dirty.update(self._desired)
        self._dirty.update(actual)
        self._hooks_dirty = True
        self._need_readback = False

    def _plan(self, plan: _Plan) -> Iterator[str]:
        """The restore input (without the ``*table`` and ``COMMIT`` lines), in chunks, generated
        lazily: chains are rendered as they are reached, so the restore can start parsing while the
        rest is still being rendered. Fills ``plan`` with what the kernel will hold afterwards."""
        names = sorted(self._dirty)
        new = [n for n in names if n in self._desired and n not in self._actual]
        if new:  # every new chain is declared before any rule can jump to it
            yield "".join(f":{n} - [0:0]\n" for n in new)
        tail: list[str] = []
        for name in names:
            if name not in self._desired:
                if name in self._actual:
                    yield f"-F {name}\n"
                    tail.append(f"-X {name}\n")
                    plan.deleted.append(name)
                continue
            want = self._chain(name)
            have = self._actual.get(name)
            if have is not None and have == want.hashes:
                continue
            edits = None if have is None else _edits(name, have, want)
            if edits is None or len(edits[0]) > len(want.lines):
                chunk = "" if have is None else f"-F {name}\n"  # a rewrite of an existing chain
                if want.lines:
                    pre = f"-A {name} "
                    chunk += pre + ("\n" + pre).join(want.lines) + "\n"
                if chunk:
                    yield chunk
                plan.chains_written += 1
                plan.rules_inserted += len(want.lines)
            else:
                lines, n_ins, n_del = edits
                yield "\n".join(lines) + "\n"
                plan.rules_inserted += n_ins
                plan.rules_deleted += n_del
            plan.written[name] = want.hashes  # shared, never mutated
        if self._hooks_dirty:
            for builtin in sorted(set(self._hooks) | set(self._actual_hooks)):
                want_hook = self._hooks.get(builtin)
                have_rules = self._actual_hooks.get(builtin, [])
                want_h = want_hook.hashes if want_hook is not None else []
                ours = [(h, spec) for h, spec in have_rules if h is not None]
                top = [h for h, _ in have_rules[: len(want_h)]]
                if top == want_h and len(ours) == len(want_h):
                    continue
                lines = [f"-D {builtin} {spec}" for _, spec in ours]
                plan.rules_deleted += len(ours)
                foreign: list[tuple[str | None, str]] = [(h, spec) for h, spec in have_rules if h is None]
                if want_hook is not None:
                    lines += [f"-I {builtin} 1 {line}" for line in reversed(want_hook.lines)]
                    plan.rules_inserted += len(want_hook.lines)
                    ours_now: list[tuple[str | None, str]] = [
                        (h, line) for h, line in zip(want_hook.hashes, want_hook.lines, strict=True)
                    ]
                    plan.hooks[builtin] = ours_now + foreign
                else:
                    plan.hooks[builtin] = foreign
                if lines:
                    yield "\n".join(lines) + "\n"
        if tail:
            yield "".join(tail)  # after every rule that jumped to them is gone

    def pending_text(self, *, readback: bool = True) -> str:
        """The restore input the next apply would send (for ``felix diff``); reads the kernel first."""
        if readback:
            self._readback()
        body = "".join(self._plan(_Plan()))
        return f"*{self.table}\n{body}COMMIT\n" if body else ""

    def _restore(self, plan: _Plan) -> bool:
        """Generate the input and feed it to one restore; False when there was nothing to write.
        Raises :class:`cmd.CommandError` when the restore fails."""
        args = [self._cmd("restore"), "--noflush", "--wait", "10"]
        chunks = self._plan(plan)
        if not self._streaming:
            body = "".join(chunks)
            if not body:
                return False
            self._run(args, input=f"*{self.table}\n{body}COMMIT\n", timeout=_RESTORE_TIMEOUT)
            return True
        proc: subprocess.Popen[str] | None = None
        try:
            for chunk in chunks:
                if proc is None:
                    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
                    assert proc.stdin is not None
                    proc.stdin.write(f"*{self.table}\n")
                assert proc.stdin is not None
                proc.stdin.write(chunk)
            if proc is None:
                return False
            assert proc.stdin is not None
            proc.stdin.write("COMMIT\n")
        except BrokenPipeError:
            pass  # the restore died early: its exit code and stderr say why
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.communicate()
            raise
        if proc is None:
            return False
        try:
            # communicate() closes stdin and waits without polling (wait(timeout) polls with sleeps)
            _, stderr = proc.communicate(timeout=_RESTORE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise cmd.CommandTimeoutError(args, None, "", f"timed out after {_RESTORE_TIMEOUT:g} s") from None
        rc = proc.returncode
        if rc != 0:
            raise cmd.CommandError(args, rc, stderr)
        return True

    def apply(self) -> ApplyStats:
        """Make the kernel hold the desired chains; raise :class:`IptablesError` when retries fail."""
        start = time.monotonic()
        readback = False
        failures = 0
        restores = 0
        last_error = ""
        for _attempt in range(MAX_RETRIES + 1):
            if self._need_readback:
                self._readback()
                readback = True
            if not self._dirty and not self._hooks_dirty:
                return ApplyStats(readback=readback, duration=time.monotonic() - start, failures=failures,
                                  restores=restores)
            plan = _Plan()
            try:
                wrote = self._restore(plan)
            except cmd.CommandError as exc:
                restores += 1
                failures += 1
                last_error = str(exc)
                if self._on_restore is not None:
                    self._on_restore(False)
                log.warning("iptables restore failed: %s", exc, extra={
                    "table": self.table, "ip_version": self.version, "backend": self.backend, "attempt": failures})
                self._need_readback = True
                time.sleep(min(0.05 * (2**failures), 0.5))
                continue
            if not wrote:
                self._dirty.clear()
                self._hooks_dirty = False
                return ApplyStats(readback=readback, duration=time.monotonic() - start, failures=failures,
                                  restores=restores)
            restores += 1
            if self._on_restore is not None:
                self._on_restore(True)
            for name, hashes in plan.written.items():
                self._actual[name] = hashes
            for name in plan.deleted:
                self._actual.pop(name, None)
            self._actual_hooks.update(plan.hooks)
            self._dirty.clear()
            self._hooks_dirty = False
            stats = ApplyStats(
                chains_written=plan.chains_written,
                chains_deleted=len(plan.deleted),
                rules_inserted=plan.rules_inserted,
                rules_deleted=plan.rules_deleted,
                restores=restores,
                failures=failures,
                readback=readback,
                duration=time.monotonic() - start,
            )
            log.debug(
                "iptables applied table=%s v%d backend=%s chains_written=%d chains_deleted=%d inserted=%d "
                "deleted=%d readback=%s duration=%.3f",
                self.table, self.version, self.backend, stats.chains_written, stats.chains_deleted,
                stats.rules_inserted, stats.rules_deleted, readback, stats.duration,
            )  # fmt: skip
            return stats
        raise IptablesError(f"iptables restore of table {self.table} v{self.version} failed "
                            f"{failures} times: {last_error}")

    def dump_desired(self) -> str:
        """The desired chains as restore text (``felix dump --desired``)."""
        lines = [f"*{self.table}"]
        lines += [f":{name} - [0:0]" for name in sorted(self._desired)]
        for builtin, chain in sorted(self._hooks.items()):
            lines += [f"-I {builtin} {i + 1} {line}" for i, line in enumerate(chain.lines)]
        for name in sorted(self._desired):
            lines += [f"-A {name} {line}" for line in self._chain(name).lines]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def dump_actual(self) -> str:
        """Our chains and hook rules as the kernel holds them (``felix dump --actual``)."""
        out = []
        for line in self.save().splitlines():
            ours = line.startswith(":" + CHAIN_PREFIX) or (
                line.startswith("-A ") and (line[3:].startswith(CHAIN_PREFIX) or "calyx:" in line))
            if ours or line.startswith("*") or line == "COMMIT":
                out.append(line)
        return "\n".join(out) + ("\n" if out else "")


def _edits(name: str, have: Sequence[str | None], want: _Chain) -> tuple[list[str], int, int] | None:
    """Delete/insert lines turning ``have`` into ``want``, or None when a rewrite is needed."""
    wpos = {h: i for i, h in enumerate(want.hashes)}
    keep: list[int] = []
    seen: set[str] = set()
    for i, h in enumerate(have):
        if h is not None and h in wpos and h not in seen:
            keep.append(i)
            seen.add(h)
    positions = [wpos[h] for h in (have[i] for i in keep) if h is not None]
    if any(a > b for a, b in itertools.pairwise(positions)):
        return None
    keep_set = set(keep)
    lines = [f"-D {name} {i + 1}" for i in range(len(have) - 1, -1, -1) if i not in keep_set]
    n_del = len(lines)
    length = len(keep)
    n_ins = 0
    for j, h in enumerate(want.hashes):
        if h in seen:
            continue
        if j >= length:
            lines.append(f"-A {name} {want.lines[j]}")
        else:
            lines.append(f"-I {name} {j + 1} {want.lines[j]}")
        length += 1
        n_ins += 1
    return lines, n_ins, n_del


def split_save(text: str) -> dict[str, str]:
    """``iptables-save`` output of several tables, split by table name."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def available(backend: str, version: int) -> bool:
    return shutil.which(command(backend, version, "restore")) is not None


def all_chains(tables: Iterable[IptablesTable]) -> int:
    return sum(len(t.chain_names) for t in tables)
