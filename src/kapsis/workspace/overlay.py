"""Copy-on-write workspace for rootful sandboxes, built on the host with kernel overlayfs.

Layout under the sandbox dir: ``lower`` is an idmapped bind of the project (its owner appears as
the agent's host uid), ``upper`` receives every write, ``work`` is overlayfs' scratch dir and
``merged`` is what the sandbox mounts at /workspace. The project itself is only ever a read-only
lower layer, so the agent cannot change it; setup time does not depend on the project's size.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.sandbox.plan import WorkspacePlan
from kapsis.workspace import _mountapi


def mount_overlay(workspace: WorkspacePlan, agent_host_uid: int, agent_host_gid: int) -> None:
    """Mount the agent's view of the project at ``workspace.merged``."""
    for directory in (workspace.upper, workspace.work, workspace.lower, workspace.merged):
        Path(directory).mkdir(parents=True, exist_ok=True)
    owner = os.stat(workspace.project)
    try:
        userns = _mountapi.user_namespace_fd(
            owner.st_uid, owner.st_gid, agent_host_uid, agent_host_gid
        )
        try:
            _mountapi.idmapped_bind(workspace.project, workspace.lower, userns)
        finally:
            os.close(userns)
        for directory in (workspace.upper, workspace.work):
            os.chown(directory, agent_host_uid, agent_host_gid)
        os.chmod(workspace.upper, 0o755)
        options = f"lowerdir={workspace.lower},upperdir={workspace.upper},workdir={workspace.work}"
        _mountapi.mount("overlay", workspace.merged, "overlay", options)
    except OSError as error:
        unmount_overlay(workspace)
        raise SandboxError(
            f"cannot set up the copy-on-write workspace for {workspace.project}: {error}; "
            "the kernel needs overlayfs with idmapped mounts (Linux >= 5.19)"
        ) from None


def unmount_overlay(workspace: WorkspacePlan) -> None:
    """Undo :func:`mount_overlay`; the upper dir (the agent's changes) is kept."""
    for target in (workspace.merged, workspace.lower):
        # os.path.ismount misses a bind of the same filesystem; just try (EINVAL: not mounted).
        with contextlib.suppress(OSError):
            _mountapi.unmount(target)
