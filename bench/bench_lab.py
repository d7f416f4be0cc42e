"""Lab benchmark: endpoint written to etcd → reachable from another rack, over 200 endpoints.

Brings up the two-racks lab on the namespace runner (felix, bgpd, CNI plugins, FRR ToRs, etcd),
then creates workloads one after another on h2b (rack 2) through the ``calyx`` CNI plugin and
pings each from a workload on h1a (rack 1). For every endpoint it records (see
:mod:`calyx.lab.convergence`): the etcd write (watch), felix's /32 route in h2b's kernel, and — for
an endpoint that opened a new IPAM block, the only case that needs BGP — the block in tor2's kernel
(bgpd announced it, the ToR learned and installed it) and in h1a's kernel, then the first echo
reply. It prints median and p99 per stage, and a Markdown table for docs/benchmarks.md.

Run as root:  .venv/bin/python bench/bench_lab.py [--count 200] [--json results.json]
Targets (issue 6): median ≤ 300 ms, p99 ≤ 1 s from write to reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from calyx.lab.convergence import Sample, probe, summary
from calyx.lab.runner import Lab, LabError, missing_programs
from calyx.lab.topology import Workload, resolve

STAGES = (("route", "/32 route in h2b's kernel"),
          ("programmed", "felix programmed (endpoint status up)"),
          ("announced", "announced (first BGP UPDATE from h2b)"),
          ("tor_learned", "ToR learned (block in tor2's kernel)"),
          ("remote_installed", "remote kernel installed (block in h1a's kernel)"),
          ("reachable", "reachable (first reply to h1a's workload)"))


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def markdown(samples: list[Sample], count: int, elapsed: float, block_size: int) -> str:
    allsum = summary(samples)
    newsum = summary([s for s in samples if s.new_block])
    lines = [
        f"### Lab convergence: endpoint written → reachable from another rack ({count} endpoints, "
        f"/{block_size} blocks, {time.strftime('%Y-%m-%d')})",
        "",
        f"two-racks lab on the namespace runner, {platform.node()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores; run took {elapsed:.0f} s. Stages are measured from the etcd write of the "
        "endpoint; negative: before it (the CNI plugin adds the route, and IPAM claims a new block, which "
        "bgpd announces at once, before it writes the endpoint). BGP stages exist only for endpoints that "
        "opened a new block.",
        "",
        "| stage | endpoints | median | p99 | max |",
        "|---|---|---|---|---|",
    ]
    for key, label in STAGES:
        for tag, summ in (("all", allsum), ("new block", newsum)):
            if key in summ and (tag == "all" or (key == "reachable" and block_size != 32)):
                s = summ[key]
                lines.append(f"| {label}{' — endpoints opening a new block' if tag != 'all' else ''} | {s['n']:.0f} | "
                             f"{_ms(s['median'])} | {_ms(s['p99'])} | {_ms(s['max'])} |")
    never = sum(1 for s in samples if s.reachable is None)
    lines += ["", f"Never reachable within the timeout: {never}. Targets: median ≤ 300 ms, p99 ≤ 1 s."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each endpoint's first reply")
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--root", type=Path, default=Path("/run/calyx-lab-bench"))
    ap.add_argument("--block-size", type=int, default=26,
                    help="block size of the benchmark's own pool (32: every endpoint is a new block and needs BGP)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_lab: run as root (network namespaces)", file=sys.stderr)
        return 2
    missing = missing_programs(["felix", "bgpd", "calyx", "calyx-ipam"])
    if missing:
        print(f"bench_lab: cannot run: not installed yet: {', '.join(missing)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    lab = Lab.create(resolve("two-racks"), instance="bench", root=args.root,
                     progress=lambda m: print(f"[{time.monotonic() - t0:6.1f}s] {m}", file=sys.stderr))
    samples: list[Sample] = []
    try:
        lab.up()
        lab.apply_text(f"kind: IPPool\nname: bench-pool\nspec: {{cidr: 10.80.0.0/16, block_size: {args.block_size}}}\n")
        with probe(lab, host="h2b", router="tor2", pinger="a-h1a") as p:
            for i in range(args.count):
                wl = Workload(f"bench-{i}", "h2b", {"tenant": "bench"}, ("lab",), ("bench-pool",))
                s = p.measure(wl, timeout=args.timeout)
                samples.append(s)
                if (i + 1) % 20 == 0:
                    done = [x.reachable for x in samples if x.reachable is not None]
                    print(f"[{time.monotonic() - t0:6.1f}s] {i + 1}/{args.count} endpoints; "
                          f"last reachable after {_ms(s.reachable) if s.reachable is not None else 'never'}; "
                          f"{len(done)} reachable so far", file=sys.stderr)
    except LabError as exc:
        print(f"bench_lab: {exc}", file=sys.stderr)
        return 1
    finally:
        if lab.owned:
            lab.down()
    elapsed = time.monotonic() - t0
    if args.json:
        args.json.write_text(json.dumps([s.__dict__ for s in samples], indent=1))
    print(json.dumps({"all": summary(samples), "new_block": summary([s for s in samples if s.new_block])}, indent=2))
    print()
    print(markdown(samples, args.count, elapsed, args.block_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
