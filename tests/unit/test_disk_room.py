"""The agent's disk never promises more than the filesystem of ~/.kapsis has free.

The disk is a sparse file there: without this bound an agent with a quota larger than the free
space could fill the filesystem that holds the audit trail and the status.
"""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from kapsis.errors import ExitCode, SandboxError
from kapsis.host.facts import HostFacts
from kapsis.sandbox import workspace_plan
from kapsis.sandbox.workspace_plan import HOST_RESERVE
from kapsis.workspace import disk, disk_helper

GIB = 1024**3


@pytest.fixture
def free_space(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The free space statvfs reports, settable by the test."""
    state = SimpleNamespace(free=100 * GIB)
    real = os.statvfs

    def statvfs(path: str | Path) -> object:
        facts = real(path)
        return SimpleNamespace(f_bavail=state.free // facts.f_frsize, f_frsize=facts.f_frsize)

    monkeypatch.setattr(workspace_plan.os, "statvfs", statvfs)
    monkeypatch.setattr(disk_helper, "loop_devices", lambda: [])  # this host's own disks
    return state


def test_with_room_the_quota_is_as_asked(make_plan, free_space) -> None:
    plan = make_plan()
    assert plan.workspace.disk_bytes == 10 * GIB and plan.resources.disk == "10g"


def test_the_quota_is_lowered_to_the_free_space_less_the_reserve(
    make_plan, free_space, kapsis_home: Path
) -> None:
    free_space.free = 2 * GIB
    plan = make_plan()
    assert plan.workspace.disk_bytes == 2 * GIB - HOST_RESERVE
    assert plan.resources.disk_bytes == 2 * GIB - HOST_RESERVE
    assert "lowered from 10g" in str(plan.resources.disk)
    assert all(f"size={2 * GIB - HOST_RESERVE}" in t.options for t in plan.tmpfs)


def test_no_room_is_refused_and_no_limit_is_the_users_choice(make_plan, free_space) -> None:
    free_space.free = 200 * 1024**2
    with pytest.raises(SandboxError) as refused:
        make_plan()
    assert refused.value.exit_code == ExitCode.SANDBOX_FAILED
    assert "no room for the agent's disk" in str(refused.value)
    assert "resources.disk: null" in str(refused.value)
    assert make_plan(config="resources:\n  disk: null\n").workspace.disk_bytes is None


def test_the_other_agents_sparse_disks_count_as_taken(
    make_plan, free_space, kapsis_home: Path
) -> None:
    """Their disks are sparse files that may still grow to their size: together with a new
    one they could otherwise fill the filesystem that holds the audit trail."""
    free_space.free = 8 * GIB
    other = kapsis_home / "sandboxes" / "other"
    other.mkdir(parents=True)
    with (other / "disk.img").open("wb") as image:
        image.truncate(5 * GIB)

    plan = make_plan()

    assert plan.workspace.disk_bytes == 3 * GIB - HOST_RESERVE
    assert "lowered from 10g" in str(plan.resources.disk)


ROOTLESS = HostFacts(rootless=True, cgroup_version=2, apparmor=False, dns_servers=("192.0.2.53",))


@pytest.fixture
def helper(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The disk helper as this user finds it (gap: why it cannot serve; room: what it says)."""
    state = SimpleNamespace(gap=None, room=100 * GIB)
    monkeypatch.setattr(disk, "helper_gap", lambda: state.gap)
    monkeypatch.setattr(disk, "helper_room", lambda: state.room)
    return state


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_rootless_the_helper_holds_the_writable_part(
    make_plan, helper, project: Path, mode: str
) -> None:
    for step in (
        ["init", "-q", "-b", "main"],
        ["-c", "user.name=U", "-c", "user.email=u@example.test", "add", "-A"],
        ["-c", "user.name=U", "-c", "user.email=u@example.test", "commit", "-qm", "one"],
        ["config", "user.name", "U"],
        ["config", "user.email", "u@example.test"],
    ):
        subprocess.run(["git", "-C", str(project), *step], check=True, capture_output=True)
    plan = make_plan(host=ROOTLESS, config=f"filesystem:\n  mode: {mode}\n")
    workspace = plan.workspace
    mount = disk_helper.mount_point(os.geteuid(), "unit1")

    assert workspace.disk_by_helper and workspace.disk_mount == str(mount)
    assert workspace.disk_bytes == 10 * GIB and plan.resources.disk_enforced
    if mode == "worktree":
        assert workspace.worktree == str(mount)
    else:
        assert Path(workspace.upper).parent == Path(workspace.work).parent == mount


def test_rootless_with_no_helper_the_run_goes_unbounded_and_says_why(make_plan, helper) -> None:
    helper.gap = "you are not in the group kapsis"
    plan = make_plan(host=ROOTLESS)
    assert plan.workspace.disk_bytes is None and not plan.workspace.disk_by_helper
    assert not plan.resources.disk_enforced
    assert plan.resources.disk_not_enforced == "you are not in the group kapsis"


def test_rootless_the_helpers_room_lowers_or_refuses(make_plan, helper) -> None:
    helper.room = 3 * GIB
    assert make_plan(host=ROOTLESS).workspace.disk_bytes == 3 * GIB
    helper.room = 10 * 1024**2
    with pytest.raises(SandboxError, match="no room for the agent's disk"):
        make_plan(host=ROOTLESS)


def test_helper_gap_names_each_missing_piece(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "kapsis-disk"
    monkeypatch.setattr(disk_helper, "INSTALLED_AT", missing)
    assert "not installed" in str(disk.helper_gap())
    missing.write_text("")
    monkeypatch.setattr(disk_helper, "GROUP", "kapsis-no-such-group")
    assert "no group kapsis-no-such-group" in str(disk.helper_gap())
    monkeypatch.setattr(disk_helper, "GROUP", grp.getgrgid(os.getgid()).gr_name)
    monkeypatch.setattr(disk, "_root_is_shared", lambda: False)
    assert "not shared" in str(disk.helper_gap())
    monkeypatch.setattr(disk, "_root_is_shared", lambda: True)
    assert disk.helper_gap() is None


def test_the_disk_helpers_disks_on_the_same_filesystem_count_too(
    make_plan, free_space, kapsis_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rootless users' disks (the helper's) may share the filesystem of root's ~/.kapsis."""
    free_space.free = 8 * GIB
    state = tmp_path / "helper-state"
    images = state / "images" / "1000"
    images.mkdir(parents=True)
    with (images / "theirs.img").open("wb") as image:
        image.truncate(4 * GIB)
    monkeypatch.setattr(disk_helper, "STATE", state)

    assert make_plan().workspace.disk_bytes == 4 * GIB - HOST_RESERVE
