"""felix speaks systemd's notify protocol and answers /livez and /readyz — as a real process in a
network namespace with a real etcd (the lab of test_felix_netns.py, one iptables backend).

felix gets ``NOTIFY_SOCKET`` (a socket this test reads, with the sender's credentials, as systemd
does) and ``WATCHDOG_USEC=2 s`` (a ping every second; /livez's limit 2 s). What must hold:

- ``READY=1`` comes only once felix is in sync with etcd and has programmed the dataplane: not while
  etcd is unreachable, and when it comes the workload routes are already in the kernel;
- ``WATCHDOG=1`` keeps coming, from felix's own pid, while etcd is unreachable too (the loop turns);
- the pings come from the main loop: with only the main thread stopped (ptrace; the process's other
  threads, the HTTP listener among them, keep running) they stop and /livez says 503; with the whole
  process stopped (SIGSTOP) they stop; both times they resume when it runs again;
- /readyz is 503 with the reason while etcd is unreachable (before and after start-up), 200 when in
  sync and programmed; SIGTERM sends ``STOPPING=1``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.felix.test_felix_netns import METRICS_PORT, WORKLOADS, Lab, wait_for
from tests.fixtures.etcd import EtcdMember
from tests.fixtures.netns import netns_session
from tests.fixtures.sdnotify import QUIET, NotifySocket, assert_silent_while_stopped, freeze_main_thread, http_get

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

WATCHDOG_USEC = 2_000_000


@pytest.fixture
def lab(etcd: EtcdMember, tmp_path: Path) -> Iterator[Lab]:
    with netns_session() as make_ns:
        lab = Lab("nft", make_ns, etcd, tmp_path)
        try:
            lab.baseline()
            yield lab
        finally:
            lab.close()


def _start(lab: Lab, sock: NotifySocket) -> int:
    lab.start_felix({"NOTIFY_SOCKET": sock.env, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert lab.felix is not None
    return lab.felix.pid  # `ip netns exec` execs felix: this is felix's pid, as systemd's main pid would be


def _probe(lab: Lab, path: str) -> tuple[int, str]:
    return http_get(METRICS_PORT, path, lab.host.name)


def _wait_http(lab: Lab) -> None:
    def up() -> bool:
        try:
            _probe(lab, "/livez")
        except OSError:
            return False
        return True

    wait_for(up, 20, "felix's metrics listener")


def test_ready_only_once_in_sync_and_programmed(lab: Lab, notify_socket: NotifySocket) -> None:
    sock = notify_socket
    lab.relay.block()  # etcd unreachable from the host namespace
    pid = _start(lab, sock)
    # the loop turns while it waits for the datastore: pings, and a status that says why it is not ready
    sock.wait_count("WATCHDOG=1", 2, 20)
    _wait_http(lab)
    waiting = sock.wait_for("STATUS=not ready: waiting for the datastore (etcd unreachable, or the snapshot is "
                            "loading)", 10)
    time.sleep(QUIET)
    assert not sock.with_field("READY=1"), sock.summary()
    assert {m.pid for m in sock.messages()} == {pid}  # every message from the main pid (NotifyAccess=main)
    assert waiting.get("STATUS") is not None
    assert _probe(lab, "/livez")[0] == 200
    status, body = _probe(lab, "/readyz")
    assert (status, body) == (503, "waiting for the datastore (etcd unreachable, or the snapshot is loading)\n")
    assert not lab.route_dsts() & set(WORKLOADS.values())  # nothing programmed before in sync
    # etcd answers: READY=1 once the dataplane is programmed
    lab.relay.unblock()
    ready = sock.wait_for("READY=1", 30, alive=lab.felix_alive)
    routes = lab.route_dsts()  # read right after READY=1 arrived: programmed before it was sent
    assert set(WORKLOADS.values()) <= routes, (routes, lab.log()[-2000:])
    programming = sock.wait_for("STATUS=not ready: in sync with the datastore; programming the dataplane", 1)
    assert programming.at <= ready.at and sock.messages().index(programming) < sock.messages().index(ready)
    assert ready.pid == pid
    assert ready.get("STATUS") == "in sync; dataplane programmed for 3 local endpoints"
    assert _probe(lab, "/readyz") == (200, "ok: in sync; dataplane programmed for 3 local endpoints\n")
    assert lab.ping("w1", WORKLOADS["w2"])
    # etcd lost after start-up: not ready (with the reason), then ready again; READY=1 is not repeated
    lost = time.monotonic()
    lab.relay.block()
    wait_for(lambda: _probe(lab, "/readyz")[0] == 503, 15, "/readyz 503 while etcd is unreachable")
    assert _probe(lab, "/readyz")[1].startswith("datastore not in sync")
    assert sock.wait_for("STATUS=not ready: datastore not in sync (etcd unreachable, or a snapshot is loading)",
                         10, since=lost)
    assert _probe(lab, "/livez")[0] == 200
    assert lab.ping("w1", WORKLOADS["w2"])  # the dataplane keeps its last state
    lab.relay.unblock()
    wait_for(lambda: _probe(lab, "/readyz")[0] == 200, 30, "/readyz 200 with etcd back")
    assert len(sock.with_field("READY=1")) == 1
    # a graceful stop says so
    lab.stop_felix(signal.SIGTERM)
    stopping = sock.wait_for("STOPPING=1", 5)
    assert stopping.pid == pid


def test_watchdog_pings_come_from_the_main_loop(lab: Lab, notify_socket: NotifySocket) -> None:
    sock = notify_socket
    pid = _start(lab, sock)
    sock.wait_for("READY=1", 30, alive=lab.felix_alive)
    _wait_http(lab)
    # steady pings, about every second (WATCHDOG_USEC / 2); counted, not timed
    start = time.monotonic()
    time.sleep(QUIET)
    assert len([m for m in sock.with_field("WATCHDOG=1", since=start) if m.pid == pid]) >= 2, sock.summary()

    # only the main thread stopped: the HTTP listener still answers, and says the loop is stuck
    with freeze_main_thread(pid):
        frozen = time.monotonic()
        assert lab.felix_alive()
        wait_for(lambda: _probe(lab, "/livez")[0] == 503, 10, "/livez 503 with the main loop stopped")
        status, body = _probe(lab, "/livez")
        assert status == 503 and body.startswith("main loop has not turned for"), body
        assert body.rstrip().endswith("(limit 2 s)"), body
        assert _probe(lab, "/readyz")[0] == 503
        time.sleep(max(0.0, frozen + QUIET - time.monotonic()))
        # a ping already on its way when the thread stopped may be read just after
        assert not sock.with_field("WATCHDOG=1", since=frozen + 0.5), sock.summary()
    resumed = time.monotonic()
    sock.wait_for("WATCHDOG=1", 10, since=resumed)
    wait_for(lambda: _probe(lab, "/livez")[0] == 200, 10, "/livez 200 again")
    assert _probe(lab, "/readyz")[0] == 200

    # the whole process stopped, as SIGSTOP does
    assert_silent_while_stopped(sock, pid)
    assert lab.felix_alive() and lab.ping("w1", WORKLOADS["w2"])
