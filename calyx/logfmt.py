"""What a Calyx daemon's log line looks like: plain text, journald's, or JSON for log shippers.

What it owns: the formatters that :func:`calyx.daemon.setup_logging` installs on the root logger of
felix, bgpd and calyx-cni-server, and the test of whether stderr is connected to the journal. It
uses the standard library's :mod:`logging` only.

The formats (``log_format`` in the configuration, ``CALYX_LOG_FORMAT`` in the environment):

- ``text`` (the default) on a terminal or a file::

      2024-05-01 12:00:00,123 felix[4242] WARNING calyx.kernel.routetable: route writes failed proto=78 count=1

- ``text`` when stderr **is the journal** (systemd sets ``JOURNAL_STREAM=<device>:<inode>`` to the
  stream it connects stdout/stderr to; a child that inherited the variable but writes elsewhere is
  not fooled, because the device and inode must match stderr's, as systemd.exec(5) says)::

      <4>WARNING calyx.kernel.routetable: route writes failed proto=78 count=1

  The ``<N>`` prefix is the syslog priority (sd-daemon(3): debug 7, info 6, warning 4, error 3,
  critical 2); journald strips it and stores it as the entry's PRIORITY, so ``journalctl -p warning``
  finds warnings. journald adds the timestamp, pid and identifier itself, so the line does not
  repeat them. Every line of a multi-line record (a traceback) carries the prefix: journald reads
  each line as its own entry.

- ``json``: one object per line, for ELK and other shippers. Fields, always: ``ts`` (RFC 3339, UTC,
  milliseconds), ``level`` (``debug`` … ``critical``), ``component`` (``felix``, ``bgpd``,
  ``calyx-cni-server``), ``node`` (``node_name``), ``logger``, ``msg``; then the record's
  structured context (below), and ``exc`` (the formatted traceback) when there is one. Under
  journald each object is preceded by its ``<N>`` prefix too, which journald strips.

Structured context: pass it with ``extra=``, the standard library's way, instead of writing it into
the message::

    log.warning("route writes failed", extra={"proto": 78, "count": 3})

The text formats append it as `` proto=78 count=3`` (values with spaces or quotes are JSON-quoted);
``json`` makes each a field. Names in use: ``peer``, ``prefix``, ``endpoint``, ``iface``, ``key``,
``proto``, ``table``, ``container`` … (docs/logging.md lists them). A name that is one of the
fixed JSON fields (``ts``, ``level``, ``component``, ``node``, ``logger``, ``exc``) is written as
``ctx_<name>`` so that it cannot hide them; names of LogRecord attributes (``msg``, ``name``,
``args`` …) are refused by :mod:`logging` itself.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from calyx.config import LOG_FORMATS as FORMATS

#: sd-daemon(3) / syslog(3) priorities of the logging levels
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

#: the fields of every JSON line, in this order
JSON_FIELDS = ("ts", "level", "component", "node", "logger", "msg")

# attributes every LogRecord has (so not context); "message"/"asctime" are set by formatting,
# "taskName" appears in Python 3.12
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_RESERVED = frozenset((*JSON_FIELDS, "exc"))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the lower one's, as logging does)."""
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= lvl:
            return PRIORITIES[lvl]
    return PRIORITIES[logging.DEBUG]


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to journald (``JOURNAL_STREAM=dev:ino``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        want = (int(dev), int(ino))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == want


def context(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The structured context of a record: what was passed with ``extra=``, in that order."""
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


def _text_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(_json_value(value), separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, list | tuple | set | frozenset):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _json_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)  # addresses, networks, enums: their text form


class TextFormatter(logging.Formatter):
    """``<time> <component>[<pid>] LEVEL logger: message key=value…``; with ``journal``, ``<N>LEVEL logger: …``."""

    def __init__(self, component: str, *, journal: bool = False) -> None:
        if journal:
            super().__init__("%(levelname)s %(name)s: %(message)s")
        else:
            super().__init__(f"%(asctime)s {component}[%(process)d] %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ctx = " ".join(f"{k}={_text_value(v)}" for k, v in context(record))
        return f"{line} {ctx}" if ctx else line

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def __init__(self, component: str, node: str, *, journal: bool = False) -> None:
        super().__init__()
        self.component = component
        self.node = node
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        obj: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "component": self.component,
            "node": self.node,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in context(record):
            obj[f"ctx_{key}" if key in _RESERVED else key] = _json_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(obj, ensure_ascii=False, default=str)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def formatter(log_format: str, component: str, node: str, *, journal: bool) -> logging.Formatter:
    """The formatter for ``log_format`` (``text`` or ``json``); ``journal``: stderr is journald's."""
    if log_format == "json":
        return JsonFormatter(component, node, journal=journal)
    if log_format == "text":
        return TextFormatter(component, journal=journal)
    raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {log_format!r}")
