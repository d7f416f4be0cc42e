"""calyx.health: the watchdog interval and the heartbeat (with a clock the test moves), readiness and
what systemd hears of it (on a real notify socket), and /livez, /readyz, /metrics on a real listener."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator

import pytest
from prometheus_client import Counter, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from calyx import health, sdnotify
from tests.fixtures.sdnotify import NotifySocket

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _health(sock: NotifySocket | None, usec: int | None) -> tuple[health.Health, Clock]:
    clock = Clock()
    notifier = sdnotify.Notifier(sock.address if sock is not None else None)
    return health.Health(notifier, usec, clock=clock), clock


def test_pings_every_half_of_watchdog_usec_and_only_from_beats(notify_socket: NotifySocket) -> None:
    h, clock = _health(notify_socket, 2_000_000)  # WATCHDOG_USEC=2 s: a ping every second
    assert h.ping_interval == 1.0 and h.stall_limit == 2.0
    assert h.next_turn() == 0.0  # the first turn pings at once
    h.beat()
    assert h.pings == 1
    clock.now += 0.4
    h.beat()  # a busy loop turns often; that alone sends nothing
    assert h.pings == 1
    assert h.next_turn() == pytest.approx(0.6)  # the loop must turn again when the next ping is due
    clock.now += 0.57  # 0.97 s after the first ping: within 5 %, sent now rather than after another short turn
    h.beat()
    assert h.pings == 2
    clock.now += 5.0  # the loop did not turn for 5 s: no ping went out meanwhile (nothing sends but beat)
    assert h.pings == 2
    h.beat()
    assert h.pings == 3
    pings = notify_socket.wait_count("WATCHDOG=1", 3, 5)
    assert len(pings) == 3 and all(m.fields == ("WATCHDOG=1",) and m.pid == os.getpid() for m in pings)


def test_without_a_watchdog_no_pings_and_the_loop_turns_a_third_of_the_stall_limit(
        notify_socket: NotifySocket) -> None:
    h, clock = _health(notify_socket, None)
    assert h.ping_interval is None and h.stall_limit == health.STALL_LIMIT
    h.beat()
    assert h.next_turn() == pytest.approx(health.STALL_LIMIT / 3)
    clock.now += 5
    assert h.next_turn() == pytest.approx(health.STALL_LIMIT / 3 - 5)
    clock.now += 100
    assert h.next_turn() == 0.0
    h.beat()
    assert h.pings == 0 and notify_socket.messages() == []


def test_from_environ_honours_watchdog_pid(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    h = health.Health.from_environ(env, pid=4242)
    assert h.ping_interval is None and h.notifier.enabled  # notify yes, watchdog not for us
    assert env == {}  # removed for the children
    env = {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "4242"}
    assert health.Health.from_environ(env, pid=4242).ping_interval == 2.0


def test_livez_follows_the_turns() -> None:
    h, clock = _health(None, 2_000_000)
    h.beat()
    clock.now += 1.9
    assert h.livez()[0]
    clock.now += 0.2
    ok, why = h.livez()
    assert not ok and "has not turned for 2.1 s (limit 2 s)" in why
    assert h.readyz() == (False, why)  # a stuck loop is not ready whatever it said last
    h.beat()
    assert h.livez()[0]


def test_ready_once_status_on_change_and_stopping(notify_socket: NotifySocket) -> None:
    h, _ = _health(notify_socket, None)
    assert h.readyz() == (False, "starting") and not h.started
    h.set_not_ready("waiting for the datastore")
    h.set_not_ready("waiting for the datastore")  # unchanged: nothing sent
    h.set_not_ready("programming", started=False)
    h.set_not_ready("the last apply left 1 error(s)", started=True)  # start-up complete although not ready
    h.set_ready("in sync; 3 endpoints")
    h.set_not_ready("datastore not in sync", started=False)  # later: READY=1 is not taken back, nor resent
    h.set_ready("in sync; 3 endpoints")
    assert h.readyz() == (True, "in sync; 3 endpoints") and h.started
    h.stopping()
    assert h.readyz() == (False, "stopping")
    want = [
        ("STATUS=not ready: waiting for the datastore",),
        ("STATUS=not ready: programming",),
        ("READY=1", "STATUS=not ready: the last apply left 1 error(s)"),
        ("STATUS=in sync; 3 endpoints",),
        ("STATUS=not ready: datastore not in sync",),
        ("STATUS=in sync; 3 endpoints",),
        ("STOPPING=1", "STATUS=stopping"),
    ]
    notify_socket.wait_for("STOPPING=1", 5)
    assert [m.fields for m in notify_socket.messages()] == want


# --- HTTP --------------------------------------------------------------------------------------------

PROBE = Counter("calyx_test_health_probe", "A counter only this test module registers")


@pytest.fixture
def served() -> Iterator[tuple[health.Health, Clock, int]]:
    h, clock = _health(None, 2_000_000)
    httpd = health.serve("127.0.0.1", 0, h)
    try:
        yield h, clock, httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()


def _get(port: int, path: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_livez_and_readyz_answer_200_or_503_with_the_reason(served: tuple[health.Health, Clock, int]) -> None:
    h, clock, port = served
    h.beat()
    assert _get(port, "/livez")[:2] == (200, "ok: main loop turned 0.0 s ago\n")
    status, body, headers = _get(port, "/readyz")
    assert (status, body) == (503, "starting\n") and headers["content-type"] == "text/plain; charset=utf-8"
    h.set_not_ready("waiting for the datastore")
    assert _get(port, "/readyz")[:2] == (503, "waiting for the datastore\n")
    h.set_ready("in sync")
    assert _get(port, "/readyz")[:2] == (200, "ok: in sync\n")
    clock.now += 3  # the loop stopped turning: both fail, and say why
    assert _get(port, "/livez")[:2] == (503, "main loop has not turned for 3.0 s (limit 2 s)\n")
    assert _get(port, "/readyz")[:2] == (503, "main loop has not turned for 3.0 s (limit 2 s)\n")
    h.beat()
    assert _get(port, "/readyz")[0] == 200
    assert _get(port, "/readyz", "HEAD")[:2] == (200, "")
    assert _get(port, "/livez", "POST")[0] == 405


def test_metrics_are_served_as_before(served: tuple[health.Health, Clock, int]) -> None:
    """/metrics (and any other path, as prometheus_client allows) answers what prometheus_client's own
    server answers, content negotiation included."""
    _h, _clock, port = served
    PROBE.inc(3)
    theirs, _thread = start_http_server(0, addr="127.0.0.1")
    try:
        for accept in (None, "application/openmetrics-text; version=1.0.0"):
            ours_resp = _get(port, "/metrics", accept=accept)
            their_resp = _get(theirs.server_port, "/metrics", accept=accept)
            assert ours_resp[0] == their_resp[0] == 200
            assert ours_resp[2]["content-type"] == their_resp[2]["content-type"]
            if accept is None:
                ours = {f.name: f for f in text_string_to_metric_families(ours_resp[1])}
                assert set(ours) == {f.name for f in text_string_to_metric_families(their_resp[1])}
                assert ours["calyx_test_health_probe"].samples[0].value == 3.0
            else:
                assert ours_resp[1].endswith("# EOF\n")
        assert _get(port, "/anything")[1].startswith("# HELP")
    finally:
        theirs.shutdown()
        theirs.server_close()
