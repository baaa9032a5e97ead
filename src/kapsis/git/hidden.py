"""filesystem.hide: which paths its gitignore-style patterns hide, matched by git itself.

Git's own matching (``ls-files --ignored``, ``check-ignore``) reads the patterns exactly as a
``.gitignore`` would: ``*.pem`` anywhere, ``.aws/`` a directory anywhere and all below it,
``/secrets`` or ``a/b`` from the project's top, ``!keep.pem`` an exception. Only the patterns
given are used: no ignore file of the project or the user takes part. Everything here reads;
the one write, :func:`view_tree`, goes to a scratch object store outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kapsis.errors import GitWorkflowError
from kapsis.git.runner import GIT, HARDENING, Repo, git_environment

# The most entries of a project that is not a repository looked through for hidden files.
MAX_WALKED = 1_000_000


@dataclass(frozen=True)
class HideRules:
    """The patterns, written where git reads them, and an empty repository to match paths in
    (see :func:`hide_rules`)."""

    patterns: tuple[str, ...]
    scratch: Path

    @property
    def pattern_file(self) -> Path:
        return self.scratch / "hide-patterns"

    def tracked(self, repo: Repo, tree: str) -> list[str]:
        """The files of ``tree`` (a commit or tree of ``repo``) that the patterns hide."""
        if not self.patterns:
            return []
        index = {"GIT_INDEX_FILE": str(self.scratch / "index")}
        # An index of the tree in the scratch dir: the repository's own index is never read.
        repo.run("read-tree", tree, env=index, as_owner=False)
        listing = repo.run(
            "ls-files", "-z", "--cached", "--ignored", f"--exclude-from={self.pattern_file}",
            env=index, as_owner=False,
        ).stdout  # fmt: skip
        return [os.fsdecode(path) for path in listing.split(b"\0") if path]

    def matching(self, paths: Iterable[str]) -> set[str]:
        """Those of ``paths`` (relative, '/'-separated) that the patterns hide."""
        wanted = list(paths)
        if not self.patterns or not wanted:
            return set()
        # "./" keeps a name that starts with ":" from being read as pathspec magic.
        result = self._git(
            "check-ignore", "--no-index", "--stdin", "-z",
            input=b"".join(b"./" + os.fsencode(path) + b"\0" for path in wanted),
        )  # fmt: skip
        if result.returncode not in (0, 1):
            raise GitWorkflowError(f"git check-ignore failed: {_reason(result)}")
        return {os.fsdecode(p.removeprefix(b"./")) for p in result.stdout.split(b"\0") if p}

    def present(self, directory: Path) -> list[str]:
        """What the patterns hide in ``directory`` (a project that is not a repository): the
        files, and the folders hidden whole (not entered). Walked one level at a time, without
        recursion and without following a link, into nested repositories too; past
        :data:`MAX_WALKED` entries it gives up rather than leave some unlooked at."""
        if not self.patterns:
            return []
        hidden: list[str] = []
        level = [""]
        walked = 0
        while level:
            entries: list[tuple[str, bool]] = []
            for folder in level:
                with os.scandir(directory / folder if folder else directory) as listing:
                    for entry in listing:
                        path = f"{folder}/{entry.name}" if folder else entry.name
                        entries.append((path, entry.is_dir(follow_symlinks=False)))
            walked += len(entries)
            if walked > MAX_WALKED:
                raise GitWorkflowError(
                    f"{directory} holds over {MAX_WALKED} files to look through for "
                    "filesystem.hide; make it a git repository, or set filesystem.hide: []"
                )
            asked = [f"{path}/" if is_dir else path for path, is_dir in entries]
            matched = {found.rstrip("/") for found in self.matching(asked)}
            level = []
            for path, is_dir in entries:
                if path in matched:
                    hidden.append(path)
                elif is_dir:
                    level.append(path)
        return sorted(hidden)

    def _git(
        self, *args: str, input: bytes | None = None, work_tree: Path | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        empty = self.scratch / "empty"
        if not empty.is_dir():
            # Made on first use: an empty work tree and a repository with no ignore file.
            empty.mkdir()
            subprocess.run(
                [GIT, "init", "--quiet", "--bare", str(self.scratch / "git")],
                capture_output=True,
                env=git_environment(),
                check=True,
            )
        command = [
            GIT,
            *(item for setting in HARDENING for item in ("-c", setting)),
            f"--git-dir={self.scratch / 'git'}",
            f"--work-tree={work_tree or empty}",
            "-c", f"core.excludesFile={self.pattern_file}",
            "-c", f"safe.directory={work_tree or empty}",
            *args,
        ]  # fmt: skip
        return subprocess.run(
            command,
            input=input,
            capture_output=True,
            # check-ignore refuses literal pathspecs (the "./" prefix keeps names literal).
            env=git_environment({"GIT_LITERAL_PATHSPECS": "0"}),
            cwd=work_tree or empty,
            check=False,
            timeout=600,
        )


@contextmanager
def hide_rules(patterns: Iterable[str]) -> Iterator[HideRules]:
    """The rules of ``patterns``, for as long as the block runs (a scratch dir of this process)."""
    with tempfile.TemporaryDirectory(prefix="kapsis-hide-") as scratch:
        rules = HideRules(tuple(patterns), Path(scratch))
        rules.pattern_file.write_text("".join(f"{p}\n" for p in rules.patterns), encoding="utf-8")
        yield rules


def view_tree(
    repo: Repo, rules: HideRules, tree: str, hidden: list[str]
) -> tuple[str, dict[str, str]]:
    """``tree`` without the ``hidden`` files (and the directories that leaves empty), and the
    environment in which git finds it: its tree objects are written to the scratch dir, never
    into the repository, which they would otherwise enter as the repository's owner's."""
    objects = rules.scratch / "objects"
    objects.mkdir(exist_ok=True)
    env = {
        "GIT_INDEX_FILE": str(rules.scratch / "index"),
        "GIT_OBJECT_DIRECTORY": str(objects),
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(repo.common_dir / "objects"),
    }
    repo.run("read-tree", tree, env=env, as_owner=False)
    repo.run(
        "update-index", "-z", "--force-remove", "--stdin",
        input=b"".join(os.fsencode(path) + b"\0" for path in hidden),
        env=env, as_owner=False,
    )  # fmt: skip
    return repo.run("write-tree", env=env, as_owner=False).stdout.decode().strip(), env


def mark_skip_worktree(
    repo: Repo, hidden: Sequence[str], index: Path | None = None, *, work_tree: Path | None = None
) -> None:
    """Mark ``hidden`` skip-worktree: in ``index`` (one of Kapsis's own files, written by this
    process), or in the index of ``repo`` itself (a worktree's, written as its owner), so that
    git takes no hidden file for deleted."""
    if not hidden:
        return
    listed = b"".join(os.fsencode(path) + b"\0" for path in hidden)
    args = ("update-index", "--skip-worktree", "-z", "--stdin")
    if index is not None:
        repo.run(*args, input=listed, env={"GIT_INDEX_FILE": str(index)}, as_owner=False)
    else:
        repo.run(*args, input=listed, work_tree=work_tree)


def _reason(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return (lines or ["no message"])[-1][:300]
