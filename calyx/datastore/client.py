"""The etcd v3 client adapter: the one module that talks to etcd.

Everything else in Calyx reads and writes the datastore through :class:`Datastore`, so the client
library underneath (etcd-sdk-python 0.0.7, module ``pyetcd``; see docs/etcd-client.md) can be swapped
by rewriting this file alone. The API is blocking; daemons run it in a thread.

What this module owns:

- **Connections.** Always a ``MultiEndpointEtcd3Client`` with ``failover=True`` and a short
  ``time_retry`` per endpoint (pyetcd's default refuses a failed endpoint for 300 s). Channels get a
  256 MiB receive limit (gRPC refuses replies over 4 MB by default), short reconnect backoff (gRPC's
  default grows to 120 s, so a long outage would leave the channel asleep after etcd came back) and
  keepalive pings, so a silently dead peer breaks a watch instead of hanging it.
- **Authentication.** pyetcd sends the token as *call credentials*, which gRPC refuses on plaintext
  channels, and never renews it when etcd expires it (``--auth-token-ttl``, 300 s by default). We
  authenticate ourselves, send the token as plain metadata, and re-authenticate once on ``invalid auth
  token``.
- **Errors.** pyetcd and gRPC exceptions are translated here, at one narrow boundary, into
  :class:`DatastoreError` (:class:`Unavailable`, :class:`Compacted`, :class:`AuthError`,
  :class:`LeaseExpired`). Nothing above this module sees a ``grpc.RpcError``. Reads are retried once
  per other endpoint when a member is unreachable; writes are never retried here (a CAS that may have
  been applied must be re-read by the caller).
- **Watches.** Each :class:`Watch` is its own gRPC stream, read in the caller's thread. pyetcd's shared
  watcher thread is not used: it reports a watch that etcd created-and-cancelled (expired token,
  permission denied) as a live watch that never fires, and closing its client prints a traceback. Our
  stream asks for leader checks (``hasleader``) so a member cut off from its cluster ends the watch.

Keys are ``str`` (UTF-8), values ``bytes``. Revisions are etcd's int64 store revisions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import kv_pb2

_log = logging.getLogger(__name__)

#: gRPC's default reply limit is 4 MB; a 100k-key range is about 23 MB. Paging keeps replies small,
#: this keeps a page of unusually large values from failing.
MAX_RECEIVE_BYTES = 256 << 20
#: Seconds a failed endpoint is skipped before it is tried again (pyetcd's default is 300).
ENDPOINT_RETRY_SECONDS = 1.0
#: etcd's default ``--max-txn-ops``.
MAX_TXN_OPS = 128

_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # etcd's --grpc-keepalive-min-time is 5 s: ping no more often than that, and only during calls.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

_T = TypeVar("_T")


# --- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KV:
    """One key as etcd holds it. ``lease`` is 0 when the key has none."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch. For a delete, ``kv.value`` is empty and ``kv.mod_revision`` is the
    revision of the delete."""

    type: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True, slots=True)
class Put:
    """Transaction operation: write ``key``. ``expect_mod_revision``: None = unconditional, 0 = the key
    must not exist, N = the key's mod revision must be N."""

    key: str
    value: bytes | str
    expect_mod_revision: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Transaction operation: delete ``key`` (same ``expect_mod_revision`` rules as :class:`Put`)."""

    key: str
    expect_mod_revision: int | None = None


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Member:
    """A member of the etcd cluster."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]


# --- errors ----------------------------------------------------------------------------------------


class DatastoreError(Exception):
    """Any failure talking to etcd."""


class Unavailable(DatastoreError):  # noqa: N818 (name fixed by the datastore API)
    """No member answered (down, unreachable, no leader, timed out). Retry later."""


class Compacted(DatastoreError):  # noqa: N818
    """The requested revision has been compacted away; only a fresh read can continue."""

    def __init__(self, compact_revision: int, message: str = "") -> None:
        self.compact_revision = compact_revision
        super().__init__(message or f"revision compacted (compact revision {compact_revision})")


