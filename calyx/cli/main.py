"""calyxctl: the operator's command line.

Exit codes: 0 success; 1 a user error (bad document, unknown object, etcd unreachable) shown as one
line on stderr; 2 a usage or configuration error. No traceback for any of those; an unexpected
failure prints one line and suggests ``--debug`` for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from calyx import __version__, config
from calyx.cli import output, resources
from calyx.cli.resources import UserError
from calyx.datastore.client import Datastore, DatastoreError, Unavailable

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every subcommand needs: configuration and a lazily opened datastore."""

    def __init__(self, cfg_path: str | None, flags: dict[str, Any], debug: bool) -> None:
        self.cfg_path = cfg_path
        self.flags = flags
        self.debug = debug
        self._cfg: config.Config | None = None
        self._ds: Datastore | None = None

    @property
    def cfg(self) -> config.Config:
        if self._cfg is None:
            self._cfg = config.load("calyxctl", path=self.cfg_path, flags=self.flags)
        return self._cfg

    def datastore(self) -> Datastore:
        if self._ds is None:
            cfg = self.cfg
            self._ds = Datastore(cfg.etcd_endpoints, **config.datastore_kwargs(cfg))
        return self._ds

    def close(self) -> None:
        if self._ds is not None:
            with contextlib.suppress(Exception):
                self._ds.close()


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn every expected failure into one line on stderr and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        obj: Context | None = ctx.find_object(Context)
        try:
            return fn(*args, **kwargs)
        except config.ConfigError as exc:
            fail(f"configuration: {exc}", config.EXIT_CONFIG)
        except UserError as exc:
            fail(str(exc))
        except Unavailable as exc:
            endpoints = ",".join(obj.cfg.etcd_endpoints) if obj is not None and obj._cfg else "?"
            fail(f"cannot reach etcd at {endpoints}: {exc}")
        except DatastoreError as exc:
            fail(f"datastore: {exc}")
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if obj is not None and obj.debug:
                raise
            fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        finally:
            if obj is not None:
                obj.close()

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-c", "--config", "cfg_path", envvar="CALYX_CONFIG", type=click.Path(dir_okay=False),
              help="Configuration file (default /etc/calyx/calyx.toml).")
@click.option("--etcd-endpoints", help="Comma-separated etcd endpoints (env CALYX_ETCD_ENDPOINTS).")
@click.option("--node-name", help="This node's name (env CALYX_NODE_NAME; default: hostname).")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, cfg_path: str | None, etcd_endpoints: str | None, node_name: str | None,
        debug: bool) -> None:
    """Manage a Calyx cluster: pools, nodes, peers, policy, workloads, IPAM and status."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    ctx.obj = Context(cfg_path, {"etcd_endpoints": etcd_endpoints, "node_name": node_name}, debug)


def _read_input(filename: str) -> tuple[str, str]:
    if filename == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(filename, encoding="utf-8") as fh:
            return fh.read(), filename
    except OSError as exc:
        raise UserError(f"cannot read {filename}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{filename}: not UTF-8 text") from None


@cli.command()
@click.option("-f", "--filename", required=True, help="YAML or JSON file with one or more documents, or - for stdin.")
@click.option("--dry-run", is_flag=True, help="Validate only; write nothing.")
@click.pass_obj
@handle_errors
def apply(obj: Context, filename: str, dry_run: bool) -> None:
    """Create or update objects from documents {kind, name, spec} (all or nothing)."""
    text, source = _read_input(filename)
    docs = resources.parse_documents(text, source)
    for warning in resources.warnings(docs):
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        for d in docs:
            click.echo(f"{d.kind.kind.value} {d.name} valid")
        return
    for d, what in resources.apply(obj.datastore(), docs):
        click.echo(f"{d.kind.kind.value} {d.name} {what}")


@cli.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True)
@click.pass_obj
@handle_errors
def get(obj: Context, kind: str, name: str | None, fmt: str) -> None:
    """Show objects of KIND (singular or plural, any case), or the one called NAME."""
    try:
        from calyx import model

        info = model.kind_info(kind)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    listing = resources.list_kind(obj.datastore(), info, name)
    for err in listing.errors:
        click.echo(f"warning: skipped {err}", err=True)
    if fmt == "table":
        if listing.objects or name is not None:
            click.echo(output.render_table(info.kind, listing.objects), nl=False)
        else:
            click.echo(f"No {info.kind.value} objects found.", err=True)
    else:
        click.echo(output.render_documents(listing.objects, fmt, single=name is not None), nl=False)


@cli.command()
@click.argument("kind")
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
@handle_errors
def delete(obj: Context, kind: str, names: tuple[str, ...]) -> None:
    """Delete the objects of KIND called NAMES (all or nothing)."""
    from calyx import model

    try:
        info = model.kind_info(kind)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    resources.delete(obj.datastore(), info, names)
    for n in names:
        click.echo(f"{info.kind.value} {n} deleted")


@cli.group()
def node() -> None:
    """Node commands."""


@node.command("status")
@click.argument("name", required=False)
@click.option("--all", "all_nodes", is_flag=True, help="Every node that reports status.")
@click.pass_obj
@handle_errors
def node_status_cmd(obj: Context, name: str | None, all_nodes: bool) -> None:
    """Show felix and BGP status of this node (or NAME, or --all); exit 1 when something is down."""
    from calyx.cli.status import node_status, status_nodes

    ds = obj.datastore()
    names = status_nodes(ds) if all_nodes else [name or obj.cfg.node_name]
    healthy = True
    for i, n in enumerate(names):
        if i:
            click.echo()
        text, ok = node_status(ds, n)
        click.echo(text, nl=False)
        healthy = healthy and ok
    if not healthy:
        sys.exit(1)


@cli.command()
def version() -> None:
    """Show the version."""
    click.echo(f"calyxctl {__version__} (Python {platform.python_version()})")


def register(group: click.Group, name: str, command: click.Command) -> None:
    """Hook for later subcommand groups (ipam, lab) living in their own modules."""
    group.add_command(command, name)


@contextlib.contextmanager
def _no_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)


def _load_plugins() -> None:
    """Subcommand groups that live in their own modules register themselves here if present."""
    import importlib

    for modname, attr, cmdname in (("calyx.cli.ipam", "ipam", "ipam"), ("calyx.cli.lab", "lab", "lab")):
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        cli.add_command(getattr(mod, attr), cmdname)


def main() -> None:
    _load_plugins()
    with _no_broken_pipe():
        cli.main(prog_name="calyxctl")


if __name__ == "__main__":
    main()
