"""Log lines for journald and for log shippers (calyx.logfmt): priorities, JOURNAL_STREAM, JSON fields."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from calyx import config, logfmt

pytestmark = pytest.mark.unit

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


def record(level: int, msg: str, *args: object, extra: dict[str, object] | None = None,
           exc: bool = False, name: str = "felix.daemon") -> logging.LogRecord:
    """A record made the way Logger.makeRecord makes it (extra= included)."""
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    logger = logging.getLogger(name)
    return logger.makeRecord(name, level, "file.py", 1, msg, args, exc_info, extra=extra)


@pytest.mark.parametrize(("level", "prio"), [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                             (logging.ERROR, 3), (logging.CRITICAL, 2), (25, 6), (45, 3)])
def test_priorities_are_sd_daemons(level: int, prio: int) -> None:
    assert logfmt.priority(level) == prio


def test_journal_text_has_the_priority_prefix_and_no_timestamp_or_pid() -> None:
    f = logfmt.TextFormatter("felix", journal=True)
    line = f.format(record(logging.WARNING, "apply left work to retry in %.1f s", 0.1))
    assert line == "<4>WARNING felix.daemon: apply left work to retry in 0.1 s"
    assert not TIMESTAMP.search(line) and str(os.getpid()) not in line
    assert f.format(record(logging.INFO, "x")).startswith("<6>INFO ")
    assert f.format(record(logging.ERROR, "x")).startswith("<3>ERROR ")


def test_plain_text_keeps_timestamp_component_and_pid() -> None:
    line = logfmt.TextFormatter("bgpd").format(record(logging.WARNING, "hello", name="bgpd.fib"))
    assert TIMESTAMP.match(line)
    assert f" bgpd[{os.getpid()}] WARNING bgpd.fib: hello" in line
    assert not line.startswith("<")


def test_journal_prefixes_every_line_of_a_traceback() -> None:
    text = logfmt.TextFormatter("felix", journal=True).format(record(logging.ERROR, "crashed", exc=True))
    lines = text.split("\n")
    assert len(lines) > 3 and all(x.startswith("<3>") for x in lines), text
    assert "RuntimeError: boom" in lines[-1]


def test_text_appends_extra_context_as_key_value() -> None:
    rec = record(logging.WARNING, "route writes failed",
                 extra={"proto": 78, "count": 2, "why": "a route of another owner", "nets": ["10.0.0.1/32", "b"],
                        "empty": ""})
    line = logfmt.TextFormatter("felix", journal=True).format(rec)
    assert line == ('<4>WARNING felix.daemon: route writes failed proto=78 count=2 why="a route of another owner" '
                    'nets=10.0.0.1/32,b empty=""')


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_journal_stream_must_match_the_descriptor(pipe_fds: tuple[int, int], tmp_path: Path) -> None:
    _, w = pipe_fds
    st = os.fstat(w)
    assert logfmt.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=w)
    # inherited by a process whose stderr goes elsewhere (a file): not the journal
    with open(tmp_path / "log", "w") as f:
        assert not logfmt.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=f.fileno())
    assert not logfmt.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd=w)
    assert not logfmt.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev + 1}:{st.st_ino}"}, fd=w)
    for bad in ("", "garbage", "1:x", ":"):
        assert not logfmt.stderr_is_journal({"JOURNAL_STREAM": bad}, fd=w)
    assert not logfmt.stderr_is_journal({}, fd=w)


def test_json_lines_carry_the_stable_fields() -> None:
    f = logfmt.JsonFormatter("bgpd", "host-1")
    before = dt.datetime.now(dt.UTC)
    obj = json.loads(f.format(record(logging.WARNING, "peer %s: announcing failed", "10.0.0.1", name="bgpd.daemon")))
    assert list(obj)[:6] == list(logfmt.JSON_FIELDS)
    assert obj["level"] == "warning" and obj["component"] == "bgpd" and obj["node"] == "host-1"
    assert obj["logger"] == "bgpd.daemon" and obj["msg"] == "peer 10.0.0.1: announcing failed"
    assert obj["ts"].endswith("Z")
    ts = dt.datetime.fromisoformat(obj["ts"])
    assert ts.utcoffset() == dt.timedelta(0) and abs((ts - before).total_seconds()) < 5
    assert "exc" not in obj


def test_json_carries_context_and_exceptions() -> None:
    f = logfmt.JsonFormatter("felix", "h1")
    rec = record(logging.ERROR, "fib route failed", exc=True,
                 extra={"prefix": ipaddress.ip_network("10.65.0.0/26"), "peer": "10.0.0.2", "count": 3,
                        "node": "other-host", "paths": ("a", "b")})
    obj = json.loads(f.format(rec))
    assert obj["prefix"] == "10.65.0.0/26" and obj["peer"] == "10.0.0.2" and obj["count"] == 3
    assert obj["paths"] == ["a", "b"]
    # a context name that is a fixed field does not hide it
    assert obj["node"] == "h1" and obj["ctx_node"] == "other-host"
    assert obj["exc"].startswith("Traceback") and "RuntimeError: boom" in obj["exc"]
    assert obj["msg"] == "fib route failed"


def test_json_under_journald_is_prefixed_and_still_one_object() -> None:
    line = logfmt.JsonFormatter("felix", "h1", journal=True).format(record(logging.WARNING, "a\nb"))
    assert line.startswith("<4>{") and "\n" not in line
    assert json.loads(line[3:])["msg"] == "a\nb"


def test_formatter_refuses_an_unknown_format() -> None:
    assert isinstance(logfmt.formatter("json", "felix", "h", journal=False), logfmt.JsonFormatter)
    assert isinstance(logfmt.formatter("text", "felix", "h", journal=True), logfmt.TextFormatter)
    with pytest.raises(ValueError, match="text, json"):
        logfmt.formatter("xml", "felix", "h", journal=False)


def test_log_format_key_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "calyx.toml"
    path.write_text('log_format = "json"\n[bgpd]\nlog_format = "text"\n')
    assert config.load("felix", path=str(path), environ={}).log_format == "json"
    assert config.load("bgpd", path=str(path), environ={}).log_format == "text"
    assert config.load("bgpd", path=str(path), environ={"CALYX_LOG_FORMAT": "JSON"}).log_format == "json"
    path.write_text("")
    assert config.load("felix", path=str(path), environ={}).log_format == "text"


@pytest.mark.parametrize(("text", "env", "source"), [
    ('log_format = "xml"\n', {}, "calyx.toml: "),
    ("", {"CALYX_LOG_FORMAT": "logfmt"}, "environment variable CALYX_LOG_FORMAT: "),
    ("", {"CALYX_FELIX_LOG_FORMAT": ""}, "environment variable CALYX_FELIX_LOG_FORMAT: "),
])
def test_bad_log_format_names_the_key_its_source_and_the_choices(tmp_path: Path, text: str, env: dict[str, str],
                                                                 source: str) -> None:
    path = tmp_path / "calyx.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load("felix", path=str(path), environ=env)
    msg = str(info.value)
    assert source in msg and "invalid value for log_format: expected one of text, json" in msg
