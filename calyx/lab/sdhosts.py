"""Lab hosts that boot systemd: one systemd-nspawn machine in each host's network namespace, with
Calyx's Debian package installed and its units running, as on a real host.

What it owns:

- **Root filesystems**, under ``$CALYX_LAB_CACHE`` (default ``/var/cache/calyx-lab``): a Debian 12
  base made by ``debootstrap --variant=minbase`` (systemd, iproute2, iptables, ipset, Python and
  what the package depends on), kept as a tarball and a tree, built once; and per ``.deb`` (by its
  SHA-256) a copy of the base with the package installed by ``dpkg -i`` in a chroot, exactly as an
  operator installs it. Both are read-only afterwards: every host boots the package's tree with
  ``--volatile=overlay`` (its changes, its journal included, live in a tmpfs of its own).
- **Machines**: a launcher (``sh``) that moves itself into cgroups of its own
  (``calyx-lab/<netns>`` in each mounted hierarchy: nspawn's ``--keep-unit`` creates its
  ``payload``/``supervisor`` cgroups under the caller's), then execs ``systemd-nspawn --boot``
  joined to the host's namespace (``--network-namespace-path``; ``CAP_NET_ADMIN``/``CAP_NET_RAW`` added
  back to the bounding set, ``/proc/sys/net`` writable through ``SYSTEMD_NSPAWN_API_VFS_WRITABLE``).
  The host's ``/etc/calyx`` (``calyx.toml`` and ``calyx.env`` written by the lab) is bound
  read-only, and ``/run/netns`` is bound so that a CNI call made inside the machine finds the
  workload's namespace.
- **Control without machined**: the machine's PID 1 is nspawn's child; :func:`exec_argv` enters it
  with ``nsenter -a`` (``systemctl``, ``journalctl``, ``calyxctl``, the CNI plugin...); stopping is
  SIGTERM to nspawn (a clean shutdown, ~2 s), SIGKILL after a timeout, then the cgroups go.

Facts and measurements behind this: ``../shared/notes/systemd-hosts.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from calyx.lab import procs
from calyx.lab.procs import Proc

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: what the base has besides minbase: systemd to boot, the package's Depends, and tools to look around
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "iproute2", "iptables", "ipset", "python3", "adduser",
    "iputils-ping", "procps", "kmod", "tcpdump", "netcat-openbsd",
)  # fmt: skip
CGROUP_PARENT = "calyx-lab"
CGROUP_ROOT = Path("/sys/fs/cgroup")
STOP_TIMEOUT = 15.0

Progress = Callable[[str], None]


class HostError(RuntimeError):
    """A systemd host could not be built, booted or reached."""


def cache_dir() -> Path:
    return Path(os.environ.get("CALYX_LAB_CACHE") or "/var/cache/calyx-lab")


def missing_tools() -> list[str]:
    """What this machine lacks to run systemd hosts, each with the Debian package that has it."""
    need = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux",
            "dpkg-deb": "dpkg"}
    return [f"{tool} (Debian package {pkg})" for tool, pkg in need.items() if shutil.which(tool) is None]


def _run(argv: Sequence[str], *, what: str, timeout: float = 600, env: Mapping[str, str] | None = None) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                       env=dict(env) if env is not None else None)
    if r.returncode != 0:
        raise HostError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    return r.stdout


# --- root filesystems --------------------------------------------------------------------------------


def _base_id() -> str:
    return hashlib.sha256(" ".join((SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]


def base_rootfs(progress: Progress | None = None) -> Path:
    """The Debian base tree (built once: debootstrap, or unpacked from the cached tarball)."""
    cache = cache_dir()
    tree = cache / f"base-{_base_id()}"
    if (tree / ".complete").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"base-{_base_id()}.tar"
    tmp = Path(tempfile.mkdtemp(prefix="base.", dir=cache))
    try:
        if tarball.exists():
            _run(["tar", "-C", str(tmp), "-xpf", str(tarball)], what=f"unpacking {tarball}")
        else:
            if progress:
                progress(f"building the hosts' Debian {SUITE} root filesystem with debootstrap (once)")
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(tmp),
                  MIRROR], what="debootstrap", timeout=1800)
            _fix_up(tmp)
            part = tarball.with_suffix(".tar.part")
            _run(["tar", "-C", str(tmp), "-cpf", str(part), "."], what="packing the base root filesystem")
            part.replace(tarball)
        (tmp / ".complete").touch()
        shutil.rmtree(tree, ignore_errors=True)
        tmp.replace(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def _fix_up(root: Path) -> None:
    """Every machine gets a machine id of its own, and its host name from nspawn; boot to multi-user."""
    (root / "etc" / "machine-id").write_text("")
    dbus_id = root / "var" / "lib" / "dbus" / "machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "etc" / "hostname").unlink(missing_ok=True)
    _run(["chroot", str(root), "systemctl", "set-default", "multi-user.target"], what="systemctl set-default")
    # no getty on a machine nobody logs into; journald keeps the journal in memory (volatile root anyway)
    _run(["chroot", str(root), "systemctl", "mask", "console-getty.service", "getty@.service"],
         what="masking gettys")


def deb_rootfs(deb: Path, progress: Progress | None = None) -> Path:
    """The base with ``deb`` installed (``dpkg -i`` in a chroot), built once per package file."""
    if not deb.is_file():
        raise HostError(f"{deb}: no such package (scripts/build-deb.sh builds dist/calyx_<version>_amd64.deb)")
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()[:16]
    cache = cache_dir()
    tree = cache / f"calyx-{_base_id()}-{digest}"
    if (tree / ".complete").exists():
        return tree
    base = base_rootfs(progress)
    if progress:
        progress(f"installing {deb.name} into the hosts' root filesystem (once per package)")
    tmp = Path(tempfile.mkdtemp(prefix="calyx.", dir=cache))
    try:
        _run(["cp", "-a", f"{base}/.", str(tmp)], what="copying the base root filesystem")
        (tmp / ".complete").unlink(missing_ok=True)
        shutil.copy2(deb, tmp / "tmp" / deb.name)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
        _run(["chroot", str(tmp), "dpkg", "-i", f"/tmp/{deb.name}"], what=f"dpkg -i {deb.name}", env=env)
        (tmp / "tmp" / deb.name).unlink()
        (tmp / ".complete").touch()
        shutil.rmtree(tree, ignore_errors=True)
        tmp.replace(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # trees of older packages are not needed any more (a running lab keeps its tree mounted: busy)
    for old in cache.glob(f"calyx-{_base_id()}-*"):
        if old != tree and (old / ".complete").exists():
            shutil.rmtree(old, ignore_errors=True)
    return tree


# --- machines -----------------------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """The cgroup hierarchies a machine's launcher must move into (v1 name=systemd and/or v2)."""
    out = []
    for name in ("systemd", "unified"):
        p = CGROUP_ROOT / name
        if (p / "cgroup.procs").exists():
            out.append(p)
    if not out and (CGROUP_ROOT / "cgroup.procs").exists():
        out.append(CGROUP_ROOT)  # a pure cgroup v2 machine
    return out


