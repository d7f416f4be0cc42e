"""The systemd units: `systemd-analyze verify` finds nothing (no unknown key, no bad value), and
each unit keeps the promises of docs/install.md: restart always with a pause except on exit code 2
(a configuration that cannot work: tests/daemon/test_config_exit.py), after the network is online,
configuration and environment files, and only the capabilities it needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calyx.config import EXIT_CONFIG

pytestmark = pytest.mark.unit

UNITS = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def _unit(name: str) -> dict[str, dict[str, str]]:
    """Sections of a unit file; a key given several times (Environment=) has its values joined by spaces."""
    out: dict[str, dict[str, str]] = {}
    section: dict[str, str] = {}
    for raw in (UNITS / name).read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("["):
            section = out.setdefault(text.strip("[]"), {})
            continue
        key, _, value = text.partition("=")
        section[key] = f"{section[key]} {value}" if key in section else value
    return out


def _verify(tmp_path: Path, text: str, name: str) -> subprocess.CompletedProcess[str]:
    # point ExecStart at an executable that exists here: verify checks it
    (tmp_path / name).write_text(text.replace("/opt/calyx/bin/", f"{Path(sys.executable).parent}/"))
    return subprocess.run([ANALYZE or "systemd-analyze", "verify", str(tmp_path / name)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["felix.service", "bgpd.service", "calyx-cni.service"])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, name: str) -> None:
    text = (UNITS / name).read_text()
    r = _verify(tmp_path, text, name)
    assert (r.returncode, r.stdout.strip(), r.stderr.strip()) == (0, "", "")
    # and verify does report a mistake on this machine (an unknown key), so the check above means something
    bad = _verify(tmp_path, text.replace("Restart=always", "Restart=always\nRestartSteps=5"), name)
    assert "Unknown key" in bad.stderr
    # and a bad exit status in RestartPreventExitStatus= would be reported too
    bad = _verify(tmp_path, text.replace("RestartPreventExitStatus=2", "RestartPreventExitStatus=two"), name)
    assert "Failed to parse value, ignoring: two" in bad.stderr, bad.stderr


@pytest.mark.parametrize(("name", "daemon", "caps"), [
    ("felix.service", "felix", {"CAP_NET_ADMIN", "CAP_NET_RAW"}),
    ("bgpd.service", "bgpd", {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}),
])
def test_unit_promises(name: str, daemon: str, caps: set[str]) -> None:
    u = _unit(name)
    unit, svc = u["Unit"], u["Service"]
    assert "network-online.target" in unit["After"].split() and "network-online.target" in unit["Wants"].split()
    assert unit["StartLimitIntervalSec"] == "0"
    assert svc["Restart"] == "always" and svc["RestartSec"].rstrip("s").isdigit() and int(svc["RestartSec"][:-1]) >= 1
    assert svc["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]
    assert svc["ExecStart"] == f"/opt/calyx/bin/{daemon} run"
    assert svc["EnvironmentFile"] == "-/etc/calyx/calyx.env"
    assert "CALYX_CONFIG=/etc/calyx/calyx.toml" in svc["Environment"]
    assert set(svc["CapabilityBoundingSet"].split()) == caps
    assert set(svc["AmbientCapabilities"].split()) == caps
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("ProtectKernelModules", "yes"), ("RestrictSUIDSGID", "yes")):
        assert svc[key] == value, key
    assert svc["ProtectSystem"] in ("strict", "full")
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_cni_service_unit() -> None:
    """The CNI service: the capabilities a CNI plugin uses, no private mount namespace (it must see
    the runtimes' netns paths), its socket where the plugins look by default."""
    from calyx.cni import shim

    u = _unit("calyx-cni.service")
    unit, svc = u["Unit"], u["Service"]
    assert "network-online.target" in unit["After"].split() and unit["StartLimitIntervalSec"] == "0"
    assert svc["Restart"] == "always" and svc["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]
    assert svc["ExecStart"].split()[:3] == ["/opt/calyx/bin/calyx-cni-server", "--socket", shim.DEFAULT_SOCKET]
    assert set(svc["CapabilityBoundingSet"].split()) == {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE",
                                                          "CAP_DAC_OVERRIDE"}
    for key in ("ProtectSystem", "PrivateTmp", "PrivateDevices", "ProtectHome", "RestrictNamespaces"):
        assert key not in svc, f"{key} would give the service a private mount namespace or forbid setns"
    assert svc["RuntimeDirectory"] == "calyx" and svc["UMask"] == "0077"
    assert int(svc["TimeoutStopSec"].rstrip("s")) > 30  # the server drains calls for up to 30 s


def test_bgpd_runs_as_a_dedicated_user() -> None:
    svc = _unit("bgpd.service")["Service"]
    assert svc["User"] == "calyx" and svc["ProtectSystem"] == "strict"


def test_example_environment_file_uses_known_keys() -> None:
    from calyx import config

    for raw in (UNITS / "calyx.env").read_text().splitlines():
        line = raw.lstrip("#").strip()
        if not line.startswith("CALYX_") or "=" not in line:
            continue
        var = line.split("=", 1)[0]
        key = var.removeprefix("CALYX_").lower()
        for comp in ("felix_", "bgpd_"):
            key = key.removeprefix(comp)
        assert key in config.FIELDS, f"{var} is not a configuration key"


@pytest.mark.parametrize(("name", "watchdog", "start_timeout"), [
    ("felix.service", "60s", "infinity"),
    ("bgpd.service", "30s", "infinity"),
    ("calyx-cni.service", "30s", None),
])
def test_units_notify_readiness_and_feed_a_watchdog(name: str, watchdog: str, start_timeout: str | None) -> None:
    """Type=notify with a watchdog (the daemons' side: tests/*/test_*liveness.py); only the main
    process may notify, so ExecStart must run the daemon itself, not a shell or a wrapper."""
    svc = _unit(name)["Service"]
    assert (svc["Type"], svc["NotifyAccess"], svc["WatchdogSec"]) == ("notify", "main", watchdog)
    assert svc.get("TimeoutStartSec") == start_timeout
    exe = svc["ExecStart"].split()[0]
    assert exe.startswith("/opt/calyx/bin/") and not any(c in svc["ExecStart"] for c in ";|&$`<>")
    # the console script pip writes runs the daemon in the interpreter it execs: one process
    script = (Path(sys.executable).parent / exe.rsplit("/", 1)[1]).read_text()
    assert script.startswith("#!") and "python" in script.splitlines()[0] and "sys.exit(main())" in script
