"""Mount the agent's workspace on the host for rootful sandboxes (kernel overlayfs, idmapped binds).

Overlay mode, under the sandbox dir: ``lower`` is an idmapped bind of the project (its owner
appears as the agent's host uid), ``delta`` an optional layer above it (see :mod:`.delta`),
``upper`` receives every write, ``work`` is overlayfs' scratch dir and ``merged`` is what the
sandbox mounts at /workspace. Worktree mode binds the worktree at ``merged`` through the same
kind of idmapping. Either way the project's object store is bound read-only for the agent's git
view. Nothing is chowned or copied, so set-up time does not depend on the project's size.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.git.owner import chown_tree
from kapsis.sandbox.workspace_plan import WorkspacePlan
from kapsis.workspace import _mountapi

# Spelled out so that a kernel default can never make the upper dir hold only metadata or
# redirects: the host reads the upper dir as the complete record of the agent's changes.
OVERLAY_SAFETY_OPTIONS = "redirect_dir=off,metacopy=off,index=off"


def _idmapped(
    source: str, target: str, agent_uid: int, agent_gid: int, planned_uid: int | None
) -> None:
    """Bind ``source`` at ``target``, its owner seen as the agent's uid.

    ``source`` is opened first, without following a symlink, and must still belong to the uid
    it had when the run was planned: root does this mount, and a source in a user's home could
    have been swapped meanwhile for a link to a directory of root's, which would then appear,
    writable, as the agent's own.
    """
    fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(fd)
        if planned_uid is not None and owner.st_uid != planned_uid:
            raise SandboxError(
                f"{source} belongs to uid {owner.st_uid}, not to uid {planned_uid} as when the "
                "run was planned; it was replaced meanwhile, so it is not mounted"
            )
        Path(target).mkdir(parents=True, exist_ok=True)
        userns = _mountapi.user_namespace_fd(owner.st_uid, owner.st_gid, agent_uid, agent_gid)
        try:
            _mountapi.idmapped_bind(fd, target, userns)
        finally:
            os.close(userns)
    finally:
        os.close(fd)


def mount_workspace(workspace: WorkspacePlan, agent_uid: int, agent_gid: int) -> None:
    """Mount the agent's view of the project at ``workspace.merged`` (host uids given)."""
    try:
        if workspace.agent_git is not None:
            chown_tree(Path(workspace.agent_git), agent_uid, agent_gid)
        if workspace.objects is not None and workspace.objects_source is not None:
            _idmapped(
                workspace.objects_source, workspace.objects, agent_uid, agent_gid, workspace.git_uid
            )
        if workspace.mode == "worktree":
            assert workspace.worktree is not None
            _idmapped(workspace.worktree, workspace.merged, agent_uid, agent_gid, workspace.git_uid)
            return
        for directory in (workspace.upper, workspace.work, workspace.merged):
            Path(directory).mkdir(parents=True, exist_ok=True)
        _idmapped(workspace.project, workspace.lower, agent_uid, agent_gid, workspace.project_uid)
        chown_tree(Path(workspace.upper), agent_uid, agent_gid)
        os.chown(workspace.work, agent_uid, agent_gid)
        os.chmod(workspace.upper, 0o755)
        lower = workspace.lower
        if workspace.needs_delta:
            chown_tree(Path(workspace.delta), agent_uid, agent_gid)
            lower = f"{workspace.delta}:{workspace.lower}"
        options = (
            f"lowerdir={lower},upperdir={workspace.upper},workdir={workspace.work},"
            f"{OVERLAY_SAFETY_OPTIONS}"
        )
        _mountapi.mount("overlay", workspace.merged, "overlay", options)
    except SandboxError:
        unmount_workspace(workspace)
        raise
    except OSError as error:
        unmount_workspace(workspace)
        raise SandboxError(
            f"cannot set up the agent's workspace for {workspace.project}: {error}; "
            "the kernel needs overlayfs with idmapped mounts (Linux >= 5.19)"
        ) from None


def unmount_workspace(workspace: WorkspacePlan) -> None:
    """Undo :func:`mount_workspace`; the upper dir and the worktree (the agent's work) stay."""
    for target in (workspace.merged, workspace.lower, workspace.objects):
        if target is None:
            continue
        # os.path.ismount misses a bind of the same filesystem; just try (EINVAL: not mounted).
        with contextlib.suppress(OSError):
            _mountapi.unmount(target)
