"""CNI ADD latency of the ``calyx`` plugin (with ``calyx-ipam``) driven by cnitool, and concurrent ADDs.

What it measures, all inside throwaway namespaces (a "host" namespace with an uplink and default
route, one namespace per container) against a private etcd:

1. ``--adds`` (200) sequential ``cnitool add`` calls, each timed from fork to exit (cnitool in Go,
   then our plugin, IPAM and the datastore writes); then as many ``cnitool del``;
2. ``--concurrent`` (20) ``cnitool add`` started at once: every one must succeed (no
   compare-and-swap conflict may surface to the caller) and no address may be given twice;
3. for reference, the cost of just starting the plugin (``VERSION``) and of an empty interpreter.

Each is measured twice (``--modes``): ``exec``, every call runs in the plugin's own fresh interpreter
(``CALYX_CNI_SOCKET=off``), and ``service``, the plugin hands the call to ``calyx-cni-server``
(started here on a private socket) and only the small forwarding client starts per call.

Bytecode is compiled first and ``PYTHONDONTWRITEBYTECODE`` is dropped from the plugins'
environment: an installed plugin runs from .pyc files. Prints a markdown table.

Usage: ``.venv/bin/python bench/bench_cni.py [--adds 200] [--concurrent 20] [--modes exec,service]`` (root).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import ipaddress
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calyx import model  # noqa: E402
from calyx.datastore import keys  # noqa: E402
from calyx.model import IPPool, Node  # noqa: E402
from tests.fixtures.cni import REFERENCE_PLUGINS, unix_etcd  # noqa: E402
from tests.fixtures.etcd import free_ports  # noqa: E402
from tests.fixtures.netns import create_veth, netns_session  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def measure(args: argparse.Namespace, cnitool: str, env: dict[str, str], host: Any, new_ns: Any, ds: Any,
            plugin_dir: Path) -> dict[str, object]:
    """Sequential ADDs and DELs, concurrent ADDs and the start-up references, in one mode."""
    enter = ["nsenter", f"--net={host.path}"]
    cpu: dict[str, list[float]] = {"add": [], "del": [], "version": [], "bare": []}

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (r.ru_utime + r.ru_stime) * 1000

    def run(cmd: str, ns_path: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        c0 = children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run([*enter, cnitool, cmd, "bench", ns_path], env=env, capture_output=True,
                              text=True, check=False)
        wall = (time.perf_counter() - t0) * 1000
        cpu.setdefault(cmd, []).append(children_cpu() - c0)
        return wall, proc

    def timed(what: str, cmd: list[str], stdin: bytes = b"") -> float:
        c0 = children_cpu()
        t0 = time.perf_counter()
        subprocess.run([*enter, *cmd], input=stdin, env={**env, "CNI_COMMAND": "VERSION"}, capture_output=True,
                       check=True)
        wall = (time.perf_counter() - t0) * 1000
        cpu[what].append(children_cpu() - c0)
        return wall

    bare = [timed("bare", [sys.executable, "-c", "pass"]) for _ in range(20)]
    version = [timed("version", [str(plugin_dir / "calyx")], b'{"cniVersion":"1.0.0"}') for _ in range(20)]

    # 1. sequential
    containers = [new_ns() for _ in range(args.adds)]
    add_ms: list[float] = []
    addrs: list[str] = []
    for c in containers:
        ms, proc = run("add", c.path)
        if proc.returncode != 0:
            raise SystemExit(f"ADD failed: {proc.stdout} {proc.stderr}")
        add_ms.append(ms)
        addrs.append(json.loads(proc.stdout)["ips"][0]["address"])
    del_ms = []
    for c in containers:
        ms, proc = run("del", c.path)
        if proc.returncode != 0:
            raise SystemExit(f"DEL failed: {proc.stdout} {proc.stderr}")
        del_ms.append(ms)
    assert len(set(addrs)) == len(addrs)
    for c in containers:
        c.delete()

    # 2. concurrent
    conc = [new_ns() for _ in range(args.concurrent)]
    t0 = time.perf_counter()
    procs = [(time.perf_counter(), subprocess.Popen([*enter, cnitool, "add", "bench", c.path], env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for c in conc]
    conc_ms = []
    conc_addrs = []
    failures = []
    for started, p in procs:
        out, err = p.communicate(timeout=120)
        conc_ms.append((time.perf_counter() - started) * 1000)
        if p.returncode != 0:
            failures.append(err.strip() or out.strip())
        else:
            conc_addrs.append(json.loads(out)["ips"][0]["address"])
    conc_wall = (time.perf_counter() - t0) * 1000
    handles = len(ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0])
    for c in conc:
        run("del", c.path)
        c.delete()

    def c50(what: str) -> str:
        return f"{statistics.median(cpu[what]):.1f}" if cpu.get(what) else "-"

    rows = [
        ["sequential ADD", str(len(add_ms)), f"{statistics.median(add_ms):.1f}", f"{pct(add_ms, 99):.1f}",
         f"{max(add_ms):.1f}", c50("add"), "p50 ≤ 60, p99 ≤ 200"],
        ["sequential DEL", str(len(del_ms)), f"{statistics.median(del_ms):.1f}", f"{pct(del_ms, 99):.1f}",
         f"{max(del_ms):.1f}", c50("del"), ""],
        [f"concurrent ADD (all {args.concurrent} at once; wall {conc_wall:.0f} ms)", str(len(conc_ms)),
         f"{statistics.median(conc_ms):.1f}", f"{pct(conc_ms, 99):.1f}", f"{max(conc_ms):.1f}", "-", ""],
        ["reference: plugin start-up (VERSION)", str(len(version)), f"{statistics.median(version):.1f}",
         f"{pct(version, 99):.1f}", f"{max(version):.1f}", c50("version"), ""],
        ["reference: `python -c pass` (venv)", str(len(bare)), f"{statistics.median(bare):.1f}",
         f"{pct(bare, 99):.1f}", f"{max(bare):.1f}", c50("bare"), ""],
    ]
    dup = len(conc_addrs) - len(set(conc_addrs))
    summary = (f"concurrent: {len(conc_addrs)}/{args.concurrent} succeeded, {len(failures)} failed, "
               f"{dup} duplicate addresses, {handles} handles in etcd afterwards.")
    return {"rows": rows, "summary": summary, "failures": failures, "ok": not failures and dup == 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adds", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--modes", default="exec,service", help="comma-separated: exec, service")
    ap.add_argument("--plugins", type=Path, default=VENV_BIN,
                    help="directory holding the calyx and calyx-ipam executables (default: the virtualenv's)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 2
    load_at_start = os.getloadavg()[0]
    cnitool = subprocess.run([str(REPO / "scripts" / "build-cnitool.sh")], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
    compileall.compile_dir(str(REPO / "calyx"), quiet=1)

    root = Path(tempfile.mkdtemp(prefix="cxb-", dir="/tmp"))
    etcd = None
    try:
        client_port, peer_port = free_ports(2)
        etcd = unix_etcd("bench", root, client_port, peer_port)
        etcd.start()
        ds = etcd.client()
        ds.put(keys.ippool_key("bench"), model.encode(IPPool("bench", ipaddress.ip_network("10.80.0.0/16"), 26)))
        ds.put(keys.node_key("bench-host"), model.encode(Node("bench-host")))
        plugin_dir = root / "bin"
        plugin_dir.mkdir()
        for name in ("calyx", "calyx-ipam"):
            (plugin_dir / name).symlink_to(args.plugins.resolve() / name)
        net_d = root / "net.d"
        net_d.mkdir()
        (net_d / "bench.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "bench", "plugins": [{
                "type": "calyx", "etcd_endpoints": [etcd.unix_endpoint],  # type: ignore[attr-defined]
                "node_name": "bench-host", "ipam": {"type": "calyx-ipam"}}]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CALYX_"))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(CNI_PATH=f"{plugin_dir}:{REFERENCE_PLUGINS}", NETCONFPATH=str(net_d))

        modes = [m for m in args.modes.split(",") if m]
        results: dict[str, dict[str, object]] = {}
        server = None
        with netns_session() as new_ns:
            host, uplink = new_ns(), new_ns()
            create_veth(host, uplink, "10.99.0.2/24", "10.99.0.1/24")
            host.ip("route", "add", "default", "via", "10.99.0.1")
            for mode in modes:
                mode_env = dict(env)
                if mode == "service":
                    sock = root / "cni.sock"
                    server = subprocess.Popen([str(VENV_BIN / "calyx-cni-server"), "--socket", str(sock),
                                               "--log-level", "warning"], env=mode_env)
                    deadline = time.monotonic() + 20
                    while not sock.exists():
                        if time.monotonic() > deadline or server.poll() is not None:
                            raise SystemExit("calyx-cni-server did not start")
                        time.sleep(0.05)
                    mode_env["CALYX_CNI_SOCKET"] = str(sock)
                elif mode == "exec":
                    mode_env["CALYX_CNI_SOCKET"] = "off"
                else:
                    raise SystemExit(f"unknown mode {mode!r} (exec, service)")
                try:
                    results[mode] = measure(args, cnitool, mode_env, host, new_ns, ds, plugin_dir)
                finally:
                    if server is not None:
                        server.terminate()
                        server.wait(timeout=30)
                        server = None

        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()[0]
        print(f"\n### CNI ADD latency (cnitool → calyx → calyx-ipam → etcd), {date}\n")
        print(f"Plugins: {args.plugins}. Machine: {platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, "
              f"load average {load_at_start:.2f} at the start, {load:.2f} at the end.\n")
        print("| mode | measurement | n | p50 ms | p99 ms | max ms | CPU p50 ms | target |")
        print("|---|---|---|---|---|---|---|---|")
        ok = True
        for mode, r in results.items():
            for row in r["rows"]:  # type: ignore[attr-defined]
                print(f"| {mode} | " + " | ".join(row) + " |")
        print("\nCPU: user+system time of the client and every plugin process it ran (children's rusage): "
              "what the call costs when it has a core to itself; wall time adds waiting for a core and "
              "for etcd's fsync. In service mode the service's own CPU is not in this column.")
        for mode, r in results.items():
            print(f"\n{mode}: {r['summary']}")
            for f in r["failures"][:5]:  # type: ignore[index]
                print(f"  failure: {f}")
            ok = ok and bool(r["ok"])
        return 0 if ok else 1
    finally:
        if etcd is not None:
            etcd.destroy()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