class AuthError(DatastoreError):
    """Authentication failed or permission denied."""


class LeaseExpired(DatastoreError):  # noqa: N818
    """The lease no longer exists (it expired or was revoked)."""


class _TokenInvalidError(AuthError):
    """etcd no longer accepts our auth token: authenticate again."""


_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _rpc_error(what: str, exc: grpc.RpcError) -> DatastoreError:
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    details = str(exc.details() if hasattr(exc, "details") else exc)
    msg = f"{what}: {code.name if code else 'error'}: {details}"
    if code in _UNAVAILABLE_CODES:
        return Unavailable(msg)
    if code is grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details:
        return _TokenInvalidError(msg)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
        "authentication failed" in details or "user name is empty" in details
    ):
        return AuthError(msg)
    if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(0, msg)
    if code is grpc.StatusCode.CANCELLED and "Channel closed" in details:
        return DatastoreError(f"{what}: client closed")
    return DatastoreError(msg)


def _cause_details(exc: BaseException) -> str:
    """pyetcd raises its own exception inside ``except RpcError``; the gRPC details are the context."""
    ctx = exc.__context__
    if isinstance(ctx, grpc.RpcError) and hasattr(ctx, "details"):
        return f"{exc}: {ctx.details()}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _boundary(what: str) -> Iterator[None]:
    """Translate everything pyetcd and gRPC raise into :class:`DatastoreError`."""
    try:
        yield
    except DatastoreError:
        raise
    except etcd_exc.RevisionCompactedError as exc:
        raise Compacted(int(exc.compacted_revision)) from exc
    except (
        etcd_exc.ConnectionFailedError,
        etcd_exc.ConnectionTimeoutError,
        etcd_exc.NoServerAvailableError,
        etcd_exc.WatchTimedOut,
        etcd_exc.InternalServerError,
    ) as exc:
        raise Unavailable(f"{what}: {_cause_details(exc)}") from exc
    except grpc.RpcError as exc:
        raise _rpc_error(what, exc) from exc
    except etcd_exc.Etcd3Exception as exc:
        raise DatastoreError(f"{what}: {_cause_details(exc)}") from exc
    except ValueError as exc:
        if "closed channel" in str(exc) or "Channel closed" in str(exc):
            raise DatastoreError(f"{what}: client closed") from exc
        raise


# --- endpoints -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    scheme: str  # "http", "https" or "" (decided by whether TLS files were given)


def _parse_endpoint(endpoint: str) -> _Target:
    """``http://h:2379``, ``https://h:2379``, ``h:2379``, ``h`` or ``[::1]:2379``."""
    text = endpoint.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    if parts.scheme not in ("", "http", "https"):
        raise ValueError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected [http[s]://]host[:port]")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint {endpoint!r}: invalid port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Target(host, port, parts.scheme)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # empty prefix (or all 0xff): every key


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode("utf-8", "surrogateescape"),
        value=bytes(raw.value),
        mod_revision=int(raw.mod_revision),
        create_revision=int(raw.create_revision),
        version=int(raw.version),
        lease=int(raw.lease),
    )


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- leases and watches ----------------------------------------------------------------------------


class Lease:
    """A granted lease. Keys put with it vanish when it expires (``ttl`` seconds without refresh)."""

    def __init__(self, datastore: Datastore, lease_id: int, ttl: int) -> None:
        self._ds = datastore
        self.id = lease_id
        self.ttl = ttl

    def refresh(self) -> int:
        """Keep the lease alive; returns the new TTL. Raises :class:`LeaseExpired` if it is gone."""
        return self._ds._refresh_lease(self.id)

    def revoke(self) -> None:
        """End the lease now, deleting its keys. Revoking a lease that is gone is not an error."""
        self._ds._revoke_lease(self.id)

    def __repr__(self) -> str:
        return f"Lease(id={self.id:#x}, ttl={self.ttl})"


