"""resources.disk for a normal user: rootless podman cannot mount a filesystem, so the disk
helper (kapsis.workspace.disk_helper, run through sudo by the members of the group kapsis)
makes the agent's disk. The agent gets ENOSPC at its quota in both workspace modes while the
host goes on; a user outside the group runs with no limit and is told why; and what the user
may ask of the helper through sudo stays inside their own disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kapsis.workspace import disk_helper

from .rootless_user import SOURCE_DIR, RootlessUser

pytestmark = pytest.mark.integration

NO_SERVER = {"KAPSIS_NO_SERVER": "1"}
HELPER = str(disk_helper.INSTALLED_AT)
FILL = (
    "dd if=/dev/zero of=/workspace/fill bs=1M count=120 2>&1; "
    "ls -l /workspace/fill | awk '{print \"workspace-bytes=\" $5}'; "
    "dd if=/dev/zero of=/tmp/fill bs=1M count=120 2>&1; "
    "ls -l /tmp/fill | awk '{print \"tmp-bytes=\" $5}'; "
    "rm -f /workspace/fill /tmp/fill; echo done > /workspace/result.txt"
)


@pytest.fixture(scope="session")
def installed_helper() -> None:
    """The helper as scripts/install.sh installs it, from this checkout (made the same if an
    older copy is installed)."""
    script = SOURCE_DIR.parent / "scripts" / "install_disk_helper.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def in_group(user: RootlessUser) -> Iterator[None]:
    """The user a member of the group kapsis for the test (as install.sh makes its user)."""
    subprocess.run(["usermod", "-aG", disk_helper.GROUP, user.name], check=True)
    try:
        yield
    finally:
        subprocess.run(["gpasswd", "-d", user.name, disk_helper.GROUP], capture_output=True)


@pytest.fixture
def member(user: RootlessUser, installed_helper: None) -> Iterator[RootlessUser]:
    with in_group(user):
        yield user


@pytest.fixture
def project(user: RootlessUser, request: pytest.FixtureRequest) -> Path:
    return user.make_repository(
        user.home / "projects" / f"{request.node.name[:30]}-{secrets.token_hex(3)}"
    )


def kapsis(user: RootlessUser, *args: str) -> Any:
    return user.kapsis(*args, env=NO_SERVER, timeout=240)


def status(user: RootlessUser, agent_id: str) -> dict[str, Any]:
    return json.loads(kapsis(user, "status", agent_id, "--json").stdout)


def _bytes(logs: str, key: str) -> int:
    line = next(line for line in logs.splitlines() if line.startswith(f"{key}="))
    return int(line.split("=", 1)[1])


def helper_disks(user: RootlessUser) -> list[str]:
    listed = user.run(["sudo", "-n", HELPER, "list"])
    assert listed.returncode == 0, listed.stderr
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def _mount_options(path: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    return []


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_rootless_full_quota_is_enospc_inside_and_the_host_goes_on(
    member: RootlessUser, project: Path, mode: str
) -> None:
    agent_id = f"rlq-{mode}"
    result = kapsis(
        member, "run", str(project), "--task", FILL, "--network-mode", "none", "--disk", "48m",
        "--mode", mode, "--agent-id", agent_id, "--json",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr + result.stdout
    assert "disk limit is NOT enforced" not in result.stderr
    logs = kapsis(member, "logs", agent_id).stdout
    assert logs.count("No space left on device") == 2, logs  # the workspace and /tmp
    assert _bytes(logs, "workspace-bytes") < 48 * 1024**2
    assert _bytes(logs, "tmp-bytes") <= 48 * 1024**2
    record = status(member, agent_id)
    assert record["phase"] == "complete" and record["disk_enforced"], record
    commit = json.loads(result.stdout)["commit_sha"]
    tree = member.run(["git", "-C", str(project), "ls-tree", "--name-only", commit]).stdout
    assert "result.txt" in tree.split()
    assert kapsis(member, "audit", "verify", agent_id).returncode == 0
    assert member.not_owned(project, member.home / ".kapsis") == []
    if mode == "overlay":
        assert helper_disks(member) == []  # all committed: the disk went with the run
    else:
        assert helper_disks(member) == [agent_id]  # the worktree stays until cleanup
        worktree = Path(record["work_location"])
        assert worktree == disk_helper.mount_point(member.uid, agent_id)
        assert {"nosuid", "nodev"} <= set(_mount_options(worktree))
        assert member.run(["cat", str(worktree / "result.txt")]).stdout == "done\n"

    cleaned = kapsis(member, "cleanup", "--agent", agent_id, "--force")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert helper_disks(member) == []
    assert not disk_helper.mount_point(member.uid, agent_id).exists()


def test_control_a_user_outside_the_group_runs_unbounded_and_is_told_why(
    user: RootlessUser, project: Path, installed_helper: None
) -> None:
    result = kapsis(
        user, "run", str(project), "--task", FILL, "--network-mode", "none", "--disk", "48m",
        "--agent-id", "rlq-none",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "disk limit is NOT enforced" in result.stderr
    assert f"not in the group {disk_helper.GROUP}" in result.stderr
    logs = kapsis(user, "logs", "rlq-none").stdout
    # The workspace takes all 120 MB; the tmpfs mounts are bounded by podman either way.
    assert _bytes(logs, "workspace-bytes") == 120 * 1024**2
    assert logs.count("No space left on device") == 1 and "/tmp/fill" in logs
    assert status(user, "rlq-none")["disk_enforced"] is False


def test_the_helper_serves_only_the_callers_own_disks(member: RootlessUser) -> None:
    """What a member may ask through sudo: ids, not paths; sizes within bounds; their own disks
    only; sudo's SUDO_UID cannot be forged; the image is root's."""
    made = member.run(["sudo", "-n", HELPER, "make", "rlq-own", str(64 * 1024**2)])
    assert made.returncode == 0, made.stderr
    mount = Path(made.stdout.strip())
    assert mount == disk_helper.mount_point(member.uid, "rlq-own")
    image = disk_helper.images_dir(disk_helper.STATE, member.uid) / "rlq-own.img"
    try:
        # The user owns what is in the disk, not the disk.
        assert member.run(["touch", str(mount / "mine")]).returncode == 0
        assert member.run(["dd", f"of={image}", "count=0"]).returncode != 0
        assert member.run(["ls", str(image.parent)]).returncode != 0
        for forged in (
            ["make", "../../../../tmp/x", "67108864"],
            ["make", "rlq-two", "../67108864"],
            ["make", "rlq-two", str(2 * 1024**4)],  # over the largest disk
            ["make", "rlq-two", "1024"],  # under the smallest (8 MiB)
            ["release", "../1001/x"],
            ["mount", "/dev/sda", "/mnt"],
        ):
            refused = member.run(["sudo", "-n", HELPER, *forged])
            assert refused.returncode == 2, (forged, refused.stdout, refused.stderr)
        # sudo keeps its SUDO_UID: another user's disks cannot be named.
        as_root = member.run(["sudo", "-n", "SUDO_UID=0", HELPER, "list"])
        assert as_root.returncode != 0
        assert "rlq-own" in member.run(["sudo", "-n", HELPER, "list"]).stdout
        # Nothing but the helper runs as root for the group.
        assert member.run(["sudo", "-n", "/bin/true"]).returncode != 0
    finally:
        released = member.run(["sudo", "-n", HELPER, "release", "rlq-own"])
    assert released.returncode == 0, released.stderr
    assert not image.exists() and not mount.exists()


def test_cleanup_releases_a_disk_no_agent_of_this_home_knows_only_when_forced(
    member: RootlessUser,
) -> None:
    """A disk whose sandbox went (say with ~/.kapsis) is found through the helper; it may be
    another Kapsis home's, so a plain cleanup names it and --force releases it."""
    made = member.run(["sudo", "-n", HELPER, "make", "rlq-stray", str(64 * 1024**2)])
    assert made.returncode == 0, made.stderr

    kept = kapsis(member, "cleanup", "--all")
    assert kept.returncode == 0, kept.stderr
    assert "rlq-stray" in kept.stdout and "--force removes it" in kept.stdout
    assert helper_disks(member) == ["rlq-stray"]

    forced = kapsis(member, "cleanup", "--all", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert helper_disks(member) == []
    assert not disk_helper.mount_point(member.uid, "rlq-stray").exists()


def test_a_disk_held_by_a_process_is_not_released_uncounted(member: RootlessUser) -> None:
    """Released while a process of the user's still sits in it, the disk would live on with no
    file to count: the helper keeps the file (and refuses) until nothing holds it."""
    made = member.run(["sudo", "-n", HELPER, "make", "rlq-held", str(64 * 1024**2)])
    assert made.returncode == 0, made.stderr
    mount = made.stdout.strip()
    image = disk_helper.images_dir(disk_helper.STATE, member.uid) / "rlq-held.img"
    holder = subprocess.Popen(
        ["runuser", "-u", member.name, "--", "sh", "-c", f"cd {mount} && exec sleep 120"],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        held = member.run(["sudo", "-n", HELPER, "release", "rlq-held"])
        assert held.returncode == 1 and "still in use" in held.stderr, held.stderr
        assert image.exists() and helper_disks(member) == ["rlq-held"]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # runuser and the sleep it started
        holder.wait()
    released = member.run(["sudo", "-n", HELPER, "release", "rlq-held"])
    assert released.returncode == 0, released.stderr
    assert not image.exists() and helper_disks(member) == []
    assert str(image) not in Path("/proc/self/mountinfo").read_text()
