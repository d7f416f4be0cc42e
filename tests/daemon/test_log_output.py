"""A real daemon's log lines: calyx-cni-server (the cheapest Calyx daemon to run: no root, no etcd,
no kernel changes) started as its unit starts it, made to log INFO and a WARNING (a request that
is not a CNI call), then stopped with SIGTERM. JSON lines parse and carry their fields; under
journald (JOURNAL_STREAM naming its stderr) every line carries its priority and no timestamp."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calyx.cni import shim

pytestmark = pytest.mark.unit

SERVER = Path(sys.executable).parent / "calyx-cni-server"


def run_server(tmp_path: Path, env: dict[str, str], toml: str = "") -> str:
    """Start the service, send it a request that is not ours, stop it; return what it wrote on stderr."""
    conf = tmp_path / "calyx.toml"
    conf.write_text('node_name = "log-node"\n' + toml)
    sock = tmp_path / "cni.sock"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CALYX_") and k != "JOURNAL_STREAM"}
    r_fd, w_fd = os.pipe()
    st = os.fstat(w_fd)
    env = {k: v.replace("{pipe}", f"{st.st_dev}:{st.st_ino}") for k, v in env.items()}
    try:
        proc = subprocess.Popen([str(SERVER), "--socket", str(sock)], stdout=subprocess.DEVNULL, stderr=w_fd,
                                env={**base, "CALYX_CONFIG": str(conf), **env})
        os.close(w_fd)
        w_fd = -1
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "calyx-cni-server did not start"
                time.sleep(0.05)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(10)
                c.connect(str(sock))
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                c.shutdown(socket.SHUT_WR)
                assert c.recv(100) == shim.REFUSED
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with os.fdopen(r_fd, errors="replace") as f:
            r_fd = -1
            return f.read()
    finally:
        for fd in (r_fd, w_fd):
            if fd >= 0:
                os.close(fd)


def test_json_lines_from_a_real_daemon(tmp_path: Path) -> None:
    out = run_server(tmp_path, {"CALYX_LOG_FORMAT": "json"})
    objs = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    assert len(objs) >= 4, out
    for o in objs:
        assert list(o)[:6] == ["ts", "level", "component", "node", "logger", "msg"], o
        assert o["component"] == "calyx-cni-server" and o["node"] == "log-node"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", o["ts"]), o
    msgs = [(o["level"], o["msg"]) for o in objs]
    assert ("info", f"serving CNI calls on {tmp_path}/cni.sock") in msgs
    refused = [o for o in objs if o["msg"].startswith("refused a call")]
    assert len(refused) == 1 and refused[0]["level"] == "warning" and refused[0]["logger"] == "calyx.cni.server"
    assert refused[0]["caller_pid"] == os.getpid()  # structured context, as a field
    assert objs[-1]["msg"] == "stopped after 0 calls"


def test_json_wins_from_the_environment_over_the_file(tmp_path: Path) -> None:
    out = run_server(tmp_path, {"CALYX_CNI_LOG_FORMAT": "json"}, toml='log_format = "text"\n')
    assert out and all(json.loads(line)["component"] == "calyx-cni-server" for line in out.splitlines())
    text = run_server(tmp_path, {}, toml='log_format = "text"\n')
    assert text and not text.startswith("{")


def test_journal_lines_from_a_real_daemon(tmp_path: Path) -> None:
    out = run_server(tmp_path, {"JOURNAL_STREAM": "{pipe}"})
    lines = out.splitlines()
    assert lines and all(re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", x) for x in lines), out
    assert f"<6>INFO calyx.cni.server: serving CNI calls on {tmp_path}/cni.sock" in lines
    warning = [x for x in lines if "refused a call" in x]
    assert len(warning) == 1 and warning[0].startswith("<4>WARNING calyx.cni.server: refused a call: ")
    assert warning[0].endswith(f" caller_pid={os.getpid()}")
    assert not any(re.search(r"\d{4}-\d\d-\d\d", x) or "calyx-cni-server[" in x for x in lines), out


def test_plain_text_when_journal_stream_names_another_stream(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited from a unit, stderr redirected elsewhere: the ordinary format."""
    out = run_server(tmp_path, {"JOURNAL_STREAM": "1:1"})
    lines = out.splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} calyx-cni-server\[\d+\] [A-Z]+ ", x)
                         for x in lines), out


@pytest.mark.privileged
@pytest.mark.parametrize("daemon", ["felix", "bgpd"])
def test_felix_and_bgpd_write_json_lines(daemon: str, tmp_path: Path) -> None:
    """felix and bgpd, each in a network namespace of its own (unshare --net: nothing on this host is
    touched) with an etcd that does not answer: they log in JSON, including the syncer's warning."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed")
    conf = tmp_path / "calyx.toml"
    conf.write_text(f'node_name = "json-{daemon}"\netcd_endpoints = ["http://127.0.0.1:9"]\netcd_timeout = 1\n'
                    f'metrics_port = 0\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("CALYX_") and k != "JOURNAL_STREAM"}
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        proc = subprocess.Popen([unshare, "--net", str(Path(sys.executable).parent / daemon), "run"],
                                stdout=subprocess.DEVNULL, stderr=f,
                                env={**base, "CALYX_CONFIG": str(conf), "CALYX_LOG_FORMAT": "json"})
    try:
        deadline = time.monotonic() + 60
        while "datastore unavailable" not in err.read_text(errors="replace"):
            assert proc.poll() is None, err.read_text(errors="replace")
            assert time.monotonic() < deadline, err.read_text(errors="replace")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    objs = [json.loads(line) for line in err.read_text().splitlines()]
    assert all(o["component"] == daemon and o["node"] == f"json-{daemon}" for o in objs), objs
    warn = [o for o in objs if "datastore unavailable" in o["msg"]]
    assert warn and warn[0]["level"] == "warning" and warn[0]["logger"] == "calyx.datastore.syncer"
    assert any(o["msg"] == "SIGTERM: shutting down" for o in objs), objs
