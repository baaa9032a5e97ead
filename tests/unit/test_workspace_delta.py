"""The delta layer between a frozen base commit and the start commit (kapsis.workspace.delta).

The base here is ``main``, the commit the checkout is on; the layer is read from git alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kapsis.errors import MalformedTreeError
from kapsis.git.runner import Repo
from kapsis.workspace.delta import build_delta

from .gitrepo import (
    Exe,
    Link,
    commit_files,
    discover,
    git,
    init_repo,
    is_whiteout,
    isolate_home,
    run_git,
)


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(
        tmp_path / "project",
        {
            "keep.txt": "unchanged\n",
            "mod.txt": "main version\n",
            "gone.txt": "only on main\n",
            "tool.sh": "#!/bin/sh\necho tool\n",
            "src/a.py": "a = 1\n",
        },
    )


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


@pytest.fixture
def other(project: Path) -> str:
    """Branch ``other``: a modification, a deletion, an addition, a mode change, a symlink."""
    git(project, "checkout", "-q", "-b", "other")
    sha = commit_files(
        project,
        {
            "mod.txt": "other version\n",
            "src/pkg/new.py": "new = True\n",
            "tool.sh": Exe("#!/bin/sh\necho tool\n"),
            "link": Link("src/a.py"),
        },
        "other",
        remove=("gone.txt",),
    )
    git(project, "checkout", "-q", "main")
    return sha


def main(project: Path) -> str:
    return git(project, "rev-parse", "main")


def listing(root: Path) -> list[str]:
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if not path.is_dir() or path.is_symlink()
    )


def test_delta_holds_the_start_commits_version_of_what_differs(
    repo: Repo, project: Path, other: str, tmp_path: Path
) -> None:
    delta = tmp_path / "delta"

    count = build_delta(repo, main(project), other, delta)

    assert count == 5
    assert listing(delta) == ["gone.txt", "link", "mod.txt", "src/pkg/new.py", "tool.sh"]
    assert (delta / "mod.txt").read_text() == "other version\n"
    assert stat.S_IMODE((delta / "mod.txt").stat().st_mode) == 0o644
    assert (delta / "src" / "pkg" / "new.py").read_text() == "new = True\n"
    assert (delta / "tool.sh").read_text() == "#!/bin/sh\necho tool\n"
    assert stat.S_IMODE((delta / "tool.sh").stat().st_mode) == 0o755
    assert (delta / "link").is_symlink()
    assert os.readlink(delta / "link") == "src/a.py"
    # the checkout has gone.txt, the start commit does not: a whiteout hides it
    assert is_whiteout(delta / "gone.txt")
    assert not (delta / "keep.txt").exists()
    assert not (delta / "src" / "a.py").exists()


def test_building_the_delta_leaves_the_checkout_alone(
    repo: Repo, project: Path, other: str, tmp_path: Path
) -> None:
    index = (project / ".git" / "index").read_bytes()

    build_delta(repo, main(project), other, tmp_path / "delta")

    assert (project / ".git" / "index").read_bytes() == index
    assert git(project, "symbolic-ref", "--short", "HEAD") == "main"
    assert git(project, "status", "--porcelain", "--untracked=all") == ""
    assert (project / "mod.txt").read_text() == "main version\n"


def test_clean_checkout_at_the_start_commit_gives_an_empty_delta(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    delta = tmp_path / "delta"

    assert build_delta(repo, main(project), main(project), delta) == 0
    assert delta.is_dir()
    assert list(delta.iterdir()) == []


def test_the_live_checkout_never_reaches_the_delta(
    repo: Repo, project: Path, other: str, tmp_path: Path
) -> None:
    (project / "mod.txt").write_text("the user's unsaved edit\n")
    (project / "keep.txt").write_text("another unsaved edit\n")
    (project / "untracked.txt").write_text("not in git\n")
    (project / "src" / "a.py").unlink()
    delta = tmp_path / "delta"

    count = build_delta(repo, main(project), other, delta)

    assert count == 5
    assert listing(delta) == ["gone.txt", "link", "mod.txt", "src/pkg/new.py", "tool.sh"]
    assert (delta / "mod.txt").read_text() == "other version\n"


def test_one_content_at_several_paths_and_as_a_link_target(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    git(project, "checkout", "-q", "-b", "same")
    big = "x" * (3 << 20) + "\n"  # larger than one chunk of the stream
    start = commit_files(
        project,
        {"a.txt": "keep.txt", "b/a.txt": "keep.txt", "l": Link("keep.txt"), "big": big},
        "same content",
    )
    git(project, "checkout", "-q", "main")
    delta = tmp_path / "delta"

    assert build_delta(repo, main(project), start, delta) == 4
    assert (delta / "a.txt").read_text() == (delta / "b" / "a.txt").read_text() == "keep.txt"
    assert os.readlink(delta / "l") == "keep.txt"
    assert (delta / "big").read_text() == big
    assert not list(tmp_path.glob(".delta-blob*"))


# Regression (a bug found while writing these tests, since fixed): when the checkout has a directory
# where the start commit has a file (start: file 'd', checkout: 'd/x'), build_delta writes the file
# 'd' and then mkdir()s 'd' as the parent of the whiteout for 'd/x', raising FileExistsError
def test_file_in_start_where_the_checkout_has_a_directory(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    git(project, "checkout", "-q", "-b", "flat")
    start = commit_files(project, {"src": "now a file\n"}, "flatten", remove=("src",))
    git(project, "checkout", "-q", "main")
    delta = tmp_path / "delta"

    build_delta(repo, main(project), start, delta)

    # the file hides the checkout's directory; nothing below it is needed
    assert (delta / "src").read_text() == "now a file\n"


def test_directory_in_start_where_the_checkout_has_a_file(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    git(project, "checkout", "-q", "-b", "deep")
    start = commit_files(project, {"keep.txt/inner": "a dir now\n"}, "deepen", remove=("keep.txt",))
    git(project, "checkout", "-q", "main")
    delta = tmp_path / "delta"

    count = build_delta(repo, main(project), start, delta)

    assert count == 1  # the file; the directory itself hides the base's file
    assert (delta / "keep.txt" / "inner").read_text() == "a dir now\n"


# Regression (a bug found while writing these tests, since fixed): a whiteout is written through a
# symlink of the start commit: start has 'l' -> /some/host/dir, the checkout tracks 'l/f', so
# build_delta creates the symlink and then mknod()s 'l/f' through it, i.e. a device node in a host
# directory outside the delta (the start commit can be an agent's earlier work when a branch is
# resumed)
def test_whiteouts_are_never_written_through_a_start_commit_symlink(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "host-dir"
    outside.mkdir()
    commit_files(project, {"l/f": "tracked on main\n"}, "add l/f")
    git(project, "checkout", "-q", "-b", "agent-branch")
    start = commit_files(project, {"l": Link(str(outside))}, "link", remove=("l",))
    git(project, "checkout", "-q", "main")
    delta = tmp_path / "delta"

    build_delta(repo, main(project), start, delta)

    assert os.readlink(delta / "l") == str(outside)
    assert list(outside.iterdir()) == []


def _crafted_commit(project: Path, entries: list[tuple[str, bytes]]) -> str:
    """A commit whose root tree holds ``entries`` (mode + name, blob) as written, unchecked, the
    way an agent can make one with ``hash-object --literally``."""
    blob = git(project, "rev-parse", "HEAD:keep.txt")
    raw = b"".join(mode_name + b"\0" + bytes.fromhex(blob) for mode_name, _ in entries)
    tree_id = run_git(project, "hash-object", "-t", "tree", "--literally", "-w", "--stdin",
                      input=raw).stdout.decode().strip()  # fmt: skip
    return git(project, "commit-tree", tree_id, "-m", "crafted")


@pytest.mark.parametrize(
    "entries",
    [
        [(b"100644 /tmp/kapsis-delta-escape", b"")],
        [(b"100644 ../escape", b"")],
        [(b"100644 .git", b"")],
        [(b"100644 dup", b""), (b"100644 dup", b"")],
        [(b"120000 same", b""), (b"100644 same", b"")],
    ],
    ids=["absolute", "dot-dot", "dot-git", "twice", "link-and-file"],
)
def test_a_crafted_tree_is_refused_and_nothing_is_written_outside(
    repo: Repo, project: Path, tmp_path: Path, entries: list[tuple[bytes, bytes]]
) -> None:
    start = _crafted_commit(project, entries)
    delta = tmp_path / "delta"

    with pytest.raises(MalformedTreeError):
        build_delta(repo, main(project), start, delta)
    assert not Path("/tmp/kapsis-delta-escape").exists()
    assert not (tmp_path / "escape").exists()


def test_control_a_plain_tree_with_the_same_content_is_written(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    start = _crafted_commit(project, [(b"100644 plain", b"")])
    build_delta(repo, main(project), start, tmp_path / "delta")
    assert (tmp_path / "delta" / "plain").read_text() == "unchanged\n"
