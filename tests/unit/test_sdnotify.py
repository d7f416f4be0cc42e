"""calyx.sdnotify against real AF_UNIX datagram sockets (a path and an abstract name), read the way
systemd reads them: with the sender's credentials."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from calyx import sdnotify
from tests.fixtures.sdnotify import NotifySocket, abstract_name

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("value", "address"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@calyx/notify", "\0calyx/notify"),
    ("", None),
    (None, None),
    ("@", None),
    ("relative/path", None),
    ("vsock:2:1234", None),
])
def test_socket_address(value: str | None, address: str | None) -> None:
    assert sdnotify.socket_address(value) == address


def test_a_message_reaches_a_path_socket_with_the_senders_pid(notify_socket: NotifySocket) -> None:
    n = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.env})
    assert n.enabled and n.address == notify_socket.address
    assert n.send("READY=1", "STATUS=in sync; 3 endpoints")
    msg = notify_socket.wait_for("READY=1", 5)
    assert msg.fields == ("READY=1", "STATUS=in sync; 3 endpoints")
    assert msg.pid == os.getpid()  # what NotifyAccess=main checks


def test_a_message_reaches_an_abstract_socket() -> None:
    sock = NotifySocket(abstract_name())
    try:
        assert sock.env.startswith("@") and "\0" not in sock.env
        n = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": sock.env})
        assert n.address == sock.address
        assert n.send("WATCHDOG=1")
        assert sock.wait_for("WATCHDOG=1", 5).pid == os.getpid()
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = sdnotify.Notifier.from_environ({})
    assert not n.enabled
    assert n.send("READY=1") is False and n.sent == 0


def test_the_variables_are_removed_so_that_children_do_not_inherit_them(monkeypatch: pytest.MonkeyPatch,
                                                                         notify_socket: NotifySocket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = sdnotify.Notifier.from_environ(unset=True)
    assert n.enabled
    code = "import os; print(sorted(k for k in os.environ if k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "[]"
    assert n.send("READY=1")  # and the notifier still knows where to send
    notify_socket.wait_for("READY=1", 5)


def test_a_failing_send_is_dropped_logged_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    import tempfile

    base = tempfile.mkdtemp(prefix="cxn-", dir="/tmp")
    path = os.path.join(base, "notify")
    n = sdnotify.Notifier(path)  # nobody listens there yet
    with caplog.at_level(logging.INFO, logger="calyx.sdnotify"):
        assert n.send("WATCHDOG=1") is False
        assert n.send("WATCHDOG=1") is False
        sock = NotifySocket(path)
        try:
            assert n.send("WATCHDOG=1") is True
            sock.wait_for("WATCHDOG=1", 5)
        finally:
            sock.close()
            os.rmdir(base)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot notify" in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_receiver_that_never_reads_cannot_block_the_sender() -> None:
    """systemd stuck: its queue fills, and sends fail at once instead of stalling the main loop."""
    name = abstract_name()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(name)
    try:
        n = sdnotify.Notifier(name)
        results = []
        start = time.monotonic()
        for _ in range(10_000):  # a datagram queue holds a few hundred (net.unix.max_dgram_qlen)
            results.append(n.send("WATCHDOG=1"))
            if not results[-1]:
                break
        assert results[0] is True and results[-1] is False, "the queue never filled"
        assert time.monotonic() - start < 30  # it returned: no blocking send (pytest's timeout is the real guard)
    finally:
        receiver.close()


def test_assignments_are_checked() -> None:
    n = sdnotify.Notifier("/nonexistent/notify")
    with pytest.raises(ValueError):
        n.send("READY")
    with pytest.raises(ValueError):
        n.send("STATUS=two\nlines")


@pytest.mark.parametrize(("env", "usec"), [
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "thirty"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_usec(env: dict[str, str], usec: int | None) -> None:
    assert sdnotify.watchdog_usec(env, 4242) == usec


def test_status_text_is_one_short_line() -> None:
    assert sdnotify.status_text("in sync;\n  3 endpoints ") == "in sync; 3 endpoints"
    long = sdnotify.status_text("x" * 1000)
    assert len(long) == sdnotify.MAX_STATUS and long.endswith("...")
