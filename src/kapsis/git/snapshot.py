"""The user's uncommitted state at launch, as a tree and, when carried, a commit of its own.

An agent on a new branch from the checked-out commit would otherwise start from whatever the
checkout holds: tracked changes and untracked files the user has not committed. Kapsis reads
that state once, at launch, into a tree (``git add -A`` into a scratch copy of the index: what
``git status`` shows, ignored files left out, the user's index untouched). With
``filesystem.uncommitted: include`` the tree becomes a commit on the agent's branch, named as the
user's, before the agent's work, so the agent's own commit holds only the agent's changes; with
``exclude`` the agent starts from the checked-out commit alone.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kapsis.git.hidden import hide_rules
from kapsis.git.owner import SHARED_TMP, copy_owned_file
from kapsis.git.runner import GitCommandError, Repo, without_filters


@dataclass(frozen=True)
class WorkingState:
    """The checkout's state at launch: its tree, and the paths that differ from ``head``."""

    tree: str
    changed: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.changed


def working_state(repo: Repo, head: str, hide: tuple[str, ...] = ()) -> WorkingState:
    """What ``git add -A`` would commit on top of ``head`` now (the user's index untouched),
    but what ``hide`` (filesystem.hide) hides as ``head`` has it: a secret the user keeps in
    the checkout never goes into a commit of the agent's branch, which may be pushed."""
    # One quick look first: most launches find a clean checkout, and that costs one process.
    status = repo.run(
        "status", "--porcelain", "-z", "--untracked-files=normal", "--ignore-submodules=dirty",
        extra_config=without_filters(repo),
    )  # fmt: skip
    if not status.stdout:
        return WorkingState(tree="", changed=())
    owner = repo.owner
    with tempfile.TemporaryDirectory(
        prefix="kapsis-index-", dir=SHARED_TMP if owner is not None else None
    ) as scratch:
        index = Path(scratch) / "index"
        # A copy of the user's index keeps its stat data: only changed files are read again.
        if not copy_owned_file(repo.git_dir / "index", index, owner.uid if owner else None):
            repo.run("read-tree", head, env={"GIT_INDEX_FILE": str(index)})
        if owner is not None:
            owner.give(Path(scratch))
        env = {"GIT_INDEX_FILE": str(index)}
        _add_all(repo, env, hide)
        _keep_hidden_as_committed(repo, head, hide, env)
        tree = repo.run("write-tree", env=env).stdout.decode().strip()
    listing = repo.run("diff-tree", "-r", "-z", "--no-renames", "--name-only", head, tree).stdout
    changed = tuple(os.fsdecode(path) for path in listing.split(b"\0") if path)
    return WorkingState(tree, changed)


def _paths_to_add(repo: Repo, hide: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """The changed and untracked files but those ``hide`` hides: a hidden file is never even
    hashed, for a blob in the object store is readable through the agent's git view."""
    untracked = repo.run(
        "ls-files", "-z", "--others", "--exclude-standard", env=env,
        extra_config=without_filters(repo),
    ).stdout  # fmt: skip
    changed = repo.run("diff-files", "-z", "--name-only", env=env).stdout
    paths = sorted({os.fsdecode(p) for p in (untracked + changed).split(b"\0") if p})
    with hide_rules(hide) as rules:
        hidden = rules.matching(paths)
    return [path for path in paths if path not in hidden]


def _keep_hidden_as_committed(
    repo: Repo, head: str, hide: tuple[str, ...], env: dict[str, str]
) -> None:
    """Put back ``head``'s entry (or none) for each changed path that ``hide`` hides."""
    if not hide:
        return
    listing = repo.run("diff-index", "--cached", "-z", "--name-only", head, env=env).stdout
    changed = [os.fsdecode(path) for path in listing.split(b"\0") if path]
    with hide_rules(hide) as rules:
        hidden = sorted(rules.matching(changed))
    if hidden:
        repo.run(
            "reset", "-q", head, "--pathspec-from-file=-", "--pathspec-file-nul",
            input=b"".join(os.fsencode(path) + b"\0" for path in hidden),
            env=env,
        )  # fmt: skip


# A file git listed and then found gone (an editor's or a build's temporary file, while the user
# works) stops git; it tries again, at most this many times. Each try reads the checkout anew,
# so a file that is gone stays out.
MAX_VANISHED = 50
_VANISHED = re.compile(rb"unable to stat '.+': No such file or directory")
_UNMATCHED = re.compile(rb"pathspec '.+' did not match any files")


def _add_all(repo: Repo, env: dict[str, str], hide: tuple[str, ...]) -> None:
    """``git add --all`` into the scratch index (but what ``hide`` hides), trying again when a
    file vanishes meanwhile."""
    for _ in range(MAX_VANISHED):
        if hide:
            # Listed anew on each try: a file gone since the last is not named again.
            paths = _paths_to_add(repo, hide, env)
            if not paths:
                return
            which = ["--pathspec-from-file=-", "--pathspec-file-nul"]
            listed: bytes | None = b"".join(os.fsencode(p) + b"\0" for p in paths)
        else:
            which, listed = ["--", "."], None
        # No filter driver runs on the user's files (as for the delta layer).
        result = repo.run(
            "add", "--all", *which, input=listed, env=env,
            extra_config=without_filters(repo), check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return
        if _VANISHED.search(result.stderr) is None and _UNMATCHED.search(result.stderr) is None:
            break
    raise GitCommandError(
        ("add", "--all"), result.returncode, result.stderr.decode(errors="replace")
    )


def carry_commit(repo: Repo, head: str, state: WorkingState, identity: str, name: str) -> str:
    """A commit of ``state`` on ``head``, authored and committed as ``identity`` (the user)."""
    from kapsis.git.commit import split_identity

    person, email = split_identity(identity)
    env = {
        "GIT_AUTHOR_NAME": person,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": person,
        "GIT_COMMITTER_EMAIL": email,
    }
    message = (
        f"Uncommitted work of {name} at launch\n\n"
        f"What the checkout held beyond {head[:12]} when the agent started ({len(state.changed)} "
        "path(s)), carried here before the agent's work (filesystem.uncommitted: include). "
        "Not the agent's.\n"
    )
    made = repo.run("commit-tree", state.tree, "-p", head, input=message.encode(), env=env)
    return made.stdout.decode().strip()
