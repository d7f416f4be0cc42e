"""Real container runtimes on the calyx plugin: podman 4.3 (runc, CNI backend) and containerd's
``ctr run --cni``. Both run inside the test's "host" namespace (``nsenter --net``) with private
configuration and storage under a temporary directory, and a busybox root filesystem.

Slow (a few seconds each), so they are few.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calyx.datastore import keys
from calyx.model import IPPool, Node
from tests.fixtures.cni import REFERENCE_PLUGINS, CniHost, nsenter

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

N = ipaddress.ip_network


def busybox_rootfs(root: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox not found (Debian package busybox-static; scripts/setup.sh installs it)")
    rootfs = root / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    names = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        link = rootfs / "bin" / name
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    return rootfs


@pytest.fixture
def pool(cni_host: CniHost) -> IPPool:
    p = IPPool("pool1", N("10.73.0.0/16"), 26)
    cni_host.put(p)
    cni_host.put(Node(cni_host.node))
    return p


class Podman:
    def __init__(self, h: CniHost, root: Path) -> None:
        if shutil.which("podman") is None or shutil.which("runc") is None:
            pytest.fail("podman or runc not found (Debian packages podman, runc; scripts/setup.sh installs them)")
        self.h = h
        self.root = root
        self.rootfs = busybox_rootfs(root)
        net_d = root / "net.d"
        net_d.mkdir()
        (net_d / "calyxpod.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "calyxpod", "plugins": [h.calyx_plugin(labels={"runtime": "podman"})]}))
        (root / "containers.conf").write_text(f"""
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
runtime = "runc"
tmp_dir = "{root}/tmp"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{h.plugin_dir}", "{REFERENCE_PLUGINS}"]
network_config_dir = "{net_d}"
default_network = "calyxpod"
""")
        (root / "storage.conf").write_text(f"""
