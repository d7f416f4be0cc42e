"""ExaBGP as bgpd's child process, and the API channel to it.

What it owns: the ExaBGP process (started, reloaded, restarted, stopped only here), its
configuration file ``<state_dir>/exabgp.conf``, and the unix socket ``<run_dir>/bgpd-api.sock``
that the API helper (:mod:`bgpd.helper`, started by ExaBGP) connects to. It knows nothing about
routes: events go to the daemon's callbacks, commands come from the daemon.

The child:

- starts only with a configuration that ``exabgp validate`` accepted (a reload of a broken file
  would break every later reload of that ExaBGP);
- gets SIGUSR1 when only ``neighbor`` blocks changed (sessions that did not change stay up), and
  is restarted when the process section or the environment changed;
- dies with bgpd (``PR_SET_PDEATHSIG``), so a killed bgpd never leaves an ExaBGP nobody reads;
- is restarted with backoff if it dies. The kernel routes are not touched: the daemon marks what it
  learned as stale and the peers' graceful restart keeps our routes while we come back.

The channel sends **one command at a time and waits for its acknowledgement** (``done`` /
``error``): ExaBGP's acks are plain-text lines mixed into the JSON stream and are not in command
order when commands are pipelined. JSON events are handed to ``on_event`` as they arrive; lines a
command prints (``show ...``) are collected for it. A new helper connection of the same ExaBGP
process (the helper died and ExaBGP respawned it) is reported to ``on_helper(respawned=True)`` so
the daemon re-learns what it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bgpd import api, exaconf
from bgpd.exaconf import ExaConfig

log = logging.getLogger(__name__)

READ_LIMIT = 64 << 20
COMMAND_TIMEOUT = 120.0
PR_SET_PDEATHSIG = 1
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0


class ChannelError(RuntimeError):
    """The command could not be completed (no helper connected, or it went away)."""


@dataclass
class CommandResult:
    ok: bool
    lines: list[api.Line] = field(default_factory=list)


@dataclass
class _Pending:
    line: str
    future: asyncio.Future[CommandResult]
    lines: list[api.Line] = field(default_factory=list)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


def resolve_binary(name: str) -> str:
    """``exabgp`` installed next to our interpreter (the same virtualenv: the pinned version bgpd's
    configuration is written for), else from PATH. An ExaBGP of another version elsewhere on PATH
    (Debian's package puts 4.2 in /usr/sbin) is not picked up unless named by its path."""
    if os.sep in name:
        return name
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name) or name


def helper_command(socket_path: str) -> str:
    """The ``run`` line of ExaBGP's process section."""
    return f"{sys.executable} -m bgpd.helper {socket_path}"


