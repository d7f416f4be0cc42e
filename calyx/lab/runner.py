"""The namespace lab runner: build a containerlab topology from network namespaces and run Calyx in it.

What it owns: one lab *instance* (default name: the clab file's ``name``), made of

- the namespaces ``cx-<instance>.<node>`` (and ``cx-<instance>._mgmt``, ``cx-<instance>.w.<workload>``)
  and the links inside them (:mod:`calyx.lab.fabric`);
- the processes it starts in them (:mod:`calyx.lab.procs`): etcd on the etcd node, FRR's zebra and
  bgpd or BIRD on router nodes, ``felix run`` and ``bgpd run`` on host nodes, and a loopback
  forwarder that makes the lab's etcd reachable from the machine;
- a directory ``$CALYX_LAB_DIR/<instance>`` (default ``/run/calyx-lab``) with ``state.json`` (what
  exists, so that ``lab down`` from another process finds it all), and per node ``log/``,
  ``calyx.toml`` and per daemon ``state``/``run`` directories; FRR's sockets under
  ``/var/run/frr/cx-<instance>.<node>``.

``up`` goes in a fixed order (namespaces and links → node ``exec`` lines → etcd → cluster objects →
routers → host daemons → each host's CNI service → workloads), writes the state file before each
step starts something, and on failure raises :class:`LabError` naming the node with the tail of its
log. ``down`` kills what the state file lists, then every process still inside one of the
instance's namespaces, deletes the namespaces and FRR's directories: it cleans up after a crashed
``up`` as well. The machine's own namespace is never changed (the forwarder only binds a loopback port).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calyx import model
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.lab import fabric, procs, sdhosts
from calyx.lab.fabric import FabricError
from calyx.lab.procs import Proc
from calyx.lab.topology import LabNode, Topology, TopologyError, Workload
from calyx.lab.topology import load as load_topology

DEFAULT_ROOT = "/run/calyx-lab"
ETCD_PORT = 2379
FRR_DIR = Path("/usr/lib/frr")
FRR_RUN = Path("/var/run/frr")
DAEMONS = ("felix", "bgpd")
HOST_MODES = ("processes", "systemd")
#: the systemd unit of each host program in the Debian package
UNITS = {"felix": "felix.service", "bgpd": "bgpd.service", "cni": "calyx-cni.service"}
REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 90.0
#: entry points and the modules that implement them (a missing module means "not installed yet")
PROGRAMS = {
    "felix": "felix.cli", "bgpd": "bgpd.cli", "calyx": "calyx.cni.plugin", "calyx-ipam": "calyx.cni.ipam_plugin",
    "calyx-cni-server": "calyx.cni.server",
}

INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")

Progress = Callable[[str], None]


class LabError(RuntimeError):
    """A lab step failed; names the node and carries the tail of its log."""

    def __init__(self, message: str, *, node: str | None = None, log: str | None = None) -> None:
        self.node = node
        self.log = log
        text = f"{node}: {message}" if node else message
        if log:
            text += f"\n--- {log} (last lines) ---\n{procs.tail(log)}"
        super().__init__(text)


def lab_root() -> Path:
    return Path(os.environ.get("CALYX_LAB_DIR") or DEFAULT_ROOT)


def program(name: str) -> str | None:
    """Path of one of Calyx's programs in this installation, or None if it is not available."""
    module = PROGRAMS[name]
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:
        return None
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    return shutil.which(name)


def missing_programs(names: Sequence[str]) -> list[str]:
    return [f"{n} (module {PROGRAMS[n]})" for n in names if program(n) is None]


def ipip_available(netns: str) -> bool:
    """IP-in-IP exists in this kernel when a fresh namespace has ``tunl0`` (module loaded or built in)."""
    return fabric.run_ip(["link", "show", "tunl0"], netns=netns, check=False).returncode == 0


@dataclass
class WorkloadState:
    name: str
    host: str
    netns: str
    ip: str | None = None
    iface: str | None = None


