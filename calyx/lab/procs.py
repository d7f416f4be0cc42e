"""Processes of a lab: start them inside a node's namespace, find them again, stop them.

What it owns: the processes the runner starts (etcd, zebra/bgpd of FRR, BIRD, felix, bgpd, the
etcd forwarder). Each is recorded as a :class:`Proc` (pid plus the kernel's start time of that pid,
so a recycled pid is never signalled) in the lab's state file, which is how ``lab down`` in another
process finds them. Processes run in their own session (a Ctrl-C of ``lab up`` does not reach
them), with stdin closed and stdout/stderr appended to their log file.

Nothing here touches the machine's own namespace: a process is started with ``ip netns exec``
into a namespace the lab created (only the forwarder runs in the root namespace, and it only binds
a loopback port).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Proc:
    """A process the lab started."""

    name: str  # "tor1/zebra", "h1a/felix", "etcd", "forwarder"
    node: str | None
    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat: tells a recycled pid apart
    log: str
    argv: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Proc:
        return cls(str(d["name"]), d.get("node"), int(d["pid"]), int(d["start_time"]), str(d["log"]),
                   tuple(d.get("argv", ())))

    @property
    def alive(self) -> bool:
        return is_alive(self.pid, self.start_time)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a pid, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = text[text.rfind(")") + 2:].split()
    return rest[0], int(rest[19])


def start_time(pid: int) -> int:
    st = _stat(pid)
    return st[1] if st else -1


def is_alive(pid: int, start: int) -> bool:
    """True while ``pid`` is the process that was started (zombies count as dead)."""
    st = _stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text[-lines:]) or "(empty)"


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    netns: str | None = None,
    node: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``argv`` (inside ``netns`` when given) in the background, logging to ``log``."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                             env=dict(env) if env is not None else None, cwd=cwd)
    # `ip netns exec` execs the command: the pid is the command's own
    return Proc(name, node, p.pid, start_time(p.pid), str(log), tuple(argv))


def signal_proc(proc: Proc, sig: signal.Signals) -> bool:
    if not proc.alive:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
        return True
    return False


def _reap(pid: int) -> None:
    """Collect our own child's exit status (children of other processes are reaped by their parent)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_dead(procs: Sequence[Proc], timeout: float) -> list[Proc]:
    """Wait until every process has exited; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = list(procs)
    while left and time.monotonic() < deadline:
        for p in left:
            _reap(p.pid)
        left = [p for p in left if p.alive]
        if left:
            time.sleep(0.05)
    return left


def stop(procs: Sequence[Proc], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``timeout``."""
    for p in procs:
        signal_proc(p, signal.SIGTERM)
    for p in wait_dead(procs, timeout):
        signal_proc(p, signal.SIGKILL)
    wait_dead(procs, 5.0)


def session_members(sid: int) -> list[Proc]:
    """Live processes of the session ``sid`` (a process started by :func:`spawn` leads its own
    session, and its children stay in it unless they call setsid): what systemd would find in the
    unit's cgroup."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2:].split()
        if int(rest[3]) == sid and rest[0] not in ("Z", "X"):
            out.append(Proc("session", None, int(entry.name), int(rest[19]), "", ()))
    return out


def stop_unit(proc: Proc, *, kill: bool = False, timeout: float = 15.0) -> None:
    """Stop a daemon as systemd's ``KillMode=mixed`` does: SIGTERM (or, for ``kill``, SIGKILL: a
    crash) to the main process, then SIGKILL to whatever is left in its session (its children)."""
    signal_proc(proc, signal.SIGKILL if kill else signal.SIGTERM)
    for p in wait_dead([proc], timeout):
        signal_proc(p, signal.SIGKILL)
    rest = [p for p in session_members(proc.pid) if p.pid != proc.pid]
    for p in rest:
        signal_proc(p, signal.SIGKILL)
    wait_dead([proc, *rest], 5.0)


def netns_pids(netns: str) -> list[int]:
    """Every process inside the namespace (``ip netns pids``)."""
    r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def kill_forwarders(prefix: str, timeout: float = 3.0) -> int:
    """Kill the etcd forwarders of a lab instance whose namespaces start with ``prefix``.

    A forwarder runs in the machine's own namespace (it binds a loopback port), so sweeping the
    lab's namespaces does not reach it; it is found by its command line instead.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"calyx.lab.forward" not in argv:
            continue
        with contextlib.suppress(ValueError, IndexError):
            ns = argv[argv.index(b"--netns") + 1].decode()
            if ns.startswith(prefix):
                pid = int(entry.name)
                found.append(Proc("forwarder", None, pid, start_time(pid), "", ()))
    found = [p for p in found if p.alive]
    if found:
        stop(found, timeout)
    return len(found)


def kill_netns_processes(netns: str, timeout: float = 3.0) -> int:
    """Kill every process still inside ``netns`` (a crashed ``lab up`` may have left some)."""
    pids = [p for p in netns_pids(netns) if p != os.getpid()]
    procs = [Proc("stray", None, p, start_time(p), "", ()) for p in pids]
    procs = [p for p in procs if p.alive]
    if procs:
        stop(procs, timeout)
    return len(procs)
