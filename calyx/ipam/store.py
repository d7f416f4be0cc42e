"""The narrow slice of the datastore that IPAM uses, and the two clients that provide it.

IPAM needs four operations: read one key, read a prefix, commit a multi-key transaction whose every
write is conditional on a key's mod revision, and close. :class:`Store` names them. Two clients
satisfy it:

- :class:`DatastoreStore` wraps :class:`calyx.datastore.client.Datastore` (gRPC, used by calyxctl,
  the daemons and the tests);
- :class:`calyx.ipam.etcdhttp.HttpStore` speaks etcd's JSON gateway over HTTP/1.1 with the standard
  library only. The CNI plugins use it because importing gRPC costs about 100 ms, more than the
  whole budget of a CNI ADD (docs/cni.md).

Operations are the datastore's semantics: ``expect_mod_revision`` None = unconditional, 0 = the key
must not exist, N = its mod revision must be N. A commit either applies every operation or none and
returns False when an expectation failed (the caller re-reads and retries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from calyx.datastore.client import Datastore


class StoreError(Exception):
    """The datastore failed (unreachable, refused, malformed reply)."""


class StoreUnavailable(StoreError):  # noqa: N818 (mirrors datastore.client.Unavailable)
    """No etcd member could be reached: retry later."""


class KVLike(Protocol):
    """What IPAM reads of a key: both datastore clients' KV types have these attributes."""

    @property
    def key(self) -> str: ...
    @property
    def value(self) -> bytes: ...
    @property
    def mod_revision(self) -> int: ...


class StoreKV(NamedTuple):
    """A key as the HTTP client returns it."""

    key: str
    value: bytes
    mod_revision: int


class Put(NamedTuple):
    """Write ``key`` (conditional on ``expect_mod_revision`` unless None)."""

    key: str
    value: bytes
    expect_mod_revision: int | None = None


class Delete(NamedTuple):
    """Delete ``key`` (conditional on ``expect_mod_revision`` unless None)."""

    key: str
    expect_mod_revision: int | None = None


Op = Put | Delete


class Range(NamedTuple):
    """One read of :meth:`Store.read`: a key, or every key under a prefix."""

    key: str
    prefix: bool = False


class Store(Protocol):
    """The datastore operations IPAM and the CNI plugins need."""

    def get(self, key: str) -> KVLike | None: ...
    def get_prefix(self, prefix: str) -> tuple[Sequence[KVLike], int]: ...
    def read(self, ranges: Sequence[Range]) -> list[list[KVLike]]:
        """Several reads, in order (one round trip, one revision, where the client can)."""
        ...
    def commit(self, ops: Sequence[Op]) -> bool: ...
    def close(self) -> None: ...


class DatastoreStore:
    """:class:`Store` over the shared gRPC :class:`~calyx.datastore.client.Datastore`.

    Translates the datastore's exceptions into :class:`StoreError` / :class:`StoreUnavailable` so
    that IPAM handles one family of errors whichever client is underneath.
    """

    def __init__(self, ds: Datastore) -> None:
        self.ds = ds

    def get(self, key: str) -> KVLike | None:
        from calyx.datastore.client import DatastoreError, Unavailable

        try:
            return self.ds.get(key)
        except Unavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except DatastoreError as exc:
            raise StoreError(str(exc)) from exc

    def get_prefix(self, prefix: str) -> tuple[Sequence[KVLike], int]:
        from calyx.datastore.client import DatastoreError, Unavailable

        try:
            return self.ds.get_prefix(prefix)
        except Unavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except DatastoreError as exc:
            raise StoreError(str(exc)) from exc

    def read(self, ranges: Sequence[Range]) -> list[list[KVLike]]:
        out: list[list[KVLike]] = []
        for r in ranges:
            if r.prefix:
                out.append(list(self.get_prefix(r.key)[0]))
            else:
                kv = self.get(r.key)
                out.append([kv] if kv is not None else [])
        return out

    def commit(self, ops: Sequence[Op]) -> bool:
        from calyx.datastore import client

        real: list[client.Op] = [
            client.Put(op.key, op.value, op.expect_mod_revision)
            if isinstance(op, Put)
            else client.Delete(op.key, op.expect_mod_revision)
            for op in ops
        ]
        try:
            return self.ds.commit(real)
        except client.Unavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except client.DatastoreError as exc:
            raise StoreError(str(exc)) from exc

    def close(self) -> None:
        self.ds.close()
