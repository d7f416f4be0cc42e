"""The test VM's accelerator choice (tests/fixtures/vm.py): what rules KVM out, and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.vm import accel_cache_key, choose_accel, kvm_unusable

pytestmark = pytest.mark.unit


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return p


def test_no_vmx_or_svm_rules_kvm_out(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    assert kvm_unusable(_cpuinfo(tmp_path, "avx512f amx_tile"), str(dev)) == "the CPU advertises neither vmx nor svm"


def test_a_device_that_cannot_be_opened_rules_kvm_out(tmp_path: Path) -> None:
    why = kvm_unusable(_cpuinfo(tmp_path, "vmx"), str(tmp_path / "no-kvm"))
    assert why is not None and "cannot be opened read-write" in why


def test_vmx_or_svm_and_an_openable_device_leave_kvm_to_the_test_boot(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    assert kvm_unusable(_cpuinfo(tmp_path, "vmx"), str(dev)) is None
    assert kvm_unusable(_cpuinfo(tmp_path, "svm"), str(dev)) is None


def test_the_choice_is_cached_for_this_boot_of_the_machine(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    # a cached answer for this machine's boot is taken as it is, without probing again
    cache.write_text(json.dumps({"key": accel_cache_key(), "accel": "kvm", "why": "probed earlier"}))
    assert choose_accel(tmp_path, cache) == ("kvm", "probed earlier (cached)")
    cache.write_text(json.dumps({"key": accel_cache_key(), "accel": "tcg", "why": "no vmx"}))
    assert choose_accel(tmp_path, cache) == ("tcg", "no vmx (cached)")


def test_a_choice_cached_for_another_boot_is_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures import vm as vm_fixture

    cache = tmp_path / "accel.json"
    cache.write_text(json.dumps({"key": "another boot", "accel": "kvm", "why": "probed then"}))
    monkeypatch.setattr(vm_fixture, "kvm_unusable", lambda: "the CPU advertises neither vmx nor svm")
    assert choose_accel(tmp_path, cache) == ("tcg", "the CPU advertises neither vmx nor svm")
    assert json.loads(cache.read_text()) == {"key": accel_cache_key(), "accel": "tcg",
                                             "why": "the CPU advertises neither vmx nor svm"}
