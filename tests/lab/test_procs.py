"""The lab's process handling: start in the background with a log, recognise a process by pid and
start time, and stop a daemon together with its children (as systemd's KillMode=mixed does)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from calyx.lab import procs

pytestmark = pytest.mark.unit


def test_spawn_logs_and_stop_unit_takes_the_children(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    p = procs.spawn("d", ["sh", "-c", "echo started; sleep 300 & sleep 300 & wait"], log=log)
    deadline = time.monotonic() + 5
    while len(procs.session_members(p.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    members = procs.session_members(p.pid)
    assert {m.pid for m in members} >= {p.pid} and len(members) == 3
    assert p.alive
    procs.stop_unit(p, kill=True)
    assert [m for m in members if m.alive] == []  # the main process is one of them
    assert "started" in log.read_text() and "start: sh -c" in log.read_text()


def test_a_recycled_pid_is_not_the_process(tmp_path: Path) -> None:
    p = procs.spawn("d", ["sleep", "300"], log=tmp_path / "x.log")
    other = procs.Proc("d", None, p.pid, p.start_time + 1, "", ())
    assert p.alive and not other.alive
    assert not procs.signal_proc(other, signal.SIGKILL)
    assert p.alive
    procs.stop([p])
    assert not p.alive


def test_tail_of_a_missing_log() -> None:
    assert "does not exist" in procs.tail("/nonexistent/log")
