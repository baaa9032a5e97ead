"""Root reading a worktree that its owner can still change: no link, and no directory swapped in
after it was listed, leads root's walk (and so the commit) outside the worktree."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kapsis.errors import FileChangedError
from kapsis.git import changes as changes_module
from kapsis.git.changes import TreeEntry, WorkspaceChanges, from_worktree


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A directory the worktree's owner must never get root to read."""
    place = tmp_path / "root-only"
    (place / "b").mkdir(parents=True)
    (place / "b" / "id_ed25519").write_text("PRIVATE KEY\n")
    return place


def _worktree(tmp_path: Path) -> Path:
    worktree = tmp_path / "worktree"
    (worktree / "a" / "b").mkdir(parents=True)
    (worktree / "a" / "b" / "work.txt").write_text("the agent's\n")
    return worktree


def test_a_worktree_replaced_by_a_link_is_refused(tmp_path: Path, secret: Path) -> None:
    worktree = tmp_path / "worktree"
    worktree.symlink_to(secret)

    with pytest.raises(FileChangedError, match="not the worktree that was planned"):
        from_worktree(worktree, {})


def test_a_worktree_of_another_owner_is_refused(tmp_path: Path) -> None:
    worktree = _worktree(tmp_path)
    with pytest.raises(FileChangedError):
        from_worktree(worktree, {}, owner=os.geteuid() + 12345)
    # Control: its own owner's is read.
    assert "a/b/work.txt" in from_worktree(worktree, {}, owner=os.geteuid()).written


def test_a_directory_swapped_for_a_link_after_listing_is_not_followed(
    tmp_path: Path, secret: Path
) -> None:
    worktree = _worktree(tmp_path)
    changes = WorkspaceChanges()
    walked = []
    for (relative, _path, listed), descend in changes_module._walk(worktree, changes):
        walked.append(relative)
        if relative == "a":
            # Listed as a directory; now, before root goes into it, a link to elsewhere.
            os.rename(worktree / "a", worktree / "a.real")
            (worktree / "a").symlink_to(secret)
        if stat.S_ISDIR(listed.st_mode):
            descend()
    assert not any("id_ed25519" in path for path in walked)
    assert "a" in changes.unsupported


def test_a_parent_swapped_for_a_link_to_a_look_alike_is_refused(
    tmp_path: Path, secret: Path
) -> None:
    """a/b is listed; then a becomes a link to a place that also has a b: the path a/b now
    names another directory, which root must not list."""
    worktree = _worktree(tmp_path)
    changes = WorkspaceChanges()
    walked = []
    for (relative, _path, listed), descend in changes_module._walk(worktree, changes):
        walked.append(relative)
        if relative == "a/b":
            os.rename(worktree / "a", worktree / "a.real")
            (worktree / "a").symlink_to(secret)
        if stat.S_ISDIR(listed.st_mode):
            descend()
    assert "a/b/id_ed25519" not in walked
    assert "a/b" in changes.unsupported


def test_what_could_not_be_read_is_not_taken_for_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worktree = _worktree(tmp_path)
    original = changes_module._entries

    def unreadable_a(directory, prefix, changes, expected):  # type: ignore[no-untyped-def]
        if prefix == "a":
            changes.unsupported.append(prefix)  # as for a directory gone or replaced
            return iter(())
        return original(directory, prefix, changes, expected)

    monkeypatch.setattr(changes_module, "_entries", unreadable_a)
    start = {
        "a/b/work.txt": TreeEntry("100644", "0" * 40, 12),
        "gone.txt": TreeEntry("100644", "1" * 40, 3),
    }

    found = from_worktree(worktree, start)

    assert found.deleted == ["gone.txt"]  # not a/b/work.txt, which was never read
    assert "a" in found.unsupported
