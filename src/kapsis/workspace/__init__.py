"""The agent's view of the project: a copy-on-write overlay whose writes land on the host."""

from kapsis.workspace.overlay import mount_overlay, unmount_overlay

__all__ = ["mount_overlay", "unmount_overlay"]
