"""The iptables and ipset drivers against in-memory fakes of the commands (with failure injection):
minimal writes, drift repair, ownership, retries. The fakes interpret the restore input the way
the kernel tools do; assertions are on the resulting state and on counts, not on command lines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from calyx.kernel.cmd import CommandError, CommandResult
from felix.ipsets import IpsetTable
from felix.iptables import IptablesError, IptablesTable, detect_backend, split_save

pytestmark = pytest.mark.unit


class FakeIptables:
    """One table of one namespace: chains → rule lines; interprets the subset restore felix uses."""

    BUILTIN = ("INPUT", "FORWARD", "OUTPUT")

    def __init__(self, table: str = "filter") -> None:
        self.table = table
        self.chains: dict[str, list[str]] = {c: [] for c in self.BUILTIN}
        self.restores: list[str] = []
        self.fail_next = 0

    def __call__(self, args: Sequence[str], *, input: str | None = None, check: bool = True,
                 **_: Any) -> CommandResult:
        if args[0].endswith("-save"):
            return CommandResult(tuple(args), 0, self.save(), "", 0.0)
        assert args[0].endswith("-restore") and "--noflush" in args
        assert input is not None
        self.restores.append(input)
        if self.fail_next:
            self.fail_next -= 1
            raise CommandError(args, 1, "iptables-restore: line 2 failed")
        self.restore(input)
        return CommandResult(tuple(args), 0, "", "", 0.0)

    def save(self) -> str:
        out = [f"*{self.table}"]
        out += [f":{c} {'ACCEPT' if c in self.BUILTIN else '-'} [0:0]" for c in self.chains]
        for c, lines in self.chains.items():
            out += [f"-A {c} {line}" for line in lines]
        return "\n".join([*out, "COMMIT"]) + "\n"

    def restore(self, text: str) -> None:
        chains = {c: list(v) for c, v in self.chains.items()}  # all or nothing, like a COMMIT
        for line in text.splitlines():
            if line.startswith(("*", "COMMIT")) or not line:
                continue
            if line.startswith(":"):
                chains[line[1:].split()[0]] = []
                continue
            op, chain, rest = ([*line.split(" ", 2), ""])[:3]
            if op == "-A":
                chains[chain].append(rest)
            elif op == "-I":
                pos, spec = rest.split(" ", 1)
                chains[chain].insert(int(pos) - 1, spec)
            elif op == "-D":
                if rest.isdigit():
                    del chains[chain][int(rest) - 1]
                else:
                    chains[chain].remove(rest)
            elif op == "-F":
                chains[chain] = []
            elif op == "-X":
                if any(f"-j {chain}" in r or f"-g {chain}" in r for v in chains.values() for r in v):
                    raise AssertionError(f"deleting {chain} while referenced")
                del chains[chain]
            else:
                raise AssertionError(f"unexpected restore line {line!r}")
        for rules in chains.values():
            for r in rules:
                m = re.search(r"-[jg] (calyx-\S+)", r)
                if m and m.group(1) not in chains:
                    raise AssertionError(f"rule jumps to missing chain {m.group(1)}")
        self.chains = chains

    def bodies(self, chain: str) -> list[str]:
        """The chain's rules without felix's comment."""
        return [re.sub(r'\s*-m comment --comment "calyx:[0-9a-f]{16}"', "", r).strip() for r in self.chains[chain]]


def table(fake: FakeIptables) -> IptablesTable:
    t = IptablesTable("filter", 4, "legacy", runner=fake)
    t.set_hooks({"FORWARD": [("", "-j calyx-FORWARD")]})
    t.set_chain("calyx-FORWARD", [("-i cali+", "-j calyx-a"), ("-o cali+", "-j ACCEPT")])
    t.set_chain("calyx-a", [("-s 10.0.0.1", "-j ACCEPT"), ("-s 10.0.0.2", "-j ACCEPT"), ("", "-j DROP")])
    return t


def test_first_apply_then_nothing_then_a_one_rule_change_is_a_one_rule_write() -> None:
    fake = FakeIptables()
    t = table(fake)
    st = t.apply()
    assert st.chains_written == 2 and fake.chains["FORWARD"][0].endswith("-j calyx-FORWARD")
    assert t.apply().restores == 0  # nothing to do: no restore at all
    t.set_chain("calyx-a", [("-s 10.0.0.1", "-j ACCEPT"), ("-s 10.0.0.3", "-j ACCEPT"), ("", "-j DROP")])
    st = t.apply()
    assert (st.rules_inserted, st.rules_deleted, st.chains_written) == (1, 1, 0)
    assert fake.bodies("calyx-a") == ["-s 10.0.0.1 -j ACCEPT", "-s 10.0.0.3 -j ACCEPT", "-j DROP"]


def test_drift_is_repaired_after_resync_and_foreign_rules_are_kept() -> None:
    fake = FakeIptables()
    t = table(fake)
    t.apply()
    fake.chains["FORWARD"].insert(0, "-s 203.0.113.1 -j DROP")  # someone else's, now above ours
    del fake.chains["calyx-a"][1]  # a rule of ours deleted by hand
    fake.chains["calyx-a"].insert(0, "-j ACCEPT")  # and a stranger in our chain
    fake.chains["calyx-stale"] = ["-j DROP"]  # a chain of ours nobody wants any more
    fake.chains["other"] = ["-j RETURN"]
    assert t.apply().restores == 0  # no resync yet: the driver trusts its belief
    t.resync()
    st = t.apply()
    assert st.readback and st.chains_deleted == 1
    assert "calyx-stale" not in fake.chains and fake.chains["other"] == ["-j RETURN"]
    assert fake.chains["FORWARD"][0].endswith("-j calyx-FORWARD")  # back on top
    assert "-s 203.0.113.1 -j DROP" in fake.chains["FORWARD"]
    assert fake.bodies("calyx-a") == ["-s 10.0.0.1 -j ACCEPT", "-s 10.0.0.2 -j ACCEPT", "-j DROP"]
    t.resync()
    assert not t.apply().did_work  # converged


def test_failed_commit_is_retried_after_a_readback_and_finally_reported() -> None:
    fake = FakeIptables()
    t = table(fake)
    fake.fail_next = 1
    st = t.apply()
    assert st.failures == 1 and st.restores == 2 and "calyx-a" in fake.chains
    t.set_chain("calyx-a", [("", "-j DROP")])
    fake.fail_next = 10
    with pytest.raises(IptablesError):
        t.apply()
    assert not t.in_sync
    fake.fail_next = 0
    t.apply()  # the change was kept and goes through now
    assert len(fake.chains["calyx-a"]) == 1


def test_removed_chain_is_unreferenced_then_deleted_in_one_transaction() -> None:
    fake = FakeIptables()
    t = table(fake)
    t.apply()
    t.set_chain("calyx-FORWARD", [("-o cali+", "-j ACCEPT")])
    t.remove_chain("calyx-a")
    st = t.apply()
    assert st.chains_deleted == 1 and len(fake.restores) == 2 and "calyx-a" not in fake.chains


def test_split_save_separates_tables() -> None:
    text = "*filter\n:calyx-a - [0:0]\n-A calyx-a -j DROP\nCOMMIT\n*nat\n:calyx-b - [0:0]\nCOMMIT\n"
    parts = split_save(text)
    assert set(parts) == {"filter", "nat"} and "-A calyx-a -j DROP" in parts["filter"]


class FakeIpset:
    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = {"foreign": {"1.2.3.4"}}
        self.restores: list[list[str]] = []
        self.referenced: set[str] = set()

    def __call__(self, args: Sequence[str], *, input: str | None = None, check: bool = True,
                 **_: Any) -> CommandResult:
        if args[1:] == ["save"]:
            lines = []
            for name, members in self.sets.items():
                lines.append(f"create {name} hash:net family inet hashsize 1024 maxelem 1048576")
                lines += [f"add {name} {m}" for m in sorted(members)]
            return CommandResult(tuple(args), 0, "\n".join(lines) + "\n", "", 0.0)
        if args[1] == "destroy":
            if args[2] in self.referenced:
                return CommandResult(tuple(args), 1, "", "Set cannot be destroyed: it is in use", 0.0)
            self.sets.pop(args[2], None)
            return CommandResult(tuple(args), 0, "", "", 0.0)
        assert args[1:] == ["-exist", "restore"] and input is not None
        lines = input.splitlines()
        self.restores.append(lines)
        for line in lines:
            op, name, *rest = line.split()
            if op == "create":
                self.sets.setdefault(name, set())
            elif op == "add":
                self.sets[name].add(rest[0])
            elif op == "del":
                self.sets[name].discard(rest[0])
            elif op == "swap":
                self.sets[name], self.sets[rest[0]] = self.sets[rest[0]], self.sets[name]
            elif op == "destroy":
                del self.sets[name]
        return CommandResult(tuple(args), 0, "", "", 0.0)


def test_ipsets_small_delta_in_place_big_change_by_swap_and_deletes_last() -> None:
    fake = FakeIpset()
    t = IpsetTable(runner=fake)
    t.set_members("calyx4-sa", {f"10.0.0.{i}" for i in range(100)})
    t.apply_updates()
    assert len(fake.sets["calyx4-sa"]) == 100
    t.set_members("calyx4-sa", {f"10.0.0.{i}" for i in range(1, 101)})  # one out, one in
    st = t.apply_updates()
    assert (st.updated, st.swapped, st.added, st.removed) == (1, 0, 1, 1)
    assert len(fake.restores[-1]) == 2
    t.set_members("calyx4-sa", {f"10.1.0.{i}" for i in range(200)})  # a rewrite: temp set + swap
    st = t.apply_updates()
    assert st.swapped == 1 and fake.sets["calyx4-sa"] == {f"10.1.0.{i}" for i in range(200)}
    assert "calyx4-tmp" not in fake.sets
    t.remove_set("calyx4-sa")
    fake.referenced.add("calyx4-sa")  # iptables still uses it: destroy fails, retried later
    assert t.apply_deletes().failed == 1 and "calyx4-sa" in fake.sets
    fake.referenced.clear()
    assert t.apply_deletes().destroyed == 1
    assert fake.sets == {"foreign": {"1.2.3.4"}}  # never touched


def test_ipset_drift_repaired_after_resync() -> None:
    fake = FakeIpset()
    t = IpsetTable(runner=fake)
    t.set_members("calyx4-sb", {"10.0.0.1", "10.0.0.2"})
    t.apply_updates()
    fake.sets["calyx4-sb"].discard("10.0.0.2")
    fake.sets["calyx4-leftover"] = {"9.9.9.9"}
    t.resync()
    t.apply_updates()
    t.apply_deletes()
    assert fake.sets["calyx4-sb"] == {"10.0.0.1", "10.0.0.2"} and "calyx4-leftover" not in fake.sets


@pytest.mark.parametrize(("legacy", "nft", "expected"), [(0, 0, "nft"), (5, 0, "legacy"), (5, 9, "nft"), (0, 3, "nft")])
def test_backend_detection_prefers_the_backend_holding_rules(legacy: int, nft: int, expected: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("felix.iptables.shutil.which", lambda name: "/usr/sbin/xtables-nft-multi")
    calls: list[str] = []

    def runner(args: Sequence[str], **_: Any) -> CommandResult:
        calls.append(args[0])
        n = legacy if "legacy" in args[0] else nft
        text = "*filter\n" + "-A FORWARD -j ACCEPT\n" * (n if args[0].startswith("iptables") else 0) + "COMMIT\n"
        return CommandResult(tuple(args), 0, text, "", 0.0)

    assert detect_backend("auto", runner) == expected
    assert detect_backend("legacy", runner) == "legacy"
    if legacy == 0:
        assert not any("nft" in c for c in calls)  # the costly nft save is skipped when it cannot matter
