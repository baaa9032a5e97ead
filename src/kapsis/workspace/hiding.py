"""filesystem.hide in the agent's view: the hidden paths are absent, in each kind of workspace.

* Overlay view of a repository: the delta layer is built towards the start commit's tree
  without the hidden files (:func:`kapsis.git.hidden.view_tree`), so each is whited out, and a
  folder left empty goes with them.
* Overlay view of a project that is no repository: the project is the live lower layer, and a
  whiteout for each hidden path is put in the delta layer above it.
* Worktree: the hidden files are deleted from the new worktree and marked skip-worktree in its
  index, so git (the user's or the agent's) does not take them for deleted.

In every mode the agent's own index marks them skip-worktree too, and the host's commit keeps
the start commit's version of each (:mod:`kapsis.git.commit`): the agent never sees them, and
their absence is never committed.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kapsis.git.hidden import HideRules, mark_skip_worktree
from kapsis.git.runner import Repo

_BATCH = 500


def whiteout_hidden(project: Path, delta: Path, rules: HideRules) -> int:
    """Whiteouts in ``delta`` for what the patterns hide in ``project``; how many."""
    roots = rules.present(project)
    for path in roots:
        target = delta / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return len(roots)


def hide_in_worktree(worktree: Path, hidden: Sequence[str]) -> None:
    """Delete the hidden files from a new worktree, then the folders that leaves empty, as the
    worktree's owner; mark them skip-worktree in its index."""
    if not hidden:
        return
    own = Repo.discover(worktree)
    if own is None:
        return
    mark_skip_worktree(own, hidden, work_tree=worktree)
    files = [str(worktree / path) for path in hidden]
    folders = sorted(
        {str(worktree / parent) for path in hidden for parent in Path(path).parents}
        - {str(worktree)},
        key=lambda folder: folder.count("/"),
        reverse=True,  # the deepest first: a parent is empty only once its children are gone
    )
    for start in range(0, len(files), _BATCH):
        _as_owner(own, ["rm", "-f", "--", *files[start : start + _BATCH]])
    for start in range(0, len(folders), _BATCH):
        _as_owner(
            own, ["rmdir", "--ignore-fail-on-non-empty", "--", *folders[start : start + _BATCH]]
        )


def _as_owner(repo: Repo, argv: list[str]) -> None:
    # A worktree in a user's home is changed by them (root would follow their links).
    if repo.owner is not None:
        repo.owner.run(argv)
    else:
        subprocess.run(argv, capture_output=True, check=False, timeout=120)
