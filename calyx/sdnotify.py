"""The systemd notify protocol (``sd_notify(3)``), in the standard library.

What it owns: one unbound ``AF_UNIX`` datagram socket per :class:`Notifier`, used only to send
messages to the address systemd puts in ``NOTIFY_SOCKET``: a path (``/run/systemd/notify``) or an
abstract name (``@name``, sent as ``\\0name``). A message is one datagram of newline-separated
``KEY=VALUE`` assignments: ``READY=1``, ``STATUS=<text>``, ``WATCHDOG=1``, ``STOPPING=1``. systemd
learns the sender's pid from the socket's credentials (``NotifyAccess=main`` accepts only the
unit's main process), so nothing here names the pid.

The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it is meant for)
when the unit has ``WatchdogSec=``; the process must send ``WATCHDOG=1`` more often than that, and
sd_watchdog_enabled(3) advises every half of it. :func:`watchdog_usec` reads those variables
(``None``: no watchdog for this process); *who* sends the pings, and when, is
:class:`calyx.health.Health`'s business — from each daemon's main loop, never from a thread of its
own, so that a loop that stops turning stops the pings.

Failures never reach the caller: without ``NOTIFY_SOCKET`` every send is a no-op, and a send that
fails (systemd gone, its queue full) is logged once and dropped. The socket is non-blocking, so a
stuck receiver cannot stall the daemon's main loop.

Why not python-systemd: its ``daemon.notify`` makes the same single ``sendmsg``; it is a C extension
built against libsystemd (a compiler and ``libsystemd-dev`` to install it into the virtualenv, or
Debian's ``python3-systemd`` outside it), which buys nothing for a dozen lines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
#: systemd reads at most this many bytes of one message (NOTIFY_BUFFER_MAX); STATUS= texts are cut to fit
MAX_MESSAGE = 4096
MAX_STATUS = 200


def socket_address(value: str | None) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value: a path, or ``"\\0name"`` for ``"@name"``.

    ``None`` for an absent, empty or unsupported value (systemd 254's ``vsock:`` addresses included).
    """
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` when the watchdog is meant for process ``pid``, else ``None``.

    ``None`` too when the value is missing, not a positive integer, or ``WATCHDOG_PID`` names
    another process (a child that inherited the environment must not ping for its parent).
    """
    raw = environ.get(ENV_WATCHDOG_USEC, "")
    try:
        usec = int(raw)
    except ValueError:
        if raw:
            log.warning("ignoring %s=%r: not a number of microseconds", ENV_WATCHDOG_USEC, raw)
        return None
    if usec <= 0:
        return None
    target = environ.get(ENV_WATCHDOG_PID, "")
    if target:
        try:
            if int(target) != pid:
                return None
        except ValueError:
            log.warning("ignoring the watchdog: %s=%r is not a pid", ENV_WATCHDOG_PID, target)
            return None
    return usec


def status_text(text: str) -> str:
    """``text`` as one ``STATUS=`` value: one line, at most :data:`MAX_STATUS` characters."""
    one = " ".join(text.split())
    return one if len(one) <= MAX_STATUS else one[: MAX_STATUS - 3] + "..."


class Notifier:
    """Sends notify messages to one address (``None``: every send is a no-op)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False
        self.sent = 0

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """The notifier ``NOTIFY_SOCKET`` asks for; with ``unset``, remove the notify and watchdog
        variables from ``environ`` (``os.environ`` by default) so that child processes (ExaBGP,
        iptables-restore) do not inherit them, as ``sd_notify(unset_environment=1)`` does."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_SOCKET)
        address = socket_address(raw)
        if raw and address is None:
            log.warning("ignoring %s=%r: neither a path nor an abstract socket name (@name)", ENV_SOCKET, raw)
        if unset:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(name, None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one message; True if it was handed to the kernel."""
        if self.address is None or not assignments:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a KEY=VALUE assignment on one line: {a!r}")
        data = "\n".join(assignments).encode()[:MAX_MESSAGE]
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                               | socket.SOCK_NONBLOCK)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                if not self._failing:
                    log.warning("cannot notify the service manager at %s: %s (dropping %s)",
                                self.address.replace("\0", "@"), exc.strerror or exc, assignments[0])
                self._failing = True
                return False
            if self._failing:
                log.info("notifying the service manager works again")
            self._failing = False
            self.sent += 1
            return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
