"""calyxctl's resource operations: parse documents, apply them atomically, get and delete.

A document is ``{kind, name, spec}`` (YAML or JSON; several per input). ``apply`` validates every
document strictly (unknown fields are errors) before writing anything, then writes all of them in
one etcd transaction: a multi-document apply is all or nothing. Changing the CIDR or block size of
an existing pool is refused (its blocks would no longer match); the pool is checked against the
revision that was read, so a concurrent change makes the apply fail instead of racing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from calyx import model
from calyx.datastore import keys
from calyx.datastore.client import Datastore, Delete, Put
from calyx.model import IPPool, Kind, ModelError, Resource

#: etcd's default --max-txn-ops
MAX_TXN_OPS = 128


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, exit code 1."""


@dataclass(frozen=True)
class Document:
    source: str
    kind: model.KindInfo
    name: str
    key: str
    obj: Resource


def _load_texts(text: str, source: str) -> list[Any]:
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{source}: no documents")
    if stripped[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        return data if isinstance(data, list) else [data]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None
    out: list[Any] = []
    for d in docs:
        out.extend(d if isinstance(d, list) else [d])
    if not out:
        raise UserError(f"{source}: no documents")
    return out


def parse_documents(text: str, source: str) -> list[Document]:
    """Parse and strictly validate every document; raise UserError naming the first bad one."""
    out: list[Document] = []
    for i, doc in enumerate(_load_texts(text, source)):
        where = f"{source}: document {i + 1}"
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected an object with kind, name and spec")
        unknown = sorted(set(doc) - {"kind", "name", "spec"})
        if unknown:
            raise UserError(f"{where}: unknown top-level field {unknown[0]!r} (a document has kind, name, spec)")
        kind_name = doc.get("kind")
        if not isinstance(kind_name, str):
            raise UserError(f"{where}: missing kind")
        try:
            info = model.kind_info(kind_name)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        if not info.writable:
            raise UserError(f"{where}: {info.kind.value} is written by the daemons, not by apply")
        name = doc.get("name", "cluster" if info.naming == "fixed" else None)
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: missing name")
        spec = doc.get("spec", {})
        if spec is None:
            spec = {}
        try:
            key = info.key_for_name(name)
            key_info = keys.parse_key(key)
            if key_info is None:
                raise ValueError(f"invalid name {name!r}")
            obj = model.from_dict(key_info, spec, key=f"{info.kind.value} {name}", strict=True)
        except ModelError as exc:
            raise UserError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        out.append(Document(where, info, name, key, obj))
    seen: dict[str, str] = {}
    for d in out:
        if d.key in seen:
            raise UserError(f"{d.source}: {d.kind.kind.value} {d.name} is also defined in {seen[d.key]}")
        seen[d.key] = d.source
    return out


#: bgpd's hold time when a BGPPeer sets none (bgpd.peering.DEFAULT_HOLD_TIME)
DEFAULT_HOLD_TIME = 90


def warnings(docs: Sequence[Document]) -> list[str]:
    """What is valid but will not do what it says (shown by apply, which still writes it)."""
    out = []
    for d in docs:
        obj = d.obj
        if isinstance(obj, model.BGPPeer) and obj.keepalive is not None:
            hold = obj.hold_time if obj.hold_time is not None else DEFAULT_HOLD_TIME
            if obj.keepalive != hold // 3:
                out.append(f"{d.source}: BGPPeer {d.name}: keepalive {obj.keepalive} is not applied: bgpd's "
                           f"BGP speaker (ExaBGP 5) sends keepalives every hold time / 3 ({hold // 3} s with "
                           f"hold_time {hold})")
    return out


def apply(ds: Datastore, docs: Sequence[Document]) -> list[tuple[Document, str]]:
    """Write every document in one transaction. Returns (document, "created"|"configured"|"unchanged")."""
    if len(docs) > MAX_TXN_OPS:
        raise UserError(
            f"{len(docs)} documents: one apply writes at most {MAX_TXN_OPS} objects atomically; split the input"
        )
    ops: list[Put | Delete] = []
    results: list[tuple[Document, str]] = []
    for d in docs:
        value = model.encode(d.obj)
        existing = ds.get(d.key)
        if existing is None:
            results.append((d, "created"))
            ops.append(Put(d.key, value, 0))
            continue
        if isinstance(d.obj, IPPool):
            _check_pool_change(d, existing.key, existing.value)
        if existing.value == value:
            results.append((d, "unchanged"))
        else:
            results.append((d, "configured"))
        ops.append(Put(d.key, value, existing.mod_revision))
    if not ds.commit(ops):
        raise UserError("another writer changed one of these objects while applying; nothing was written, retry")
    return results


def _check_pool_change(d: Document, key: str, old_value: bytes) -> None:
    try:
        old = model.decode(key, old_value)
    except ModelError:
        return  # a malformed stored pool may be replaced
    assert isinstance(d.obj, IPPool)
    if isinstance(old, IPPool) and (old.cidr != d.obj.cidr or old.block_size != d.obj.block_size):
        raise UserError(
            f"{d.source}: IPPool {d.name}: cidr and block_size cannot change ({old.cidr} /{old.block_size} → "
            f"{d.obj.cidr} /{d.obj.block_size}); create a new pool, drain and delete this one"
        )


@dataclass
class Listing:
    objects: list[Resource]
    errors: list[str]


def list_kind(ds: Datastore, info: model.KindInfo, name: str | None = None) -> Listing:
    """Read objects of one kind (or the one named); malformed values are reported, not fatal."""
    if name is not None:
        try:
            key = info.key_for_name(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        kv = ds.get(key)
        if kv is None:
            raise UserError(f"{info.kind.value} {name!r} not found")
        try:
            obj = model.decode(key, kv.value)
        except ModelError as exc:
            raise UserError(f"stored value is malformed: {exc}") from None
        assert obj is not None
        return Listing([obj], [])
    prefix = info.prefix
    kvs, _ = ds.get_prefix(prefix)
    objs: list[Resource] = []
    errors: list[str] = []
    for kv in kvs:
        ki = keys.parse_key(kv.key)
        if ki is None or ki.kind is not info.kind:
            continue
        try:
            obj = model.decode(kv.key, kv.value)
        except ModelError as exc:
            errors.append(str(exc))
            continue
        if obj is not None:
            objs.append(obj)
    return Listing(objs, errors)


def delete(ds: Datastore, info: model.KindInfo, names: Iterable[str]) -> list[str]:
    """Delete the named objects (all or nothing); returns their keys."""
    if not info.writable:
        raise UserError(f"{info.kind.value} is written by the daemons; it expires by itself")
    ops: list[Put | Delete] = []
    deleted = []
    for name in names:
        try:
            key = info.key_for_name(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        kv = ds.get(key)
        if kv is None:
            raise UserError(f"{info.kind.value} {name!r} not found")
        if info.kind is Kind.IP_POOL:
            _check_pool_unused(ds, key, kv.value, name)
        ops.append(Delete(key, kv.mod_revision))
        deleted.append(key)
    if ops and not ds.commit(ops):
        raise UserError("another writer changed one of these objects while deleting; nothing was deleted, retry")
    return deleted


def _check_pool_unused(ds: Datastore, key: str, value: bytes, name: str) -> None:
    try:
        pool = model.decode(key, value)
    except ModelError:
        return
    if not isinstance(pool, IPPool):
        return
    kvs, _ = ds.get_prefix(keys.IPAM_BLOCKS_PREFIX)
    in_use = 0
    for kv in kvs:
        try:
            block = model.decode(kv.key, kv.value)
        except ModelError:
            continue
        if (isinstance(block, model.IPAMBlock) and block.cidr.version == pool.cidr.version
                and block.cidr.subnet_of(pool.cidr)):  # type: ignore[arg-type]
            in_use += block.in_use()
    if in_use:
        raise UserError(
            f"IPPool {name} still has {in_use} address(es) in use; set disabled: true, move the workloads, "
            "then delete it"
        )
