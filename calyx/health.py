"""Liveness and readiness of a daemon: its main loop's heartbeat, what systemd hears, /livez and /readyz.

What it owns: the process's one :class:`Health` (:func:`current`) and the HTTP listener on the
metrics port (:func:`serve`), which answers ``/livez`` and ``/readyz`` itself and hands every other
request to prometheus_client's exposition unchanged (``/metrics`` exactly as before).

**The heartbeat.** A daemon's main loop calls :meth:`Health.beat` at every turn and never waits
longer than :meth:`Health.next_turn` before turning again, so an idle loop still turns. A turn
records its time; when systemd's watchdog is on (``WATCHDOG_USEC``, see :mod:`calyx.sdnotify`) and a
ping is due — every half of ``WATCHDOG_USEC`` — the same call sends ``WATCHDOG=1``. Nothing else
sends pings: no thread, no timer. A loop that stops turning (blocked in a call, stuck awaiting work
that never ends, the process frozen) stops the pings, and systemd kills and restarts the daemon.

**/livez**: 200 while the loop turned within the *stall limit* — ``WATCHDOG_USEC`` when the
watchdog is on (the limit systemd applies), :data:`STALL_LIMIT` otherwise; 503 with how long it has
been otherwise. The listener runs in threads of its own, so it answers while the loop is stuck.

**Readiness** is the daemon's to judge (each says what "ready" means for it); at each turn it calls
:meth:`Health.set_ready` with a one-line summary, or :meth:`Health.set_not_ready` with the reason.
Start-up is complete the first time it is ready, or when it says so (``started=True``: felix has
programmed the dataplane once although an apply left errors); systemd then gets ``READY=1``, once.
Every change of the summary goes to systemd as ``STATUS=`` (``systemctl status`` shows it).
``/readyz`` answers 200 with the summary, or 503 with the reason — and 503 while ``/livez`` fails,
since a stuck loop's last word is stale. :meth:`Health.stopping` sends ``STOPPING=1`` on a graceful
stop.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from calyx import sdnotify

log = logging.getLogger(__name__)

#: /livez's limit without a watchdog: seconds the main loop may go without turning
STALL_LIMIT = 60.0
#: a ping this early (fraction of the interval) is sent rather than waiting another short turn
_EARLY = 0.05


class Health:
    """One daemon's heartbeat and readiness (see the module docstring). ``clock`` is for tests."""

    def __init__(self, notifier: sdnotify.Notifier | None = None, watchdog_usec: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier if notifier is not None else sdnotify.Notifier(None)
        self.clock = clock
        #: seconds between WATCHDOG=1 pings (None: no watchdog)
        self.ping_interval: float | None = watchdog_usec / 2e6 if watchdog_usec else None
        #: /livez fails when the loop has not turned for longer than this
        self.stall_limit = watchdog_usec / 1e6 if watchdog_usec else STALL_LIMIT
        now = clock()
        self._last_turn = now
        self._next_ping = now
        self._state: tuple[bool, str] = (False, "starting")
        self._started = False
        self._status: str | None = None
        self._lock = threading.Lock()
        self.pings = 0

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
                     unset: bool = True) -> Health:
        """The health the environment asks for (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``);
        with ``unset`` those variables are removed so that child processes do not inherit them."""
        env = os.environ if environ is None else environ
        usec = sdnotify.watchdog_usec(env, os.getpid() if pid is None else pid)
        notifier = sdnotify.Notifier.from_environ(env, unset=unset)
        health = cls(notifier, usec)
        if notifier.enabled:
            log.info("notifying systemd at %s%s", (notifier.address or "").replace("\0", "@"),
                     f"; watchdog ping every {health.ping_interval:g} s" if health.ping_interval else "")
        return health

    # --- the main loop ---------------------------------------------------------------------------------

    def beat(self) -> None:
        """One turn of the main loop: note it, and ping the watchdog if a ping is due."""
        now = self.clock()
        self._last_turn = now
        interval = self.ping_interval
        if interval is not None and now >= self._next_ping - _EARLY * interval:
            self._next_ping = now + interval
            self.pings += 1
            self.notifier.send("WATCHDOG=1")

    def next_turn(self) -> float:
        """Seconds the loop may wait before its next turn: until the next ping is due, or (without a
        watchdog) a third of the stall limit after the last turn."""
        now = self.clock()
        if self.ping_interval is not None:
            return max(0.0, self._next_ping - now)
        return max(0.0, self._last_turn + self.stall_limit / 3 - now)

    # --- readiness -------------------------------------------------------------------------------------

    def set_ready(self, status: str) -> None:
        """Ready now; ``status`` is a one-line summary (start-up is complete)."""
        self._set(True, status, started=True)

    def set_not_ready(self, reason: str, *, started: bool = False) -> None:
        """Not ready now, because of ``reason``; ``started``: start-up is nonetheless complete."""
        self._set(False, reason, started=started)

    def _set(self, ready: bool, text: str, *, started: bool) -> None:
        text = sdnotify.status_text(text)
        with self._lock:
            self._state = (ready, text)
            fields = []
            if started and not self._started:
                self._started = True
                fields.append("READY=1")
                log.info("start-up complete: %s", text)
            status = text if ready else f"not ready: {text}"
            if status != self._status:
                self._status = status
                fields.append(f"STATUS={status}")
            if fields:
                self.notifier.send(*fields)

    @property
    def started(self) -> bool:
        return self._started

    def stopping(self) -> None:
        """A graceful stop has begun."""
        with self._lock:
            self._state = (False, "stopping")
            self._status = "stopping"
            self.notifier.send("STOPPING=1", "STATUS=stopping")

    # --- probes (any thread) ---------------------------------------------------------------------------

    def livez(self) -> tuple[bool, str]:
        age = self.clock() - self._last_turn
        if age > self.stall_limit:
            return False, f"main loop has not turned for {age:.1f} s (limit {self.stall_limit:g} s)"
        return True, f"main loop turned {age:.1f} s ago"

    def readyz(self) -> tuple[bool, str]:
        alive, why = self.livez()
        if not alive:
            return False, why
        return self._state


_current: Health | None = None
_current_lock = threading.Lock()


def current() -> Health:
    """This process's health, made from (and removing) the notify variables of ``os.environ`` on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Health.from_environ()
        return _current


# --- HTTP ------------------------------------------------------------------------------------------


def application(health: Health, fallback: WSGIApplication | None = None) -> WSGIApplication:
    """``/livez`` and ``/readyz`` of ``health``; anything else goes to ``fallback`` (default:
    prometheus_client's exposition of its default registry)."""
    if fallback is None:
        from prometheus_client import make_wsgi_app

        fallback = make_wsgi_app()
    metrics = fallback

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/livez", "/readyz"):
            return metrics(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        ok, text = health.livez() if path == "/livez" else health.readyz()
        body = f"{'ok: ' if ok else ''}{text}\n".encode()
        start_response("200 OK" if ok else "503 Service Unavailable", [
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store")])
        return [b"" if method == "HEAD" else body]

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in progress never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds: no access log."""


def serve(host: str, port: int, health: Health, fallback: WSGIApplication | None = None) -> WSGIServer:
    """Listen on ``host:port`` (IPv4 or IPv6) and serve :func:`application` from a daemon thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    class Server(_Server):
        address_family = family

    httpd = make_server(str(sockaddr[0]), port, application(health, fallback), Server, _QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd
