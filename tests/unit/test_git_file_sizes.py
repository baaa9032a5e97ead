# ruff: noqa: F811  (the commit tests' fixtures, imported, are the tests' arguments)
"""Files the agent makes large (or sparse: a terabyte that costs it nothing) are left out of the
commit by size, never read; the files that are committed are streamed, never held whole."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from kapsis.git import changes as changes_module
from kapsis.git.changes import Written, from_upper, from_worktree
from kapsis.git.commit import commit_workspace, tree_listing
from kapsis.git.runner import Repo

from .gitrepo import git, tree
from .test_git_commit import (  # noqa: F401
    BRANCH,
    _git_home,
    project,
    repo,
    request,
    start,
)

TERABYTE = 1024**4
LIMIT = 1024 * 1024


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)  # a hole: no block is written


def _reads(monkeypatch: pytest.MonkeyPatch, only: str | None = None) -> list[int]:
    """The size of every piece of file content read (of files named ``only``, if given)."""
    asked: list[int] = []
    original = Written.stream

    def counting(self: Written, announce, write) -> None:  # type: ignore[no-untyped-def]
        def counted(piece: bytes) -> None:
            if only is None or (self.source is not None and self.source.name == only):
                asked.append(len(piece))
            write(piece)

        original(self, announce, counted)

    monkeypatch.setattr(Written, "stream", counting)
    return asked


def test_a_sparse_terabyte_in_the_upper_dir_is_left_out_unread(
    repo: Repo, project: Path, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upper = tmp_path / "upper"
    _sparse(upper / "huge.bin", TERABYTE)
    (upper / "small.txt").parent.mkdir(parents=True, exist_ok=True)
    (upper / "small.txt").write_text("real work\n")
    (upper / "exactly.bin").write_bytes(b"x" * LIMIT)  # at the limit: committed (control)
    reads = _reads(monkeypatch)

    outcome = commit_workspace(request(repo, start, max_file_size=LIMIT), from_upper(upper))

    assert outcome.too_large == [("huge.bin", TERABYTE)]
    assert "huge.bin" in outcome.excluded
    committed = tree(project, outcome.commit_sha)
    assert "huge.bin" not in committed
    assert committed["small.txt"] == ("100644", b"real work\n")
    assert committed["exactly.bin"][1] == b"x" * LIMIT
    assert sum(reads) == LIMIT + len(b"real work\n")  # the terabyte was never read


def test_without_a_limit_the_same_large_file_is_committed(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    """Control: the size alone (2 MiB) keeps it out above; with room it goes in."""
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "big.bin").write_bytes(b"y" * (2 * LIMIT))

    outcome = commit_workspace(request(repo, start, max_file_size=4 * LIMIT), from_upper(upper))

    assert outcome.too_large == []
    assert tree(project, outcome.commit_sha)["big.bin"][1] == b"y" * (2 * LIMIT)


def test_a_sparse_terabyte_in_a_worktree_is_never_hashed(
    repo: Repo, project: Path, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worktree = tmp_path / "worktree"
    git(project, "worktree", "add", "-q", str(worktree), BRANCH)
    _sparse(worktree / "README.md", TERABYTE)  # a tracked file, now a terabyte
    reads = _reads(monkeypatch, only="README.md")

    changes = from_worktree(worktree, tree_listing(repo, start))
    outcome = commit_workspace(request(repo, start, max_file_size=LIMIT), changes)

    assert sum(reads) == 0  # a different size is a change: nothing read to compare
    assert outcome.too_large == [("README.md", TERABYTE)]
    assert outcome.commit_sha is None  # left as it was: nothing else changed


def test_an_unchanged_file_of_the_same_size_is_compared_in_pieces(
    repo: Repo, project: Path, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worktree = tmp_path / "worktree"
    git(project, "worktree", "add", "-q", str(worktree), BRANCH)
    reads = _reads(monkeypatch)

    changes = from_worktree(worktree, tree_listing(repo, start))

    assert changes.written == {}
    assert reads and max(reads) <= changes_module.READ_PIECE


def test_a_committed_file_is_streamed_not_held_whole(
    repo: Repo, project: Path, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    size = 5 * changes_module.READ_PIECE + 7
    (upper / "data.bin").write_bytes(b"z" * size)
    reads = _reads(monkeypatch)

    outcome = commit_workspace(request(repo, start, max_file_size=size), from_upper(upper))

    assert tree(project, outcome.commit_sha)["data.bin"][1] == b"z" * size
    assert sum(reads) == size and max(reads) <= changes_module.READ_PIECE
    assert len(reads) == 6


def test_a_file_that_grows_while_it_is_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"a" * 10)
    written = Written("100644", source=path, size=10)

    def grow(piece: bytes) -> None:
        with path.open("ab") as handle:
            handle.write(b"more")

    from kapsis.errors import FileChangedError

    with pytest.raises(FileChangedError, match="changed size"):
        written.stream(lambda size: None, grow)


def test_memory_stays_flat_for_a_large_commit(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    """64 MiB committed; the process grows by far less than that."""
    upper = tmp_path / "upper"
    upper.mkdir()
    with (upper / "large.bin").open("wb") as handle:
        for _ in range(64):
            handle.write(b"q" * (1024 * 1024))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    outcome = commit_workspace(request(repo, start, max_file_size=128 * LIMIT), from_upper(upper))

    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert outcome.commit_sha is not None
    assert grown_kib < 32 * 1024
