"""Golden files: datastore values (input JSON) → the ExaBGP configuration bgpd renders.

Regenerate after an intended change with ``CALYX_UPDATE_GOLDEN=1 pytest tests/bgpd/test_exaconf.py``
and review the diff. Every golden configuration is also checked by ``exabgp validate``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bgpd import exaconf
from bgpd.peering import Neighbor
from bgpd.render import render_from_input

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))
EXABGP = shutil.which("exabgp") or str(Path(sys.executable).parent / "exabgp")


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    rendered = render_from_input(json.loads((GOLDEN / f"{case}.json").read_text()))
    expected_path = GOLDEN / f"{case}.conf"
    if os.environ.get("CALYX_UPDATE_GOLDEN"):
        expected_path.write_text(rendered)
    assert rendered == expected_path.read_text()
    assert "None" not in rendered and "$" not in rendered


@pytest.mark.parametrize("case", CASES)
def test_golden_is_valid_exabgp(case: str, tmp_path: Path) -> None:
    conf = tmp_path / "exabgp.conf"
    # validate resolves the helper's command line: use one that exists here
    text = (GOLDEN / f"{case}.conf").read_text().replace("/usr/bin/python3", sys.executable)
    conf.write_text(text)
    proc = subprocess.run([EXABGP, "validate", str(conf)], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "exabgp.daemon.drop": "false"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_restart_only_when_globals_change() -> None:
    nb = Neighbor("10.0.0.2", 64512, 64512, "10.0.0.1", "10.0.0.1", "mesh")
    a = exaconf.build("h1", {}, helper="h", bind="10.0.0.1")
    b = exaconf.build("h1", {"10.0.0.2": nb}, helper="h", bind="10.0.0.1")
    assert exaconf.needs_restart(None, a)
    assert not exaconf.needs_restart(a, b)  # neighbours only: SIGUSR1
    assert exaconf.needs_restart(b, exaconf.build("h1", {}, helper="h", bind="10.0.0.9"))
    assert exaconf.needs_restart(b, exaconf.build("h1", {}, helper="h", bind="10.0.0.1", reactor_speed=1.0))
    env = exaconf.environment(b)
    assert env["exabgp.daemon.drop"] == "false" and env["exabgp.api.cli"] == "false"
    assert env["exabgp.api.show-routes-format"] == "v2" and env["exabgp.tcp.bind"] == "10.0.0.1"
