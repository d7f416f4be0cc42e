"""Convergence of a new workload in a lab: from its endpoint written to etcd until it answers a ping
from another rack, with the stages in between.

What it measures, each as a wall-clock time (``time.time()``):

- ``written``: the workload endpoint's key appears in etcd (a watch on the host's workload prefix;
  about 1 ms after the write);
- ``route``: the /32 route to the workload appears in its host's kernel (the CNI plugin may add it
  before it writes the endpoint: then this is 0);
- ``programmed``: felix reports the endpoint programmed (its endpoint status key turns ``up``; the
  status is written by a background thread, so this is an upper bound);
- ``announced``: the first BGP UPDATE the host sends after the write (``tcpdump`` in the host's
  namespace; only for an endpoint that opened a new block);
- ``tor_learned``: the workload's block (or /32) route appears in the kernel of the host's own
  ToR/router — bgpd announced it and the router installed it (only when the block is new: an
  endpoint in a block that was already announced needs no BGP at all, which is the point of
  blocks);
- ``remote_installed``: the same route appears in the kernel of the pinging host;
- ``reachable``: the first echo reply seen by ``ping -D`` from a workload on another host.

Stages that happen before the endpoint write (the CNI plugin's route, the announcement of a
block IPAM claimed for it) come out negative.

Kernel events come from ``ip -ts monitor route`` run inside each namespace (timestamps taken by
``ip`` as it reads the netlink message), so polling does not blur them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from calyx.datastore import keys
from calyx.datastore.client import Watch
from calyx.lab.runner import Lab, WorkloadState
from calyx.lab.topology import Workload

_TS = re.compile(r"^\[(\d{4}-\d\d-\d\dT[\d:.]+)\]\s+(Deleted\s+)?(\S+)")
_PING = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")


class RouteMonitor:
    """``ip -ts monitor route`` inside one namespace; remembers when each destination appeared."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.added: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(["ip", "-n", netns, "-ts", "monitor", "route"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name=f"monitor-{netns}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            m = _TS.match(line)
            if not m or m.group(2):
                continue
            dst = m.group(3)
            if dst in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "throw"):
                continue
            t = datetime.fromisoformat(m.group(1)).timestamp()
            if "/" not in dst:
                dst += "/32"
            with self._lock:
                self.added.setdefault(dst, []).append(t)

    def first_after(self, dst: str, since: float) -> float | None:
        with self._lock:
            times = [t for t in self.added.get(dst, []) if t >= since - 0.001]
        return min(times) if times else None

    def close(self) -> None:
        self._proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)


class UpdateMonitor:
    """BGP UPDATE messages leaving a host (``tcpdump`` in its namespace): when was something announced."""

    # the first BGP message in the segment is an UPDATE (type byte at offset 18 of the BGP header)
    FILTER = "src host {ip} and tcp port 179 and tcp[((tcp[12] >> 4) * 4) + 18] == 2"

    def __init__(self, netns: str, ip: str) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-i", "any", "-n", "-tt", "-l", "-q",
             self.FILTER.format(ip=ip)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name=f"updates-{netns}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            head = line.split(" ", 1)[0]
            with contextlib.suppress(ValueError), self._lock:
                self.times.append(float(head))

    def first_after(self, since: float) -> float | None:
        with self._lock:
            times = [t for t in self.times if t >= since - 0.001]
        return min(times) if times else None

    def close(self) -> None:
        self._proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)


