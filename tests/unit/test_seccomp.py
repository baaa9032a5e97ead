"""The Kapsis seccomp filter, built on top of a host default profile (or without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kapsis.sandbox.security import (
    CLONE_NAMESPACE_FLAGS,
    DENIED_SYSCALLS,
    ENOSYS,
    EPERM,
    HOST_DEFAULT_SECCOMP,
    seccomp_profile,
)

# CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
NAMESPACE_BITS = [
    0x80,
    0x20000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
]
CLONE_NEWUSER = 0x10000000
DANGEROUS = ["unshare", "mount", "ptrace", "setns", "bpf", "keyctl", "pivot_root"]


@pytest.fixture
def host_default(tmp_path: Path) -> Path:
    path = tmp_path / "seccomp.json"
    path.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "defaultErrnoRet": 1,
                "syscalls": [
                    {
                        "names": ["read", "write", "unshare", "mount", "clone", "clone3", "ptrace"],
                        "action": "SCMP_ACT_ALLOW",
                    },
                    {"names": ["setns"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["X"]}},
                    {"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "comment": "kept as is"},
                ],
            }
        )
    )
    return path


def _rules_for(profile: dict, name: str) -> list[dict]:
    return [rule for rule in profile["syscalls"] if name in rule.get("names", [])]


def _allowed_names(profile: dict) -> set[str]:
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for name in rule["names"]
    }


def test_namespace_flag_constant_covers_every_namespace():
    combined = 0
    for bit in NAMESPACE_BITS:
        combined |= bit

    assert combined == CLONE_NAMESPACE_FLAGS


def test_host_default_action_is_kept(host_default):
    profile = seccomp_profile(host_default)

    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1


def test_denied_syscalls_are_removed_from_allow_rules(host_default):
    profile = seccomp_profile(host_default)

    allowed = _allowed_names(profile)
    assert {"read", "write", "getpid"} <= allowed
    assert not allowed & {"unshare", "mount", "ptrace", "clone", "clone3", "setns"}


def test_rule_left_empty_by_removal_is_dropped(host_default):
    profile = seccomp_profile(host_default)

    assert not [rule for rule in profile["syscalls"] if not rule.get("names")]
    assert not [rule for rule in profile["syscalls"] if "includes" in rule]


def test_other_rule_fields_are_kept(host_default):
    profile = seccomp_profile(host_default)

    (getpid,) = _rules_for(profile, "getpid")
    assert getpid["comment"] == "kept as is"


def test_denied_syscalls_get_an_eperm_rule(host_default):
    profile = seccomp_profile(host_default)

    (rule,) = _rules_for(profile, "unshare")
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert rule["errnoRet"] == EPERM == 1
    assert set(rule["names"]) == set(DENIED_SYSCALLS)
    for name in DANGEROUS:
        assert name in rule["names"]


def test_clone_is_allowed_only_without_namespace_flags(host_default):
    profile = seccomp_profile(host_default)

    (rule,) = _rules_for(profile, "clone")
    assert rule["names"] == ["clone"]
    assert rule["action"] == "SCMP_ACT_ALLOW"
    assert rule["args"] == [
        {"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]


def test_clone3_gets_enosys_so_libc_falls_back(host_default):
    profile = seccomp_profile(host_default)

    (rule,) = _rules_for(profile, "clone3")
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert rule["errnoRet"] == ENOSYS == 38


def test_profile_is_json_serialisable(host_default):
    profile = seccomp_profile(host_default)

    assert json.loads(json.dumps(profile)) == profile


def test_without_host_default_the_profile_allows_by_default(tmp_path):
    profile = seccomp_profile(tmp_path / "does-not-exist.json")

    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    (denied,) = _rules_for(profile, "mount")
    assert denied["action"] == "SCMP_ACT_ERRNO"
    assert denied["errnoRet"] == EPERM


def test_without_host_default_clone_is_refused_per_namespace_flag(tmp_path):
    profile = seccomp_profile(tmp_path / "does-not-exist.json")

    clone_rules = _rules_for(profile, "clone")
    assert len(clone_rules) == len(NAMESPACE_BITS)
    bits = []
    for rule in clone_rules:
        assert rule["action"] == "SCMP_ACT_ERRNO"
        assert rule["errnoRet"] == EPERM
        (arg,) = rule["args"]
        assert arg["op"] == "SCMP_CMP_MASKED_EQ"
        assert arg["index"] == 0
        assert arg["value"] == arg["valueTwo"]
        bits.append(arg["value"])
    assert sorted(bits) == sorted(NAMESPACE_BITS)
    assert CLONE_NEWUSER in bits


def test_without_host_default_clone3_gets_enosys(tmp_path):
    profile = seccomp_profile(tmp_path / "does-not-exist.json")

    (rule,) = _rules_for(profile, "clone3")
    assert rule["errnoRet"] == ENOSYS


def test_host_default_file_is_not_modified(host_default):
    before = host_default.read_text()

    seccomp_profile(host_default)

    assert host_default.read_text() == before


@pytest.mark.skipif(not HOST_DEFAULT_SECCOMP.is_file(), reason="no host seccomp default")
def test_real_host_default_is_hardened():
    profile = seccomp_profile(HOST_DEFAULT_SECCOMP)

    assert profile["defaultAction"] != "SCMP_ACT_ALLOW"
    for rule in profile["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW" and rule["names"] != ["clone"]:
            assert not set(rule["names"]) & set(DENIED_SYSCALLS), rule
            assert "clone3" not in rule["names"]
    (clone,) = _rules_for(profile, "clone")
    assert clone["args"][0]["value"] == CLONE_NAMESPACE_FLAGS
    assert clone["args"][0]["valueTwo"] == 0
    assert "read" in _allowed_names(profile)
    (clone3,) = _rules_for(profile, "clone3")
    assert clone3["errnoRet"] == ENOSYS
