"""calyxctl apply warns about settings that are valid but not applied (no datastore needed)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from calyx.cli import resources
from calyx.cli.main import cli


def _peer(**spec: object) -> str:
    return json.dumps({"kind": "BGPPeer", "name": "tor", "spec": {"peer_ip": "10.0.0.1", "as_number": 65000, **spec}})


def test_keepalive_other_than_a_third_of_hold_time_is_warned() -> None:
    docs = resources.parse_documents(_peer(keepalive=5, hold_time=30), "peer.json")
    (warning,) = resources.warnings(docs)
    assert "BGPPeer tor: keepalive 5 is not applied" in warning and "10 s with hold_time 30" in warning
    assert resources.warnings(resources.parse_documents(_peer(keepalive=10, hold_time=30), "p")) == []
    assert resources.warnings(resources.parse_documents(_peer(keepalive=30), "p")) == []  # default hold 90
    assert resources.warnings(resources.parse_documents(_peer(hold_time=9), "p")) == []


def test_dry_run_apply_prints_the_warning_and_succeeds() -> None:
    result = CliRunner().invoke(cli, ["apply", "--dry-run", "-f", "-"], input=_peer(keepalive=5, hold_time=30),
                                env={"CALYX_CONFIG": "/dev/null"})
    assert result.exit_code == 0, result.output
    assert "BGPPeer tor valid" in result.stdout and "warning: " in result.stderr and "keepalive 5" in result.stderr