class ExaBGP:
    """The supervised ExaBGP child and its API channel."""

    def __init__(
        self,
        binary: str,
        state_dir: Path,
        run_dir: Path,
        *,
        on_event: Callable[[api.Event], None],
        on_helper: Callable[[bool], Awaitable[None]],
        on_exit: Callable[[], None],
    ) -> None:
        self.binary = resolve_binary(binary)
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.conf_path = state_dir / "exabgp.conf"
        self.socket_path = run_dir / "bgpd-api.sock"
        self.on_event = on_event
        self.on_helper = on_helper
        self.on_exit = on_exit
        self.config: ExaConfig | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.garbage = 0
        self.log_tail: deque[str] = deque(maxlen=50)
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._helper_pids: set[int] = set()
        self._pending: _Pending | None = None
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = 0.0
        self._backoff = BACKOFF_INITIAL

    # --- lifecycle ---

    async def open(self) -> None:
        """Listen for the helper."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.socket_path), limit=READ_LIMIT)
        os.chmod(self.socket_path, 0o600)

    @property
    def helper(self) -> str:
        return helper_command(str(self.socket_path))

    def env(self, cfg: ExaConfig) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        env.update(exaconf.environment(cfg))
        env["exabgp.daemon.user"] = pwd.getpwuid(os.getuid()).pw_name
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def validate(self, cfg: ExaConfig, text: str) -> tuple[bool, str]:
        """Run ``exabgp validate`` on ``text``."""
        path = self.conf_path.with_suffix(".new")
        path.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            self.binary, "validate", str(path), env=self.env(cfg),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode == 0, out.decode(errors="replace")[-2000:]

    async def apply(self, cfg: ExaConfig) -> str:
        """Make ExaBGP run ``cfg``: ``unchanged``, ``reloaded``, ``restarted``/``started``, or ``invalid``."""
        if cfg == self.config and self.running:
            return "unchanged"
        text = exaconf.render(cfg)
        ok, output = await self.validate(cfg, text)
        if not ok:
            log.error("ExaBGP refused the rendered configuration; keeping the running one: %s", output.strip())
            return "invalid"
        restart = exaconf.needs_restart(self.config, cfg) or not self.running
        self.conf_path.with_suffix(".new").replace(self.conf_path)
        old = self.config
        self.config = cfg
        if not restart and self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)
            log.info("ExaBGP reloaded: %d neighbours (was %d)", len(cfg.neighbors), len(old.neighbors) if old else 0)
            return "reloaded"
        was_running = self.running
        if was_running:
            await self._terminate()
        await self._spawn()
        return "restarted" if was_running else "started"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def _spawn(self) -> None:
        assert self.config is not None
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "server", str(self.conf_path), env=self.env(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_pdeathsig, limit=READ_LIMIT,
        )  # fmt: skip
        self._started_at = time.monotonic()
        log.info("ExaBGP started pid=%d neighbours=%d", self.proc.pid, len(self.config.neighbors))
        self._spawn_task(self._pump_log(self.proc))
        self._monitor = asyncio.create_task(self._watch(self.proc))

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.log_tail.append(line)
            if "| ERROR" in line or "| CRITICAL" in line or "Traceback" in line:
                log.warning("exabgp: %s", line)
            else:
                log.debug("exabgp: %s", line)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._stopping or proc is not self.proc:
            return
        self.restarts += 1
        uptime = time.monotonic() - self._started_at
        if uptime > 60:
            self._backoff = BACKOFF_INITIAL
        log.warning("ExaBGP exited rc=%s after %.0f s; restarting in %.0f s (kernel routes kept). Last log: %s",
                    rc, uptime, self._backoff, " / ".join(list(self.log_tail)[-5:]))
        self._drop_connection()
        self.on_exit()
        await asyncio.sleep(self._backoff)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if not self._stopping:
            await self._spawn()

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self.proc = None  # the watcher ignores this exit
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        self._drop_connection()

    async def stop(self) -> None:
        """Stop ExaBGP (no withdraw: with graceful restart the peers keep our routes)."""
        self._stopping = True
        await self._terminate()
        if self._monitor is not None:
            self._monitor.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # --- the channel ---

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(reader.readline(), 10)
        except (TimeoutError, ValueError, ConnectionError):
            writer.close()
            return
        text = hello.decode(errors="replace").strip()
        pid = int(text.split()[1]) if text.startswith("#hello ") and text.split()[1].isdigit() else -1
        if self.proc is None or pid != self.proc.pid:
            log.warning("API helper of an unknown ExaBGP (pid %s, ours %s) connected; closing it", pid, self.pid)
            writer.close()
            return
        respawned = pid in self._helper_pids
        self._helper_pids = {pid}
        self._drop_connection()
        self._writer = writer
        self._connected.set()
        log.info("API helper connected (ExaBGP pid %d%s)", pid, ", respawned: re-learning state" if respawned else "")
        self._spawn_task(self.on_helper(respawned))
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                self._on_line(raw)
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            log.warning("API channel read failed: %s", exc)
        finally:
            if self._writer is writer:
                # a warning only when nobody asked for it: on a stop it is how ExaBGP is meant to go
                (log.info if self._stopping else log.warning)("API helper disconnected")
                self._drop_connection()

    def _drop_connection(self) -> None:
        self._connected.clear()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(ChannelError(f"API helper went away during {pending.line[:60]!r}"))

    def _on_line(self, raw: bytes) -> None:
        line = api.parse_line(raw)
        pending = self._pending
        if isinstance(line, api.Ack):
            if pending is not None and not pending.future.done():
                pending.future.set_result(CommandResult(line.ok, pending.lines))
            else:
                log.debug("unexpected ack %r", line.word)
            return
        if isinstance(line, api.Garbage):
            self.garbage += 1
            log.warning("ignored a line from ExaBGP (%s): %.200s", line.reason, line.text)
            return
        if isinstance(line, api.RibLine | api.TextLine):
            if pending is not None:
                pending.lines.append(line)
            return
        try:
            self.on_event(line)
        except Exception:  # a bug in a handler must not kill the channel
            log.exception("error handling %r", line)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def command(self, line: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Send one command and wait for its acknowledgement."""
        async with self._lock:
            if not self._connected.is_set():
                raise ChannelError("no API helper connected")
            writer = self._writer
            assert writer is not None
            fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
            self._pending = _Pending(line, fut)
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                return await asyncio.wait_for(fut, timeout)
            except (ConnectionError, TimeoutError) as exc:
                raise ChannelError(f"{line[:60]!r}: {exc or type(exc).__name__}") from exc
            finally:
                self._pending = None

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True
