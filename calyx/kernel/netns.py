"""Network namespaces: move the current thread into one and back, and open sockets inside one.

What it owns: nothing in the kernel. It never creates or deletes namespaces (``ip netns add`` does,
from the root mount namespace; see docs/kernel.md); it only switches the calling thread.

``setns(fd, CLONE_NEWNET)`` is per *thread*: :func:`enter` moves the calling OS thread and only it.
The namespace to return to is taken from ``/proc/thread-self/ns/net`` (``/proc/self`` would name
the main thread's namespace, which is wrong when called from a worker thread) and is restored even
when the body raises. If restoring fails the thread is left in a foreign namespace, which is not
recoverable: :class:`NamespaceRestoreError` is raised and the daemon must exit (crash-only).

A socket belongs to the namespace it was created in for its whole life, so the cheap way to work
in a namespace is to create the socket inside it once (:func:`socket_in`) and use it from anywhere.
Never ``await`` inside :func:`enter`: other coroutines of the same event loop would run in the
namespace too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = [
    "NETNS_RUN_DIR",
    "NamespaceError",
    "NamespaceNotFoundError",
    "NamespaceRestoreError",
    "enter",
    "netns_path",
    "run_in_netns",
    "socket_in",
]

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_SELF_NETNS = "/proc/thread-self/ns/net"

P = ParamSpec("P")
T = TypeVar("T")

_libc: ctypes.CDLL | None = None


class NamespaceError(OSError):
    """A network namespace could not be entered or left."""


class NamespaceNotFoundError(NamespaceError):
    """The named namespace does not exist (no ``/run/netns/<name>``, or the path is not a netns)."""


class NamespaceRestoreError(NamespaceError):
    """The thread could not return to its original namespace: it must not go on working."""


def netns_path(name_or_path: str | os.PathLike[str]) -> str:
    """``/run/netns/<name>`` for a bare name; a path (anything with a ``/``) is returned as is."""
    text = os.fspath(name_or_path)
    if not text:
        raise NamespaceNotFoundError(errno.ENOENT, "empty network namespace name")
    if "/" in text:
        return text
    return os.path.join(NETNS_RUN_DIR, text)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def enter(name_or_path: str | os.PathLike[str]) -> Iterator[None]:
    """Run the body with the current thread inside the network namespace, then move it back.

    ``name_or_path`` is a name under ``/run/netns`` or a path such as ``/proc/<pid>/ns/net``.
    Raises :class:`NamespaceNotFoundError` if it does not exist or is not a network namespace.
    """
    path = netns_path(name_or_path)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFoundError(errno.ENOENT, f"no network namespace {path}")
    try:
        original = os.open(_SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise NamespaceNotFoundError(errno.EINVAL, f"{path} is not a network namespace")
                raise NamespaceError(exc.errno, f"cannot enter {path}: {exc.strerror}")
            try:
                yield
            finally:
                try:
                    _setns(original)
                except OSError as exc:
                    raise NamespaceRestoreError(
                        exc.errno, f"cannot return from {path} to the original namespace: {exc.strerror}"
                    )
        finally:
            os.close(original)
    finally:
        os.close(target)


def socket_in(
    name_or_path: str | os.PathLike[str] | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A socket created inside the namespace (``None``: the current one). It stays bound to it."""
    if name_or_path is None:
        return socket.socket(family, type, proto)
    with enter(name_or_path):
        return socket.socket(family, type, proto)


def run_in_netns(name_or_path: str | os.PathLike[str], fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``fn(*args, **kwargs)`` with the current thread inside the namespace and return its result."""
    with enter(name_or_path):
        return fn(*args, **kwargs)