class KeyWatcher:
    """When did keys under a prefix first get written (with a value ``accept`` likes); an etcd watch
    from the current revision."""

    def __init__(self, lab: Lab, prefix: str, accept: Callable[[bytes], bool] = lambda _: True) -> None:
        self.seen: dict[str, float] = {}
        self._accept = accept
        self._watch: Watch = lab.datastore().watch_prefix(prefix, lab.datastore().revision() + 1)
        self._thread = threading.Thread(target=self._read, name="key-watcher", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for events in self._watch:
                now = time.time()
                for ev in events:
                    if ev.type == "put" and self._accept(ev.kv.value):
                        self.seen.setdefault(ev.kv.key, now)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._watch.cancel()


@dataclass(frozen=True)
class Sample:
    """One workload's convergence; stage times in seconds after ``written`` (None: not observed)."""

    workload: str
    ip: str
    new_block: bool
    written: float
    route: float | None
    programmed: float | None
    announced: float | None
    tor_learned: float | None
    remote_installed: float | None
    reachable: float | None

    @property
    def total(self) -> float | None:
        return self.reachable


def _endpoint_up(value: bytes) -> bool:
    try:
        return bool(json.loads(value).get("state") == "up")
    except (ValueError, AttributeError):
        return False


def _rel(t: float | None, t0: float) -> float | None:
    """Seconds after the endpoint write; negative when the stage happened before it (the CNI plugin
    adds the /32 route, and IPAM claims the block — which bgpd announces at once — before it writes
    the endpoint)."""
    return None if t is None else t - t0


class ConvergenceProbe:
    """Route monitors on the workload's host, its router and the pinging host, plus an etcd watch."""

    def __init__(self, lab: Lab, host: str, router: str, pinger: str) -> None:
        self.lab = lab
        self.host = host
        self.pinger = pinger
        self.monitors = {n: RouteMonitor(lab.ns(n)) for n in (host, router, lab.state.workloads[pinger].host)}
        self.router = router
        self.remote_host = lab.state.workloads[pinger].host
        self.watcher = KeyWatcher(lab, keys.workloads_prefix(host))
        self.status = KeyWatcher(lab, keys.status_prefix(host), _endpoint_up)
        host_ip = next(str(a[3]).split("/")[0] for a in lab.topo.nodes[host].exec if a[:3] == ("ip", "addr", "add"))
        self.updates = UpdateMonitor(lab.ns(host), host_ip) if shutil.which("tcpdump") else None
        time.sleep(0.3)  # let the monitors subscribe

    def close(self) -> None:
        for m in self.monitors.values():
            m.close()
        self.watcher.close()
        self.status.close()
        if self.updates is not None:
            self.updates.close()

    def measure(self, wl: Workload, timeout: float = 15.0) -> Sample:
        """Create ``wl`` through the CNI plugin and time each stage until the pinger gets a reply."""
        blocks_before = set(self.lab.blocks_of(self.host))
        started = time.time()
        # the address is not known before ADD: ping starts right after it, and catches the first reply
        ws: WorkloadState = self.lab.add_workload(wl)
        assert ws.ip is not None
        # no -w: with a deadline ping gives up at the first ICMP error (e.g. "net unreachable" from a
        # router that has not learned the route yet); a timer ends it instead
        ping = subprocess.Popen(["ip", "netns", "exec", self.lab.ns(self.pinger), "stdbuf", "-oL", "ping", "-n",
                                 "-D", "-i", "0.01", "-W", "1", "-c", str(int(timeout / 0.01)), ws.ip],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        timer = threading.Timer(timeout, ping.terminate)
        timer.start()
        reachable = None
        try:
            assert ping.stdout is not None
            for line in ping.stdout:
                m = _PING.match(line)
                if m:
                    reachable = float(m.group(1))
                    break
        finally:
            timer.cancel()
            ping.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                ping.wait(5)
        # the plugin names the workload <K8S_POD_NAMESPACE>.<K8S_POD_NAME>, which the runner sets to
        # <instance>.<workload> (see calyx.cni.netconf and Lab._cni)
        ident = ("lab", f"{self.lab.state.instance}.{wl.name}", "eth0")
        key = keys.workload_key(self.host, *ident)
        status_key = keys.endpoint_status_key(self.host, *ident)
        deadline = time.monotonic() + 2
        while key not in self.watcher.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        written = self.watcher.seen.get(key, started)
        blocks_after = set(self.lab.blocks_of(self.host))
        addr = ipaddress.ip_address(ws.ip)
        block = next((b for b in blocks_after if addr in ipaddress.ip_network(b)), f"{ws.ip}/32")
        new_block = block not in blocks_before
        time.sleep(0.05)  # let the monitors' readers catch up with the last events
        return Sample(
            workload=wl.name, ip=ws.ip, new_block=new_block, written=written,
            route=_rel(self.monitors[self.host].first_after(f"{ws.ip}/32", started), written),
            programmed=_rel(self.status.seen.get(status_key), written),
            announced=_rel(self.updates.first_after(started), written) if new_block and self.updates else None,
            tor_learned=_rel(self.monitors[self.router].first_after(block, started), written) if new_block else None,
            remote_installed=_rel(self.monitors[self.remote_host].first_after(block, started), written)
            if new_block else None,
            reachable=_rel(reachable, written),
        )


@contextlib.contextmanager
def probe(lab: Lab, host: str, router: str, pinger: str) -> Iterator[ConvergenceProbe]:
    p = ConvergenceProbe(lab, host, router, pinger)
    try:
        yield p
    finally:
        p.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Median and p99 (seconds) of every stage over the samples that observed it."""
    out: dict[str, dict[str, float]] = {}
    for stage in ("route", "programmed", "announced", "tor_learned", "remote_installed", "reachable"):
        vals = [getattr(s, stage) for s in samples if getattr(s, stage) is not None]
        if vals:
            out[stage] = {"n": len(vals), "median": statistics.median(vals), "p99": percentile(vals, 99),
                          "max": max(vals)}
    return out