[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/runroot"
""")
        self.env = h.env(CONTAINERS_CONF=str(root / "containers.conf"),
                         CONTAINERS_STORAGE_CONF=str(root / "storage.conf"))

    def __call__(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*nsenter(self.h.host), "podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def cleanup(self) -> None:
        self("rm", "--force", "--all", "--time", "0", check=False)
        self("system", "reset", "--force", check=False)
        for mnt in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = mnt.split()[1]
            if target.startswith(str(self.root)):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@pytest.fixture
def podman(cni_host: CniHost) -> Iterator[Podman]:
    root = Path(tempfile.mkdtemp(prefix="cxpod-", dir="/tmp"))
    p = Podman(cni_host, root)
    try:
        yield p
    finally:
        p.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _endpoint_ip(h: CniHost, workload: str) -> str:
    kv = h.ds.get(keys.workload_key(h.node, "cni", workload, "eth0"))
    assert kv is not None, f"no endpoint for {workload}"
    return str(json.loads(kv.value)["ipv4_nets"][0]).split("/")[0]


def test_podman_two_containers_ping_and_release(cni_host: CniHost, podman: Podman, pool: IPPool) -> None:
    h = cni_host
    for name in ("cxp1", "cxp2"):
        podman("run", "-d", "--name", name, "--network", "calyxpod", "--rootfs", str(podman.rootfs),
               "sleep", "300")
    ip1, ip2 = _endpoint_ip(h, "cxp1"), _endpoint_ip(h, "cxp2")  # podman passes K8S_POD_NAME=<name>
    assert N(f"{ip1}/26", strict=False) == N(f"{ip2}/26", strict=False)  # the host's one block
    assert ipaddress.ip_address(ip1) in pool.cidr
    addr = podman("exec", "cxp1", "ip", "-4", "addr", "show", "eth0").stdout
    assert f"inet {ip1}/32" in addr
    assert "default via 169.254.1.1" in podman("exec", "cxp1", "ip", "route").stdout
    ping = podman("exec", "cxp1", "ping", "-c", "1", "-W", "3", ip2)
    assert "1 packets received" in ping.stdout and "ttl=63" in ping.stdout
    assert len(h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0]) == 2
    podman("stop", "--time", "0", "cxp1")
    podman("rm", "cxp1")
    assert h.ds.get(keys.workload_key(h.node, "cni", "cxp1", "eth0")) is None
    [left] = h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0]
    assert ip2.encode() in left.value
    podman("rm", "--force", "--time", "0", "cxp2")
    assert h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0] == []
    assert h.ds.get_prefix(keys.WORKLOADS_PREFIX)[0] == []
    assert [x for x in h.host_links() if x.startswith("cali")] == []


class Containerd:
    """A private containerd (state, sockets and opt dir under ``root``) started in the host namespace."""

    def __init__(self, h: CniHost, root: Path) -> None:
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            pytest.fail("containerd or ctr not found (Debian package containerd; scripts/setup.sh installs it)")
        if not Path("/etc/cni/net.d").is_dir() or not Path("/opt").is_dir():
            pytest.fail("ctr's CNI paths /etc/cni/net.d and /opt must exist to be bind-mounted over "
                        "(/etc/cni/net.d comes with Debian's containernetworking-plugins)")
        self.h = h
        self.root = root
        self.sock = root / "containerd.sock"
        (root / "opt").mkdir()
        net_d = root / "net.d"
        net_d.mkdir()
        # ctr's CNI takes the first conflist of /etc/cni/net.d and plugins from /opt/cni/bin (bound below)
        (net_d / "10-calyx.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "calyxctr", "plugins": [h.calyx_plugin()]}))
        cni_bin = root / "opt" / "cni" / "bin"
        cni_bin.mkdir(parents=True)
        for p in [*h.plugin_dir.iterdir(), *REFERENCE_PLUGINS.iterdir()]:
            (cni_bin / p.name).symlink_to(p.resolve())
        (root / "config.toml").write_text(f"""
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = "{root}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt/containerd"
""")
        self.rootfs = busybox_rootfs(root)
        self.log = open(root / "containerd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([*nsenter(h.host), "setpriv", "--pdeathsig", "KILL", "containerd", "--config",
                                      str(root / "config.toml")], stdout=self.log, stderr=self.log)
        for _ in range(100):
            if self.sock.exists() and self.ctr("version", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            self.stop()
            pytest.fail(f"containerd did not start: {(root / 'containerd.log').read_text()[-1000:]}")

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        script = ('mount --bind "$R/net.d" /etc/cni/net.d && mount --bind "$R/opt" /opt && '
                  'exec ctr --address "$R/containerd.sock" "$@"')
        env = self.h.env(R=str(self.root))
        cmd = [*nsenter(self.h.host), "unshare", "-m", "--propagation", "private", "sh", "-c", script, "ctr", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            for c in self.ctr("containers", "list", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "KILL", c, check=False)
                self.ctr("containers", "delete", c, check=False)
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
        for mnt in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = mnt.split()[1]
            if target.startswith(str(self.root)):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@pytest.fixture
def containerd(cni_host: CniHost) -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="cxctr-", dir="/tmp"))
    c = None
    try:
        c = Containerd(cni_host, root)
        yield c
    finally:
        if c is not None:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_containerd_ctr_run_cni(cni_host: CniHost, containerd: Containerd, pool: IPPool) -> None:
    h = cni_host
    proc = containerd.ctr("run", "--rm", "--cni", "--rootfs", str(containerd.rootfs), "cxk1",
                          "/bin/sh", "-c", "ip -4 addr show eth0; ip route", timeout=90)
    out = proc.stdout
    [line] = [x for x in out.splitlines() if "inet " in x]
    addr = line.split()[1]
    assert addr.endswith("/32") and ipaddress.ip_interface(addr).ip in pool.cidr, out
    assert "default via 169.254.1.1 dev eth0" in out
    # --rm in the foreground: DEL ran (with an empty CNI_NETNS) and released everything
    assert h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0] == []
    assert h.ds.get_prefix(keys.WORKLOADS_PREFIX)[0] == []
    assert [x for x in h.host_links() if x.startswith("cali")] == []
