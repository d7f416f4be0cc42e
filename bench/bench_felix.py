"""felix benchmarks (run as root): programming time, single-change latency, RSS, restart resync.

    .venv/bin/python bench/bench_felix.py [--endpoints 10000] [--backends nft,legacy] [--skip-daemon]

Everything happens in throwaway network namespaces (``cxt-…``), deleted at the end; the machine's
own iptables, ipsets and routes are never touched. Prints a markdown table.

1. **Program N endpoints with policies**, per backend: felix's time from the calculated model to a
   programmed kernel (rendering, hashing, readback of the empty table, diff, ``iptables-restore``)
   against one raw ``iptables-restore --noflush`` of the very same ruleset (what felix wrote, taken
   from its desired state) in a fresh namespace. Both get the same ipsets beforehand. Measured twice,
   alternating, best of each kept.
2. **One change** at 1k/5k/10k endpoints: an endpoint's labels change so that another policy
   selects it; felix's calculation + render + minimal restore, against a raw restore that rewrites
   that one endpoint chain. Median of 5.
3. **The daemon at N endpoints**: N endpoints, 20 profiles and 50 policies written to a real etcd;
   ``felix run`` started in a namespace; its RSS once in sync; then ``kill -9`` and a restart: the time
   from exec to the end of its first apply, and the number of iptables rules it rewrote (must be 0).
   Routes stay pending (the bench creates no interfaces), so route writes are not part of these numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calyx import model  # noqa: E402
from calyx.datastore import keys  # noqa: E402
from calyx.datastore.client import MAX_TXN_OPS, Put  # noqa: E402
from calyx.kernel import netns  # noqa: E402
from felix import rules  # noqa: E402
from felix.calc import Calculator  # noqa: E402
from felix.dataplane import Dataplane  # noqa: E402
from tests.fixtures.etcd import TcpProxy, new_member  # noqa: E402
from tests.fixtures.netns import Netns, create_netns  # noqa: E402

NODE = "bench-node"
APPS, TIERS, PROFILES, POLICIES = 100, 5, 20, 50


# --- the cluster model -------------------------------------------------------------------------------


def iface(i: int) -> str:
    """Calico's convention: ``cali`` + 11 hex characters of a hash of the workload's identity."""
    return "cali" + hashlib.sha1(f"k8s/w{i}/eth0".encode()).hexdigest()[:11]


def address(i: int) -> str:
    return f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def endpoint_value(i: int, app: int | None = None) -> dict[str, Any]:
    return {"iface": iface(i), "ipv4_nets": [address(i)],
            "labels": {"app": f"a{app if app is not None else i % APPS}", "tier": f"t{i % TIERS}"},
            "profiles": [f"prof{i % PROFILES}"]}


def cluster(n: int) -> list[tuple[str, bytes]]:
    """(key, JSON value) of the whole benchmark cluster."""
    out: list[tuple[str, bytes]] = []
    for p in range(PROFILES):
        out.append((keys.profile_key(f"prof{p}"), json.dumps({
            "ingress": [{"action": "allow", "source": {"selector": f"tier == 't{p % TIERS}'"}}],
            "egress": [{"action": "allow"}]}).encode()))
    for j in range(POLICIES):
        out.append((keys.policy_key(f"pol{j}"), json.dumps({
            "order": j, "selector": f"app == 'a{j}'",
            "ingress": [{"action": "deny", "protocol": "icmp"},
                        {"action": "allow", "protocol": "tcp", "source": {"selector": f"tier == 't{j % TIERS}'"},
                         "destination": {"ports": [80, 443, "8000:8100"]}}]}).encode()))
    out.append((keys.ippool_key("pool"), json.dumps({"cidr": "10.64.0.0/10", "nat_outgoing": True}).encode()))
    for i in range(n):
        out.append((keys.workload_key(NODE, "k8s", f"w{i}", "eth0"), json.dumps(endpoint_value(i)).encode()))
    return out


def load(calc: Calculator, items: list[tuple[str, bytes]]) -> None:
    for key, value in items:
        obj = model.decode(key, value)
        if obj is not None:
            calc.on_update(key, obj)


# --- helpers -------------------------------------------------------------------------------------------


@contextmanager
def namespace() -> Iterator[Netns]:
    ns = create_netns()
    try:
        yield ns
    finally:
        ns.delete()


def run_in(ns: Netns, fn: Callable[[], Any]) -> Any:
    with netns.enter(ns.name):
        return fn()


def restore(ns: Netns, backend: str, text: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["ip", "netns", "exec", ns.name, f"iptables-{backend}-restore", "--noflush"], input=text,
                   text=True, check=True)
    return time.monotonic() - t0


def preload_ipsets(ns: Netns, dp: Dataplane) -> None:
    ns.run("ipset", "restore", input=dp.ipsets.dump_desired())


def build(n: int, backend: str) -> tuple[Calculator, Dataplane, float]:
    calc = Calculator(NODE)
    items = cluster(n)
    t0 = time.monotonic()
    load(calc, items)
    t_calc = time.monotonic() - t0
    dp = Dataplane(calc, backend=backend, versions=(4,))
    return calc, dp, t_calc


# --- 1. full programming -----------------------------------------------------------------------------


def _settle() -> None:
    """Let the kernel finish tearing down the previous namespace (it frees a large ruleset in the
    background) before the next measurement."""
    time.sleep(3.0)


def bench_program(n: int, backend: str, repeats: int = 3) -> dict[str, Any]:
    felix_times: list[float] = []
    raw_times: list[float] = []
    render_times: list[float] = []
    t_calc = 0.0
    rules_total = 0

    def felix_once(calc: Calculator, dp: Dataplane) -> None:
        with namespace() as ns:
            t0 = time.monotonic()
            dp.update(calc.take_dirty())
            t_render = time.monotonic() - t0
            run_in(ns, dp.ipsets.apply_updates)  # not timed: the raw restore gets the same sets for free
            t1 = time.monotonic()
            for table in dp.tables.values():
                run_in(ns, table.apply)
            felix_times.append(t_render + (time.monotonic() - t1))
            render_times.append(t_render)
        _settle()

    def raw_once(dp: Dataplane) -> None:
        with namespace() as ns:
            preload_ipsets(ns, dp)
            raw_times.append(sum(restore(ns, backend, t.dump_desired()) for t in dp.tables.values()))
        _settle()

    for r in range(repeats):
        calc, dp, t_calc = build(n, backend)
        if r % 2:  # alternate the order
            felix_once(calc, dp)
            raw_once(dp)
        else:
            calc2, dp2, _ = build(n, backend)
            dp2.update(calc2.take_dirty())
            raw_once(dp2)
            felix_once(calc, dp)
        rules_total = sum(len(t.desired_rules(c)) for t in dp.tables.values() for c in t.chain_names)
    return {"felix": min(felix_times), "render": min(render_times), "raw": min(raw_times), "calc": t_calc,
            "rules": rules_total, "felix_all": felix_times, "raw_all": raw_times}


# --- 2. one change -------------------------------------------------------------------------------------


def bench_change(n: int, backend: str, repeats: int = 5) -> dict[str, float]:
    calc, dp, _ = build(n, backend)
    felix_times: list[float] = []
    raw_times: list[float] = []
    written: list[int] = []
    with namespace() as ns:
        dp.update(calc.take_dirty())
        run_in(ns, dp.ipsets.apply_updates)
        for table in dp.tables.values():
            run_in(ns, table.apply)
        filt = dp.filter[4]
        for r in range(repeats):
            i = (r * 7919) % n
            key = keys.workload_key(NODE, "k8s", f"w{i}", "eth0")
            new_app = (i % APPS + 1 + r) % POLICIES  # a different policy selects it now
            value = json.dumps(endpoint_value(i, app=new_app)).encode()
            t0 = time.monotonic()
            obj = model.decode(key, value)
            calc.on_update(key, obj)
            dp.update(calc.take_dirty())
            ip_stats = run_in(ns, dp.ipsets.apply_updates)
            st = run_in(ns, filt.apply)
            felix_times.append(time.monotonic() - t0)
            written.append(st.rules_inserted + st.rules_deleted)
            del ip_stats
            # raw: rewrite that endpoint's to-workload chain in one restore
            chain = rules.to_wl_chain(iface(i))
            text = f"*filter\n:{chain} - [0:0]\n" + "".join(
                f"-A {chain} {line}\n" for line in filt.desired_rules(chain)) + "COMMIT\n"
            raw_times.append(restore(ns, backend, text))
    return {"felix": statistics.median(felix_times), "raw": statistics.median(raw_times),
            "rules_written": statistics.median(written)}


# --- 3. the daemon ---------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_daemon(n: int, backend: str, tmp: Path) -> dict[str, float]:
    member = new_member(tmp / "etcd")
    relay = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ds = member.client()
        items = cluster(n)
        for k in range(0, len(items), MAX_TXN_OPS):
            ds.commit([Put(key, value) for key, value in items[k:k + MAX_TXN_OPS]])
        with namespace() as ns:
            relay = TcpProxy(member.client_port, netns=ns.name, port=2379)
            cfg = tmp / "calyx.toml"
            cfg.write_text("")
            env = dict(os.environ, CALYX_CONFIG=str(cfg), CALYX_NODE_NAME=NODE,
                       CALYX_ETCD_ENDPOINTS="http://127.0.0.1:2379", CALYX_IPTABLES_BACKEND=backend,
                       CALYX_ENDPOINT_STATUS="false", CALYX_METRICS_PORT="0", CALYX_LOG_LEVEL="info")

            def start(n_run: int) -> tuple[subprocess.Popen[bytes], Path, float]:
                log = tmp / f"felix-{backend}-{n_run}.log"
                with open(log, "wb") as out:
                    t0 = time.monotonic()
                    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(REPO / ".venv/bin/felix"), "run"],
                                            env=env, stdout=out, stderr=subprocess.STDOUT)
                procs.append(proc)
                deadline = time.monotonic() + 300
                while "first apply complete" not in log.read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"felix did not sync:\n{log.read_text()[-3000:]}")
                    time.sleep(0.05)
                return proc, log, time.monotonic() - t0

            proc, _, t_first = start(1)
            time.sleep(1.0)
            rss = rss_mb(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc2, log2, t_restart = start(2)
            text = log2.read_text()
            # the apply summary (logged only when an apply did work): <table>=+inserted/-deleted/chains...
            rewritten = sum(int(a) + int(b) for a, b in re.findall(r"=\+(\d+)/-(\d+)/chains", text))
            if "the kernel was already right" not in text:
                rewritten = max(rewritten, 1)
            proc2.send_signal(signal.SIGTERM)
            proc2.wait(timeout=30)
            ds.close()
            return {"first": t_first, "rss": rss, "restart": t_restart, "rewritten": rewritten}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if relay is not None:
            relay.close()
        member.destroy()


# --- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--backends", default="nft,legacy")
    ap.add_argument("--change-sizes", default="1000,5000,10000")
    ap.add_argument("--only", choices=("program", "change", "daemon"), default=None, help="run one part")
    ap.add_argument("--keep-logs", default=None, help="copy felix's logs of the daemon part here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_felix.py needs root (network namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanups (namespaces, etcd, felix)
    backends = args.backends.split(",")
    n = args.endpoints
    rows: list[str] = []
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = {args.only} if args.only else {"program", "change", "daemon"}
    for b in backends if "program" in parts else ():
        r = bench_program(n, b)
        runs = "/".join(f"{x:.2f}" for x in r["felix_all"]), "/".join(f"{x:.2f}" for x in r["raw_all"])
        rows.append(f"| program {n:,} endpoints ({int(r['rules']):,} rules), best of 3 ({runs[0]} vs {runs[1]}) | "
                    f"{b} | {r['felix']:.2f} s (render {r['render']:.2f} s; calculation {r['calc']:.2f} s more) | "
                    f"{r['raw']:.2f} s | {r['felix'] / r['raw']:.2f} | ≤ 1.3 |")
        print(rows[-1], flush=True)
    for b in backends if "change" in parts else ():
        for size in (int(s) for s in args.change_sizes.split(",")):
            r = bench_change(size, b)
            rows.append(f"| one change at {size:,} endpoints ({int(r['rules_written'])} rules written) | {b} | "
                        f"{r['felix'] * 1000:.0f} ms | {r['raw'] * 1000:.0f} ms | {r['felix'] / r['raw']:.2f} | ≤ 2 |")
            print(rows[-1], flush=True)
    if "daemon" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-felix-") as d:
            for b in backends:
                r = bench_daemon(n, b, Path(d) / b)
                if args.keep_logs:
                    Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                    for log in (Path(d) / b).glob("felix-*.log"):
                        shutil.copy(log, Path(args.keep_logs) / log.name)
                rows.append(f"| daemon RSS at {n:,} endpoints (in sync) | {b} | {r['rss']:.0f} MB | | | ≤ 150 MB |")
                rows.append(f"| daemon first start to programmed, {n:,} endpoints | {b} | {r['first']:.2f} s | | | |")
                rows.append(f"| restart (kill -9) to in sync, {n:,} endpoints | {b} | {r['restart']:.2f} s, "
                            f"{r['rewritten']} rules rewritten | | | ≤ 5 s, 0 rewritten |")
                print("\n".join(rows[-3:]), flush=True)
    print()
    print(f"felix benchmark, {started}, `{' '.join(sys.argv)}`")
    print()
    print("| measure | backend | felix | raw iptables-restore | ratio | target |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
