"""Calyx's Debian package (docs/install.md, "The Debian package"): what ``scripts/build-deb.sh`` builds
(files, conffiles, maintainer scripts, dependencies, lintian), and what installing, upgrading,
removing and purging it does in a Debian 12 root: first chrooted, with no systemd running, as in
image builds and containers (the maintainer scripts must work there, and the daemons' commands must
run from the installed files alone); then booted under systemd, where systemd's own state shows
which units the package enables, starts, restarts and stops."""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath

import pytest

from tests.fixtures.debpkg import REPO, BootedRoot, DebianRoot, package_version, require

pytestmark = pytest.mark.deb

UNITS = ("felix.service", "bgpd.service", "calyx-cni.service")
CONFFILES = {"/etc/calyx/calyx.toml", "/etc/calyx/calyx.env", "/etc/iproute2/rt_protos.d/calyx.conf"}
# files shipped as they are in the checkout
FROM_CHECKOUT = {
    "lib/systemd/system/felix.service": "systemd/felix.service",
    "lib/systemd/system/bgpd.service": "systemd/bgpd.service",
    "lib/systemd/system/calyx-cni.service": "systemd/calyx-cni.service",
    "etc/calyx/calyx.toml": "etc/calyx.toml",
    "etc/calyx/calyx.env": "systemd/calyx.env",
    "etc/iproute2/rt_protos.d/calyx.conf": "etc/iproute2/rt_protos.d/calyx.conf",
}
COMMANDS = ("felix", "bgpd", "calyxctl", "calyx", "calyx-ipam", "calyx-cni-server", "exabgp")
SITE = "opt/calyx/lib/python3.11/site-packages"


