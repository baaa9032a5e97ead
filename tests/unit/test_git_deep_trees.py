"""The agent chooses the depth of its tree: reading its changes never recurses on it.

A tree thousands of levels deep (far past Python's recursion limit, and past PATH_MAX for the
deepest paths) is read whole where it can be, and what cannot be read by path is listed as
unsupported instead of ending the save with a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapsis.git.changes import TreeEntry, from_upper, from_worktree

DEPTH = 3000  # past the recursion limit (1000), and each path past PATH_MAX (4096) at the bottom


def deep_tree(root: Path, depth: int = DEPTH) -> str:
    """``d/d/d/.../d/leaf.txt`` ``depth`` levels deep, made with relative steps (no long path
    is ever passed to the kernel); returns the relative path of the directory above the leaf."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)
    return "/".join(["d"] * depth)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """pytest's own clean-up of its temporary directories recurses too: deep trees go first."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=True)


def test_a_deep_upper_layer_is_read_without_recursion(tmp_path: Path) -> None:
    assert sys.getrecursionlimit() < DEPTH
    upper = tmp_path / "upper"
    deep_tree(upper)
    (upper / "top.txt").write_text("top\n")
    shallow = "/".join(["d"] * 50) + "/leaf.txt"
    # Control: a file at a depth a path can still name is found.
    (upper / shallow).write_bytes(b"shallow\n")

    changes = from_upper(upper)

    assert "top.txt" in changes.written and shallow in changes.written
    # The part too deep to open by path is listed, not a crash.
    assert changes.unsupported
    assert all(path.startswith("d/") for path in changes.unsupported)


def test_a_deep_worktree_is_read_without_recursion(tmp_path: Path) -> None:
    worktree = tmp_path / "worktree"
    deep_tree(worktree)
    start = {"gone.txt": TreeEntry("100644", "0" * 40)}

    changes = from_worktree(worktree, start)

    assert changes.deleted == ["gone.txt"]
    assert changes.unsupported


def test_a_tree_just_deeper_than_the_recursion_limit_is_read_whole(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit, still short enough to be named by path: every file
    is found, in the order a recursive walk gives."""
    depth = sys.getrecursionlimit() + 50
    upper = tmp_path / "u"
    # One-character names keep the deepest path under PATH_MAX.
    assert 2 * depth + len(str(upper)) + 20 < 4096
    above = deep_tree(upper, depth)
    (upper / "a.txt").write_text("a\n")

    changes = from_upper(upper)

    assert list(changes.written) == ["a.txt", f"{above}/leaf.txt"]
    assert changes.unsupported == []


def test_a_deep_tree_is_removed_whole(tmp_path: Path) -> None:
    """Python's rmtree recurses (RecursionError, which ignore_errors does not catch); the
    sandbox's and worktrees' removal does not."""
    from kapsis.git.owner import remove_tree

    sandbox = tmp_path / "sandbox"
    deep_tree(sandbox / "upper")
    (tmp_path / "beside.txt").write_text("kept\n")  # control: only the tree goes

    remove_tree(sandbox, None)

    assert not sandbox.exists()
    assert (tmp_path / "beside.txt").read_text() == "kept\n"
