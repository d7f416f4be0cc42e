"""The forwarding client (calyx.cni.shim) and the service's request handling, without a datastore.

The executables are run as real processes against small fake services (a listener that breaks off,
one that refuses) and against :class:`calyx.cni.server.Server` with fake plugins, so the fallback,
the error answers and the isolation of concurrent calls are checked byte for byte.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from calyx.cni import server, shim, spec

VENV_BIN = Path(sys.executable).parent


def _run_calyx(sock: str, stdin: bytes, command: str = "VERSION", **env: str) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CALYX_"))}
    e.update(CNI_COMMAND=command, CALYX_CNI_SOCKET=sock, **env)
    return subprocess.run([str(VENV_BIN / "calyx")], input=stdin, env=e, capture_output=True, timeout=30, check=False)


@pytest.mark.unit
def test_request_and_answer_frames_round_trip() -> None:
    env = {b"CNI_COMMAND": b"ADD", b"CNI_ARGS": b"A=1;B=x=y", b"ODD": b"\xff\xfe", b"EMPTY": b""}
    req = shim.encode_request("calyx", env, b'{"cniVersion": "1.0.0"}')
    plugin, environ, stdin = server.parse_request(req)
    assert plugin == "calyx" and stdin == b'{"cniVersion": "1.0.0"}'
    assert {os.fsencode(k): os.fsencode(v) for k, v in environ.items()} == env
    ans = server.encode_answer(-3, b"out\n", b"err")
    assert shim.decode_answer(ans) == (-3, b"out\n", b"err")
    assert server.parse_request(shim.encode_request("calyx-ipam", {}, b"")) == ("calyx-ipam", {}, b"")


@pytest.mark.unit
@pytest.mark.parametrize("data", [b"", b"GET / HTTP/1.0\r\n", shim.MAGIC + b"\x00\x00",
                                  shim.MAGIC + b"\x00\x00\x00\x09ab",
                                  shim.MAGIC + shim._frame([b"calyx", b"NOEQUALS", b""]),
                                  shim.MAGIC + shim._frame([b"calyx", b"", b""]) + b"x"])
def test_malformed_requests_are_refused_not_run(data: bytes) -> None:
    with pytest.raises(server.BadRequestError):
        server.parse_request(data)


@pytest.mark.unit
def test_malformed_answers_are_errors() -> None:
    for data in (b"", b"hello", shim.MAGIC + b"\x00"):
        with pytest.raises(ValueError):
            shim.decode_answer(data)
    code, out, _ = shim._try_again('service at /run/"x"\\y broke off')
    doc = json.loads(out)
    assert code == 1 and doc["code"] == spec.TRY_AGAIN_LATER and '"' not in doc["msg"]


class FakeService:
    """A listener that does ``behaviour(conn)`` with every connection."""

    def __init__(self, path: Path, behaviour: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.behaviour = behaviour
        self.connections = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self.behaviour(conn)

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.unit
def test_a_service_that_breaks_off_gets_try_again_and_the_call_is_not_run_twice(tmp_path: Path) -> None:
    svc = FakeService(tmp_path / "s", lambda conn: (_read_request(conn), None)[1])
    try:
        proc = _run_calyx(str(tmp_path / "s"), b'{"cniVersion": "1.0.0"}')
    finally:
        svc.close()
    assert svc.connections == 1
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["code"] == spec.TRY_AGAIN_LATER and "broke off" in doc["msg"]


@pytest.mark.unit
def test_a_refusing_service_means_the_plugin_runs_the_call_itself(tmp_path: Path) -> None:
    svc = FakeService(tmp_path / "s", lambda conn: (_read_request(conn), conn.sendall(shim.REFUSED))[1])
    try:
        proc = _run_calyx(str(tmp_path / "s"), b'{"cniVersion": "0.4.0"}')
    finally:
        svc.close()
    assert svc.connections == 1
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


@pytest.mark.unit
@pytest.mark.parametrize("where", ["missing", "stale", "off"])
def test_no_service_means_in_process(tmp_path: Path, where: str) -> None:
    path = tmp_path / "s"
    if where == "stale":  # a socket file nobody listens on (a killed service)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
    proc = _run_calyx("off" if where == "off" else str(path), b"{not json", command="ADD")
    # the plugin's own answer to bad stdin: code 6, from this process
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == spec.DECODING_FAILURE


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[Path, server.Server]]:
    calls: list[Mapping[str, str]] = []

    def fake(environ: Mapping[str, str], stdin: bytes) -> int:
        calls.append(environ)
        if environ.get("FAIL") == "exit":
            spec.fail(spec.CNIError(spec.IO_FAILURE, "exits"), "1.0.0")
        time.sleep(float(environ.get("DELAY", "0")))
        spec.write_json({"tag": environ["TAG"], "stdin": stdin.decode(), "env_seen": spec.caller_environ()["TAG"],
                         "netns": os.readlink("/proc/thread-self/ns/net")})
        print(f"stderr of {environ['TAG']}", file=spec.stderr())
        return int(environ.get("EXIT", "0"))

    path = tmp_path / "cni.sock"
    srv = server.Server(str(path), max_calls=4, runners={"calyx": fake})
    srv.bind()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield path, srv
    finally:
        srv.stop(timeout=10)
        t.join(10)


@pytest.mark.privileged
def test_concurrent_calls_keep_their_own_output_environment_and_exit_code(
        live_server: tuple[Path, server.Server]) -> None:
    path, srv = live_server
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    procs = []
    for i in range(12):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CALYX_"))}
        e.update(CNI_COMMAND="ADD", CALYX_CNI_SOCKET=str(path), TAG=f"t{i}", DELAY="0.2", EXIT=str(i % 3))
        procs.append(subprocess.Popen([str(VENV_BIN / "calyx")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=e))
    my_ns = os.readlink("/proc/self/ns/net")
    for i, p in enumerate(procs):
        out, err = p.communicate(f"in{i}".encode(), timeout=30)
        assert p.returncode == i % 3
        doc = json.loads(out)
        assert doc == {"tag": f"t{i}", "stdin": f"in{i}", "env_seen": f"t{i}", "netns": my_ns}
        assert err.decode().strip() == f"stderr of t{i}"
    assert srv.calls == 12


@pytest.mark.privileged
def test_the_call_runs_in_the_callers_network_namespace(live_server: tuple[Path, server.Server],
                                                        netns: Callable[[], object]) -> None:
    path, _ = live_server
    ns = netns()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CALYX_"))}
    e.update(CNI_COMMAND="ADD", CALYX_CNI_SOCKET=str(path), TAG="ns")
    proc = subprocess.run(["nsenter", f"--net={ns.path}", str(VENV_BIN / "calyx")],  # type: ignore[attr-defined]
                          input=b"x", env=e, capture_output=True, timeout=30, check=True)
    theirs = subprocess.run(["nsenter", f"--net={ns.path}", "readlink", "/proc/self/ns/net"],  # type: ignore[attr-defined]
                            capture_output=True, text=True, check=True).stdout.strip()
    assert json.loads(proc.stdout)["netns"] == theirs != os.readlink("/proc/self/ns/net")
    # and the service's own thread came back to its namespace
    assert os.readlink("/proc/self/ns/net") != theirs


@pytest.mark.privileged
def test_a_second_service_on_a_live_socket_refuses_to_start(live_server: tuple[Path, server.Server]) -> None:
    path, _ = live_server
    with pytest.raises(SystemExit, match="another service"):
        server.Server(str(path)).bind()


@pytest.mark.privileged
def test_a_call_that_exits_is_still_answered(live_server: tuple[Path, server.Server]) -> None:
    path, srv = live_server
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CALYX_"))}
    e.update(CNI_COMMAND="ADD", CALYX_CNI_SOCKET=str(path), TAG="x", FAIL="exit")
    proc = subprocess.run([str(VENV_BIN / "calyx")], input=b"", env=e, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == spec.IO_FAILURE
    assert srv.calls == 1
