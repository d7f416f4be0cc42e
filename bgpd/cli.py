"""``bgpd`` command line: ``bgpd run`` (the daemon) and ``bgpd render`` (print ExaBGP's configuration).

Options override the configuration file and ``CALYX_*`` variables (calyx.config). A configuration
error (and an ExaBGP executable that cannot be found) prints one line and exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from calyx import config as calyx_config


def _load(ctx_opts: dict[str, Any], config_path: str | None) -> calyx_config.Config:
    try:
        return calyx_config.load("bgpd", path=config_path, flags=ctx_opts)
    except calyx_config.ConfigError as exc:
        calyx_config.fail("bgpd", exc)


def _common(f: Any) -> Any:
    for opt in reversed([
        click.option("--config", "config_path", help="configuration file (default /etc/calyx/calyx.toml)"),
        click.option("--node-name", help="this node's name (default: the host name)"),
        click.option("--etcd-endpoints", help="comma-separated etcd URLs"),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error", "critical"])),
    ]):
        f = opt(f)
    return f


@click.group()
def cli() -> None:
    """Calyx bgpd: BGP route distribution through ExaBGP."""


@cli.command()
@_common
@click.option("--metrics-port", type=int, help="Prometheus port (0: off; default 9092)")
def run(config_path: str | None, **flags: Any) -> None:
    """Run the daemon (ExaBGP as a child, routes with protocol 79)."""
    cfg = _load(flags, config_path)
    from bgpd.daemon import main as daemon_main
    from bgpd.exabgp import resolve_binary

    exe = resolve_binary(cfg.exabgp_bin)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        calyx_config.fail("bgpd", calyx_config.ConfigError(
            f"{cfg.origin('exabgp_bin')}: exabgp_bin: {cfg.exabgp_bin!r} is not an executable file (looked on PATH "
            f"and next to {sys.executable}): install ExaBGP 5 into Calyx's virtualenv or set exabgp_bin to its path"))

    sys.exit(daemon_main(cfg))


@cli.command()
@_common
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="render from a JSON file (node_name, nodes, peers, cluster) instead of etcd")
def render(config_path: str | None, input_path: str | None, **flags: Any) -> None:
    """Print the ExaBGP configuration this node would run."""
    from bgpd.render import render_from_datastore, render_from_input

    if input_path:
        with open(input_path) as f:
            click.echo(render_from_input(json.load(f)), nl=False)
        return
    cfg = _load(flags, config_path)
    click.echo(render_from_datastore(cfg), nl=False)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
