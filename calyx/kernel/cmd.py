"""Run the kernel's command-line tools: ``iptables-restore``, ``iptables-save``, ``ipset``, ``ip``.

What it owns: the child processes it starts, each for the duration of one call. Every call has a
timeout (the child is killed when it expires), captures stdout and stderr as text, and on failure
raises :class:`CommandError` carrying the command, the exit code and the tail of stderr, so the
caller can log one line that an operator can act on. Nothing here retries: the drivers decide what
is retryable.

``netns`` runs the command inside a named network namespace through ``ip netns exec``.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CommandError", "CommandResult", "CommandTimeoutError", "ip_batch", "run"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_STDERR_TAIL = 2000


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command produced."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float


class CommandError(Exception):
    """A command failed: it exited non-zero, could not be started, or timed out.

    ``returncode`` is the exit status, negative for a signal, ``None`` if it never ran or timed out;
    ``stderr`` holds at most the last 2,000 characters of its standard error.
    """

    def __init__(self, args: Sequence[str], returncode: int | None, stderr: str, reason: str = "") -> None:
        self.cmd = tuple(args)
        self.returncode = returncode
        self.stderr = stderr[-_STDERR_TAIL:]
        self.reason = reason or (f"exit code {returncode}" if returncode is not None else "failed")
        tail = self.stderr.strip().splitlines()[-3:]
        detail = " | ".join(tail)
        super().__init__(f"{_show(self.cmd)}: {self.reason}" + (f": {detail}" if detail else ""))


class CommandTimeoutError(CommandError):
    """The command did not finish within its timeout and was killed."""


def _show(args: Sequence[str]) -> str:
    text = " ".join(args)
    return text if len(text) <= 200 else text[:197] + "..."


def run(
    args: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run ``args``, feeding ``input`` on stdin; raise :class:`CommandError` unless it exits 0.

    With ``check=False`` a non-zero exit is returned in the result instead (a missing program and a
    timeout still raise).
    """
    argv = tuple(args)
    if netns is not None:
        argv = ("ip", "netns", "exec", netns, *argv)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise CommandTimeoutError(argv, None, stderr, f"timed out after {timeout:g} s")
    except OSError as exc:
        raise CommandError(argv, None, "", f"cannot run: {exc.strerror or exc}")
    duration = time.monotonic() - start
    result = CommandResult(argv, proc.returncode, proc.stdout, proc.stderr, duration)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    log.debug("ran cmd=%s rc=%d duration=%.3f", _show(argv), proc.returncode, duration)
    return result


def ip_batch(
    lines: Iterable[str], netns: str | None = None, *, force: bool = False, timeout: float = 300.0
) -> CommandResult:
    """Feed ``lines`` (``route add ...``) to one ``ip -batch -``, inside ``netns`` if given.

    ``force`` (``ip -force``) goes on past failing lines; ``ip`` then still exits non-zero.
    """
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    text = "\n".join(lines)
    return run(argv, input=text + "\n" if text else "", timeout=timeout)