def _listing(deb: Path) -> dict[str, tuple[str, str, str | None]]:
    """``dpkg-deb -c``: path (no leading ./ or /) -> (mode, owner, link target)."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    entries: dict[str, tuple[str, str, str | None]] = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(maxsplit=5)
        path, _, target = rest.partition(" -> ")
        entries[path.removeprefix("./").rstrip("/")] = (mode, owner, target or None)
    return entries


def _pins() -> dict[str, str]:
    """debian/requirements.txt: normalised distribution name -> version."""
    pins = {}
    for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "debian" / "requirements.txt").read_text(), re.M):
        pins[re.sub(r"[-_.]+", "_", m.group(1)).lower()] = m.group(2)
    return pins


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def _control_file(deb: Path, name: str, tmp_path: Path) -> str | None:
    ctrl = tmp_path / "control"
    if not ctrl.exists():
        subprocess.run(["dpkg-deb", "-e", str(deb), str(ctrl)], check=True)
    path = ctrl / name
    return path.read_text() if path.exists() else None


def test_package_files(calyx_deb: Path) -> None:
    files = _listing(calyx_deb)
    missing = [p for p in [*FROM_CHECKOUT, "usr/share/bash-completion/completions/calyxctl",
                           "usr/share/man/man1/calyxctl.1.gz", "usr/share/doc/calyx/copyright",
                           "opt/calyx/pyvenv.cfg"] if p not in files]
    assert not missing, missing
    for cmd in COMMANDS:
        mode, _, _ = files[f"opt/calyx/bin/{cmd}"]
        assert mode == "-rwxr-xr-x", (cmd, mode)
    # the virtualenv's interpreter is Debian's 3.11, wherever `python3` on PATH points on the build machine
    assert files["opt/calyx/bin/python3.11"][2] == "/usr/bin/python3.11"
    # the CNI plugins where runtimes look, calyxctl on PATH: links into the virtualenv
    links = {"opt/cni/bin/calyx": "opt/calyx/bin/calyx", "opt/cni/bin/calyx-ipam": "opt/calyx/bin/calyx-ipam",
             "usr/bin/calyxctl": "opt/calyx/bin/calyxctl"}
    for link, dest in links.items():
        mode, _, target = files[link]
        assert mode.startswith("l") and target is not None, (link, mode)
        assert posixpath.normpath(posixpath.join("/", posixpath.dirname(link), target)) == f"/{dest}", (link, target)
    # Calyx and exactly the pinned distributions; no pip or setuptools in the shipped environment
    dists = {}
    for path in files:
        m = re.fullmatch(rf"{SITE}/([^/]+)-([^-/]+)\.dist-info", path)
        if m:
            dists[re.sub(r"[-_.]+", "_", m.group(1)).lower()] = m.group(2)
    assert dists == {**_pins(), "calyx": package_version()}
    # every module of Calyx byte-compiled for CPython 3.11
    for path in files:
        if path.startswith(f"{SITE}/") and path.endswith(".py") and path.split("/")[5] in ("calyx", "felix", "bgpd"):
            p = PurePosixPath(path)
            pyc = str(p.parent / "__pycache__" / f"{p.stem}.cpython-311.pyc")
            assert pyc in files, f"{path} has no {pyc}"
    # everything root's, nothing setuid, nothing writable by others
    odd = [(p, m, o) for p, (m, o, _) in files.items()
           if o != "root/root" or (not m.startswith("l") and ("s" in m or m[8] == "w"))]
    assert not odd, odd[:10]


def test_package_file_contents(calyx_deb: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(calyx_deb), str(tree)], check=True)
    for shipped, source in FROM_CHECKOUT.items():
        assert (tree / shipped).read_bytes() == (REPO / source).read_bytes(), shipped
    for cmd in COMMANDS:
        first = (tree / "opt/calyx/bin" / cmd).read_text().splitlines()[0]
        assert first == "#!/opt/calyx/bin/python", (cmd, first)
    cfg = dict(line.split(" = ", 1) for line in (tree / "opt/calyx/pyvenv.cfg").read_text().splitlines())
    assert cfg["home"] == "/usr/bin" and cfg["include-system-site-packages"] == "false"
    assert cfg["version"].startswith("3.11.")
    # no trace of the build directory anywhere (shebangs, activate scripts, .pyc paths, RECORD files)
    leaks = subprocess.run(["grep", "-rlF", "deb-build", str(tree)], capture_output=True, text=True, check=False)
    assert leaks.returncode == 1 and not leaks.stdout, leaks.stdout[:2000]
    completion = (tree / "usr/share/bash-completion/completions/calyxctl").read_text()
    assert "_CALYXCTL_COMPLETE=bash_complete" in completion and "complete -o nosort -F _calyxctl_completion calyxctl" \
        in completion


def test_package_control(calyx_deb: Path, tmp_path: Path) -> None:
    assert _field(calyx_deb, "Package") == "calyx"
    assert _field(calyx_deb, "Version") == package_version()
    assert _field(calyx_deb, "Architecture") == "amd64"
    depends = {d.strip().split(" ")[0] for d in _field(calyx_deb, "Depends").split(",")}
    assert {"python3.11", "adduser", "iproute2", "iptables", "ipset", "libc6"} <= depends, depends
    conffiles = _control_file(calyx_deb, "conffiles", tmp_path)
    assert conffiles is not None and set(conffiles.split()) == CONFFILES
    postinst = _control_file(calyx_deb, "postinst", tmp_path)
    prerm = _control_file(calyx_deb, "prerm", tmp_path)
    postrm = _control_file(calyx_deb, "postrm", tmp_path)
    preinst = _control_file(calyx_deb, "preinst", tmp_path) or ""
    assert postinst and prerm and postrm
    for unit in UNITS:
        assert f"deb-systemd-helper enable '{unit}'" in postinst, unit
    # what a chroot cannot show (no systemd runs there): started by nobody on a first install,
    # try-restarted after an upgrade (only if running), never stopped while the upgrade unpacks,
    # stopped on remove
    assert "deb-systemd-invoke start" not in postinst and "_dh_action=start" not in postinst
    assert re.search(r'if \[ "\$1" = "configure" \] && \[ -n "\$2" \].*?\n\s+systemctl try-restart --no-block '
                     r"felix.service bgpd.service calyx-cni.service", postinst, re.S), postinst
    assert "/usr/sbin/policy-rc.d calyx restart" in postinst  # what deb-systemd-invoke would have honoured
    assert "deb-systemd-invoke try-restart" not in postinst  # it waits for Type=notify units: apt would hang
    assert "stop" not in preinst
    assert re.search(r'if \[ "\$1" = remove \].*\n\s+deb-systemd-invoke stop calyx-cni.service bgpd.service '
                     r"felix.service", prerm), prerm


def test_lintian_is_clean(calyx_deb: Path) -> None:
    """No error or warning that debian/calyx.lintian-overrides does not explain, and no override that
    matches nothing (a stale one would hide the next real problem)."""
    lintian = require("lintian", "lintian", "the package is checked with it")
    r = subprocess.run([lintian, "-I", "--fail-on", "error,warning", str(calyx_deb)], capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    stale = re.findall(r"^I: calyx: (?:unused|mismatched)-override .*$", r.stdout, re.M)
    assert not stale, stale


def _wants(root: DebianRoot) -> set[str]:
    wants = root.file("/etc/systemd/system/multi-user.target.wants")
    return {p.name for p in wants.iterdir()} & set(UNITS) if wants.is_dir() else set()


def _status(root: DebianRoot) -> str:
    r = root.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "calyx"], check=False)
    return r.stdout.strip() if r.returncode == 0 else "not installed"


def test_install_upgrade_remove_purge(debian_root: DebianRoot, calyx_deb: Path, calyx_deb_upgrade: Path) -> None:
    root = debian_root
    first = root.copy_in(calyx_deb)
    second = root.copy_in(calyx_deb_upgrade)
    version, upgrade_version = package_version(), f"{package_version()}+upgrade1"

    # install, as docs/install.md says: apt pulls in the Depends from the mirror
    r = root.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", first], timeout=600)
    assert _status(root) == f"install ok installed {version}", r.stdout[-3000:]
    user = root.run(["getent", "passwd", "calyx"]).stdout.strip().split(":")
    assert int(user[2]) < 1000 and user[5] == "/nonexistent" and user[6] == "/usr/sbin/nologin", user
    assert root.run(["id", "-gn", "calyx"]).stdout.strip() == "calyx"
    assert root.run(["stat", "-c", "%U:%G %a", "/etc/calyx/calyx.env"]).stdout.strip() == "root:calyx 640"
    assert _wants(root) == set(UNITS), "the units are not enabled"
    # the commands run from the installed files, with the root's /usr/bin/python3.11
    assert "felix: the Calyx node agent" in root.run(["/opt/calyx/bin/felix", "--help"]).stdout
    assert "Usage: bgpd" in root.run(["/opt/calyx/bin/bgpd", "--help"]).stdout
    assert "Usage: calyxctl" in root.run(["calyxctl", "--help"]).stdout
    assert "ExaBGP : 5.0.15" in root.run(["/opt/calyx/bin/exabgp", "version"]).stdout
    for plugin in ("calyx", "calyx-ipam"):
        out = root.run([f"/opt/cni/bin/{plugin}"], env={"CNI_COMMAND": "VERSION", "CALYX_CNI_SOCKET": "off"},
                       stdin='{"cniVersion": "1.0.0"}').stdout
        assert "1.0.0" in json.loads(out)["supportedVersions"], out
    completion = root.run(["bash", "-c", "source /usr/share/bash-completion/completions/calyxctl; "
                           "COMP_WORDS=(calyxctl nod); COMP_CWORD=1; _calyxctl_completion calyxctl; "
                           'printf "%s\\n" "${COMPREPLY[@]}"']).stdout.split()
    assert completion == ["node"], completion
    # running them compiled nothing: the shipped .pyc are valid, every file is as packaged
    verify = root.run(["dpkg", "--verify", "calyx"], check=False)
    assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout[-2000:]

    # the administrator edits the configuration, adds TLS files, the daemons have state
    toml = root.file("/etc/calyx/calyx.toml")
    edited = toml.read_text().replace('log_level = "info"', 'log_level = "debug"')
    assert edited != toml.read_text()
    toml.write_text(edited)
    root.sh("install -d -m 0750 -g calyx /etc/calyx/pki && echo cert > /etc/calyx/pki/etcd-ca.crt && "
            "install -d /var/lib/calyx/felix && echo x > /var/lib/calyx/felix/state")

    # upgrade to a rebuild at a higher version: the edited conffile is kept without a question
    # (stdin is empty: a conffile prompt would fail the upgrade), nothing else differs
    r = root.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", second], timeout=600)
    assert _status(root) == f"install ok installed {upgrade_version}", r.stdout[-3000:]
    assert "Configuration file" not in r.stdout, r.stdout[-3000:]
    assert toml.read_text() == edited
    assert not list(root.file("/etc/calyx").glob("*.dpkg-*")), list(root.file("/etc/calyx").iterdir())
    assert root.run(["stat", "-c", "%U:%G %a", "/etc/calyx/calyx.env"]).stdout.strip() == "root:calyx 640"
    verify = root.run(["dpkg", "--verify", "calyx"], check=False)
    assert verify.stdout.split() == ["??5??????", "c", "/etc/calyx/calyx.toml"], verify.stdout
    assert "felix: the Calyx node agent" in root.run(["/opt/calyx/bin/felix", "--help"]).stdout
    assert _wants(root) == set(UNITS)

    # remove: the programs go, the configuration stays
    root.run(["apt-get", "remove", "-y", "-q", "calyx"])
    assert _status(root) == f"deinstall ok config-files {upgrade_version}"
    gone = ["/opt/calyx", "/opt/cni/bin/calyx", "/opt/cni/bin/calyx-ipam", "/usr/bin/calyxctl",
            "/lib/systemd/system/felix.service", "/usr/share/bash-completion/completions/calyxctl"]
    assert [p for p in gone if root.file(p).is_symlink() or root.file(p).exists()] == []
    assert toml.read_text() == edited
    assert root.file("/etc/iproute2/rt_protos.d/calyx.conf").exists()
    assert root.file("/etc/calyx/pki/etcd-ca.crt").exists()
    assert root.file("/var/lib/calyx/felix/state").exists()
    assert _wants(root) == set(UNITS), "remove keeps the enablement links (dangling) until purge"

    # purge: the configuration, the administrator's files in /etc/calyx, the state and the units'
    # enablement go; the system user stays (Debian's usual choice, docs/install.md)
    root.run(["apt-get", "purge", "-y", "-q", "calyx"])
    assert _status(root) == "not installed" or _status(root).startswith("unknown ok not-installed")
    for path in ("/etc/calyx", "/var/lib/calyx", "/etc/iproute2/rt_protos.d/calyx.conf"):
        assert not root.file(path).exists(), path
    assert _wants(root) == set()
    assert root.run(["getent", "passwd", "calyx"], check=False).returncode == 0


def test_units_under_systemd(debian_root: DebianRoot, calyx_deb: Path, calyx_deb_upgrade: Path) -> None:
    """Installed in a booted Debian 12 (systemd 252): the units are enabled and not started; an
    upgrade restarts, once and after the unpack, those that run and leaves the others stopped; remove
    stops them; purge forgets them. felix runs against an etcd inside, so that it is really up."""
    etcd = Path(require("etcd", "etcd-server", "felix needs an etcd to come up inside the booted root"))
    root = debian_root
    depends = [d.strip().split(" ")[0] for d in _field(calyx_deb, "Depends").split(",")]
    root.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd", "systemd-sysv", "dbus",
              *depends], timeout=600)
    root.run(["systemctl", "set-default", "multi-user.target"])
    debs = root.path.parent / "debs"
    debs.mkdir()
    for deb in (calyx_deb, calyx_deb_upgrade):
        shutil.copy2(deb, debs)

    with BootedRoot(root, {debs: "/debs", etcd: "/usr/local/bin/etcd"}) as host:
        host.run(["systemd-run", "--unit=etcd", "/usr/local/bin/etcd", "--data-dir=/var/lib/etcd-test",
                  "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
                  "--listen-peer-urls=http://127.0.0.1:2380"])

        host.run(["dpkg", "-i", f"/debs/{calyx_deb.name}"])
        for unit in UNITS:
            u = host.unit(unit)
            assert (u["UnitFileState"], u["ActiveState"]) == ("enabled", "inactive"), (unit, u)

        # the administrator configures the host and starts felix and the CNI service, not bgpd
        host.run(["sh", "-c", "printf 'CALYX_ETCD_ENDPOINTS=http://127.0.0.1:2379\\nCALYX_NODE_NAME=h1\\n' "
                  "> /etc/calyx/calyx.env"])
        host.run(["systemctl", "start", "felix.service", "calyx-cni.service"], timeout=120)
        before = {unit: host.unit(unit) for unit in UNITS}
        for unit in ("felix.service", "calyx-cni.service"):
            assert before[unit]["ActiveState"] == "active", (unit, before[unit])

        r = host.run(["dpkg", "-i", f"/debs/{calyx_deb_upgrade.name}"], timeout=300)

        def restarted() -> bool:  # queued by postinst (--no-block): wait for systemd to do it
            now = {unit: host.unit(unit) for unit in ("felix.service", "calyx-cni.service")}
            return all(u["ActiveState"] == "active" and u["InvocationID"] != before[n]["InvocationID"]
                       for n, u in now.items())

        deadline = time.monotonic() + 60
        while not restarted() and time.monotonic() < deadline:
            time.sleep(0.5)
        after = {unit: host.unit(unit) for unit in UNITS}
        for unit in ("felix.service", "calyx-cni.service"):
            assert after[unit]["ActiveState"] == "active", (unit, after[unit])
            assert after[unit]["InvocationID"] != before[unit]["InvocationID"], f"{unit} was not restarted"
        assert after["bgpd.service"]["ActiveState"] == "inactive", "try-restart started a stopped unit"
        # restarted once, after the new files were unpacked (no stop before)
        journal = host.run(["journalctl", "-u", "felix.service", "-o", "cat", "--no-pager"]).stdout
        assert journal.count("Stopping felix.service") == 1, journal[-3000:]
        assert "Unpacking calyx" in r.stdout and "Setting up calyx" in r.stdout
        assert "CALYX_NODE_NAME=h1" in host.run(["cat", "/etc/calyx/calyx.env"]).stdout

        host.run(["dpkg", "-r", "calyx"])
        for unit in UNITS:
            assert host.unit(unit)["ActiveState"] == "inactive", unit
        host.run(["dpkg", "-P", "calyx"])
        for unit in UNITS:
            assert host.unit(unit)["UnitFileState"] == "", unit
        assert not host.run(["sh", "-c", "ls /etc/systemd/system/multi-user.target.wants | grep -E 'felix|bgpd|calyx'"],
                            check=False).stdout
