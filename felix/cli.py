"""The ``felix`` command: ``felix run`` (the daemon), ``felix dump`` and ``felix diff`` (inspection).

What it owns: argument parsing and exit codes. ``dump --desired`` prints what felix would program
from the datastore as it is now (iptables restore text, ipsets, routes); ``dump --actual`` prints
what the kernel holds that carries felix's marks; ``diff`` prints what the next apply would change
(the restore text per table, the ipset commands, the routes to add and remove), and exits 1 when
there is a difference, 0 when the kernel is already right. None of them writes anything.

Configuration errors print one line and exit 2 (``calyx.config.EXIT_CONFIG``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from calyx import config as calyx_config
from calyx import model
from calyx.daemon import run as run_daemon
from calyx.daemon import setup_logging, start_metrics
from calyx.datastore.client import Datastore, DatastoreError
from calyx.kernel import cmd
from calyx.kernel.routetable import PROTO_FELIX
from calyx.model.errors import ModelError
from felix import daemon
from felix.calc import Calculator
from felix.dataplane import Dataplane


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--config", "config_path", default=None, help="TOML configuration file"),
        click.option("--node-name", default=None, help="this node's name (default: hostname)"),
        click.option("--etcd-endpoints", default=None, help="comma-separated etcd client URLs"),
        click.option("--log-level", default=None, help="debug, info, warning, error"),
        click.option("--metrics-port", default=None, type=int, help="Prometheus port (0: off)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _load(config_path: str | None, **flags: Any) -> calyx_config.Config:
    try:
        return calyx_config.load("felix", path=config_path, flags=flags)
    except calyx_config.ConfigError as exc:
        calyx_config.fail("felix", exc)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(config_path: str | None, node_name: str | None, etcd_endpoints: str | None,
                log_level: str | None, metrics_port: int | None, **kwargs: Any) -> Any:
        cfg = _load(config_path, node_name=node_name, etcd_endpoints=etcd_endpoints, log_level=log_level,
                    metrics_port=metrics_port)
        return fn(cfg, **kwargs)

    return _options(wrapper)


@click.group()
def cli() -> None:
    """felix: the Calyx node agent (workload routes, policy, status)."""


@cli.command()
@_common
def run(cfg: calyx_config.Config) -> None:
    """Run the node agent (crash-only: exits non-zero on unexpected errors)."""
    setup_logging(cfg.log_level, "felix", log_format=cfg.log_format, node=cfg.node_name)
    start_metrics(cfg.metrics_host, cfg.metrics_port)
    sys.exit(run_daemon(lambda stop: daemon.run(cfg, stop), name="felix"))


def _snapshot(cfg: calyx_config.Config) -> tuple[Calculator, Dataplane, list[str]]:
    calc = Calculator(cfg.node_name)
    errors: list[str] = []
    try:
        with Datastore(cfg.etcd_endpoints, **calyx_config.datastore_kwargs(cfg)) as ds:
            rev: int | None = None
            for prefix in daemon.PREFIXES:
                kvs, rev = ds.get_prefix(prefix, revision=rev)
                for kv in kvs:
                    try:
                        obj = model.decode(kv.key, kv.value)
                    except ModelError as exc:
                        errors.append(str(exc))
                        continue
                    if obj is not None:
                        calc.on_update(kv.key, obj)
    except DatastoreError as exc:
        click.echo(f"felix: datastore: {exc}", err=True)
        sys.exit(1)
    dp = daemon.build_dataplane(cfg, calc)
    calc.mark_all_dirty()
    dp.update(calc.take_dirty())
    return calc, dp, errors


def _kernel_routes() -> set[str]:
    out: set[str] = set()
    for family in ("-4", "-6"):
        res = cmd.run(["ip", "-j", family, "route", "show", "proto", str(PROTO_FELIX)], check=False)
        if res.returncode == 0 and res.stdout.strip():
            for r in json.loads(res.stdout):
                dst = r.get("dst", "")
                if dst and "/" not in dst:
                    dst = str(ipaddress.ip_network(dst))
                prefix = f"{r['type']} " if r.get("type") not in (None, "unicast") else ""
                dev = f" dev {r['dev']}" if r.get("dev") and r.get("type") in (None, "unicast") else ""
                out.add(f"{prefix}{dst}{dev}")
    return out


def _desired_routes(dp: Dataplane) -> set[str]:
    out = set()
    for dst, route in dp.endpoints.desired_routes.items():
        if route.type.name == "BLACKHOLE":
            out.add(f"blackhole {dst}")
        else:
            out.add(f"{dst} dev {route.oif}")
    return out


@cli.command()
@click.option("--desired", "which", flag_value="desired", help="what felix would program now")
@click.option("--actual", "which", flag_value="actual", help="what the kernel holds with felix's marks")
@_common
def dump(cfg: calyx_config.Config, which: str | None) -> None:
    """Print the desired or the actual dataplane (iptables, ipsets, routes)."""
    if which is None:
        raise click.UsageError("give --desired or --actual")
    setup_logging("warning", "felix")
    if which == "desired":
        _, dp, errors = _snapshot(cfg)
        for e in errors:
            click.echo(f"# skipped malformed: {e}", err=True)
        for name, table in dp.tables.items():
            click.echo(f"# iptables {name}")
            click.echo(table.dump_desired(), nl=False)
        click.echo("# ipsets")
        click.echo(dp.ipsets.dump_desired(), nl=False)
        click.echo("# routes")
        for line in sorted(_desired_routes(dp)):
            click.echo(line)
        return
    calc = Calculator(cfg.node_name)
    dp = daemon.build_dataplane(cfg, calc)
    for name, table in dp.tables.items():
        click.echo(f"# iptables {name}")
        click.echo(table.dump_actual(), nl=False)
    click.echo("# ipsets")
    click.echo(dp.ipsets.dump_actual(), nl=False)
    click.echo("# routes")
    for line in sorted(_kernel_routes()):
        click.echo(line)


@cli.command()
@_common
def diff(cfg: calyx_config.Config) -> None:
    """Print what the next apply would change; exit 1 if anything, 0 if the kernel is right."""
    setup_logging("warning", "felix")
    _, dp, _ = _snapshot(cfg)
    changed = False
    for name, table in dp.tables.items():
        text = table.pending_text()
        if text:
            changed = True
            click.echo(f"# iptables {name}")
            click.echo(text, nl=False)
    dp.ipsets.readback()
    lines, _, _ = dp.ipsets.plan_updates()
    doomed = sorted(n for n in dp.ipsets.read_actual() if n not in dp.ipsets.names)
    lines += [f"destroy {n}" for n in doomed]
    if lines:
        changed = True
        click.echo("# ipsets")
        for line in lines:
            click.echo(line)
    want, have = _desired_routes(dp), _kernel_routes()
    if want != have:
        changed = True
        click.echo("# routes")
        for line in sorted(want - have):
            click.echo(f"+ {line}")
        for line in sorted(have - want):
            click.echo(f"- {line}")
    sys.exit(1 if changed else 0)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
