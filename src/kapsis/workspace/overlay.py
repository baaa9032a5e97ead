"""Mount the agent's workspace on the host (kernel overlayfs, idmapped binds).

Overlay mode, under the sandbox dir: ``lower`` is where the base is bound (a frozen checkout of
a commit, see :mod:`.bases`; for a project that is not a git repository, the project itself),
``delta`` an optional layer above it (see :mod:`.delta`), ``upper`` receives every write,
``work`` is overlayfs' scratch dir and ``merged`` is what the sandbox mounts at /workspace.
Rootful, the host mounts all of it, the base idmapped so its owner appears as the agent's host
uid; rootless, the same stack is mounted inside podman's user namespace (:func:`mount_rootless`)
with the user's own ids. Worktree mode binds the worktree at ``merged`` through the same kind of
idmapping. Either way the project's object store is bound read-only for the agent's git view,
and each of ``filesystem.share_ignored`` read-only. Nothing is chowned or copied, so set-up time
does not depend on the project's size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.git.owner import chown_tree
from kapsis.sandbox.workspace_plan import WorkspacePlan
from kapsis.workspace import _mountapi
from kapsis.workspace.disk import make_disk

# Spelled out so that a kernel default can never make the upper dir hold only metadata or
# redirects: the host reads the upper dir as the complete record of the agent's changes.
OVERLAY_SAFETY_OPTIONS = "redirect_dir=off,metacopy=off,index=off"


def _idmapped(
    source: str,
    target: str,
    agent_uid: int,
    agent_gid: int,
    planned_uid: int | None,
    *,
    read_only: bool = False,
    opened: int | None = None,
) -> None:
    """Bind ``source`` at ``target``, its owner seen as the agent's uid.

    ``source`` is opened first, without following a symlink (or comes ``opened`` so by the
    caller, and is closed here), and must still belong to the uid it had when the run was
    planned: root does this mount, and a source in a user's home could have been swapped
    meanwhile for a link to a directory of root's, which would then appear as the agent's own.
    """
    fd = opened
    if fd is None:
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
            _mountapi.idmapped_bind(fd, target, userns, read_only=read_only)
        finally:
            os.close(userns)
    finally:
        os.close(fd)


def mount_workspace(workspace: WorkspacePlan, agent_uid: int, agent_gid: int) -> None:
    """Mount the agent's view of the project at ``workspace.merged`` (host uids given)."""
    try:
        make_disk(workspace)  # a project that is not a repository has not made it yet
        if workspace.agent_git is not None:
            chown_tree(Path(workspace.agent_git), agent_uid, agent_gid)
        if workspace.objects is not None and workspace.objects_source is not None:
            _idmapped(
                workspace.objects_source, workspace.objects, agent_uid, agent_gid, workspace.git_uid
            )
        _bind_shared(workspace, agent_uid, agent_gid)
        if workspace.mode == "worktree":
            assert workspace.worktree is not None
            _idmapped(workspace.worktree, workspace.merged, agent_uid, agent_gid, workspace.git_uid)
            return
        for directory in (workspace.upper, workspace.work, workspace.merged):
            Path(directory).mkdir(parents=True, exist_ok=True)
        # Read-only binds: a lower layer is never written, and removing a sandbox dir left
        # behind with the bind still there must not reach the shared base through it.
        if workspace.base is not None:
            _idmapped(
                workspace.base, workspace.lower, agent_uid, agent_gid, workspace.base_uid,
                read_only=True,
            )  # fmt: skip
        else:
            _idmapped(
                workspace.project, workspace.lower, agent_uid, agent_gid, workspace.project_uid,
                read_only=True,
            )  # fmt: skip
        chown_tree(Path(workspace.upper), agent_uid, agent_gid)
        os.chown(workspace.work, agent_uid, agent_gid)
        os.chmod(workspace.upper, 0o755)
        if workspace.needs_delta:
            chown_tree(Path(workspace.delta), agent_uid, agent_gid)
        options = overlay_options(workspace, workspace.lower, OVERLAY_SAFETY_OPTIONS)
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
    shared = [item.bound for item in workspace.shared]
    for target in (workspace.merged, workspace.lower, workspace.objects, *shared):
        if target is None:
            continue
        # os.path.ismount misses a bind of the same filesystem; just try (EINVAL: not mounted).
        with contextlib.suppress(OSError):
            _mountapi.unmount(target)