class Watch:
    """Changes under a prefix from ``start_revision`` on, as batches of :class:`WatchEvent`.

    Iterating blocks until etcd sends something. Each batch holds the events of one watch reply, in
    revision order; an empty batch is a progress notification. ``revision`` is the highest revision
    whose events have all been delivered, so a broken watch resumes at ``revision + 1``. The iterator
    raises :class:`Compacted` when etcd no longer has the history, :class:`Unavailable` when the stream
    breaks, and stops after :meth:`cancel` (which may be called from any thread).
    """

    def __init__(self, datastore: Datastore, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self.revision = start_revision - 1
        self.watch_id: int | None = None
        self._ds = datastore
        self._done = threading.Event()
        self._call: Any = None
        self._endpoint: Any = None
        self._pending: list[Any] = []

    def _open(self, timeout: float) -> None:
        """Start the stream and wait for etcd to confirm the watch."""
        key = self.prefix.encode()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=_prefix_end(key), start_revision=self.start_revision, progress_notify=True
        )
        done = self._done

        def requests() -> Iterator[Any]:
            yield etcdrpc.WatchRequest(create_request=create)
            done.wait()  # keep the request side open until the watch ends

        channel, self._endpoint = self._ds._channel()
        stub = etcdrpc.WatchStub(channel)
        self._call = stub.Watch(requests(), metadata=self._ds._metadata(watch=True))
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            self._call.cancel()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            first = next(self._call)
        except grpc.RpcError as exc:
            self._finish()
            if timed_out.is_set():
                self._ds._endpoint_failed(self._endpoint)
                raise Unavailable(f"watch {self.prefix}: not created within {timeout} s") from exc
            raise self._error(exc) from exc
        except StopIteration:
            self._finish()
            raise Unavailable(f"watch {self.prefix}: stream closed before creation") from None
        finally:
            timer.cancel()
        if first.canceled:
            self._finish()
            raise _cancel_error(self.prefix, first.cancel_reason, int(first.compact_revision))
        self.watch_id = int(first.watch_id)
        if not first.created:
            self._pending.append(first)

    def _finish(self) -> None:
        self._done.set()
        if self._call is not None:
            self._call.cancel()

    def _error(self, exc: grpc.RpcError) -> DatastoreError:
        err = _rpc_error(f"watch {self.prefix}", exc)
        if isinstance(err, Unavailable):
            self._ds._endpoint_failed(self._endpoint)
        return err

    def cancel(self) -> None:
        """End the watch; a blocked iteration returns promptly and stops."""
        self._finish()
        self._ds._forget_watch(self)

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> list[WatchEvent]:
        while True:
            if self._done.is_set():
                raise StopIteration
            if self._pending:
                resp = self._pending.pop()
            else:
                try:
                    resp = next(self._call)
                except grpc.RpcError as exc:
                    if self._done.is_set():
                        raise StopIteration from None
                    self._finish()
                    raise self._error(exc) from exc
                except StopIteration:
                    if self._done.is_set():
                        raise
                    self._finish()
                    raise Unavailable(f"watch {self.prefix}: stream closed by etcd") from None
            if resp.compact_revision or resp.canceled:
                self._finish()
                raise _cancel_error(self.prefix, resp.cancel_reason, int(resp.compact_revision))
            if resp.events:
                batch = [
                    WatchEvent("delete" if ev.type == kv_pb2.Event.DELETE else "put", _kv(ev.kv))
                    for ev in resp.events
                ]
                self.revision = max(self.revision, batch[-1].kv.mod_revision)
                return batch
            if not resp.created:
                # Progress notification: etcd sends it only to a watcher that has every event up to
                # the header revision.
                self.revision = max(self.revision, int(resp.header.revision))
                return []

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _cancel_error(prefix: str, reason: str, compact_revision: int) -> DatastoreError:
    if compact_revision:
        return Compacted(compact_revision, f"watch {prefix}: revision compacted at {compact_revision}")
    msg = f"watch {prefix} cancelled by etcd: {reason or 'no reason given'}"
    if "invalid auth token" in reason:
        return _TokenInvalidError(msg)
    if "permission denied" in reason or "Unauthenticated" in reason or "user name is empty" in reason:
        return AuthError(msg)
    return Unavailable(msg)


