"""``calyx-cni-server``: the CNI service that runs plugin calls for :mod:`calyx.cni.shim`.

Why it exists: a CNI ADD in a fresh Python interpreter spends ~50 ms importing before it does
~10 ms of work (docs/cni.md#performance). This long-lived process has everything imported and
answers the same call in the time of the work itself. It is optional: without it the executables
run every call themselves, with the same results.

What it owns: its Unix socket (default ``/run/calyx/cni.sock``, mode 0600, removed on exit) and
nothing else; every call does what :func:`calyx.cni.plugin.run` (or the IPAM plugin's) does.

Protocol (see :mod:`calyx.cni.shim`): the client sends the plugin name, its whole environment and
stdin, then shuts its side down; the service answers exit code, stdout and stderr, and closes. A
request in another protocol version, or from a process whose network namespace cannot be reached,
is answered ``REFUSED`` without running anything, and the client runs the call itself.

Each call runs in its own thread, moved into the **caller's** network namespace (the peer's pid
from ``SO_PEERCRED``; the caller waits for the answer, so its namespace is there), with its own
stdout, stderr and environment (:func:`calyx.cni.spec.call_io`). Only root and the service's own
user may call (``SO_PEERCRED`` uid). At most ``--max-calls`` run at once; more wait their turn.
SIGTERM stops accepting and waits up to 30 s for the calls in flight.

Health (:mod:`calyx.health`): the accept loop is the main loop. Each turn (at least every 0.5 s, and
while it waits for a free call slot) is a heartbeat — systemd's watchdog ping and ``/livez`` on the
metrics port — and the service is ready (``READY=1``, ``/readyz``) once it listens; SIGTERM sends
``STOPPING=1``.

Configuration: the service's own (``config.load("cni")``: ``--config``, ``CALYX_CONFIG``, the
``[cni]`` table, ``CALYX_*``) sets its ``log_level``, ``log_format`` and the node name its JSON
lines carry, and a configuration that cannot work (a bad key, a missing TLS file) ends it with one
line and exit code 2 before it listens. Each call still reads the cluster's settings from its own
network configuration and the caller's environment (:mod:`calyx.cni.netconf`).

Requirements: the service shares the runtimes' mount and PID namespaces (netns paths such as
``/run/netns/X`` and ``/proc/<pid>/ns/net`` are resolved here) and has what the plugin needs (root:
``setns`` needs CAP_SYS_ADMIN, reading another process's namespace CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import contextvars
import io
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import cast

from calyx import health as calyx_health
from calyx.cni import shim, spec
from calyx.kernel import netns

log = logging.getLogger("calyx.cni.server")

MAX_REQUEST = 4 << 20  #: bytes; a network configuration is a few KiB
READ_TIMEOUT = 10.0  #: seconds to receive the whole request
DRAIN_TIMEOUT = 30.0  #: seconds SIGTERM waits for calls in flight
ACCEPT_TICK = 0.5  #: seconds the accept loop waits at most before it turns again

Runner = Callable[[Mapping[str, str], bytes], int]


def _runners() -> dict[str, Runner]:
    from calyx.cni import ipam_plugin, plugin

    return {"calyx": plugin.run, "calyx-ipam": ipam_plugin.run}


class BadRequestError(ValueError):
    """A request this service will not run (the client then runs it itself)."""


def parse_request(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(plugin, environment, stdin) of one request; BadRequestError when it is not ours."""
    if not data.startswith(shim.MAGIC):
        raise BadRequestError("not a Calyx CNI request of protocol version 1")
    try:
        plugin_b, env_b, stdin = shim._read_frames(data[len(shim.MAGIC):], 3)
    except ValueError as exc:
        raise BadRequestError(f"malformed request: {exc}") from None
    plugin = plugin_b.decode(errors="replace")
    environ: dict[str, str] = {}
    for item in env_b.split(b"\0") if env_b else ():
        k, sep, v = item.partition(b"=")
        if not sep or not k:
            raise BadRequestError("malformed environment entry")
        environ[os.fsdecode(k)] = os.fsdecode(v)
    return plugin, environ, stdin


def encode_answer(code: int, out: bytes, err: bytes) -> bytes:
    return shim.MAGIC + shim._frame([code.to_bytes(4, "big", signed=True), out, err])


def _peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _read_all(conn: socket.socket) -> bytes:
    conn.settimeout(READ_TIMEOUT)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REQUEST:
            raise BadRequestError(f"request larger than {MAX_REQUEST} bytes")
        chunks.append(chunk)