def cgroup_dirs(netns: str) -> list[Path]:
    return [h / CGROUP_PARENT / netns for h in _hierarchies()]


def boot(*, name: str, netns: str, tree: Path, etc_dir: Path | None, log: Path, node: str,
         binds_ro: Mapping[Path, str] | None = None) -> Proc:
    """Boot ``tree`` as machine ``name`` inside ``netns``; returns nspawn's process (the launcher's pid).

    ``etc_dir`` is bound read-only on ``/etc/calyx`` (the lab writes the hosts' configuration there);
    ``None`` leaves the machine's own ``/etc/calyx`` (the package's conffiles, edited inside, as an
    operator does). ``binds_ro`` are more host paths bound read-only (``{host path: path inside}``)."""
    cgroups = cgroup_dirs(netns)
    if not cgroups:
        raise HostError("no cgroup hierarchy to put the machine in (/sys/fs/cgroup has neither systemd nor v2)")
    argv = [
        "systemd-nspawn", "--quiet", "--boot", "-D", str(tree), f"--machine={name}", f"--hostname={name}",
        f"--uuid={secrets.token_hex(16)}", "--register=no", "--keep-unit", "--console=passive",
        "--volatile=overlay", f"--network-namespace-path=/run/netns/{netns}",
        "--capability=CAP_NET_ADMIN,CAP_NET_RAW", "--bind=/run/netns:/run/netns",
    ]  # fmt: skip
    if etc_dir is not None:
        argv.append(f"--bind-ro={etc_dir}:/etc/calyx")
    argv += [f"--bind-ro={host}:{inside}" for host, inside in (binds_ro or {}).items()]
    script = "".join(f'mkdir -p {c} && echo $$ > {c}/cgroup.procs || exit 1\n' for c in cgroups) + 'exec "$@"\n'
    env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
    env.pop("NOTIFY_SOCKET", None)
    return procs.spawn(f"{node}/machine", ["sh", "-c", script, "sh", *argv], log=log, node=node, env=env)


