"""Worktree mode on the host: a real ``git worktree`` of the project on the agent's branch.

The user can open it in an IDE while the agent works. Checking it out runs no hooks, and no
filter driver: every driver the user's config defines is blanked for the checkout, because the
checked-out ``.gitattributes`` may come from an agent's earlier commit. Removal deletes the
files directly (never following a symlink) and prunes git's record, rather than letting git
inspect an agent-written tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kapsis.git.runner import Repo, without_filters


def add_worktree(repo: Repo, path: Path, branch: str) -> None:
    if repo.owner is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # else git, running as the repository's owner, makes the missing dirs theirs.
    repo.run("worktree", "add", "--quiet", str(path), branch, extra_config=without_filters(repo))


def remove_worktree(repo: Repo | None, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if repo is not None:
        repo.run("worktree", "prune", check=False)
