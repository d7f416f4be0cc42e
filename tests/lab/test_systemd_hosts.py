"""two-racks with hosts that boot systemd (``--hosts systemd``): the Debian package built from this
checkout, installed in a Debian 12 root, booted with systemd-nspawn in each host's namespace; felix,
bgpd and the CNI service run as the package's units. What systemd itself does is read from systemd
(``systemctl show``, ``journalctl``), never from the unit files:

- every unit active on every host, a full ping matrix across the racks, the tenant-isolation policy
  isolating (iptables and ipsets programmed under the units' hardening);
- ``kill -9`` of felix, bgpd or the CNI service: systemd restarts it (NRestarts + 1, a new main pid)
  and nothing is lost for good (the matrix is full again; a cross-rack ping through it is reported);
- a configuration that cannot work ends the unit: exit status 2, ``failed``, no restart, the one
  line in ``systemctl status``; fixed and started again, it runs;
- journald gets the daemons' priorities: a warning felix is made to log is in ``journalctl -p
  warning``; a CNI ADD on a quiet host logs no warning;
- ``lab down`` leaves no namespace, machine or cgroup behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calyx.datastore import keys
from calyx.lab import fabric, sdhosts
from calyx.lab.runner import Lab, ping_counts
from calyx.lab.topology import Workload, resolve
from tests.lab.conftest import instance_name, wait_until

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def racks(tmp_path_factory: pytest.TempPathFactory, calyx_deb: Path) -> Iterator[Lab]:
    missing = sdhosts.missing_tools()
    if missing:
        pytest.fail(f"systemd hosts need: {', '.join(missing)} (scripts/setup.sh installs them)")
    lab = Lab.create(resolve("two-racks"), instance=instance_name("s"), root=tmp_path_factory.mktemp("labs"))
    try:
        lab.up(hosts="systemd", deb=calyx_deb)
        yield lab
    finally:
        if lab.owned:
            lab.down()
        assert fabric.list_netns(lab.state.prefix) == []
        for h in lab.topo.hosts:
            assert not any(d.exists() for d in sdhosts.cgroup_dirs(lab.ns(h.name))), f"cgroups of {h.name} left"
            assert lab.proc(f"{h.name}/machine") is None or not lab.proc(f"{h.name}/machine").alive  # type: ignore[union-attr]


def _all_reach(lab: Lab) -> bool:
    return all(lab.ping_matrix().values())


def _show(lab: Lab, host: str, unit: str) -> dict[str, str]:
    out = lab.run(host, ["systemctl", "show", unit, "-p", "ActiveState,SubState,Result,NRestarts,MainPID,"
                         "ExecMainStatus"], check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _ip(lab: Lab, wl: str) -> str:
    ip = lab.state.workloads[wl].ip
    assert ip is not None
    return ip


def test_units_active_and_a_full_matrix(racks: Lab) -> None:
    for h in racks.topo.hosts:
        assert racks.unit_states(h.name) == {"felix.service": "active", "bgpd.service": "active",
                                             "calyx-cni.service": "active"}
        # the package's files, as an operator has them
        assert racks.run(h.name, ["test", "-x", "/opt/calyx/bin/felix"]).returncode == 0
        assert racks.run(h.name, ["test", "-x", "/opt/cni/bin/calyx"]).returncode == 0
        assert racks.run(h.name, ["id", "calyx"]).returncode == 0
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix across the racks")
    assert len(racks.state.workloads) == 8
    # on the host, calyxctl with no flags: /etc/calyx/calyx.toml and calyx.env, as the units read them
    status = racks.run("h1a", ["calyxctl", "node", "status"])
    assert status.returncode == 0, status.stdout + status.stderr
    assert "h1a" in status.stdout and "10.0.1.1" in status.stdout, status.stdout
    # bgpd's routes (h1b's block, reflected by the ToR, via h1b itself) and felix's in a host's
    # kernel, under the protocol names the package installs
    def protocols() -> set[str | None]:
        routes = json.loads(racks.run("h1a", ["ip", "-j", "route", "show"], check=True).stdout)
        return {r.get("protocol") for r in routes}

    wait_until(lambda: {"calyx-bgpd", "calyx-felix"} <= protocols(), 30,
               "routes of protocols calyx-bgpd and calyx-felix on h1a")


def test_tenant_isolation(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    policy = racks.topo.policies["tenant-isolation"]
    cross = [(a, b) for a in racks.state.workloads for b in racks.state.workloads
             if a != b and a[0] != b[0]]  # "a-…" ↔ "b-…"
    same = [(a, b) for a in racks.state.workloads for b in racks.state.workloads if a != b and a[0] == b[0]]
    racks.apply_file(policy)
    try:
        wait_until(lambda: not any(racks.ping_pairs(cross, timeout=0.5).values()), 30,
                   "tenant a cut off from tenant b on every host")
        assert all(racks.ping_pairs(same).values()), "a tenant's own workloads must still reach each other"
    finally:
        racks.delete_objects(policy)
    wait_until(lambda: _all_reach(racks), 30, "tenants reaching each other again")


@pytest.mark.parametrize("unit", ["felix.service", "bgpd.service", "calyx-cni.service"])
def test_kill_9_is_restarted_by_systemd(racks: Lab, unit: str) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    before = _show(racks, "h2a", unit)
    assert before["ActiveState"] == "active" and int(before["MainPID"]) > 0, before
    ping = racks.start_ping("a-h1a", _ip(racks, "a-h2a"), seconds=10, interval=0.05)
    time.sleep(1.0)
    racks.run("h2a", ["kill", "-9", before["MainPID"]], check=True)

    def restarted() -> dict[str, str] | None:
        now = _show(racks, "h2a", unit)
        ok = (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
              and int(now["NRestarts"]) == int(before["NRestarts"]) + 1)
        return now if ok else None

    wait_until(restarted, 30, f"systemd restarting {unit} after kill -9")
    racks.wait_ready(["h2a"], timeout=60)
    sent, received = ping_counts(ping)
    print(f"kill -9 of {unit} on h2a: {received}/{sent} cross-rack pings answered")
    wait_until(lambda: _all_reach(racks), 30, f"a full ping matrix after {unit} came back")
    # a CNI call after the service's restart goes through it again
    if unit == "calyx-cni.service":
        ws = racks.add_workload(Workload("c-h2a", "h2a", labels={"tenant": "a"}, profiles=("lab",)))
        try:
            wait_until(lambda: racks.ping("a-h1a", ws.ip or "", timeout=1), 30, "the new workload reachable")
        finally:
            racks.delete_workload("c-h2a")


def test_a_configuration_error_ends_the_unit(racks: Lab) -> None:
    conf = racks.node_dir("h1b") / "etc" / "calyx.toml"
    good = conf.read_text()
    conf.write_text(good + "[felix]\nroute_refresh_intervall = 5\n")  # a typo: an unknown key
    try:
        racks.run("h1b", ["systemctl", "restart", "felix.service"])

        wait_until(lambda: _show(racks, "h1b", "felix.service")["ActiveState"] == "failed", 30,
                   "felix ending failed on a configuration error")
        st = _show(racks, "h1b", "felix.service")
        assert st["ExecMainStatus"] == "2" and st["Result"] == "exit-code", st
        time.sleep(4)  # longer than RestartSec: systemd must not have tried again
        assert _show(racks, "h1b", "felix.service")["NRestarts"] == st["NRestarts"]
        status = racks.run("h1b", ["systemctl", "status", "--no-pager", "-n", "5", "felix.service"]).stdout
        assert "unknown configuration key 'route_refresh_intervall'" in status, status
        assert "did you mean 'route_refresh_interval'?" in status, status
    finally:
        conf.write_text(good)
    racks.run("h1b", ["systemctl", "reset-failed", "felix.service"])
    racks.run("h1b", ["systemctl", "start", "felix.service"], check=True)
    racks.wait_ready(["h1b"], timeout=60)


def test_journald_gets_the_priorities(racks: Lab) -> None:
    # quiet host: a CNI ADD (and the route felix then adopts) makes no warning
    since = racks.run("h1a", ["date", "+%Y-%m-%d %H:%M:%S"], check=True).stdout.strip()
    time.sleep(1.1)
    ws = racks.add_workload(Workload("q-h1a", "h1a", labels={"tenant": "a"}, profiles=("lab",)))
    try:
        wait_until(lambda: racks.ping("a-h2b", ws.ip or "", timeout=1), 30, "the new workload reachable")
        time.sleep(1)
        quiet = racks.run("h1a", ["journalctl", "--no-pager", "-q", "-p", "warning", "--since", since,
                                  "-u", "felix.service", "-u", "calyx-cni.service", "-u", "bgpd.service"]).stdout
        assert quiet.strip() == "", quiet
    finally:
        racks.delete_workload("q-h1a")
    # a malformed endpoint of this host: felix warns, and journald files it as a warning
    key = keys.workload_key("h1a", "lab", f"broken-{instance_name()}", "eth0")
    racks.datastore().put(key, "{not json")
    try:
        def warned() -> str:
            return racks.run("h1a", ["journalctl", "--no-pager", "-q", "-p", "warning", "-u", "felix.service",
                                     "--since", since]).stdout

        wait_until(lambda: key in warned(), 30, "felix's warning on the malformed endpoint in journalctl -p warning")
        # and it is not filed as anything more severe than a warning, nor with a second timestamp
        line = next(x for x in warned().splitlines() if key in x)
        assert "WARNING" in line and "<4>" not in line, line
    finally:
        racks.datastore().delete(key)


def test_a_frozen_daemon_is_killed_by_the_watchdog_and_restarted(racks: Lab) -> None:
    """SIGSTOP bgpd: its main loop stops turning, so do its WATCHDOG=1 pings; after WatchdogSec
    (30 s as shipped) systemd kills it ("Watchdog timeout") and Restart= brings it back."""
    unit = "bgpd.service"
    racks.wait_ready(["h2b"], timeout=60)
    before = _show(racks, "h2b", unit)
    assert before["ActiveState"] == "active", before
    since = racks.run("h2b", ["date", "+%Y-%m-%d %H:%M:%S"], check=True).stdout.strip()
    racks.run("h2b", ["kill", "-STOP", before["MainPID"]], check=True)

    def restarted() -> bool:
        now = _show(racks, "h2b", unit)
        return (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1)

    took = wait_until(restarted, 75, "systemd's watchdog killing the frozen bgpd and restarting it", interval=1)
    journal = racks.run("h2b", ["journalctl", "--no-pager", "-q", "-u", unit, "--since", since]).stdout
    assert "Watchdog timeout" in journal, journal
    print(f"frozen bgpd: killed by the watchdog and active again {took:.0f} s after SIGSTOP")
    racks.wait_ready(["h2b"], timeout=60)
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix after the watchdog restart")


def test_bgp_sessions_with_tcp_md5_under_the_units_hardening(racks: Lab) -> None:
    """A password on rack 2's peering (the ToR's peer group and the BGPPeer): bgpd's ExaBGP, as user
    calyx inside bgpd.service's sandbox, re-establishes both sessions with a TCP MD5 key."""
    secret = "S3cret-md5"
    r = racks.run("tor2", ["vtysh", "-c", "conf t", "-c", "router bgp 65002", "-c",
                           f"neighbor HOSTS password {secret}"])
    assert r.returncode == 0, r.stdout + r.stderr
    racks.apply_text("kind: BGPPeer\nname: rack2-tor\nspec: {peer_ip: 10.0.2.1, as_number: 65002, "
                     f"node_selector: \"rack == 'r2'\", password: {secret}}}\n")

    def md5_socket(host: str) -> str:
        out = racks.run(host, ["ss", "-tnie", "state", "established", "( sport = :179 or dport = :179 )"]).stdout
        # ss prints the socket's key list as md5keys:<peer>/32=<key> (the key's bytes may land out of
        # place in its output, so the two are looked for apart)
        return out if "md5keys:10.0.2.1/32=" in out and secret in out else ""

    for host in ("h2a", "h2b"):
        wait_until(lambda h=host: md5_socket(h), 60, f"{host}'s session to tor2 with a TCP MD5 key")
        out = md5_socket(host)
        assert out, f"{host}'s signed session went away"
        uid = racks.run(host, ["id", "-u", "calyx"], check=True).stdout.strip()
        assert f"uid:{uid}" in out and "cgroup:/system.slice/bgpd.service" in out, out
    racks.wait_ready(["h2a", "h2b"], timeout=60)
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix with rack 2's sessions signed")