def init_pid(machine: Proc) -> int | None:
    """The machine's PID 1 as this machine sees it (nspawn's child), or None."""
    if not machine.alive:
        return None
    try:
        children = Path(f"/proc/{machine.pid}/task/{machine.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def exec_argv(machine: Proc, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The command line that runs ``argv`` inside the machine (all its namespaces, root)."""
    pid = init_pid(machine)
    if pid is None:
        raise HostError(f"machine {machine.name} is not running")
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return ["nsenter", "-t", str(pid), "-a", "env", "-i", path, "LANG=C.UTF-8", *extra, *argv]


def run(machine: Proc, argv: Sequence[str], *, timeout: float = 60, input: str | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(exec_argv(machine, argv, env), input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_booted(machine: Proc, timeout: float = 120) -> str:
    """Wait until the machine's systemd finished starting up; its state ("running" or "degraded").

    Start-up includes the package's Type=notify units: felix and bgpd are started once in sync with
    etcd, so a host boots completely only when the datastore answers (as on a real host)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not machine.alive:
            raise HostError(f"machine {machine.name} exited while booting:\n{procs.tail(machine.log)}")
        if init_pid(machine) is not None:
            try:
                r = run(machine, ["systemctl", "is-system-running", "--wait"],
                        timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            last = r.stdout.strip()
            if last in ("running", "degraded"):
                return last
        time.sleep(0.1)
    raise HostError(f"machine {machine.name} did not finish booting in {timeout:.0f} s (state {last or '?'})"
                    f":\n{procs.tail(machine.log)}")


def unit_states(machine: Proc, units: Sequence[str]) -> dict[str, str]:
    """``systemctl is-active`` of each unit (active, activating, failed, inactive...)."""
    r = run(machine, ["systemctl", "is-active", *units], timeout=20)
    states = r.stdout.split()
    return dict(zip(units, states + ["unknown"] * (len(units) - len(states)), strict=True))


def stop(machine: Proc, netns: str, timeout: float = STOP_TIMEOUT) -> None:
    """Shut the machine down (SIGTERM to nspawn: systemd stops its units), kill it if it hangs, and
    remove its cgroups."""
    if machine.alive:
        procs.signal_proc(machine, signal.SIGTERM)
        for left in procs.wait_dead([machine], timeout):
            procs.signal_proc(left, signal.SIGKILL)
        procs.wait_dead([machine], 5.0)
    remove_cgroups(netns)


def stop_all(machines: Sequence[tuple[Proc, str]], timeout: float = STOP_TIMEOUT) -> None:
    """:func:`stop` for several machines at once: (machine, its netns) pairs, shut down in parallel."""
    alive = [m for m, _ in machines if m.alive]
    for m in alive:
        procs.signal_proc(m, signal.SIGTERM)
    for left in procs.wait_dead(alive, timeout):
        procs.signal_proc(left, signal.SIGKILL)
    procs.wait_dead(alive, 5.0)
    for _, netns in machines:
        remove_cgroups(netns)


def remove_cgroups(netns: str) -> None:
    """Remove ``calyx-lab/<netns>`` (depth first) in every hierarchy; kill what is still in it."""
    for top in cgroup_dirs(netns):
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    with contextlib.suppress(OSError, ValueError):
                        for pid in (d / "cgroup.procs").read_text().split():
                            os.kill(int(pid), 9)
                    time.sleep(0.05)
    for h in _hierarchies():  # the parent, once no lab's machine is left in it
        with contextlib.suppress(OSError):
            (h / CGROUP_PARENT).rmdir()