# --- the datastore ---------------------------------------------------------------------------------


class Datastore:
    """A connection to one etcd cluster.

    ``endpoints`` are client URLs of the members (``http://h:2379``, ``https://h:2379`` or ``h:2379``).
    TLS is used for ``https`` endpoints, and for scheme-less ones when ``ca`` or ``cert`` is given.
    ``timeout`` bounds every unary call and watch creation. Creating a Datastore does not contact etcd
    (daemons may start before etcd does); the first call does.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both cert and key")
        if (username is None) != (password is None):
            raise ValueError("etcd authentication needs both username and password")
        targets = [_parse_endpoint(e) for e in endpoints]
        tls_files = ca is not None or cert is not None
        creds = None
        if tls_files or any(t.scheme == "https" for t in targets):
            creds = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
        eps = []
        for t in targets:
            if t.scheme == "http" and tls_files:
                raise ValueError(f"etcd endpoint {t.host}:{t.port} is http:// but TLS files were given")
            secure = t.scheme == "https" or (t.scheme == "" and tls_files)
            eps.append(
                pyetcd.Endpoint(
                    t.host,
                    t.port,
                    secure=secure,
                    creds=creds if secure else None,
                    time_retry=ENDPOINT_RETRY_SECONDS,
                    opts=list(_CHANNEL_OPTIONS),
                )
            )
        self.endpoints = tuple(f"{'https' if e.secure else 'http'}://{e.netloc}" for e in eps)
        self.timeout = timeout
        self._username = username
        self._password = password
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._closed = False
        # No user/password here: pyetcd would authenticate in its constructor (etcd must be up) and
        # send the token as call credentials, which plaintext channels refuse.
        self._client: Any = pyetcd.MultiEndpointEtcd3Client(eps, timeout=timeout, failover=True)

    # --- lifecycle ---

    def close(self) -> None:
        """Cancel open watches and close every channel."""
        if self._closed:
            return
        self._closed = True
        for w in list(self._watches):
            w.cancel()
        self._client.close()

    def __enter__(self) -> Datastore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Datastore({', '.join(self.endpoints)})"

    @property
    def current_endpoint(self) -> str:
        """The endpoint that the next call will try first (for status and logs)."""
        ep = self._client.endpoint_in_use
        return f"{'https' if ep.secure else 'http'}://{ep.netloc}"

    # --- plumbing ---

    def _metadata(self, *, watch: bool = False) -> tuple[tuple[str, str], ...] | None:
        md: list[tuple[str, str]] = []
        if self._token is not None:
            md.append(("token", self._token))
        if watch:
            md.append(("hasleader", "true"))
        return tuple(md) or None

    def _channel(self) -> tuple[Any, Any]:
        """A channel to a member that has not failed recently, and its endpoint."""
        if self._closed:
            raise DatastoreError("datastore client is closed")
        with _boundary("connect"):
            channel = self._client.channel
            return channel, self._client.endpoint_in_use

    def _endpoint_failed(self, endpoint: Any) -> None:
        """Skip ``endpoint`` for a while: the next call fails over to another member."""
        if endpoint is None:
            return
        endpoint.fail()
        if endpoint is self._client.endpoint_in_use:
            self._client._clear_old_stubs()  # cached stubs are bound to the failed channel

    def _forget_watch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def _authenticate(self, stale: str | None) -> None:
        """Get a token (again, if ``stale`` is still the current one)."""
        if self._username is None:
            return
        with self._auth_lock:
            if self._token is not None and self._token != stale:
                return  # another thread already did it
            channel, endpoint = self._channel()
            stub = etcdrpc.AuthStub(channel)
            req = etcdrpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                resp = stub.Authenticate(req, self.timeout)
            except grpc.RpcError as exc:
                err = _rpc_error("authenticate", exc)
                if isinstance(err, Unavailable):
                    self._endpoint_failed(endpoint)
                raise err from exc
            self._token = str(resp.token)
            self._client.metadata = (("token", self._token),)
            self._client.call_credentials = None

    def _call(self, what: str, fn: Callable[[], _T], *, idempotent: bool = False) -> _T:
        """Run one pyetcd call at the error boundary, with auth renewal and (for reads) failover."""
        attempts = len(self.endpoints) if idempotent else 1
        reauthed = False
        attempt = 0
        while True:
            if self._closed:
                raise DatastoreError(f"{what}: datastore client is closed")
            if self._username is not None and self._token is None:
                self._authenticate(None)
            token = self._token
            try:
                with _boundary(what):
                    return fn()
            except _TokenInvalidError:
                if reauthed:
                    raise
                reauthed = True
                self._authenticate(token)
            except Unavailable as exc:
                attempt += 1
                if attempt >= attempts:
                    raise
                _log.debug("%s: member unavailable, trying another (attempt %d): %s", what, attempt + 1, exc)

    # --- reads ---

    def get(self, key: str) -> KV | None:
        """The key, or None if it does not exist."""
        resp = self._call("get", lambda: self._client.get_response(key), idempotent=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    def get_prefix(
        self, prefix: str, *, revision: int | None = None, page_size: int = 1000
    ) -> tuple[list[KV], int]:
        """Every key under ``prefix``, read at one revision, in key order; and that revision.

        Read in pages of ``page_size`` keys (0: one reply). The first page fixes the revision (unless
        ``revision`` is given); later pages read at it, so the result is one consistent snapshot.
        Raises :class:`Compacted` if the revision is compacted before the last page is read.
        """
        start = prefix.encode()
        end = _prefix_end(start)
        out: list[KV] = []
        rev = revision
        key = start
        while True:
            resp = self._call("get_prefix", self._range(key, end, page_size, rev), idempotent=True)
            if rev is None:
                rev = int(resp.header.revision)
            out.extend(_kv(raw) for raw in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, rev
            key = bytes(resp.kvs[-1].key) + b"\0"

    def _range(self, key: bytes, end: bytes, limit: int, revision: int | None) -> Callable[[], Any]:
        return lambda: self._client.get_range_response(key, end, limit=limit or None, revision=revision)

    def revision(self) -> int:
        """The current store revision (as reported by the member answering)."""

        def status() -> Any:
            channel, endpoint = self._channel()
            try:
                return etcdrpc.MaintenanceStub(channel).Status(
                    etcdrpc.StatusRequest(), self.timeout, metadata=self._metadata()
                )
            except grpc.RpcError as exc:
                if exc.code() in _UNAVAILABLE_CODES:
                    self._endpoint_failed(endpoint)
                raise

        return int(self._call("revision", status, idempotent=True).header.revision)

    def member_list(self) -> list[Member]:
        """The cluster's members."""

        def members() -> list[Member]:
            return [
                Member(int(m.id), str(m.name), tuple(m.peer_urls), tuple(m.client_urls))
                for m in self._client.members
            ]

        return self._call("member_list", members, idempotent=True)

    # --- writes ---

    def put(self, key: str, value: bytes | str, *, lease: int | Lease | None = None) -> int:
        """Write ``key``; returns the new store revision."""
        lease_id = lease.id if isinstance(lease, Lease) else (lease or 0)
        resp = self._call("put", lambda: self._client.put(key, _b(value), lease=lease_id))
        return int(resp.header.revision)

    def create(self, key: str, value: bytes | str, *, lease: int | Lease | None = None) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        lease_id = lease.id if isinstance(lease, Lease) else (lease or 0)
        tx = self._client.transactions
        return self._txn(
            "create", [tx.mod(key) == 0], [tx.put(key, _b(value), lease=lease_id)]
        )

    def update(self, key: str, value: bytes | str, mod_revision: int) -> bool:
        """Write ``key`` only if its mod revision is still ``mod_revision`` (compare-and-swap)."""
        if mod_revision <= 0:
            raise ValueError("update needs the mod revision of an existing key (use create)")
        tx = self._client.transactions
        return self._txn("update", [tx.mod(key) == mod_revision], [tx.put(key, _b(value))])

    def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        """Delete ``key``; with ``mod_revision``, only if it is unchanged. True if a key was deleted."""
        if mod_revision is None:
            resp = self._call("delete", lambda: self._client.delete(key, return_response=True))
            return int(resp.deleted) > 0
        if mod_revision <= 0:
            raise ValueError("a conditional delete needs the mod revision of an existing key")
        tx = self._client.transactions
        return self._txn("delete", [tx.mod(key) == mod_revision], [tx.delete(key)])

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""
        if not prefix:
            raise ValueError("refusing to delete every key: empty prefix")
        resp = self._call("delete_prefix", lambda: self._client.delete_prefix(prefix))
        return int(resp.deleted)

    def commit(self, ops: Sequence[Op]) -> bool:
        """Apply ``ops`` atomically: all of them if every expectation holds, otherwise none (False).

        At most :data:`MAX_TXN_OPS` operations (etcd's ``--max-txn-ops``), each key once.
        """
        if not ops:
            return True
        if len(ops) > MAX_TXN_OPS:
            raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} operations, got {len(ops)}")
        keys = [op.key for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError("a transaction may name each key only once")
        tx = self._client.transactions
        compare = []
        success = []
        for op in ops:
            if op.expect_mod_revision is not None:
                if op.expect_mod_revision < 0:
                    raise ValueError(f"{op.key}: expect_mod_revision must be >= 0")
                compare.append(tx.mod(op.key) == op.expect_mod_revision)
            if isinstance(op, Put):
                success.append(tx.put(op.key, _b(op.value)))
            else:
                success.append(tx.delete(op.key))
        return self._txn("commit", compare, success)

    def _txn(self, what: str, compare: list[Any], success: list[Any]) -> bool:
        ok, _ = self._call(what, lambda: self._client.transaction(compare=compare, success=success, failure=[]))
        return bool(ok)

    def compact(self, revision: int, *, physical: bool = False) -> None:
        """Discard history before ``revision`` (``physical``: wait until it is gone from disk)."""
        self._call("compact", lambda: self._client.compact(revision, physical=physical))

    # --- leases ---

    def grant_lease(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds (etcd raises very small TTLs to its minimum, about 2 s)."""
        raw = self._call("grant_lease", lambda: self._client.lease(ttl))
        return Lease(self, int(raw.id), int(raw.ttl))

    def _refresh_lease(self, lease_id: int) -> int:
        responses = self._call(
            "refresh_lease", lambda: list(self._client.refresh_lease(lease_id)), idempotent=True
        )
        ttl = int(responses[0].TTL) if responses else 0
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease_id:#x} has expired or was revoked")
        return ttl

    def _revoke_lease(self, lease_id: int) -> None:
        try:
            self._call("revoke_lease", lambda: self._client.revoke_lease(lease_id))
        except DatastoreError as exc:
            if "requested lease not found" not in str(exc):
                raise

    # --- watches ---

    def watch_prefix(self, prefix: str, start_revision: int) -> Watch:
        """Watch every key under ``prefix`` from ``start_revision`` on (see :class:`Watch`).

        Raises :class:`Unavailable` if no member accepts the watch within ``timeout``.
        """
        if start_revision <= 0:
            raise ValueError("start_revision must be positive (a snapshot revision + 1)")
        if self._username is not None and self._token is None:
            self._authenticate(None)
        for attempt in (1, 2):
            token = self._token
            watch = Watch(self, prefix, start_revision)
            try:
                with _boundary(f"watch {prefix}"):
                    watch._open(self.timeout)
            except _TokenInvalidError:
                if attempt == 2:
                    raise
                self._authenticate(token)
                continue
            self._watches.add(watch)
            return watch
        raise AssertionError("unreachable")

