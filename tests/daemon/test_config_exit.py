"""A configuration that cannot work ends felix, bgpd and calyx-cni-server with exit code 2 and one
line on stderr naming the key, where it came from and the fix (the units do not restart on 2).

Each daemon runs as a real process (its console script). As root it runs in a network namespace of
its own (``unshare --net``), so that a daemon that wrongly started could not touch this host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

VENV_BIN = Path(sys.executable).parent
UNSHARE = shutil.which("unshare")
DAEMONS = {
    "felix": ["run"],
    "bgpd": ["run"],
    "calyx-cni-server": ["--socket", "{tmp}/cni.sock"],
}
#: the environment variable of a key for one component: CALYX_<COMPONENT>_<KEY>
COMPONENT = {"felix": "FELIX", "bgpd": "BGPD", "calyx-cni-server": "CNI"}


def run_daemon(program: str, tmp_path: Path, toml: str = "", env: dict[str, str] | None = None,
               stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "calyx.toml"
    conf.write_text('etcd_endpoints = ["http://127.0.0.1:9"]\nnode_name = "cfgtest"\n' + toml)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CALYX_") and k != "JOURNAL_STREAM"}
    argv = [str(VENV_BIN / program), *(a.format(tmp=tmp_path) for a in DAEMONS[program])]
    if os.geteuid() == 0 and UNSHARE:
        argv = [UNSHARE, "--net", *argv]
    return subprocess.run(argv, env={**base, "CALYX_CONFIG": str(conf), **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.PIPE,
                          timeout=60, check=False)


def one_line(program: str, r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert lines[0].startswith(f"{program}: configuration error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("program", list(DAEMONS))
def test_unknown_key_in_the_file(program: str, tmp_path: Path) -> None:
    line = one_line(program, run_daemon(program, tmp_path, "[felix]\nnodename = 'x'\n"))
    assert f"{tmp_path}/calyx.toml [felix]: unknown configuration key 'nodename': did you mean 'node_name'?" in line


@pytest.mark.parametrize("program", list(DAEMONS))
def test_tls_file_named_in_the_file_does_not_exist(program: str, tmp_path: Path) -> None:
    line = one_line(program, run_daemon(program, tmp_path, f"etcd_ca = '{tmp_path}/pki/ca.crt'\n"))
    assert f"{tmp_path}/calyx.toml: etcd_ca: file {tmp_path}/pki/ca.crt does not exist: create it" in line


@pytest.mark.parametrize("program", list(DAEMONS))
def test_tls_file_named_in_the_environment_does_not_exist(program: str, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("not used: the certificate is missing first\n")
    r = run_daemon(program, tmp_path, env={"CALYX_ETCD_CERT": "/etc/calyx/pki/nope.crt", "CALYX_ETCD_KEY": str(key)})
    line = one_line(program, r)
    assert "environment variable CALYX_ETCD_CERT: etcd_cert: file /etc/calyx/pki/nope.crt does not exist" in line


@pytest.mark.parametrize("program", list(DAEMONS))
def test_bad_environment_variable(program: str, tmp_path: Path) -> None:
    var = f"CALYX_{COMPONENT[program]}_LOG_FORMAT"
    line = one_line(program, run_daemon(program, tmp_path, env={var: "xml"}))
    assert f"environment variable {var}: invalid value for log_format: expected one of text, json, got 'xml'" in line


@pytest.mark.parametrize("program", list(DAEMONS))
def test_empty_node_name(program: str, tmp_path: Path) -> None:
    line = one_line(program, run_daemon(program, tmp_path, env={"CALYX_NODE_NAME": ""}))
    assert "environment variable CALYX_NODE_NAME: invalid value for node_name: expected a non-empty string" in line


def test_invalid_node_name_in_the_file(tmp_path: Path) -> None:
    line = one_line("felix", run_daemon("felix", tmp_path, "[felix]\nnode_name = 'host 1'\n"))
    assert "[felix]: invalid value for node_name: 'host 1' is not a valid node name" in line


def test_certificate_that_is_not_one(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    key.write_text("garbage\n")
    line = one_line("bgpd", run_daemon("bgpd", tmp_path, f"etcd_cert = '{cert}'\netcd_key = '{key}'\n"))
    assert f"calyx.toml: etcd_cert {cert} and etcd_key {key} are not a PEM certificate and its private key" in line


def test_exabgp_that_cannot_be_found(tmp_path: Path) -> None:
    line = one_line("bgpd", run_daemon("bgpd", tmp_path, "[bgpd]\nexabgp_bin = 'no-such-exabgp'\n"))
    assert "calyx.toml [bgpd]: exabgp_bin: 'no-such-exabgp' is not an executable file" in line


def test_the_line_carries_error_priority_under_journald(tmp_path: Path) -> None:
    """With stderr connected to the journal (JOURNAL_STREAM names it), journald files the line as an error."""
    r_fd, w_fd = os.pipe()
    try:
        st = os.fstat(w_fd)
        r = run_daemon("calyx-cni-server", tmp_path, "nodename = 'x'\n",
                       env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=w_fd)
        os.close(w_fd)
        w_fd = -1
        with os.fdopen(r_fd, errors="replace") as f:
            r_fd = -1
            err = f.read()
    finally:
        for fd in (r_fd, w_fd):
            if fd >= 0:
                os.close(fd)
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("<3>calyx-cni-server: configuration error: "), err
