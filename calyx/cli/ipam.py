"""``calyxctl ipam``: show usage, allocate and release by hand, check and repair consistency.

Every command works on the contract's ``ipam/*`` keys through :class:`calyx.ipam.allocator.IPAM`
(compare-and-swap writes, block and handle together). ``check`` exits 1 when it finds problems it
did not fix, so it can run from cron or a health check.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from typing import Any

import click

from calyx.cli.main import Context, handle_errors
from calyx.cli.resources import UserError
from calyx.ipam.allocator import IPAM, dump_json
from calyx.ipam.logic import IPAMError, block_count, within
from calyx.ipam.store import DatastoreStore


def _ipam(obj: Context) -> IPAM:
    return IPAM(DatastoreStore(obj.datastore()))


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)


@click.group()
def ipam() -> None:
    """IP address management: pools' usage, blocks, handles, fixed addresses."""


@ipam.command("show")
@click.option("--blocks", "show_blocks", is_flag=True, help="List every block with its affinity and usage.")
@click.option("--handles", "show_handles", is_flag=True, help="List every handle and its addresses.")
@click.option("--ip", "address", help="Show who holds ADDRESS.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
@handle_errors
def show(obj: Context, show_blocks: bool, show_handles: bool, address: str | None, fmt: str) -> None:
    """Show each pool's blocks and addresses in use (and blocks, handles, or one address)."""
    snap = _ipam(obj).snapshot()
    if address is not None:
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            raise UserError(f"{address!r} is not an IP address") from None
        for b, _ in snap.blocks.values():
            if addr in b.cidr:
                holder = b.allocations[b.ordinal(addr)]
                h = snap.handles.get(holder) if holder else None
                info: dict[str, Any] = {"address": str(addr), "block": str(b.cidr), "affinity": b.affinity,
                                        "handle": holder, "attributes": h[0].attributes if h else None}
                click.echo(json.dumps(info, indent=2) if fmt == "json" else
                           f"{addr}: {'free' if holder is None else 'held by ' + holder} in block {b.cidr} "
                           f"({b.affinity or 'unaffine'})" + (f" {h[0].attributes}" if h else ""))
                return
        click.echo(f"{addr}: not in any block (free)" if fmt == "table" else
                   json.dumps({"address": str(addr), "block": None, "handle": None}))
        return
    pools: list[dict[str, Any]] = []
    for p in sorted(snap.pools, key=lambda p: p.name):
        blocks = [b for b, _ in snap.blocks.values() if within(b.cidr, p.cidr)]
        in_use = sum(b.in_use() for b in blocks)
        pools.append({"name": p.name, "cidr": str(p.cidr), "block_size": p.block_size, "disabled": p.disabled,
                      "blocks_claimed": len(blocks), "blocks_total": block_count(p),
                      "addresses_in_use": in_use, "addresses_total": p.cidr.num_addresses})
    blocks_out: list[dict[str, Any]] = [
        {"cidr": str(b.cidr), "affinity": b.affinity, "pool": b.pool, "in_use": b.in_use(),
         "size": b.cidr.num_addresses} for b, _ in sorted(snap.blocks.values(), key=lambda br: br[0].cidr)
    ]
    handles_out: list[dict[str, Any]] = [
        {"handle": h.handle_id, "addresses": [str(a) for a in h.addresses], "attributes": h.attributes}
        for h, _ in sorted(snap.handles.values(), key=lambda hr: hr[0].handle_id)
    ]
    if fmt == "json":
        doc: dict[str, Any] = {"pools": pools}
        if show_blocks:
            doc["blocks"] = blocks_out
        if show_handles:
            doc["handles"] = handles_out
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [["POOL", "CIDR", "BLOCKS", "IN USE", "STATE"]]
    for pd in pools:
        rows.append([pd["name"], pd["cidr"], f"{pd['blocks_claimed']}/{pd['blocks_total']} of /{pd['block_size']}",
                     f"{pd['addresses_in_use']}/{pd['addresses_total']}",
                     "disabled" if pd["disabled"] else "enabled"])
    click.echo(_table(rows), nl=False)
    if show_blocks:
        click.echo()
        rows = [["BLOCK", "AFFINITY", "POOL", "IN USE"]]
        rows += [[b["cidr"], b["affinity"] or "-", b["pool"] or "-", f"{b['in_use']}/{b['size']}"] for b in blocks_out]
        click.echo(_table(rows), nl=False)
    if show_handles:
        click.echo()
        rows = [["HANDLE", "ADDRESSES", "WORKLOAD"]]
        rows += [[h["handle"], ",".join(h["addresses"]) or "-",
                  "/".join(h["attributes"].get(k, "") for k in ("node", "orchestrator", "workload", "endpoint"))
                  .strip("/") or "-"] for h in handles_out]
        click.echo(_table(rows), nl=False)


@ipam.command("allocate")
@click.option("--handle", "handle_id", required=True, help="Handle that will hold the addresses.")
@click.option("--node", help="Allocate as this node (default: this node's name).")
@click.option("--ip", "addresses", multiple=True, help="A fixed address to take (repeatable).")
@click.option("--ipv4", "num_ipv4", type=click.IntRange(0, 64), default=None, help="IPv4 addresses (default 1).")
@click.option("--ipv6", "num_ipv6", type=click.IntRange(0, 64), default=0, show_default=True, help="IPv6 addresses.")
@click.option("--pool", "pools", multiple=True, help="Only from these pools (name or CIDR; repeatable).")
@click.option("--workload", help="Workload name: a reservation for it gives its fixed address.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
@handle_errors
def allocate(obj: Context, handle_id: str, node: str | None, addresses: tuple[str, ...], num_ipv4: int | None,
             num_ipv6: int, pools: tuple[str, ...], workload: str | None, fmt: str) -> None:
    """Allocate addresses to HANDLE by hand (idempotent: a handle keeps what it holds)."""
    try:
        fixed = [ipaddress.ip_address(a) for a in addresses]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if num_ipv4 is None:
        num_ipv4 = sum(1 for a in fixed if a.version == 4) or (0 if num_ipv6 or fixed else 1)
    try:
        got = _ipam(obj).allocate(handle_id, node or obj.cfg.node_name, num_ipv4=num_ipv4, num_ipv6=num_ipv6,
                                  addresses=fixed, workload=workload, pools=pools,
                                  attributes={"created": str(int(time.time())), "by": "calyxctl"})
    except (IPAMError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if fmt == "json":
        click.echo(dump_json(got))
    else:
        for a in got:
            kind = "fixed" if a.fixed else "borrowed" if a.borrowed else "affine"
            click.echo(f"{a.address} block {a.block} pool {a.pool or '-'} ({kind})")


@ipam.command("release")
@click.option("--handle", "handle_id", help="Release every address of this handle and delete it.")
@click.option("--ip", "address", help="Release one address.")
@click.option("--empty-blocks", is_flag=True, help="Free the affinity of empty blocks of --node (default: this node).")
@click.option("--block", "block", help="Free the affinity of this block if it is empty.")
@click.option("--node", help="With --empty-blocks: whose blocks.")
@click.option("--force", is_flag=True, help="With --block/--empty-blocks: make non-empty blocks unaffine.")
@click.pass_obj
@handle_errors
def release(obj: Context, handle_id: str | None, address: str | None, empty_blocks: bool, block: str | None,
            node: str | None, force: bool) -> None:
    """Release addresses (by handle or address) or free the affinity of empty blocks."""
    if sum(x is not None for x in (handle_id, address, block, True if empty_blocks else None)) != 1:
        raise click.UsageError("give exactly one of --handle, --ip, --block, --empty-blocks")
    ipam_ = _ipam(obj)
    try:
        if handle_id is not None:
            freed = ipam_.release(handle_id)
            if not freed:
                raise UserError(f"handle {handle_id} holds no addresses (already released?)")
            click.echo(f"released {', '.join(map(str, freed))}")
        elif address is not None:
            holder = ipam_.release_address(ipaddress.ip_address(address))
            if holder is None:
                raise UserError(f"{address} is not allocated")
            click.echo(f"released {address} (was held by {holder})")
        else:
            cidr = ipaddress.ip_network(block) if block is not None else None
            freed_blocks, kept = ipam_.release_affinity(
                node=None if cidr is not None else (node or obj.cfg.node_name), cidr=cidr, force=force)
            for c in freed_blocks:
                click.echo(f"freed block {c}")
            for c in kept:
                click.echo(f"{'made block ' + str(c) + ' unaffine' if force else 'kept block ' + str(c)}"
                           f"{'' if force else ' (not empty)'}")
            if not freed_blocks and not kept:
                click.echo("no matching blocks")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except IPAMError as exc:
        raise UserError(str(exc)) from None


@ipam.command("check")
@click.option("--fix", "do_fix", is_flag=True, help="Repair what is found.")
@click.option("--min-age", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds a handle must have existed before it counts as leaked.")
@click.pass_obj
@handle_errors
def check_cmd(obj: Context, do_fix: bool, min_age: float) -> None:
    """Find leaked handles, blocks of vanished nodes, and mismatched blocks and handles."""
    from calyx.ipam import check

    ipam_ = _ipam(obj)
    problems = check.check(ipam_, min_age=min_age)
    for p in problems:
        click.echo(str(p))
    if not problems:
        click.echo("IPAM is consistent")
        return
    if not do_fix:
        click.echo(f"{len(problems)} problem(s) found; run with --fix to repair", err=True)
        sys.exit(1)
    for line in check.fix(ipam_, problems):
        click.echo(f"fixed: {line}")
    left = [p for p in check.check(ipam_, min_age=min_age) if p.kind != "malformed-block"]
    if left:
        for p in left:
            click.echo(f"still: {p}", err=True)
        sys.exit(1)
