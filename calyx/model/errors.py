"""Typed errors of the cluster model: every malformed value names its key and its field."""

from __future__ import annotations


class ModelError(ValueError):
    """A datastore value or a user document that does not match the contract.

    ``key`` is the etcd key (or the document's ``kind/name`` when there is no key yet), ``field`` the
    dotted path of the offending field (``ingress[0].destination.ports[1]``), ``message`` what is
    wrong in words an operator can act on.
    """

    def __init__(self, key: str, field: str, message: str) -> None:
        self.key = key
        self.field = field
        self.message = message
        where = f"{key}: {field}" if field else key
        super().__init__(f"{where}: {message}")
