"""The agent's disk quota (resources.disk): its workspace on a filesystem of its own.

The writable part of the workspace - the overlay's upper and work dirs, or the worktree - is an
ext4 filesystem made in a sparse file of the quota's size (``disk.img`` in the sandbox dir) and
mounted through a loop device, nosuid and nodev. The kernel refuses a write past it with ENOSPC
inside the sandbox, while the host's own filesystem (the audit trail, the status, the other
agents) is untouched. The file takes only the blocks the agent wrote. It stays mounted while the
work may still be needed (a worktree, a run whose work was not committed) and goes with
``kapsis cleanup``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.sandbox.workspace_plan import WorkspacePlan

# No reserved blocks (the agent gets the whole size); inode tables and the journal are
# initialised lazily, so making a 10 GiB filesystem writes a few MB and takes milliseconds.
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]


def make_disk(workspace: WorkspacePlan) -> None:
    """Make and mount the workspace's filesystem (nothing when it has no quota, or already is)."""
    if workspace.disk_bytes is None or workspace.disk_image is None:
        return
    assert workspace.disk_mount is not None
    mount_point = Path(workspace.disk_mount)
    if os.path.ismount(mount_point):
        return
    image = Path(workspace.disk_image)
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(descriptor, workspace.disk_bytes)  # sparse: no block is written
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
    unmount_disk(Path(workspace.disk_mount))
    Path(workspace.disk_image).unlink(missing_ok=True)


def unmount_disk(mount_point: Path) -> None:
    """Unmount a workspace filesystem (lazily if something still holds it); nothing if none."""
    if not os.path.ismount(mount_point):
        return
    done = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
    if done.returncode != 0:
        _run(["umount", "--lazy", str(mount_point)], what="umount")


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
