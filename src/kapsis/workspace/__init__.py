"""The agent's view of the project and its host-side preparation (overlay, worktree, git view)."""

from kapsis.workspace.overlay import mount_workspace, unmount_workspace

__all__ = ["mount_workspace", "unmount_workspace"]
