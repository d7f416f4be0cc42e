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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar

if TYPE_CHECKING:
    from calyx.datastore.client import Datastore

_T = TypeVar("_T")


class StoreError(Exception):
    """The datastore failed (unreachable, refused, malformed reply)."""


class StoreUnavailable(StoreError):  # noqa: N818 (mirrors datastore.client.Unavailable)
    """No etcd member could be reached: retry later."""


class GatewayUnavailable(StoreUnavailable):
    """etcd answered, but its JSON gateway could not reach etcd's own gRPC service. Seen with
    ``--client-cert-auth`` when the server certificate lacks the ``clientAuth`` usage: the gateway
    presents it to itself. The request never reached the key-value store."""


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
    def read(self, ranges: Sequence[Range]) -> Sequence[Sequence[KVLike]]:
        """Several reads, in order (one round trip, one revision, where the client can)."""
        ...
    def commit(self, ops: Sequence[Op]) -> bool: ...
    def close(self) -> None: ...


class FallbackStore:
    """A :class:`Store` that starts with a fast client (the HTTP gateway) and switches for good to a
    second one (gRPC) when the first reports :class:`GatewayUnavailable`. Safe: the failed request
    never reached the key-value store."""

    def __init__(self, fast: Store, make_slow: Callable[[], Store]) -> None:
        self._store = fast
        self._make_slow = make_slow
        self._switched = False

    def _call(self, fn: Callable[[Store], _T]) -> _T:
        try:
            return fn(self._store)
        except GatewayUnavailable:
            if self._switched:
                raise
            self._store.close()
            self._store = self._make_slow()
            self._switched = True
            return fn(self._store)

    def get(self, key: str) -> KVLike | None:
        return self._call(lambda s: s.get(key))

    def get_prefix(self, prefix: str) -> tuple[Sequence[KVLike], int]:
        return self._call(lambda s: s.get_prefix(prefix))

    def read(self, ranges: Sequence[Range]) -> Sequence[Sequence[KVLike]]:
        return self._call(lambda s: s.read(ranges))

    def commit(self, ops: Sequence[Op]) -> bool:
        return self._call(lambda s: s.commit(ops))

    def close(self) -> None:
        self._store.close()


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

    def read(self, ranges: Sequence[Range]) -> Sequence[Sequence[KVLike]]:
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