@dataclass
class LabState:
    """What exists of an instance; saved as JSON after every change."""

    instance: str
    clab_file: str
    prefix: str
    phase: str = "creating"
    etcd_port: int | None = None
    daemons: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    workloads: dict[str, WorkloadState] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: how the Calyx hosts run: "processes" (felix and bgpd started by the lab) or "systemd"
    #: (a systemd-nspawn machine per host with the Debian package ``deb`` installed, units running)
    hosts: str = "processes"
    deb: str = ""

    def to_json(self) -> str:
        return json.dumps({
            "instance": self.instance, "clab_file": self.clab_file, "prefix": self.prefix, "phase": self.phase,
            "etcd_port": self.etcd_port, "started": self.started, "daemons": self.daemons,
            "procs": [p.to_dict() for p in self.procs],
            "workloads": {k: vars(v) for k, v in self.workloads.items()},
            "hosts": self.hosts, "deb": self.deb,
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        d = json.loads(text)
        return cls(
            instance=d["instance"], clab_file=d["clab_file"], prefix=d["prefix"], phase=d.get("phase", "?"),
            etcd_port=d.get("etcd_port"), started=d.get("started", 0.0), daemons=list(d.get("daemons", [])),
            procs=[Proc.from_dict(p) for p in d.get("procs", [])],
            workloads={k: WorkloadState(**v) for k, v in d.get("workloads", {}).items()},
            hosts=d.get("hosts", "processes"), deb=d.get("deb", ""),
        )


def _quiet(_: str) -> None:
    pass


class Lab:
    """One lab instance. Create with :meth:`create` (before ``up``) or :meth:`attach` (a running one)."""

    def __init__(self, topo: Topology, state: LabState, root: Path, progress: Progress = _quiet) -> None:
        self.topo = topo
        self.state = state
        self.root = root
        self.dir = root / state.instance
        self.progress = progress
        self._ds: Datastore | None = None
        #: set once ``up`` has started creating things: only then may a failed ``up`` tear down
        self.owned = False

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def create(cls, clab_file: Path, *, instance: str | None = None, root: Path | None = None,
               progress: Progress = _quiet) -> Lab:
        topo = load_topology(clab_file)
        name = instance or topo.name
        if not INSTANCE_RE.match(name):
            raise TopologyError(f"lab instance name {name!r}: lower-case letters, digits and '-' (at most 31)")
        state = LabState(instance=name, clab_file=str(clab_file), prefix=fabric.prefix_for(name))
        return cls(topo, state, root or lab_root(), progress)

    @classmethod
    def attach(cls, instance: str, *, root: Path | None = None, progress: Progress = _quiet) -> Lab:
        root = root or lab_root()
        path = root / instance / "state.json"
        try:
            state = LabState.from_json(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab {instance!r} is up (no {path})") from None
        return cls(load_topology(Path(state.clab_file)), state, root, progress)

    # --- names and paths ---------------------------------------------------------------------------

    def ns(self, node: str) -> str:
        if node in self.state.workloads:
            return self.state.workloads[node].netns
        if node not in self.topo.nodes:
            raise LabError(f"no node or workload {node!r} in lab {self.state.instance}")
        return self.state.prefix + node

    def workload_ns(self, wl: str) -> str:
        return f"{self.state.prefix}w.{wl}"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def log_path(self, node: str, what: str) -> Path:
        return self.node_dir(node) / "log" / f"{what}.log"

    def frr_pathspace(self, node: str) -> str:
        """FRR's ``-N`` name (no dots allowed there): ``cx-<instance>_<node>``."""
        return self.state.prefix.replace(".", "_") + node

    def bird_socket(self, node: str) -> Path:
        return self.node_dir(node) / "run" / "bird.ctl"

    @property
    def etcd_endpoint(self) -> str:
        """The lab's etcd as the machine reaches it (through the forwarder)."""
        if self.state.etcd_port is None:
            raise LabError("the lab's etcd is not running")
        return f"http://127.0.0.1:{self.state.etcd_port}"

    @property
    def etcd_endpoint_inside(self) -> str:
        """The lab's etcd as its nodes reach it (management network)."""
        return f"http://{self.topo.etcd_node.mgmt_ipv4}:{ETCD_PORT}"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(self.state.to_json())
        tmp.replace(self.dir / "state.json")

    def _add_proc(self, proc: Proc) -> Proc:
        self.state.procs = [p for p in self.state.procs if p.name != proc.name] + [proc]
        self.save()
        return proc

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.state.procs if p.name == name), None)

    def datastore(self) -> Datastore:
        if self._ds is None:
            self._ds = Datastore([self.etcd_endpoint], timeout=5.0)
        return self._ds

    def close(self) -> None:
        if self._ds is not None:
            with contextlib.suppress(Exception):
                self._ds.close()
            self._ds = None

    # --- environment of Calyx programs on a host -----------------------------------------------------

    def node_env(self, node: str, daemon: str | None = None) -> dict[str, str]:
        """Environment for a Calyx program on ``node``: the clab ``env`` plus the lab's directories."""
        n = self.topo.nodes[node]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CALYX_", "CNI_"))}
        bindir = str(Path(sys.executable).parent)
        base["PATH"] = f"{bindir}:{base.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        base.update(n.env)
        base.setdefault("CALYX_NODE_NAME", node)
        base.setdefault("CALYX_ETCD_ENDPOINTS", self.etcd_endpoint_inside)
        base["CALYX_CONFIG"] = str(self.node_dir(node) / "calyx.toml")
        if daemon:
            base["CALYX_STATE_DIR"] = str(self.node_dir(node) / daemon / "state")
            base["CALYX_RUN_DIR"] = str(self.node_dir(node) / daemon / "run")
        return base

    def _write_node_config(self, node: LabNode) -> None:
        d = self.node_dir(node.name)
        (d / "log").mkdir(parents=True, exist_ok=True)
        (d / "run").mkdir(parents=True, exist_ok=True)
        if node.role != "host":
            return
        if self.systemd_hosts:
            self._write_host_etc(node)
            return
        for daemon in DAEMONS:
            (d / daemon / "state").mkdir(parents=True, exist_ok=True)
            (d / daemon / "run").mkdir(parents=True, exist_ok=True)
        (d / "calyx.toml").write_text(
            "# Written by calyxctl lab: this host's configuration (the environment variables in\n"
            "# the clab file's env, and per daemon CALYX_STATE_DIR/CALYX_RUN_DIR, take precedence).\n"
            f'node_name = "{node.env.get("CALYX_NODE_NAME", node.name)}"\n'
            f'etcd_endpoints = ["{node.env.get("CALYX_ETCD_ENDPOINTS", self.etcd_endpoint_inside)}"]\n'
            'log_level = "info"\n'
        )

    # --- up ----------------------------------------------------------------------------------------

    def up(self, *, daemons: bool | Sequence[str] = True, workloads: bool = True,
           ready_timeout: float = READY_TIMEOUT, hosts: str = "processes", deb: Path | None = None) -> None:
        """Bring the whole lab up (see the module docstring for the order). Raises LabError.

        ``daemons``: True for felix and bgpd on every host, False for none, or a list of the ones to
        run (``["felix"]``: workloads and policy on each host without BGP).
        ``hosts``: ``"processes"`` (the lab starts felix and bgpd in each host's namespace) or
        ``"systemd"`` (each host boots systemd in a systemd-nspawn machine with the Debian package
        ``deb`` installed — default: the newest ``dist/calyx_*_amd64.deb`` of this checkout — and
        the package's units run the daemons; :mod:`calyx.lab.sdhosts`).
        """
        if hosts not in HOST_MODES:
            raise LabError(f"unknown host mode {hosts!r} (known: {', '.join(HOST_MODES)})")
        self.state.hosts = hosts
        wanted = list(DAEMONS) if daemons is True else [] if daemons is False else list(daemons)
        unknown = sorted(set(wanted) - set(DAEMONS))
        if unknown:
            raise LabError(f"unknown daemon {unknown[0]!r} (known: {', '.join(DAEMONS)})")
        self.state.daemons = wanted
        if (self.dir / "state.json").exists():
            raise LabError(f"lab {self.state.instance} is already up (state in {self.dir}); "
                           f"`calyxctl lab down {self.state.instance}` first")
        stale = fabric.list_netns(self.state.prefix)
        if stale:
            raise LabError(f"namespaces of lab {self.state.instance} exist already ({', '.join(stale[:3])}...); "
                           f"`calyxctl lab down {self.state.instance}` first")
        if wanted and hosts == "processes":
            missing = missing_programs(wanted)
            if missing:
                raise LabError(f"cannot start the host daemons: not installed yet: {', '.join(missing)} "
                               "(use --no-daemons to bring up the topology, etcd and the routers only)")
        workloads = workloads and "felix" in wanted  # a workload without felix gets no route
        tree: Path | None = None
        if hosts == "systemd" and self.topo.hosts:
            tree = self._host_tree(deb)
        if workloads and self.topo.workloads:
            missing = missing_programs(["calyx", "calyx-ipam"])
            if missing:
                raise LabError(f"cannot create the workloads: the CNI plugins are not installed yet: "
                               f"{', '.join(missing)} (use --no-workloads to bring up the rest)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.owned = True
        self.save()
        t0 = time.monotonic()
        self.progress(f"building {len(self.topo.nodes)} namespaces and {len(self.topo.links)} links")
        try:
            fabric.build(self.topo, self.state.prefix)
        except FabricError as exc:
            raise LabError(f"building the network: {exc}") from None
        for node in self.topo.nodes.values():
            self._write_node_config(node)
            for argv in node.exec:
                try:
                    fabric.run_exec(self.ns(node.name), argv)
                except FabricError as exc:
                    raise LabError(f"exec failed: {exc}", node=node.name) from None
        if wanted and "ipip" in self.topo.requires and not ipip_available(self.ns(self.topo.hosts[0].name)):
            raise LabError("this lab needs IP-in-IP and this kernel has no ipip module (no tunl0); "
                           "use --no-daemons for the topology alone, or run it where ipip exists")
        self._start_etcd()
        self.progress(f"etcd ready at {self.etcd_endpoint} (inside the lab: {self.etcd_endpoint_inside})")
        if self.topo.cluster_file is not None:
            applied = self.apply_file(self.topo.cluster_file)
            self.progress(f"applied {applied} cluster objects from {self.topo.cluster_file.name}")
        for node in self.topo.by_role("frr", "bird"):
            self.start_router(node.name)
            self.progress(f"{node.name}: {node.role} started")
        if tree is not None:
            # after etcd and the cluster objects: the units are Type=notify and a host's boot is
            # complete only once felix and bgpd are in sync (READY=1), as on a real host
            self._boot_hosts(tree)
        if wanted:
            for node in self.topo.hosts:
                for d in wanted:
                    self.start_daemon(node.name, d)
            self.progress(f"{' and '.join(wanted)} started on {len(self.topo.hosts)} hosts; waiting until ready")
            self.wait_ready(timeout=ready_timeout)
        if self.systemd_hosts:
            self._systemd_units(wanted, workloads)
        elif workloads and self.topo.workloads and program("calyx-cni-server") is not None:
            for name in sorted({wl.host for wl in self.topo.workloads}):
                self.start_cni_service(name)
            self.progress("CNI service (calyx-cni-server) started on the hosts with workloads")
        if workloads:
            for i, wl in enumerate(self.topo.workloads):
                ws = self.add_workload(wl)
                self.progress(f"workload {i + 1}/{len(self.topo.workloads)} {wl.name} on {wl.host}: {ws.ip}")
        self.state.phase = "up" if wanted == list(DAEMONS) else f"up ({', '.join(wanted) or 'no daemons'})"
        self.save()
        self.progress(f"lab {self.state.instance} up in {time.monotonic() - t0:.1f} s")

    def _start_etcd(self) -> None:
        node = self.topo.etcd_node
        data = self.node_dir(node.name) / "data"
        ip = node.mgmt_ipv4
        argv = [
            shutil.which("etcd") or "/usr/bin/etcd", "--name", node.name, "--data-dir", str(data),
            "--listen-client-urls", f"http://{ip}:{ETCD_PORT},http://127.0.0.1:{ETCD_PORT}",
            "--advertise-client-urls", f"http://{ip}:{ETCD_PORT}",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", f"{node.name}=http://127.0.0.1:2380", "--initial-cluster-state", "new",
            "--initial-cluster-token", f"calyx-lab-{self.state.instance}", "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        log = self.log_path(node.name, "etcd")
        etcd = self._add_proc(procs.spawn("etcd", argv, log=log, netns=self.ns(node.name), node=node.name))
        port_file = self.dir / "etcd.port"
        port_file.unlink(missing_ok=True)
        fwd_log = self.dir / "forwarder.log"
        self._add_proc(procs.spawn(
            "forwarder",
            [sys.executable, "-m", "calyx.lab.forward", "--netns", self.ns(node.name), "--connect",
             f"{ip}:{ETCD_PORT}", "--port-file", str(port_file)],
            log=fwd_log, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        ))
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if time.monotonic() > deadline or not self.proc("forwarder") or not self.proc("forwarder").alive:  # type: ignore[union-attr]
                raise LabError("the etcd forwarder did not start", log=str(fwd_log))
            time.sleep(0.05)
        self.state.etcd_port = int(port_file.read_text())
        self.save()
        last = ""
        while time.monotonic() < deadline:
            if not etcd.alive:
                raise LabError("etcd exited", node=node.name, log=str(log))
            try:
                with urllib.request.urlopen(f"{self.etcd_endpoint}/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise LabError(f"etcd not healthy after 20 s ({last})", node=node.name, log=str(log))

    def apply_file(self, path: Path) -> int:
        """Apply a file of calyxctl documents to the lab's etcd (all or nothing); returns the count."""
        return self.apply_text(path.read_text(), str(path))

    def apply_text(self, text: str, source: str = "<text>") -> int:
        """Apply calyxctl documents (YAML or JSON) to the lab's etcd (all or nothing)."""
        from calyx.cli import resources

        docs = resources.parse_documents(text, source)
        resources.apply(self.datastore(), docs)
        return len(docs)

    def delete_objects(self, path: Path) -> None:
        """Delete the objects a file of calyxctl documents names."""
        from calyx.cli import resources

        for d in resources.parse_documents(path.read_text(), str(path)):
            self.datastore().delete(d.key)

    # --- routers -----------------------------------------------------------------------------------

    def start_router(self, node: str) -> None:
        n = self.topo.nodes[node]
        if n.role == "frr":
            self._start_frr(n)
        elif n.role == "bird":
            self._start_bird(n)
        else:
            raise LabError(f"not a router (calyx.role {n.role})", node=node)

    def _start_frr(self, node: LabNode) -> None:
        ps = self.frr_pathspace(node.name)
        run = FRR_RUN / ps
        shutil.rmtree(run, ignore_errors=True)  # sockets and pid files of a killed instance
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "frr", "frr")
        log = self.log_path(node.name, "frr")
        started = []
        for daemon in ("zebra", "bgpd"):
            argv = [str(FRR_DIR / daemon), "-N", ps, "-f", "/dev/null", "-i", str(run / f"{daemon}.pid")]
            started.append(self._add_proc(procs.spawn(f"{node.name}/{daemon}", argv, log=log,
                                                      netns=self.ns(node.name), node=node.name)))
            sock = run / f"{daemon}.vty"
            deadline = time.monotonic() + 15
            while not sock.exists():
                if not started[-1].alive or time.monotonic() > deadline:
                    raise LabError(f"FRR {daemon} did not start", node=node.name, log=str(log))
                time.sleep(0.05)
        assert node.config is not None
        r = subprocess.run(["ip", "netns", "exec", self.ns(node.name), "vtysh", "-N", ps, "-f", str(node.config)],
                           capture_output=True, text=True, check=False, timeout=60)
        if r.returncode != 0:
            with open(log, "a") as fh:
                fh.write(r.stdout + r.stderr)
            raise LabError(f"vtysh could not apply {node.config}", node=node.name, log=str(log))

    def _start_bird(self, node: LabNode) -> None:
        assert node.config is not None
        sock = self.bird_socket(node.name)
        argv = ["bird", "-f", "-c", str(node.config), "-s", str(sock), "-P", str(sock.with_suffix(".pid"))]
        log = self.log_path(node.name, "bird")
        p = self._add_proc(procs.spawn(f"{node.name}/bird", argv, log=log, netns=self.ns(node.name), node=node.name))
        deadline = time.monotonic() + 15
        while not sock.exists():
            if not p.alive or time.monotonic() > deadline:
                raise LabError("BIRD did not start", node=node.name, log=str(log))
            time.sleep(0.05)

    def stop_router(self, node: str, *, kill: bool = False) -> None:
        """Stop a router's daemons (SIGKILL with ``kill``: as a crash or power loss)."""
        mine = [p for p in self.state.procs if p.node == node and "/" in p.name and p.name.split("/")[1] in
                ("zebra", "bgpd", "bird")]
        if kill:
            for p in mine:
                procs.signal_proc(p, signal.SIGKILL)
            procs.wait_dead(mine, 5)
        else:
            procs.stop(mine)

    def router_routes(self, node: str) -> str:
        """The router's BGP table as its own CLI prints it."""
        n = self.topo.nodes[node]
        if n.role == "frr":
            argv = ["vtysh", "-N", self.frr_pathspace(node), "-c", "show ip bgp"]
        elif n.role == "bird":
            argv = ["birdc", "-s", str(self.bird_socket(node)), "show", "route"]
        else:
            raise LabError(f"not a router (calyx.role {n.role})", node=node)
        return self.run(node, argv).stdout

    # --- host daemons ------------------------------------------------------------------------------

    def start_daemon(self, node: str, daemon: str) -> Proc | None:
        if self.systemd_hosts:
            self._systemctl(node, "start", UNITS[daemon])
            return None
        exe = program(daemon)
        if exe is None:
            raise LabError(f"{daemon} is not installed (module {PROGRAMS[daemon]} missing)", node=node)
        env = self.node_env(node, daemon)
        log = self.log_path(node, daemon)
        return self._add_proc(procs.spawn(f"{node}/{daemon}", [exe, "run"], log=log, netns=self.ns(node),
                                          node=node, env=env))

    def cni_socket(self, node: str) -> Path:
        return self.node_dir(node) / "run" / "cni.sock"

    def start_cni_service(self, node: str, timeout: float = 20.0) -> Proc:
        """The host's CNI service, as calyx-cni.service runs it; the lab's CNI calls go through it."""
        exe = program("calyx-cni-server")
        if exe is None:
            raise LabError("calyx-cni-server is not installed", node=node)
        sock = self.cni_socket(node)
        log = self.log_path(node, "cni")
        proc = self._add_proc(procs.spawn(f"{node}/cni", [exe, "--socket", str(sock)], log=log,
                                          netns=self.ns(node), node=node, env=self.node_env(node)))
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if not proc.alive or time.monotonic() > deadline:
                raise LabError("the CNI service did not start", node=node, log=log.as_posix())
            time.sleep(0.05)
        return proc

    def stop_daemon(self, node: str, daemon: str, *, kill: bool = False) -> None:
        """Stop a host daemon and its children, as systemd would (``kill``: SIGKILL, as a crash).

        On systemd hosts ``kill`` is ``systemctl kill -s KILL``: the unit's Restart= brings it back."""
        if self.systemd_hosts:
            if kill:
                self._systemctl(node, "kill", "--signal=KILL", UNITS[daemon])
            else:
                self._systemctl(node, "stop", UNITS[daemon])
            return
        p = self.proc(f"{node}/{daemon}")
        if p is None:
            return
        procs.stop_unit(p, kill=kill)

    def restart_daemon(self, node: str, daemon: str, *, kill: bool = False) -> Proc | None:
        self.stop_daemon(node, daemon, kill=kill)
        return self.start_daemon(node, daemon)

    def node_status(self, node: str) -> tuple[model.FelixStatus | None, list[model.BGPPeerStatus]]:
        kvs, _ = self.datastore().get_prefix(keys.status_prefix(node))
        felix: model.FelixStatus | None = None
        peers: list[model.BGPPeerStatus] = []
        for kv in kvs:
            try:
                obj = model.decode(kv.key, kv.value)
            except model.ModelError:
                continue
            if isinstance(obj, model.FelixStatus):
                felix = obj
            elif isinstance(obj, model.BGPPeerStatus):
                peers.append(obj)
        return felix, peers

    def _not_ready(self, node: str) -> str | None:
        if self.systemd_hosts:
            states = sdhosts.unit_states(self._machine(node), [UNITS[d] for d in self.state.daemons])
            failed = [u for u, st in states.items() if st == "failed"]
            if failed:
                log = sdhosts.run(self._machine(node), ["journalctl", "--no-pager", "-n", "25", *(
                    a for u in failed for a in ("-u", u))]).stdout
                raise LabError(f"{', '.join(failed)} failed:\n{log}", node=node)
            inactive = [f"{u} {st}" for u, st in states.items() if st != "active"]
            if inactive:
                return ", ".join(inactive)
        for d in self.state.daemons if not self.systemd_hosts else ():
            p = self.proc(f"{node}/{d}")
            if p is None or not p.alive:
                raise LabError(f"{d} exited", node=node, log=self.log_path(node, d).as_posix())
        felix, peers = self.node_status(node)
        if "felix" in self.state.daemons:
            if felix is None:
                return "felix has not reported status"
            if not felix.in_sync:
                return "felix not in sync"
        if "bgpd" not in self.state.daemons:
            return None
        if not peers:
            return "bgpd reports no BGP session"
        down = [p.peer_ip for p in peers if p.state.lower() not in ("established", "up")]
        if down:
            return f"BGP sessions not established: {', '.join(map(str, down))}"
        return None

    def wait_ready(self, nodes: Sequence[str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Wait until felix is in sync and every BGP session is established on the hosts."""
        nodes = list(nodes) if nodes is not None else [n.name for n in self.topo.hosts]
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        pending: dict[str, str] = {}
        while True:
            pending = {}
            for n in nodes:
                why = self._not_ready(n)
                if why:
                    pending[n] = why
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                node, why = next(iter(pending.items()))
                daemon = "felix" if "felix" in why else "bgpd"
                raise LabError(f"not ready after {timeout:.0f} s: {why}", node=node,
                               log=self.log_path(node, daemon).as_posix())
            if now - last_report > 5:
                self.progress("waiting: " + "; ".join(f"{n}: {w}" for n, w in sorted(pending.items())))
                last_report = now
            time.sleep(0.25)

    # --- workloads ---------------------------------------------------------------------------------

    def _cni(self, command: str, wl: WorkloadState, netconf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        if self.systemd_hosts:
            # as a runtime on the host calls it: the package's plugin, through the host's CNI service
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"{self.state.instance}-{wl.name}",
                   "CNI_NETNS": f"/run/netns/{wl.netns}", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
                   "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={wl.name};K8S_POD_NAMESPACE={self.state.instance}"}
            return sdhosts.run(self._machine(wl.host), ["/opt/cni/bin/calyx"], input=json.dumps(netconf), env=env)
        plugin = program("calyx")
        if plugin is None:
            raise LabError(f"the calyx CNI plugin is not installed (module {PROGRAMS['calyx']} missing)", node=wl.host)
        env = self.node_env(wl.host)
        env.update({
            "CNI_COMMAND": command, "CNI_CONTAINERID": f"{self.state.instance}-{wl.name}",
            "CNI_NETNS": f"/run/netns/{wl.netns}", "CNI_IFNAME": "eth0",
            "CNI_PATH": f"{Path(sys.executable).parent}:/usr/lib/cni",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={wl.name};K8S_POD_NAMESPACE={self.state.instance}",
            # the host's CNI service when it runs (the call is the same without it, only slower)
            "CALYX_CNI_SOCKET": str(self.cni_socket(wl.host)),
        })
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns(wl.host)}", "--", plugin],
                              input=json.dumps(netconf), capture_output=True, text=True, env=env, check=False,
                              timeout=60)

    def netconf(self, wl: Workload) -> dict[str, Any]:
        """The CNI network configuration of one workload (labels and profiles are per workload)."""
        env = self.node_env(wl.host)
        ipam: dict[str, Any] = {"type": "calyx-ipam"}
        if wl.pools:
            ipam["ipv4_pools"] = list(wl.pools)
        return {
            "cniVersion": "1.0.0", "name": f"calyx-lab-{self.state.instance}", "type": "calyx",
            "etcd_endpoints": env["CALYX_ETCD_ENDPOINTS"], "node_name": env["CALYX_NODE_NAME"],
            "orchestrator": "lab", "ipam": ipam, "labels": dict(wl.labels), "profiles": list(wl.profiles),
        }

    def add_workload(self, wl: Workload) -> WorkloadState:
        """Create the workload's namespace and wire it through the CNI plugin (ADD)."""
        ws = WorkloadState(wl.name, wl.host, self.workload_ns(wl.name))
        self.state.workloads[wl.name] = ws
        self.save()
        try:
            fabric.add_netns(ws.netns)
        except FabricError as exc:
            raise LabError(str(exc), node=wl.host) from None
        r = self._cni("ADD", ws, self.netconf(wl))
        if r.returncode != 0:
            raise LabError(f"CNI ADD of workload {wl.name} failed (exit {r.returncode}): "
                           f"{(r.stdout or '').strip()} {(r.stderr or '').strip()[-800:]}", node=wl.host)
        try:
            result = json.loads(r.stdout)
            ws.ip = str(result["ips"][0]["address"]).split("/")[0]
            ifaces = result.get("interfaces") or []
            ws.iface = next((i.get("name") for i in ifaces if not i.get("sandbox")), None)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LabError(f"CNI ADD of {wl.name} returned an unusable result ({exc}): {r.stdout[:500]}",
                           node=wl.host) from None
        self.save()
        return ws

    def delete_workload(self, name: str) -> None:
        """CNI DEL, then delete the workload's namespace."""
        ws = self.state.workloads.get(name)
        if ws is None:
            return
        wl = next((w for w in self.topo.workloads if w.name == name), Workload(name, ws.host))
        r = self._cni("DEL", ws, self.netconf(wl))
        if r.returncode != 0:
            raise LabError(f"CNI DEL of {name} failed: {r.stdout.strip()} {r.stderr.strip()[-500:]}", node=ws.host)
        fabric.delete_netns(ws.netns)
        del self.state.workloads[name]
        self.save()

    # --- systemd hosts (calyx.lab.sdhosts) ----------------------------------------------------------

    @property
    def systemd_hosts(self) -> bool:
        return self.state.hosts == "systemd"

    def _host_tree(self, deb: Path | None) -> Path:
        """The root filesystem the hosts boot: the base with the package installed (built once)."""
        missing = sdhosts.missing_tools()
        if missing:
            raise LabError(f"systemd hosts need: {', '.join(missing)} (scripts/setup.sh installs them)")
        if deb is None:
            found = sorted((REPO / "dist").glob("calyx_*_amd64.deb"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise LabError(f"systemd hosts need Calyx's Debian package: none in {REPO / 'dist'} "
                               "(scripts/build-deb.sh builds it, or pass --deb)")
            deb = found[-1]
        self.state.deb = str(deb)
        try:
            return sdhosts.deb_rootfs(deb, self.progress)
        except sdhosts.HostError as exc:
            raise LabError(f"the hosts' root filesystem: {exc}") from None

    def _write_host_etc(self, node: LabNode) -> None:
        """What the package's units read on this host: /etc/calyx/calyx.toml and calyx.env."""
        etc = self.node_dir(node.name) / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "calyx.toml").write_text(
            "# Written by calyxctl lab: this host's /etc/calyx/calyx.toml (bound read-only into its machine).\n"
            f'node_name = "{node.env.get("CALYX_NODE_NAME", node.name)}"\n'
            f'etcd_endpoints = ["{node.env.get("CALYX_ETCD_ENDPOINTS", self.etcd_endpoint_inside)}"]\n'
            'log_level = "info"\n'
        )
        (etc / "calyx.env").write_text("# Written by calyxctl lab: no etcd TLS in the lab.\n")

    def _machine(self, node: str) -> Proc:
        p = self.proc(f"{node}/machine")
        if p is None:
            raise LabError("this host's machine is not running", node=node)
        return p

    def _boot_hosts(self, tree: Path) -> None:
        """Boot every host's machine (in parallel), then wait for each to finish starting up."""
        t0 = time.monotonic()
        for node in self.topo.hosts:
            self._add_proc(sdhosts.boot(name=node.name, netns=self.ns(node.name), tree=tree,
                                        etc_dir=self.node_dir(node.name) / "etc", node=node.name,
                                        log=self.log_path(node.name, "machine")))
        for node in self.topo.hosts:
            try:
                sdhosts.wait_booted(self._machine(node.name))
            except sdhosts.HostError as exc:
                raise LabError(str(exc), node=node.name) from None
        self.progress(f"{len(self.topo.hosts)} systemd hosts booted in {time.monotonic() - t0:.1f} s "
                      f"({Path(self.state.deb).name})")

    def _systemctl(self, node: str, *args: str) -> str:
        r = sdhosts.run(self._machine(node), ["systemctl", *args], timeout=60)
        if r.returncode != 0:
            raise LabError(f"systemctl {' '.join(args)}: {(r.stderr or r.stdout).strip()}", node=node)
        return r.stdout

    def _systemd_units(self, wanted: Sequence[str], workloads: bool) -> None:
        """The package enables every unit: stop the daemons this lab does not want, check the rest."""
        units = [UNITS[d] for d in DAEMONS if d in wanted]
        if workloads and self.topo.workloads:
            units.append(UNITS["cni"])
        unwanted = [u for u in UNITS.values() if u not in units]
        for node in self.topo.hosts:
            if unwanted:
                self._systemctl(node.name, "stop", *unwanted)
            states = sdhosts.unit_states(self._machine(node.name), units)
            bad = {u: st for u, st in states.items() if st != "active"}
            if bad:
                raise LabError(f"units not active: {bad}", node=node.name)
        self.progress(f"units active on {len(self.topo.hosts)} hosts: {', '.join(units)}")

    def unit_states(self, node: str) -> dict[str, str]:
        """``systemctl is-active`` of the package's units on a systemd host."""
        return sdhosts.unit_states(self._machine(node), list(UNITS.values()))

    def _machine_summary(self, node: str) -> str:
        p = self.proc(f"{node}/machine")
        if p is None or not p.alive:
            return "machine DOWN"
        try:
            states = self.unit_states(node)
        except (sdhosts.HostError, subprocess.SubprocessError):
            return "machine up (units unknown)"
        return "machine up; " + ", ".join(f"{u.removesuffix('.service')} {st}" for u, st in states.items())

    # --- using the lab -----------------------------------------------------------------------------

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``node`` (a node or a workload; on a systemd
        host, inside its machine: its own /etc, systemd and journal)."""
        if self.systemd_hosts and node in self.topo.nodes and self.topo.nodes[node].role == "host":
            return sdhosts.exec_argv(self._machine(node), argv)
        env: list[str] = []
        if node in self.topo.nodes:
            role = self.topo.nodes[node].role
            if role == "host":
                env = [f"{k}={v}" for k, v in self.node_env(node).items() if k.startswith("CALYX_") or k == "PATH"]
            if role == "frr" and argv and argv[0] == "vtysh" and "-N" not in argv:
                argv = ["vtysh", "-N", self.frr_pathspace(node), *argv[1:]]
            if role == "bird" and argv and argv[0] == "birdc" and "-s" not in argv:
                argv = ["birdc", "-s", str(self.bird_socket(node)), *argv[1:]]
        ns = self.ns(node)
        return ["ip", "netns", "exec", ns, *(["env", *env] if env else []), *argv]

    def run(self, node: str, argv: Sequence[str], *, timeout: float = 30, check: bool = False,
            ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.exec_argv(node, argv), capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}", node=node)
        return r

    def ping(self, src: str, dst_ip: str, *, count: int = 1, timeout: float = 1.0) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.ns(src), "ping", "-n", "-q", "-c", str(count), "-W",
                            f"{timeout:g}", "-i", "0.2", dst_ip], capture_output=True, check=False,
                           timeout=count * (timeout + 1) + 5)
        return r.returncode == 0

    def ping_matrix(self, names: Sequence[str] | None = None, *, timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        """Ping every workload from every other one (in parallel); (src, dst) → answered."""
        wls = [self.state.workloads[n] for n in (names or sorted(self.state.workloads))]
        return self.ping_pairs([(a.name, b.name) for a in wls for b in wls if a.name != b.name and b.ip],
                               timeout=timeout)

    def ping_pairs(self, pairs: Sequence[tuple[str, str]], *, timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        """Ping workload ``b`` from workload ``a`` for every pair (in parallel)."""

        def one(ab: tuple[str, str]) -> bool:
            ip = self.state.workloads[ab[1]].ip
            return ip is not None and self.ping(ab[0], ip, timeout=timeout)

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, pairs))
        return dict(zip(pairs, results, strict=True))

    def kernel_routes(self, node: str) -> set[str]:
        """Destinations in the main table of a node (or workload) namespace."""
        out = self.run(node, ["ip", "-j", "route", "show"], check=True).stdout
        return {r["dst"] for r in json.loads(out or "[]")}

    def router_prefixes(self, node: str) -> set[str]:
        """Prefixes in a router's BGP table (FRR: ``show ip bgp json``; BIRD: ``show route``)."""
        n = self.topo.nodes[node]
        if n.role == "frr":
            out = self.run(node, ["vtysh", "-N", self.frr_pathspace(node), "-c", "show ip bgp json"]).stdout
            try:
                return set(json.loads(out).get("routes", {}))
            except ValueError:
                return set()
        if n.role == "bird":
            out = self.run(node, ["birdc", "-s", str(self.bird_socket(node)), "show", "route"]).stdout
            return {line.split()[0] for line in out.splitlines() if line[:1].isdigit() and "/" in line.split()[0]}
        raise LabError(f"not a router (calyx.role {n.role})", node=node)

    def blocks_of(self, node: str) -> list[str]:
        """The IPAM blocks affine to ``node``."""
        kvs, _ = self.datastore().get_prefix(keys.IPAM_BLOCKS_PREFIX)
        out = []
        for kv in kvs:
            try:
                obj = model.decode(kv.key, kv.value)
            except model.ModelError:
                continue
            if isinstance(obj, model.IPAMBlock) and obj.node == node:
                out.append(str(obj.cidr))
        return sorted(out)

    def start_ping(self, src: str, dst_ip: str, *, seconds: float, interval: float = 0.05,
                   ) -> subprocess.Popen[str]:
        """A continuous ping from ``src`` for ``seconds``; read it with :func:`ping_counts`."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(src), "ping", "-n", "-q", "-i", f"{interval:g}",
                                 "-w", f"{seconds:g}", "-W", "1", dst_ip],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def remove_host(self, node: str) -> None:
        """Take a host away as a power loss would: kill its daemons, delete its namespace and workloads."""
        for d in DAEMONS:
            self.stop_daemon(node, d, kill=True)
        for ws in [w for w in self.state.workloads.values() if w.host == node]:
            fabric.delete_netns(ws.netns)
            del self.state.workloads[ws.name]
        procs.kill_netns_processes(self.ns(node))
        fabric.delete_netns(self.ns(node))
        self.save()

    # --- status and down ---------------------------------------------------------------------------

    def status_rows(self) -> list[dict[str, str]]:
        rows = []
        for node in self.topo.nodes.values():
            ns = self.ns(node.name)
            mine = [p for p in self.state.procs if p.node == node.name]
            if self.systemd_hosts and node.role == "host":
                rows.append({
                    "node": node.name, "role": node.role, "mgmt": str(node.mgmt_ipv4),
                    "netns": ns if fabric.netns_exists(ns) else f"{ns} (missing)",
                    "processes": self._machine_summary(node.name),
                })
                continue
            rows.append({
                "node": node.name, "role": node.role, "mgmt": str(node.mgmt_ipv4),
                "netns": ns if fabric.netns_exists(ns) else f"{ns} (missing)",
                "processes": ", ".join(f"{p.name.split('/')[-1]} {'up' if p.alive else 'DOWN'}" for p in mine) or "-",
            })
        return rows

    def down(self, *, keep_logs: bool = False) -> list[str]:
        """Remove everything of this instance; returns what was removed (for the progress output)."""
        self.close()
        removed: list[str] = []
        machines = [(p, self.state.prefix + p.node) for p in self.state.procs if p.name.endswith("/machine") and p.node]
        sdhosts.stop_all(machines)
        removed += [f"machine {p.node}" for p, _ in machines]
        alive = [p for p in self.state.procs if p.alive]
        procs.stop(alive)
        removed += [f"process {p.name} ({p.pid})" for p in alive]
        n = procs.kill_forwarders(self.state.prefix)
        if n:
            removed.append(f"{n} stray etcd forwarder(s)")
        for ns in fabric.list_netns(self.state.prefix):
            n = procs.kill_netns_processes(ns)
            if n:
                removed.append(f"{n} stray process(es) in {ns}")
            fabric.delete_netns(ns)
            removed.append(f"namespace {ns}")
        if FRR_RUN.is_dir():
            for d in FRR_RUN.iterdir():
                if d.name.startswith(self.state.prefix.replace(".", "_")):
                    shutil.rmtree(d, ignore_errors=True)
        if self.dir.exists():
            if keep_logs:
                shutil.rmtree(self.node_dir(self.topo.etcd_node.name) / "data", ignore_errors=True)
                (self.dir / "state.json").unlink(missing_ok=True)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        return removed


def ping_counts(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, int]:
    """(transmitted, received) of a finished :meth:`Lab.start_ping`."""
    out, _ = p.communicate(timeout=timeout)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out or "")
    if not m:
        raise LabError(f"unexpected ping output: {out!r}")
    return int(m.group(1)), int(m.group(2))


def down_instance(instance: str, *, root: Path | None = None, clab_file: Path | None = None,
                  keep_logs: bool = False) -> list[str]:
    """``lab down``: from the state file if there is one, else by the instance's name prefix."""
    root = root or lab_root()
    try:
        lab = Lab.attach(instance, root=root)
    except (LabError, TopologyError, ValueError):
        if clab_file is None:
            try:
                from calyx.lab.topology import resolve

                clab_file = resolve(instance)
            except TopologyError:
                clab_file = None
        if clab_file is None:
            # nothing to read the topology from: sweep by prefix only
            removed = []
            prefix = fabric.prefix_for(instance)
            if procs.kill_forwarders(prefix):
                removed.append("stray etcd forwarder(s)")
            for ns in fabric.list_netns(prefix):
                procs.kill_netns_processes(ns)
                fabric.delete_netns(ns)
                removed.append(f"namespace {ns}")
            for d in FRR_RUN.iterdir() if FRR_RUN.is_dir() else []:
                if d.name.startswith(prefix.replace(".", "_")):
                    shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(root / instance, ignore_errors=True)
            return removed
        lab = Lab.create(clab_file, instance=instance, root=root)
        with contextlib.suppress(FileNotFoundError, ValueError):
            lab.state = LabState.from_json((root / instance / "state.json").read_text())
    return lab.down(keep_logs=keep_logs)


@contextlib.contextmanager
def running(clab_file: Path, *, instance: str | None = None, root: Path | None = None, daemons: bool = True,
            workloads: bool = True, progress: Progress = _quiet) -> Iterator[Lab]:
    """A lab that is up for the body and always torn down afterwards (tests, benchmarks, the demo)."""
    lab = Lab.create(clab_file, instance=instance, root=root, progress=progress)
    try:
        lab.up(daemons=daemons, workloads=workloads)
        yield lab
    finally:
        if lab.owned:
            lab.down()
