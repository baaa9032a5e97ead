"""Worktree mode on the host: a real ``git worktree`` of the project on the agent's branch.

The user can open it in an IDE while the agent works. Checking it out runs no hooks, and no
filter driver: every driver the user's config defines is blanked for the checkout, because the
checked-out ``.gitattributes`` may come from an agent's earlier commit. Removal deletes the
files directly (never following a symlink) and prunes git's record, rather than letting git
inspect an agent-written tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from kapsis.git.owner import RepoOwner, remove_tree
from kapsis.git.runner import Repo, without_filters
from kapsis.workspace.disk import unmount_disk


def add_worktree(repo: Repo, path: Path, branch: str) -> None:
    if os.path.ismount(path):
        pass  # on a disk of its own, made for the owner (kapsis.workspace.disk)
    elif repo.owner is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        # In the owner's ~/.kapsis, made by them, closed to others like the one of their own
        # runs; git makes the dirs below it, theirs too.
        repo.owner.make_private(path.parent.parent)
    repo.run("worktree", "add", "--quiet", str(path), branch, extra_config=without_filters(repo))


def remove_worktree(repo: Repo | None, path: Path, owner: RepoOwner | None = None) -> None:
    """Delete the worktree's files, then git's record of it.

    A worktree of a user's repository lies in their home: it is deleted by its owner
    (``owner``, else the repository's), who can only delete what is theirs.
    """
    unmount_disk(path)  # a worktree on a disk of its own (resources.disk)
    remove_tree(path, owner or (repo.owner if repo is not None else None))
    if repo is not None:
        repo.run("worktree", "prune", check=False)
