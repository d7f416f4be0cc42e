"""Which ExaBGP bgpd runs: the one in its own virtualenv (the pinned version its configuration is
written for) before any other on PATH, such as Debian's exabgp 4.2 in /usr/sbin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bgpd.exabgp import resolve_binary

pytestmark = pytest.mark.unit


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_the_virtualenv_exabgp_wins_over_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = Path(sys.executable).parent / "exabgp"
    assert ours.is_file(), f"{ours} is missing: the test environment has no ExaBGP (scripts/setup.sh installs it)"
    _executable(tmp_path / "exabgp")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_binary("exabgp") == str(ours)


def test_a_name_not_in_the_virtualenv_comes_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = _executable(tmp_path / "exabgp-of-another-name")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_binary("exabgp-of-another-name") == str(other)
    assert resolve_binary("no-such-exabgp") == "no-such-exabgp"


def test_a_path_is_taken_as_given(tmp_path: Path) -> None:
    assert resolve_binary(str(tmp_path / "exabgp")) == str(tmp_path / "exabgp")
