"""``calyxctl lab``: bring containerlab topologies up and down with network namespaces (no Docker).

``LAB`` is a topology name under ``labs/`` (two-racks, route-reflectors, cross-subnet), a directory
holding one ``*.clab.yml`` or the file itself; ``--name`` runs a second instance of the same
topology beside the first (every namespace and directory carries the instance name). The commands
that act on a running lab (status, exec, down, routes, apply, ping) take the instance name, which
is the clab file's ``name`` unless ``--name`` was given. See docs/labs.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from calyx.cli.main import Context, handle_errors
from calyx.cli.output import boxed
from calyx.cli.resources import UserError
from calyx.lab import runner, topology
from calyx.lab.runner import Lab, LabError
from calyx.lab.topology import TopologyError


def _need_root() -> None:
    if os.geteuid() != 0:
        raise UserError("calyxctl lab needs root (it creates network namespaces)")


def _printer() -> runner.Progress:
    t0 = time.monotonic()

    def show(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    return show


def _attach(instance: str) -> Lab:
    try:
        return Lab.attach(_instance_name(instance), progress=_printer())
    except (LabError, TopologyError) as exc:
        raise UserError(str(exc)) from None


def _instance_name(lab: str) -> str:
    """An instance name as given, or the clab ``name`` of a topology given by name or path."""
    if (runner.lab_root() / lab / "state.json").exists():
        return lab
    try:
        return topology.load(topology.resolve(lab)).name
    except TopologyError:
        return lab


@click.group()
def lab() -> None:
    """Run lab topologies (containerlab files) with network namespaces: up, status, exec, down."""


@lab.command("up")
@click.argument("lab_name", metavar="LAB")
@click.option("--name", "instance", help="Instance name (default: the clab file's name).")
@click.option("--no-daemons", is_flag=True, help="Only the topology, etcd, cluster objects and routers.")
@click.option("--daemons", "daemon_list", default="felix,bgpd", show_default=True,
              help="Which Calyx daemons run on the hosts (e.g. felix: workloads and policy without BGP).")
@click.option("--no-workloads", is_flag=True, help="Do not create the declared workloads.")
@click.option("--keep-on-failure", is_flag=True, help="Leave what was built when a step fails (for debugging).")
@click.option("--timeout", type=float, default=runner.READY_TIMEOUT, show_default=True,
              help="Seconds to wait for the hosts' daemons to be ready.")
@click.option("--hosts", "host_mode", type=click.Choice(runner.HOST_MODES), default="processes", show_default=True,
              help="processes: the lab runs felix and bgpd in each host's namespace; systemd: each host boots "
                   "systemd (systemd-nspawn) with the Debian package installed and its units running.")
@click.option("--deb", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The package for --hosts systemd (default: the newest dist/calyx_*_amd64.deb).")
@click.pass_obj
@handle_errors
def up_cmd(obj: Context, lab_name: str, instance: str | None, no_daemons: bool, daemon_list: str,
           no_workloads: bool, keep_on_failure: bool, timeout: float, host_mode: str, deb: Path | None) -> None:
    """Build LAB and start everything in it."""
    _need_root()
    try:
        the_lab = Lab.create(topology.resolve(lab_name), instance=instance, progress=_printer())
    except TopologyError as exc:
        raise UserError(str(exc)) from None
    try:
        daemons = [] if no_daemons else [d.strip() for d in daemon_list.split(",") if d.strip()]
        the_lab.up(daemons=daemons, workloads=not no_workloads, ready_timeout=timeout, hosts=host_mode, deb=deb)
    except (LabError, TopologyError, KeyboardInterrupt) as exc:
        if the_lab.owned and not keep_on_failure:
            click.echo("lab up failed; tearing down what was built (--keep-on-failure keeps it)", err=True)
            the_lab.down(keep_logs=True)
            click.echo(f"logs kept in {the_lab.dir}", err=True)
        if isinstance(exc, KeyboardInterrupt):
            raise UserError("interrupted") from None
        raise UserError(str(exc)) from None
    finally:
        the_lab.close()
    click.echo(f"lab {the_lab.state.instance} is up; etcd for calyxctl: "
               f"CALYX_ETCD_ENDPOINTS={the_lab.etcd_endpoint}")
    click.echo(f"  calyxctl lab status {the_lab.state.instance}   calyxctl lab exec {the_lab.state.instance} "
               f"NODE CMD...   calyxctl lab down {the_lab.state.instance}")


@lab.command("down")
@click.argument("lab_name", metavar="LAB")
@click.option("--keep-logs", is_flag=True, help="Keep the log directories.")
@click.pass_obj
@handle_errors
def down_cmd(obj: Context, lab_name: str, keep_logs: bool) -> None:
    """Stop every process of LAB and delete its namespaces (also after a crashed `up`)."""
    _need_root()
    instance = _instance_name(lab_name)
    clab = None
    try:
        clab = topology.resolve(lab_name)
    except TopologyError:
        pass
    removed = runner.down_instance(instance, clab_file=clab, keep_logs=keep_logs)
    procs_n = sum(1 for r in removed if r.startswith("process"))
    ns_n = sum(1 for r in removed if r.startswith("namespace"))
    click.echo(f"lab {instance} down: stopped {procs_n} processes, deleted {ns_n} namespaces")


@lab.command("status")
@click.argument("lab_name", metavar="LAB", required=False)
@click.pass_obj
@handle_errors
def status_cmd(obj: Context, lab_name: str | None) -> None:
    """Show the nodes, processes and workloads of LAB (or list the labs that are up)."""
    if lab_name is None:
        root = runner.lab_root()
        names = sorted(p.parent.name for p in root.glob("*/state.json")) if root.is_dir() else []
        if not names:
            click.echo("no lab is up", err=True)
            return
        for n in names:
            the_lab = _attach(n)
            click.echo(f"{n}\t{the_lab.state.phase}\t{the_lab.state.clab_file}")
        return
    the_lab = _attach(lab_name)
    st = the_lab.state
    click.echo(f"lab {st.instance} ({st.phase}), from {st.clab_file}")
    if st.etcd_port:
        click.echo(f"etcd: {the_lab.etcd_endpoint} from this machine, {the_lab.etcd_endpoint_inside} inside the lab")
    rows = the_lab.status_rows()
    header = ["NODE", "ROLE", "MGMT", "NAMESPACE", "PROCESSES"]
    body = [[r["node"], r["role"], r["mgmt"], r["netns"], r["processes"]] for r in rows]
    click.echo(boxed(header, body), nl=False)
    if st.workloads:
        wl_rows = [[w.name, w.host, w.ip or "-", w.netns] for w in st.workloads.values()]
        click.echo(boxed(["WORKLOAD", "HOST", "ADDRESS", "NAMESPACE"], wl_rows), nl=False)
    down = [r for r in rows if "DOWN" in r["processes"] or "missing" in r["netns"]]
    if down:
        sys.exit(1)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("lab_name", metavar="LAB")
@click.argument("node")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def exec_cmd(lab_name: str, node: str, argv: tuple[str, ...]) -> None:
    """Run a command inside NODE (a node or a workload) of LAB.

    Examples: `calyxctl lab exec two-racks tor1 vtysh -c 'show ip bgp'`,
    `calyxctl lab exec two-racks h1a calyxctl node status` (hosts get their CALYX_* environment).
    """
    _need_root()
    the_lab = _attach(lab_name)
    try:
        full = the_lab.exec_argv(node, list(argv))
    except LabError as exc:
        raise UserError(str(exc)) from None
    sys.stdout.flush()
    os.execvp(full[0], full)


@lab.command("routes")
@click.argument("lab_name", metavar="LAB")
@click.argument("nodes", nargs=-1)
@handle_errors
def routes_cmd(lab_name: str, nodes: tuple[str, ...]) -> None:
    """Print the BGP table of the router NODES of LAB (default: every FRR and BIRD node)."""
    _need_root()
    the_lab = _attach(lab_name)
    names = list(nodes) or [n.name for n in the_lab.topo.by_role("frr", "bird")]
    for n in names:
        click.echo(f"=== {n} ({the_lab.topo.nodes[n].role if n in the_lab.topo.nodes else '?'})")
        try:
            click.echo(the_lab.router_routes(n).rstrip())
        except LabError as exc:
            raise UserError(str(exc)) from None


@lab.command("apply")
@click.argument("lab_name", metavar="LAB")
@click.argument("what")
@handle_errors
def apply_cmd(lab_name: str, what: str) -> None:
    """Apply a file of calyxctl documents, or a policy the lab names (calyx-lab.yml `policies`)."""
    _need_root()
    the_lab = _attach(lab_name)
    try:
        path = the_lab.topo.policies.get(what) or Path(what)
        if not path.is_file():
            raise UserError(f"{what}: neither a policy of lab {the_lab.state.instance} "
                            f"({', '.join(the_lab.topo.policies) or 'none'}) nor a file")
        n = the_lab.apply_file(path)
    finally:
        the_lab.close()
    click.echo(f"applied {n} objects from {path}")


@lab.command("ping")
@click.argument("lab_name", metavar="LAB")
@click.pass_obj
@handle_errors
def ping_cmd(obj: Context, lab_name: str) -> None:
    """Ping every workload of LAB from every other one and print the matrix (exit 1 if any failed)."""
    _need_root()
    the_lab = _attach(lab_name)
    if not the_lab.state.workloads:
        raise UserError(f"lab {the_lab.state.instance} has no workloads")
    matrix = the_lab.ping_matrix()
    click.echo(render_matrix(sorted(the_lab.state.workloads), matrix))
    if not all(matrix.values()):
        sys.exit(1)


def render_matrix(names: list[str], matrix: dict[tuple[str, str], bool]) -> str:
    """Rows: source; columns: destination; ``ok``, ``--`` (no answer) or ``.`` (itself)."""
    width = max(len(n) for n in names)
    lines = [" " * (width + 1) + " ".join(f"{n:>{width}}" for n in names)]
    for a in names:
        cells = []
        for b in names:
            cell = "." if a == b else ("ok" if matrix.get((a, b)) else "--")
            cells.append(f"{cell:>{width}}")
        lines.append(f"{a:<{width}} " + " ".join(cells))
    return "\n".join(lines)
