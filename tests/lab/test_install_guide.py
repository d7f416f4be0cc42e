"""docs/install.md followed as written, on a host that boots systemd, against a three-member etcd
over TLS.

The guide's blocks marked ``<!-- guide: NAME -->`` are run verbatim with ``bash -euo pipefail``
where an operator runs them (docs/install.md, "How this guide is tested"):

- ``certificates`` on this machine, in a scratch directory (the administration machine);
- ``etcd-member`` for ``etcd1`` to ``etcd3`` in one network namespace holding ``10.0.0.11`` to ``.13``:
  its ``/etc/default/etcd`` is each member's environment (the paths moved into the scratch
  directory; for ``etcd2``/``etcd3`` the name and address changed, as the guide says);
- on the host — the labs' Debian 12 root without Calyx, booted with ``systemd-nspawn --boot`` in a
  namespace holding ``10.0.0.21/24`` and a default route — ``install``, ``host-pki``,
  ``configure``, ``kernel``, ``start`` and ``pool``, as root in ``/root`` where the package and
  the three files were copied.

What is checked is read from systemd, etcd and calyxctl, never from the files the guide wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calyx.lab import procs, sdhosts
from tests.fixtures.etcd import ETCD, ETCDCTL
from tests.fixtures.netns import Netns, create_netns, create_veth
from tests.lab.conftest import wait_until

pytestmark = pytest.mark.systemd

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "install.md"
HOST = "host-1"
HOST_ADDR = "10.0.0.21/24"
MEMBERS = (1, 2, 3)
UNITS = ("felix.service", "bgpd.service", "calyx-cni.service")
BLOCK = re.compile(r"^<!-- guide: ([a-z0-9-]+) -->\n```sh\n(.*?)^```$", re.M | re.S)


def guide_blocks() -> dict[str, str]:
    """The guide's marked shell blocks, by name, in the order they appear."""
    blocks: dict[str, str] = {}
    for name, body in BLOCK.findall(GUIDE.read_text()):
        assert name not in blocks, f"docs/install.md: two blocks named {name!r}"
        blocks[name] = body
    return blocks


def member_env(block: str, n: int, pki: Path, data: Path) -> dict[str, str]:
    """``/etc/default/etcd`` of the guide's etcd-member block, as member ``n`` of the test has it."""
    m = re.search(r"^cat > /etc/default/etcd <<'END'\n(.*?)^END$", block, re.M | re.S)
    assert m, "docs/install.md, block etcd-member: no `cat > /etc/default/etcd <<'END'` ... `END`"
    env: dict[str, str] = {}
    for line in m.group(1).splitlines():
        key, _, value = line.partition("=")
        if key != "ETCD_INITIAL_CLUSTER":  # the same on every member
            value = value.replace("etcd1", f"etcd{n}").replace("10.0.0.11:", f"10.0.0.1{n}:")
        env[key] = value.replace("/etc/etcd/pki/", f"{pki}/")
    env["ETCD_DATA_DIR"] = str(data / f"etcd{n}.data")
    return env