class Server:
    """Accepts calls on ``path`` and runs each in a thread (see the module docstring)."""

    def __init__(self, path: str, *, max_calls: int = 32, runners: Mapping[str, Runner] | None = None,
                 health: calyx_health.Health | None = None) -> None:
        self.path = path
        self.health = health if health is not None else calyx_health.Health()
        self.runners = dict(runners) if runners is not None else _runners()
        self._slots = threading.BoundedSemaphore(max_calls)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.calls = 0
        self._metrics: tuple[object, object] | None = None

    # --- lifecycle ---

    def bind(self) -> None:
        """Listen on the socket, replacing a stale one; refuse if another service answers there."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # nobody listens: left by a killed service
            else:
                raise SystemExit(f"calyx-cni-server: another service is listening on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(128)
        sock.settimeout(0.5)
        self._sock = sock

    def enable_metrics(self) -> None:
        from prometheus_client import Counter, Histogram

        self._metrics = (
            Counter("calyx_cni_calls_total", "CNI calls run by the service", ["plugin", "command", "result"]),
            Histogram("calyx_cni_call_duration_seconds", "Duration of CNI calls run by the service", ["command"],
                      buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)),
        )

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        log.info("serving CNI calls on %s", self.path)
        self.health.set_ready(f"listening on {self.path}")
        while not self._stop.is_set():
            self.health.beat()
            sock = cast("socket.socket | None", self._sock)  # stop() closes and clears it, from another thread
            if sock is None:
                break
            try:
                sock.settimeout(max(0.01, min(ACCEPT_TICK, self.health.next_turn())))
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:  # EBADF: closed by stop() between the check above and here
                if self._stop.is_set():
                    break
                raise
            # all slots busy: wait for a call to end, turning (the loop is alive; the calls have their own limits)
            while not self._slots.acquire(timeout=max(0.01, min(ACCEPT_TICK, self.health.next_turn()))):
                self.health.beat()
            with self._lock:
                self._inflight += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name="cni-call").start()

    def stop(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, wait for the calls in flight (up to ``timeout``), remove the socket."""
        self.health.stopping()  # here, not in the signal handler: that may run inside the health's lock
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            if self._inflight:
                log.warning("stopping with %d call(s) still running", self._inflight)

    # --- one call ---

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_one(conn)
        except Exception:
            log.exception("CNI call failed in the service")
        finally:
            self._slots.release()
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _serve_one(self, conn: socket.socket) -> None:
        start = time.monotonic()
        pid, uid = _peer(conn)
        if uid not in (0, os.getuid()):
            log.warning("refused a call from uid %d", uid, extra={"caller_pid": pid})
            return  # closing without an answer: the client reports "try again"; not ours to run
        try:
            data = _read_all(conn)
            if not data:
                return  # a probe (connect and close), e.g. a new service checking for a running one
            plugin, environ, stdin = parse_request(data)
            if plugin not in self.runners:
                raise BadRequestError(f"unknown plugin {plugin!r}")
            if pid <= 0:
                raise BadRequestError("the caller's process is not visible from the service's PID namespace")
        except (BadRequestError, OSError) as exc:
            log.warning("refused a call: %s", exc, extra={"caller_pid": pid})
            conn.settimeout(READ_TIMEOUT)
            conn.sendall(shim.REFUSED)
            return
        try:
            caller_ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("refused a call: cannot open the caller's network namespace: %s", exc.strerror,
                        extra={"caller_pid": pid})
            conn.sendall(shim.REFUSED)
            return
        out, err = io.StringIO(), io.StringIO()
        try:
            with netns.enter(f"/proc/self/fd/{caller_ns}"):
                code = contextvars.Context().run(self._run, plugin, environ, stdin, out, err)
        except netns.NamespaceError as exc:
            log.warning("refused a call: cannot enter the caller's network namespace: %s", exc,
                        extra={"caller_pid": pid})
            conn.sendall(shim.REFUSED)
            return
        finally:
            os.close(caller_ns)
        elapsed = time.monotonic() - start
        command = environ.get("CNI_COMMAND", "")
        self.calls += 1
        log.info("%s %s", plugin, command or "-", extra={
            "container": environ.get("CNI_CONTAINERID", "-"), "ifname": environ.get("CNI_IFNAME", "-"), "exit": code,
            "duration_ms": round(elapsed * 1000, 1)})
        if self._metrics is not None:
            calls, duration = self._metrics
            calls.labels(plugin, command, "ok" if code == 0 else "error").inc()  # type: ignore[attr-defined]
            duration.labels(command).observe(elapsed)  # type: ignore[attr-defined]
        conn.settimeout(READ_TIMEOUT)
        try:
            conn.sendall(encode_answer(code, out.getvalue().encode(), err.getvalue().encode()))
        except OSError as exc:  # the runtime gave up on the call; its DEL cleans up an ADD
            log.warning("caller left before the answer: %s", exc, extra={"caller_pid": pid})

    def _run(self, plugin: str, environ: dict[str, str], stdin: bytes, out: io.StringIO, err: io.StringIO) -> int:
        spec.call_io(spec.CallIO(out, err, environ))
        try:
            return self.runners[plugin](environ, stdin)
        except SystemExit as exc:  # a plugin path that exits (spec.fail): its code, not a dead thread
            return exc.code if isinstance(exc.code, int) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``calyx-cni-server``."""
    ap = argparse.ArgumentParser(prog="calyx-cni-server", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("CALYX_CNI_SOCKET") or shim.DEFAULT_SOCKET,
                    help="Unix socket to listen on (default: $CALYX_CNI_SOCKET or %(default)s)")
    ap.add_argument("--max-calls", type=int, default=32, help="calls run at once (default %(default)s)")
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    ap.add_argument("--metrics-host", default="127.0.0.1")
    ap.add_argument("--config", default=None,
                    help="configuration file (default: $CALYX_CONFIG, else /etc/calyx/calyx.toml if present)")
    ap.add_argument("--log-level", default=None, help="debug, info, warning, error (default: log_level)")
    args = ap.parse_args(argv)
    if args.max_calls < 1:
        ap.error("--max-calls must be at least 1")
    from calyx import config
    from calyx.daemon import setup_logging, start_metrics

    try:  # the [cni] table and CALYX_* of the service itself: its logging, and a check that it can work
        cfg = config.load("cni", path=args.config, flags={"log_level": args.log_level})
    except config.ConfigError as exc:
        config.fail("calyx-cni-server", exc)
    setup_logging(cfg.log_level, "calyx-cni-server", log_format=cfg.log_format, node=cfg.node_name)
    server = Server(args.socket, max_calls=args.max_calls, health=calyx_health.current())
    server.bind()
    if args.metrics_port:
        server.enable_metrics()
        start_metrics(args.metrics_host, args.metrics_port)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        server._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever()
    finally:
        server.stop()
    log.info("stopped after %d calls", server.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
