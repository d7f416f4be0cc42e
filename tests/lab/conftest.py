"""Fixtures for the lab tests: labs under the test's temporary directory, always torn down.

Each lab gets an instance name of its own (``t<pid><n>``), so these tests never collide with a lab
an operator has up, nor with each other; teardown runs ``down`` even when the test failed, and the
test then asserts nothing of the instance is left.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from calyx.lab import fabric
from calyx.lab.runner import Lab, missing_programs
from calyx.lab.topology import resolve

_n = itertools.count()


def instance_name(tag: str = "") -> str:
    return f"t{os.getpid() % 100000}{tag}{next(_n)}"


def wait_until(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll ``fn`` until it returns something true; return the seconds it took."""
    t0 = time.monotonic()
    while True:
        if fn():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def need(*programs: str) -> None:
    """Fail, naming them, when Calyx programs the test drives are not installed (scripts/setup.sh)."""
    missing = missing_programs(list(programs))
    if missing:
        pytest.fail(f"Calyx programs not installed: {', '.join(missing)} (scripts/setup.sh installs them)")


@pytest.fixture
def lab_root(tmp_path: Path) -> Path:
    return tmp_path / "labs"


@pytest.fixture
def make_lab(lab_root: Path) -> Iterator[Callable[..., Lab]]:
    """``make_lab("two-racks", daemons=False)`` → a lab that is up; torn down at teardown."""
    labs: list[Lab] = []

    def make(name: str, *, daemons: bool = True, workloads: bool = True, instance: str | None = None) -> Lab:
        lab = Lab.create(resolve(name), instance=instance or instance_name(), root=lab_root)
        labs.append(lab)
        lab.up(daemons=daemons, workloads=workloads)
        return lab

    yield make
    for lab in labs:
        lab.down()
        assert fabric.list_netns(lab.state.prefix) == [], f"namespaces of {lab.state.instance} left behind"