def overlay_options(workspace: WorkspacePlan, lower: str, safety: str) -> str:
    """The overlay's mount options: ``lower`` (the base), the delta above it if any."""
    layers = [workspace.delta, lower] if workspace.needs_delta else [lower]
    for path in (*layers, workspace.upper, workspace.work):
        if any(char in path for char in ",:\\"):
            raise SandboxError(
                f"cannot mount the agent's workspace: {path} holds a comma, colon or backslash, "
                "which overlayfs options cannot carry; set KAPSIS_HOME to a plainer path"
            )
    return (
        f"lowerdir={':'.join(layers)},upperdir={workspace.upper},workdir={workspace.work},{safety}"
    )


def _bind_shared(workspace: WorkspacePlan, agent_uid: int, agent_gid: int) -> None:
    """Bind each shared ignored directory read-only, idmapped, where podman will mount it.

    Opened one step at a time from the project without following a symlink, and still owned as
    when planned: a user whose repository root works on could otherwise swap a step for a link
    to a directory of root's, which would then be shown to the agent.
    """
    for shared in workspace.shared:
        source = f"{workspace.project}/{shared.path}"
        owner = workspace.project_uid
        fd = _open_beneath(workspace.project, shared.path, owner)
        _idmapped(source, shared.bound, agent_uid, agent_gid, owner, read_only=True, opened=fd)


def _open_beneath(root: str, relative: str, owner_uid: int | None) -> int:
    """``root``/``relative`` opened one step at a time, no step a symlink, each step (the
    project included) still owned by ``owner_uid``: the project's owner cannot swap in a
    directory of root's (left by `sudo make`, say) or lead the walk elsewhere."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = -1
    try:
        fd = os.open(root, flags)
        _check_step_owner(fd, root, owner_uid)
        for step in relative.split("/"):
            following = os.open(step, flags, dir_fd=fd)
            os.close(fd)
            fd = following
            _check_step_owner(fd, relative, owner_uid)
    except OSError as error:
        if fd >= 0:
            os.close(fd)
        raise SandboxError(
            f"filesystem.share_ignored: {relative} in {root} is no longer the directory it was "
            f"({error.strerror}); it was changed after the run was planned, so it is not shared"
        ) from None
    return fd


def _check_step_owner(fd: int, where: str, owner_uid: int | None) -> None:
    if owner_uid is not None and os.fstat(fd).st_uid != owner_uid:
        raise OSError(errno.EPERM, f"{where} is not owned by uid {owner_uid}")


# Rootless: podman keeps one user and mount namespace for all the user's containers; the
# overlay is mounted there, with the options overlayfs allows in a user namespace.
ROOTLESS_OPTIONS = "userxattr,redirect_dir=nofollow,metacopy=off,index=off"


def mount_rootless(workspace: WorkspacePlan, podman: str) -> None:
    """Mount the overlay stack at ``merged`` inside podman's user namespace (rootless)."""
    assert workspace.base is not None
    make_disk(workspace)  # the disk helper's, made already for a repository
    Path(workspace.merged).mkdir(parents=True, exist_ok=True)
    Path(workspace.upper).mkdir(parents=True, exist_ok=True)
    Path(workspace.work).mkdir(parents=True, exist_ok=True)
    options = overlay_options(workspace, workspace.base, ROOTLESS_OPTIONS)
    result = subprocess.run(
        # nosuid, nodev: the container's bind of it keeps them (see _mountapi.idmapped_bind).
        [
            podman,
            "unshare",
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"nosuid,nodev,{options}",
            workspace.merged,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise SandboxError(
            f"cannot mount the agent's workspace in podman's user namespace: {detail}; "
            "rootless overlay mode needs Linux >= 5.11 (overlayfs in a user namespace); "
            "or use --mode worktree"
        )


def unmount_rootless(workspace: WorkspacePlan, podman: str) -> None:
    subprocess.run(
        [podman, "unshare", "umount", "--lazy", workspace.merged],
        capture_output=True,
        check=False,
    )
