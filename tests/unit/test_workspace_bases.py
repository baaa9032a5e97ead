"""Frozen bases (kapsis.workspace.bases): made once from git, reused while near, then replaced.

The view an agent gets is base + delta; these tests check that the pair is exactly the start
commit's tree and that nothing of the live checkout goes into either.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from kapsis.git.runner import Repo
from kapsis.workspace import bases
from kapsis.workspace.delta import build_delta

from .gitrepo import Exe, Link, commit_files, discover, git, init_repo, isolate_home, tree


@pytest.fixture(autouse=True)
def _homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)
    monkeypatch.setenv("KAPSIS_HOME", str(tmp_path / "kapsis-home"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(
        tmp_path / "project",
        {"a.txt": "a\n", "tool.sh": Exe("#!/bin/sh\n"), "src/b.py": "b = 1\n", "l": Link("a.txt")},
    )


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


def ensure(repo: Repo, choice: bases.BaseChoice) -> bases.BaseRecord | None:
    return bases.ensure_base(repo, choice.key, choice.commit, Path(choice.tree))


def head(project: Path) -> str:
    return git(project, "rev-parse", "HEAD")


def view_of(root: Path) -> dict[str, tuple[str, bytes]]:
    """The files a merged view of ``root`` shows, as git would record them."""
    found: dict[str, tuple[str, bytes]] = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            if path.is_symlink():
                found[relative] = ("120000", os.fsencode(os.readlink(path)))
            else:
                mode = "100755" if path.stat().st_mode & 0o111 else "100644"
                found[relative] = (mode, path.read_bytes())
    return found


def merged(base: Path, delta: Path, target: Path) -> Path:
    """What overlayfs shows for delta over base, computed by hand: a whiteout removes, and a
    file and a directory of one name in the two layers show the upper one only."""
    for source in (base, delta):
        for directory, _dirs, files in os.walk(source):
            for name in files:
                path = Path(directory, name)
                out = target / path.relative_to(source)
                for parent in reversed(out.relative_to(target).parents):
                    step = target / parent
                    if step.is_symlink() or step.is_file():
                        step.unlink()
                _remove(out)
                if stat.S_ISCHR(path.lstat().st_mode):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                if path.is_symlink():
                    out.symlink_to(os.readlink(path))
                else:
                    out.write_bytes(path.read_bytes())
                    out.chmod(path.stat().st_mode)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def test_a_new_project_gets_a_base_of_the_checked_out_commit_from_git_alone(
    repo: Repo, project: Path
) -> None:
    (project / "a.txt").write_text("the user's unsaved edit\n")
    (project / "untracked.txt").write_text("not in git\n")
    choice = bases.choose_base(repo, head(project), head(project))
    assert not choice.exists and choice.commit == head(project) and choice.delta_paths == 0

    made = ensure(repo, choice)

    assert made is not None and made.files == 4 and made.bytes > 0
    base = Path(choice.tree)
    assert view_of(base) == tree(project, "HEAD")  # the commit, not the checkout
    assert bases.index_path(choice.tree).is_file()
    assert not list(base.parent.glob(".making-*"))
    assert [r.commit for r in bases.records(choice.key)] == [head(project)]
    assert ensure(repo, choice) is None  # made once


def test_a_near_start_reuses_the_base_and_base_plus_delta_is_the_start_tree(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    ensure(repo, bases.choose_base(repo, head(project), head(project)))
    start = commit_files(
        project,
        {"a.txt": "changed\n", "src": "a file now\n", "l": "no longer a link\n", "new/x": "x\n"},
        "next",
        remove=("src/b.py", "tool.sh"),
    )
    base_commit = git(project, "rev-parse", "HEAD~1")

    choice = bases.choose_base(repo, start, start)

    assert choice.exists and choice.commit == base_commit and choice.delta_paths == 6
    delta = tmp_path / "delta"
    build_delta(repo, choice.commit, start, delta)
    view = merged(Path(choice.tree), delta, tmp_path / "view")
    assert view_of(view) == tree(project, start)


def test_a_far_start_gets_a_new_base(
    repo: Repo, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = bases.choose_base(repo, head(project), head(project))
    ensure(repo, first)
    monkeypatch.setattr(bases, "MAX_DELTA_PATHS", 2)
    start = commit_files(project, {"1": "1", "2": "2", "3": "3"}, "three more")

    choice = bases.choose_base(repo, start, start)

    assert not choice.exists and choice.commit == start and choice.tree != first.tree
    ensure(repo, choice)
    assert [r.commit for r in bases.records(choice.key)] == [start, first.commit]


def test_removing_a_base_takes_its_files_and_its_record(repo: Repo, project: Path) -> None:
    choice = bases.choose_base(repo, head(project), head(project))
    made = ensure(repo, choice)
    assert made is not None

    bases.remove_base(made)

    assert not Path(made.tree).exists() and not made.index.exists()
    assert bases.records(choice.key) == []
    assert not bases.choose_base(repo, head(project), head(project)).exists


def test_a_base_whose_files_are_gone_is_not_chosen(repo: Repo, project: Path) -> None:
    choice = bases.choose_base(repo, head(project), head(project))
    ensure(repo, choice)
    bases.remove_tree(Path(choice.tree), None)  # say, the user deleted ~/.kapsis/bases

    again = bases.choose_base(repo, head(project), head(project))

    assert not again.exists
    assert ensure(repo, again) is not None


def test_two_clones_of_one_project_have_their_own_bases(tmp_path: Path, project: Path) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert bases.project_key(discover(project)) != bases.project_key(discover(clone))
    assert bases.project_key(discover(project)).startswith("project-")


def test_a_removed_directory_and_a_directory_become_a_submodule_leave_nothing_behind(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    """The delta whites out a removed directory whole, and what a directory held where the
    start commit has a submodule (an empty directory in a checkout)."""
    base = bases.choose_base(repo, head(project), head(project))
    ensure(repo, base)
    commit_files(project, {"deep/a/b.txt": "b\n", "deep/c.txt": "c\n"}, "deep")
    ensure(repo, bases.choose_base(repo, head(project), head(project)))
    first = head(project)
    git(project, "rm", "-rq", "deep", "src")
    gitlink = git(project, "rev-parse", "HEAD")
    git(project, "update-index", "--add", "--cacheinfo", f"160000,{gitlink},src")
    git(project, "commit", "-q", "-m", "submodule where src was; deep gone")
    start = head(project)

    delta = tmp_path / "delta"
    build_delta(repo, first, start, delta)
    view = merged(Path(bases.choose_base(repo, first, first).tree), delta, tmp_path / "view")

    assert not (view / "deep").exists()
    assert (view / "src").is_dir() and list((view / "src").iterdir()) == []
    expected = {k: v for k, v in tree(project, start).items() if v[0] != "160000"}
    assert view_of(view) == expected


def test_the_base_holds_each_blob_as_stored_whatever_the_attributes_and_config_say(
    repo: Repo, project: Path
) -> None:
    start = commit_files(
        project,
        {".gitattributes": "* text eol=crlf ident\n", "t.txt": "line $Id$\nnext\n"},
        "attributes an agent could write",
    )
    git(project, "config", "core.autocrlf", "true")

    choice = bases.choose_base(repo, start, start)
    ensure(repo, choice)

    assert (Path(choice.tree) / "t.txt").read_bytes() == b"line $Id$\nnext\n"
    assert view_of(Path(choice.tree)) == tree(project, start)
    # control: git's own checkout of the same commit converts
    git(project, "rm", "-q", "--cached", "t.txt")
    git(project, "checkout", "--", ".")
    (project / "t.txt").unlink()
    git(project, "checkout", "HEAD", "--", "t.txt")
    assert (project / "t.txt").read_bytes() != b"line $Id$\nnext\n"
