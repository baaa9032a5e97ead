"""The agent's disk quota (resources.disk): its workspace on a filesystem of its own.

The writable part of the workspace - the overlay's upper and work dirs, or the worktree - is an
ext4 filesystem made in a sparse file of the quota's size (``disk.img`` in the sandbox dir) and
mounted through a loop device, nosuid and nodev. The kernel refuses a write past it with ENOSPC
inside the sandbox, while the host's own filesystem (the audit trail, the status, the other
agents) is untouched. The file takes only the blocks the agent wrote. It stays mounted while the
work may still be needed (a worktree, a run whose work was not committed) and goes with
``kapsis cleanup``.

Rootless, the user cannot mount: the root-owned helper :mod:`kapsis.workspace.disk_helper`
makes, mounts and removes the disk for them through ``sudo -n`` (``disk_by_helper`` in the
plan), at a path of its own (:func:`~kapsis.workspace.disk_helper.mount_point`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from kapsis.errors import SandboxError
from kapsis.sandbox.workspace_plan import WorkspacePlan, room_for_a_disk
from kapsis.workspace import disk_helper

# No reserved blocks (the agent gets the whole size); inode tables and the journal are
# initialised lazily, so making a 10 GiB filesystem writes a few MB and takes milliseconds.
T = TypeVar("T")

MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]


def make_disk(workspace: WorkspacePlan) -> None:
    """Make and mount the workspace's filesystem (nothing when it has no quota, or already is)."""
    if workspace.disk_bytes is None or workspace.disk_image is None:
        return
    assert workspace.disk_mount is not None
    mount_point = Path(workspace.disk_mount)
    if os.path.ismount(mount_point):
        return
    if workspace.disk_by_helper:
        assert workspace.disk_uid is not None
        made = helper_make(workspace.disk_uid, mount_point.name, workspace.disk_bytes)
        if made != mount_point:
            raise SandboxError(f"the disk helper mounted the agent's disk at {str(made)!r}")
        return
    image = Path(workspace.disk_image)
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _disks_lock(image.parent.parent):
        # Counted again with the others' disks held still: two launches at once do not both
        # take the same room. What the launch wrote since planning (a base) counts too.
        size = min(workspace.disk_bytes, room_for_a_disk(image.parent, workspace.disk_bytes))
        descriptor = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(descriptor, size)  # sparse: no block is written
        finally:
            os.close(descriptor)
    mount_point.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run([*MKFS, str(image)], what="mkfs.ext4")
    _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(mount_point)], what="mount")
    # An empty root: a worktree is checked out into it, and git must not see lost+found.
    (mount_point / "lost+found").rmdir()


def release_disk(workspace: WorkspacePlan) -> None:
    """Unmount the workspace's filesystem and delete it (what is in it goes too)."""
    if workspace.disk_image is None or workspace.disk_mount is None:
        return
    if workspace.disk_by_helper:
        assert workspace.disk_uid is not None
        helper_release(workspace.disk_uid, Path(workspace.disk_mount).name)
        return
    unmount_disk(Path(workspace.disk_mount))
    Path(workspace.disk_image).unlink(missing_ok=True)


def unmount_disk(mount_point: Path) -> None:
    """Unmount a workspace filesystem (lazily if something still holds it); nothing if none.
    One of the helper's goes through it, and with it its disk."""
    if mount_point.parent.parent == disk_helper.STATE / "mounts":
        if mount_point.exists():
            helper_release(int(mount_point.parent.name), mount_point.name)
        return
    if not os.path.ismount(mount_point):
        return
    done = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
    if done.returncode != 0:
        _run(["umount", "--lazy", str(mount_point)], what="umount")


@contextlib.contextmanager
def _disks_lock(sandboxes: Path) -> Iterator[None]:
    descriptor = os.open(sandboxes / ".disks.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def helper_make(uid: int, agent_id: str, size: int) -> Path:
    """A disk of the helper's for ``uid``: through sudo, or in-process as root."""
    if os.geteuid() != 0:
        return Path(helper("make", agent_id, str(size)).strip())
    return _in_process(lambda: disk_helper.make(disk_helper.STATE, uid, agent_id, size))


def helper_release(uid: int, agent_id: str) -> None:
    if os.geteuid() != 0:
        helper("release", agent_id)
    else:
        _in_process(lambda: disk_helper.release(disk_helper.STATE, uid, agent_id))


def _in_process(action: Callable[[], T]) -> T:
    try:
        disk_helper.private_dir(disk_helper.STATE, 0o755)
        return action()
    except (disk_helper.HelperError, OSError) as error:
        raise SandboxError(
            f"cannot make the workspace's disk: {error}; set resources.disk: null to run "
            "without a disk limit"
        ) from None


def helper(*args: str) -> str:
    """Run the disk helper through sudo (never asking for a password); what it printed."""
    argv = ["sudo", "-n", str(disk_helper.INSTALLED_AT), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxError(f"cannot run the disk helper ({args[0]}): {error}") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise SandboxError(
            f"the disk helper ({args[0]}) failed: {detail}; set resources.disk: null to run "
            "without a disk limit"
        )
    return done.stdout


def helper_gap() -> str | None:
    """Why this user's rootless runs cannot have a disk of their own, or None if they can."""
    import grp
    import shutil

    fix = "sudo bash scripts/install.sh installs it"
    if not disk_helper.INSTALLED_AT.is_file():
        return f"rootless podman cannot mount a disk, and the disk helper is not installed ({fix})"
    if shutil.which("sudo") is None:
        return f"the disk helper runs through sudo, which is not installed ({fix})"
    try:
        group = grp.getgrnam(disk_helper.GROUP).gr_gid
    except KeyError:
        return f"there is no group {disk_helper.GROUP} for the disk helper ({fix})"
    if group not in os.getgroups() and group != os.getegid():
        return (
            f"you are not in the group {disk_helper.GROUP}, whose members may run the disk "
            f"helper (sudo usermod -aG {disk_helper.GROUP} $USER, then log in again)"
        )
    if not _root_is_shared():
        return (
            "the root mount is not shared, so podman would not see the agent's disk "
            "(sudo mount --make-rshared /)"
        )
    return None


def helper_disks() -> list[str]:
    """The agent ids whose disks the helper holds for this user (none if it cannot serve)."""
    if os.geteuid() == 0 or helper_gap() is not None:
        return []
    return [line.split()[0] for line in helper("list").splitlines() if line.strip()]


def helper_room() -> int:
    """Bytes a new disk from the helper may have (the free space of its filesystem, less its
    reserve and what the existing disks may still take)."""
    if os.geteuid() == 0:
        state = disk_helper.STATE
        while not state.exists():  # made with the first disk
            state = state.parent
        return disk_helper.room(state, disk_helper.all_images(disk_helper.STATE))
    text = helper("room").strip()
    if not text.isdigit():
        raise SandboxError(f"the disk helper gave no size for the room left: {text[:80]!r}")
    return int(text)


def _root_is_shared() -> bool:
    """Whether ``/`` propagates mounts (podman's user namespace then sees the helper's)."""
    shared = False
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:  # the last mount on / is the one seen
            fields = line.split(" - ", 1)[0].split()
            if len(fields) > 6 and fields[4] == "/":
                shared = any(tag.startswith("shared:") for tag in fields[6:])
    return shared


def _run(argv: list[str], *, what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxError(f"cannot make the workspace's disk ({what}): {error}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
        raise SandboxError(
            f"cannot make the workspace's disk ({what}): {detail[0]}; set resources.disk: null "
            "to run without a disk limit"
        )
