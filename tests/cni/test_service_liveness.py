"""calyx-cni-server speaks systemd's notify protocol and answers /livez and /readyz — a real service
process, its notify socket an abstract one (``NOTIFY_SOCKET=@…``, as systemd may give), read with the
sender's credentials as systemd reads it.

What must hold: ``READY=1`` once it listens (its socket accepts a connection when the message is
read); ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from its pid, none when ``WATCHDOG_PID`` names
another process; the pings stop while the accept loop is stopped (its thread alone: /livez 503 from
the still-running listener thread; or the whole process, SIGSTOP) and resume after; SIGTERM sends
``STOPPING=1`` and it exits 0.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.cni import CniService
from tests.fixtures.etcd import free_ports
from tests.fixtures.routers import wait_for
from tests.fixtures.sdnotify import (
    QUIET,
    NotifySocket,
    abstract_name,
    assert_silent_while_stopped,
    freeze_main_thread,
    http_get,
)

WATCHDOG_USEC = 2_000_000


@pytest.fixture
def service() -> Iterator[tuple[CniService, NotifySocket, int, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="cxs-", dir="/tmp"))  # short: unix socket paths are limited
    (root / "calyx.toml").write_text("")
    sock = NotifySocket(abstract_name())
    svc = CniService(root)
    port = free_ports(1)[0]
    env = {"CALYX_CONFIG": str(root / "calyx.toml"), "NOTIFY_SOCKET": sock.env, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        yield svc, sock, port, env
    finally:
        svc.stop(signal.SIGKILL)
        sock.close()
        shutil.rmtree(root, ignore_errors=True)


def test_ready_once_listening_then_pings_from_the_accept_loop(
        service: tuple[CniService, NotifySocket, int, dict[str, str]]) -> None:
    svc, sock, port, env = service
    svc.start("--metrics-port", str(port), env=env)
    assert svc.proc is not None
    pid = svc.proc.pid
    ready = sock.wait_for("READY=1", 20)
    assert svc.listening()
    assert ready.pid == pid and ready.get("STATUS") == f"listening on {svc.socket}"
    assert http_get(port, "/readyz") == (200, f"ok: listening on {svc.socket}\n")
    assert http_get(port, "/livez")[0] == 200
    assert http_get(port, "/metrics")[1].startswith("# HELP")
    start = time.monotonic()
    time.sleep(QUIET)
    assert len([m for m in sock.with_field("WATCHDOG=1", since=start) if m.pid == pid]) >= 2, sock.summary()

    with freeze_main_thread(pid):  # the accept loop stopped; the HTTP listener's threads run on
        frozen = time.monotonic()
        wait_for(lambda: http_get(port, "/livez")[0] == 503, 10, "/livez 503 with the accept loop stopped")
        assert http_get(port, "/readyz")[1].startswith("main loop has not turned for")
        time.sleep(max(0.0, frozen + QUIET - time.monotonic()))
        assert not sock.with_field("WATCHDOG=1", since=frozen + 0.5), sock.summary()
    sock.wait_for("WATCHDOG=1", 10, since=time.monotonic())
    wait_for(lambda: http_get(port, "/livez")[0] == 200, 10, "/livez 200 again")

    assert_silent_while_stopped(sock, pid)
    assert svc.listening()

    assert svc.stop(signal.SIGTERM) == 0
    assert sock.wait_for("STOPPING=1", 5).pid == pid
    assert {m.pid for m in sock.messages()} == {pid}


def test_no_pings_when_the_watchdog_is_meant_for_another_process(
        service: tuple[CniService, NotifySocket, int, dict[str, str]]) -> None:
    svc, sock, _port, env = service
    svc.start(env={**env, "WATCHDOG_PID": "1"})
    sock.wait_for("READY=1", 20)
    time.sleep(QUIET)
    assert not sock.with_field("WATCHDOG=1"), sock.summary()