@dataclass
class Cluster:
    etcd_ns: Netns
    host_ns: Netns
    machine: procs.Proc
    pki: Path
    blocks: dict[str, str]
    outputs: dict[str, str]

    def host(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return sdhosts.run(self.machine, argv, timeout=timeout, env={"HOME": "/root"})

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _etcdctl(self.etcd_ns, self.pki, *args)


def _etcdctl(etcd_ns: Netns, pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """etcdctl against etcd1 with the guide's client certificate."""
    return subprocess.run(
        ["ip", "netns", "exec", etcd_ns.name, ETCDCTL, "--endpoints", "https://10.0.0.11:2379",
         "--cacert", str(pki / "etcd-ca.crt"), "--cert", str(pki / "calyx-client.crt"),
         "--key", str(pki / "calyx-client.key"), *args],
        capture_output=True, text=True, timeout=30, check=False, env=dict(os.environ, ETCDCTL_API="3"))


def _run_block(c: Cluster, name: str, *, timeout: float = 180) -> str:
    """Run the guide's block ``name`` on the host, as root in /root; its output."""
    r = c.host(["bash", "-euo", "pipefail", "-c", f"cd /root\n{c.blocks[name]}"], timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        journal = c.host(["journalctl", "--no-pager", "-n", "40", *(f"-u{u}" for u in UNITS)]).stdout
        raise AssertionError(f"docs/install.md, block {name!r}, exited {r.returncode} on the host:\n{out[-3000:]}\n"
                             f"--- journal:\n{journal}")
    c.outputs[name] = out
    return out


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory, calyx_deb: Path) -> Iterator[Cluster]:
    missing = sdhosts.missing_tools() + [f"{t} (Debian package {p})" for t, p in
                                         (("openssl", "openssl"), ("etcd", "etcd-server"), ("etcdctl", "etcd-client"))
                                         if shutil.which(t) is None and not Path(f"/usr/bin/{t}").exists()]
    if missing:
        pytest.fail(f"following docs/install.md needs: {', '.join(missing)} (scripts/setup.sh installs them)")
    blocks = guide_blocks()
    wanted = ["certificates", "etcd-member", "install", "host-pki", "configure", "kernel", "start", "pool"]
    assert list(blocks) == wanted, f"docs/install.md's guide blocks changed: {list(blocks)} (this test runs {wanted})"
    work = tmp_path_factory.mktemp("guide")
    admin = work / "admin"
    admin.mkdir()
    # 1. the certificates, on the administration machine
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks["certificates"]], cwd=admin, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, f"docs/install.md, block 'certificates':\n{r.stdout}\n{r.stderr}"
    etcd_ns = create_netns()
    host_ns = create_netns()
    members: list[subprocess.Popen[bytes]] = []
    machine: procs.Proc | None = None
    try:
        create_veth(etcd_ns, host_ns, "10.0.0.11/24", HOST_ADDR, name_a="eth0", name_b="eth0")
        for n in MEMBERS[1:]:
            etcd_ns.ip("addr", "add", f"10.0.0.1{n}/24", "dev", "eth0")
        host_ns.ip("route", "add", "default", "via", "10.0.0.1")
        # 1. the members, each with its /etc/default/etcd
        for n in MEMBERS:
            env = {"PATH": os.environ["PATH"], **member_env(blocks["etcd-member"], n, admin, work)}
            with open(work / f"etcd{n}.log", "wb") as log:
                members.append(subprocess.Popen(["ip", "netns", "exec", etcd_ns.name, "setpriv", "--pdeathsig", "KILL",
                                                 ETCD], env=env, stdout=log, stderr=log))

        def healthy() -> bool:
            return (all(m.poll() is None for m in members)
                    and _etcdctl(etcd_ns, admin, "endpoint", "health", "--cluster").returncode == 0)

        try:
            wait_until(healthy, 60, "the three etcd members healthy over TLS")
        except AssertionError:
            logs = "\n".join(f"--- etcd{n}:\n" + (work / f"etcd{n}.log").read_text()[-1500:] for n in MEMBERS)
            raise AssertionError(f"etcd as docs/install.md configures it did not become healthy:\n{logs}") from None
        # the host: a fresh Debian 12 with systemd, the package and the files copied to it
        media = work / "media"
        media.mkdir()
        shutil.copy2(calyx_deb, media / calyx_deb.name)
        for f in ("etcd-ca.crt", "calyx-client.crt", "calyx-client.key"):
            shutil.copy2(admin / f, media / f)
        machine = sdhosts.boot(name=HOST, netns=host_ns.name, tree=sdhosts.base_rootfs(), etc_dir=None,
                               log=work / "machine.log", node=HOST, binds_ro={media: "/root/media"})
        sdhosts.wait_booted(machine)
        c = Cluster(etcd_ns, host_ns, machine, admin, blocks, {})
        r = c.host(["sh", "-c", "cp /root/media/* /root/"])
        assert r.returncode == 0, r.stderr
        for name in wanted[2:]:
            _run_block(c, name)
        yield c
    finally:
        if machine is not None:
            sdhosts.stop(machine, host_ns.name)
        for m in members:
            m.kill()
            m.wait(timeout=10)
        host_ns.delete()
        etcd_ns.delete()


def test_units_active_and_never_restarted(guide: Cluster) -> None:
    for unit in UNITS:
        out = guide.host(["systemctl", "show", unit, "-p", "ActiveState,NRestarts,UnitFileState"]).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        assert props == {"ActiveState": "active", "NRestarts": "0", "UnitFileState": "enabled"}, (unit, props)


def test_calyxctl_node_status_with_no_flags(guide: Cluster) -> None:
    # the output of the guide's own `calyxctl node status`, right after `systemctl start` returned
    out = guide.outputs["start"]
    assert HOST in out, out
    assert re.search(r"in.sync", out, re.I), out
    # and again now, as an operator types it (no flag, no variable: /etc/calyx/calyx.toml and calyx.env)
    r = guide.host(["calyxctl", "node", "status"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert HOST in r.stdout


def test_host_registered_its_node_over_tls(guide: Cluster) -> None:
    r = guide.host(["calyxctl", "get", "node", HOST, "-o", "json"])
    assert r.returncode == 0, r.stdout + r.stderr
    node = json.loads(r.stdout)
    spec = node.get("spec", node)
    assert spec.get("ipv4") == HOST_ADDR, node
    # in etcd itself, read with the guide's client certificate; and etcd refuses a client without one
    r = guide.etcdctl("get", "--prefix", "--keys-only", f"/calyx/v1/nodes/{HOST}")
    assert r.returncode == 0 and f"/calyx/v1/nodes/{HOST}" in r.stdout, r.stdout + r.stderr
    bare = subprocess.run(["ip", "netns", "exec", guide.etcd_ns.name, ETCDCTL, "--endpoints",
                           "https://10.0.0.11:2379", "--cacert", str(guide.pki / "etcd-ca.crt"), "--dial-timeout", "3s",
                           "get", "x"], capture_output=True, text=True, timeout=30, check=False,
                          env=dict(os.environ, ETCDCTL_API="3"))
    assert bare.returncode != 0, "etcd accepted a client without a certificate: the guide's TLS is not mutual"


def test_pool_applied_and_listed(guide: Cluster) -> None:
    assert "10.65.0.0/16" in guide.outputs["pool"], guide.outputs["pool"]
    r = guide.host(["calyxctl", "get", "pools", "-o", "json"])
    assert r.returncode == 0 and "10.65.0.0/16" in r.stdout, r.stdout + r.stderr


def test_no_warning_in_the_journal(guide: Cluster) -> None:
    # felix took the pool (applied last) and settled: wait until its status says so, then read the journal
    def settled() -> bool:
        r = guide.host(["calyxctl", "node", "status"])
        return r.returncode == 0 and bool(re.search(r"in.sync", r.stdout, re.I))

    wait_until(settled, 30, "felix in sync after the pool")
    time.sleep(1)
    r = guide.host(["journalctl", "--no-pager", "-q", "-p", "warning", *(f"-u{u}" for u in UNITS)])
    assert r.stdout.strip() == "", f"warnings on a host installed as the guide says:\n{r.stdout}"
