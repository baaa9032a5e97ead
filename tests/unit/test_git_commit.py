"""Committing the agent's workspace on the host (kapsis.git.changes + kapsis.git.commit)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from kapsis.errors import GitWorkflowError
from kapsis.git.changes import from_upper, from_worktree
from kapsis.git.commit import CommitRequest, commit_workspace, quote_path, tree_listing
from kapsis.git.runner import Repo

from .gitrepo import (
    Exe,
    Link,
    commit_files,
    discover,
    git,
    init_repo,
    isolate_home,
    opaque_dir,
    rev,
    run_git,
    tree,
    whiteout,
    write_files,
)

BRANCH = "kapsis/task-a1"
EXCLUDE = (".env", ".env.*", "*.pem", "*.key", "id_rsa*")
MESSAGE = "kapsis: do the task\n\nAgent: claude\n"
BOT_NAME = "Kapsis Bot"
BOT_EMAIL = "bot@kapsis.example"

START_FILES = {
    ".gitignore": "build/\n*.log\n",
    "README.md": "hello\n",
    "src/app.py": "print('app')\n",
    "src/util.py": "def util(): pass\n",
    "bin/run.sh": Exe("#!/bin/sh\necho run\n"),
    "link": Link("README.md"),
    "docs/a.md": "a\n",
    "docs/b.md": "b\n",
    "old_name.txt": "renamed content\n",
    "tool.sh": "#!/bin/sh\necho tool\n",
    "delete_me.txt": "bye\n",
}


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "project", START_FILES)


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


@pytest.fixture
def start(project: Path) -> str:
    """The start commit, with the agent's branch created on it (as prepare_workspace does)."""
    sha = rev(project, "HEAD")
    assert sha is not None
    git(project, "update-ref", f"refs/heads/{BRANCH}", sha)
    return sha


def request(repo: Repo, start: str, **fields) -> CommitRequest:
    values = {
        "repo": repo,
        "branch": BRANCH,
        "start_commit": start,
        "message": MESSAGE,
        "committer_name": BOT_NAME,
        "committer_email": BOT_EMAIL,
        "exclude": EXCLUDE,
        "scratch_name": "a1",
    }
    values.update(fields)
    return CommitRequest(**values)


def user_state(project: Path) -> tuple[str, str, bytes, str]:
    """HEAD, current branch, index bytes and status of the user's checkout."""
    head = git(project, "rev-parse", "HEAD")
    branch = git(project, "symbolic-ref", "--short", "HEAD")
    index = (project / ".git" / "index").read_bytes()
    status = git(project, "--no-optional-locks", "status", "--porcelain", "--untracked=all")
    return head, branch, index, status


def make_user_checkout_dirty(project: Path) -> None:
    (project / "README.md").write_text("the user's own unsaved edit\n")
    (project / "scratch.txt").write_text("untracked, the user's\n")
    git(project, "add", "scratch.txt")
    (project / "untracked.txt").write_text("also the user's\n")


def build_upper(upper: Path) -> None:
    """Every kind of entry an overlay upper dir can hold after an agent run."""
    write_files(
        upper,
        {
            "README.md": "hello world\n",  # modified (copied up)
            "src/new.py": "print('new')\n",  # new file in an existing dir
            "new_name.txt": "renamed content\n",  # rename: new name ...
            "tool.sh": Exe("#!/bin/sh\necho tool\n"),  # chmod +x of a copy-up
            "newlink": Link("src/app.py"),  # new symlink
            ".env": "SECRET=1\n",  # excluded
            "keys/id_rsa": "-----BEGIN KEY-----\n",  # excluded
            "build/out.o": b"\x7fELF",  # new file in a gitignored dir
            "debug.log": "log\n",  # new file matching a gitignore glob
            ".git": "gitdir: /kapsis/git\n",  # the agent's gitlink, never work
        },
    )
    whiteout(upper / "delete_me.txt")
    whiteout(upper / "old_name.txt")  # ... and whiteout of the old name
    opaque_dir(upper / "docs")
    (upper / "docs" / "c.md").write_text("c\n")
    os.mkfifo(upper / "pipe")


# ---------------------------------------------------------------------------------------------
# upper dir


def test_upper_dir_commit_has_exactly_the_expected_tree(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    build_upper(upper)

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert outcome.created_commit is True
    assert outcome.commit_sha == rev(project, f"refs/heads/{BRANCH}")
    assert tree(project, outcome.commit_sha) == {
        ".gitignore": ("100644", b"build/\n*.log\n"),
        "README.md": ("100644", b"hello world\n"),
        "bin/run.sh": ("100755", b"#!/bin/sh\necho run\n"),
        "docs/c.md": ("100644", b"c\n"),
        "link": ("120000", b"README.md"),
        "new_name.txt": ("100644", b"renamed content\n"),
        "newlink": ("120000", b"src/app.py"),
        "src/app.py": ("100644", b"print('app')\n"),
        "src/new.py": ("100644", b"print('new')\n"),
        "src/util.py": ("100644", b"def util(): pass\n"),
        "tool.sh": ("100755", b"#!/bin/sh\necho tool\n"),
    }
    assert outcome.excluded == [".env", "keys/id_rsa"]
    assert outcome.ignored == ["build/out.o", "debug.log"]
    assert outcome.unsupported == ["pipe"]
    assert (outcome.agent_commits, outcome.squashed_agent_commits) == (0, False)


def test_upper_dir_commit_has_the_requested_identity_message_and_parent(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    write_files(upper, {"README.md": "changed\n"})

    sha = commit_workspace(request(repo, start), from_upper(upper)).commit_sha

    assert sha is not None
    fields = git(project, "log", "-1", "--format=%an|%ae|%cn|%ce|%P", sha)
    assert fields == f"{BOT_NAME}|{BOT_EMAIL}|{BOT_NAME}|{BOT_EMAIL}|{start}"
    raw = run_git(project, "cat-file", "commit", sha).stdout
    assert raw.split(b"\n\n", 1)[1] == MESSAGE.encode()


def test_commit_leaves_the_users_checkout_alone(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    make_user_checkout_dirty(project)
    before = user_state(project)
    upper = tmp_path / "upper"
    build_upper(upper)

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert outcome.commit_sha is not None
    assert user_state(project) == before
    assert (project / "README.md").read_text() == "the user's own unsaved edit\n"
    assert not (project / "src" / "new.py").exists()
    # the scratch ref fast-import used is gone
    assert git(project, "for-each-ref", "refs/kapsis/") == ""


def test_no_changes_means_no_commit_and_the_branch_stays(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    # a copy-up with unchanged content, the gitlink, and only excluded/ignored/unsupported files
    write_files(
        upper,
        {
            "README.md": "hello\n",
            ".git": "gitdir: /kapsis/git\n",
            ".env": "SECRET=1\n",
            "build/x.o": "o",
        },
    )
    os.mkfifo(upper / "fifo")

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert outcome.commit_sha is None
    assert outcome.created_commit is False
    assert outcome.excluded == [".env"]
    assert outcome.ignored == ["build/x.o"]
    assert outcome.unsupported == ["fifo"]
    assert rev(project, f"refs/heads/{BRANCH}") == start


def test_an_empty_upper_dir_commits_nothing(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert (outcome.commit_sha, outcome.created_commit) == (None, False)
    assert rev(project, f"refs/heads/{BRANCH}") == start


def test_tracked_file_in_an_ignored_place_is_still_committed(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    # build/ is ignored, but a file force-added there is tracked, so a change to it is work
    (project / "build").mkdir()
    (project / "build" / "keep.txt").write_text("v1\n")
    git(project, "add", "-f", "build/keep.txt")
    git(project, "commit", "-qm", "force-add")
    start = rev(project, "HEAD")
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)
    upper = tmp_path / "upper"
    write_files(upper, {"build/keep.txt": "v2\n", "build/new.txt": "new\n"})

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert outcome.ignored == ["build/new.txt"]
    entries = tree(project, outcome.commit_sha)
    assert entries["build/keep.txt"] == ("100644", b"v2\n")
    assert "build/new.txt" not in entries


def test_excluded_pattern_matches_path_or_file_name(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    write_files(
        upper,
        {
            "deep/dir/.env.local": "x",  # file name matches .env.*
            "certs/server.pem": "x",  # *.pem
            "secrets/token": "x",  # path matches secrets/*
            "environment.md": "kept\n",
        },
    )

    outcome = commit_workspace(
        request(repo, start, exclude=(*EXCLUDE, "secrets/*")), from_upper(upper)
    )

    assert outcome.excluded == ["certs/server.pem", "deep/dir/.env.local", "secrets/token"]
    entries = tree(project, outcome.commit_sha)
    assert entries["environment.md"] == ("100644", b"kept\n")
    assert not {"certs/server.pem", "deep/dir/.env.local", "secrets/token"} & set(entries)


def test_branch_moved_meanwhile_is_not_overwritten_and_the_work_is_saved(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    git(project, "checkout", "-q", BRANCH)
    moved = commit_files(project, {"user.txt": "the user committed meanwhile\n"})
    git(project, "checkout", "-q", "main")
    upper = tmp_path / "upper"
    write_files(upper, {"README.md": "agent's edit\n"})

    with pytest.raises(GitWorkflowError) as raised:
        commit_workspace(request(repo, start), from_upper(upper))

    assert rev(project, f"refs/heads/{BRANCH}") == moved
    saved = rev(project, f"refs/kapsis/saved/{BRANCH}")
    assert saved is not None
    assert saved[:12] in str(raised.value)
    assert f"refs/kapsis/saved/{BRANCH}" in str(raised.value)
    assert git(project, "rev-parse", f"{saved}^") == start
    assert tree(project, saved)["README.md"] == ("100644", b"agent's edit\n")


def test_directory_replaced_by_file_and_file_by_directory(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    # overlay: rm -r docs; echo > docs   and   rm tool.sh; mkdir tool.sh; echo > tool.sh/x
    write_files(upper, {"docs": "now a file\n"})
    opaque_dir(upper / "tool.sh")
    (upper / "tool.sh" / "x").write_text("inside\n")

    sha = commit_workspace(request(repo, start), from_upper(upper)).commit_sha

    entries = tree(project, sha)
    assert entries["docs"] == ("100644", b"now a file\n")
    assert entries["tool.sh/x"] == ("100644", b"inside\n")
    assert not {"docs/a.md", "docs/b.md", "tool.sh"} & set(entries)


ODD_NAMES = [
    "with space.txt",
    "new\nline.txt",
    'quote".txt',
    "back\\slash.txt",
    ":colon.txt",
    ":(glob)magic.txt",
    "-dash.txt",
    "--help",
    "ünïcödé ✓.txt",
    "tab\there.txt",
    "star*?[x].txt",
    '"leading-quote',
    os.fsdecode(b"latin1-\xe9.txt"),  # not valid UTF-8
    "dir with space/ne\nsted\\file",
]


def test_odd_file_names_round_trip_into_the_tree(repo: Repo, project: Path, tmp_path: Path) -> None:
    start = commit_files(project, {"- old file.txt": "x", "old\nline": "y"})
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)
    upper = tmp_path / "upper"
    write_files(upper, {name: f"content of {name!r}\n" for name in ODD_NAMES})
    write_files(upper, {"ignored\nname.log": "log\n"})
    whiteout(upper / "- old file.txt")
    whiteout(upper / "old\nline")

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    entries = tree(project, outcome.commit_sha)
    for name in ODD_NAMES:
        assert entries[name] == (
            "100644",
            f"content of {name!r}\n".encode(errors="surrogateescape"),
        )
    assert outcome.ignored == ["ignored\nname.log"]
    assert not {"- old file.txt", "old\nline", "ignored\nname.log"} & set(entries)
    assert set(entries) - set(ODD_NAMES) == set(START_FILES)


def test_quote_path_escapes_quotes_backslashes_and_control_bytes() -> None:
    assert quote_path('a"b\\c\nd\x7f é') == b'"a\\"b\\\\c\\012d\\177 \xc3\xa9"'


# ---------------------------------------------------------------------------------------------
# worktree


@pytest.fixture
def worktree(project: Path, start: str, tmp_path: Path) -> Path:
    path = tmp_path / "worktree"
    git(project, "worktree", "add", "-q", str(path), BRANCH)
    return path


def test_worktree_changes_are_committed_exactly(
    repo: Repo, project: Path, start: str, worktree: Path, tmp_path: Path
) -> None:
    (worktree / "src" / "app.py").write_text("print('changed')\n")
    (worktree / "src" / "util.py").unlink()
    (worktree / "notes.txt").write_text("new\n")
    (worktree / "README.md").chmod(0o755)
    (worktree / "link").unlink()
    os.symlink("src/app.py", worktree / "link")
    os.mkfifo(worktree / "pipe")
    (worktree / "empty-dir").mkdir()

    changes = from_worktree(worktree, tree_listing(repo, start))
    assert sorted(changes.written) == ["README.md", "link", "notes.txt", "src/app.py"]
    assert changes.deleted == ["src/util.py"]
    assert changes.unsupported == ["pipe"]
    outcome = commit_workspace(request(repo, start), changes)

    expected = tree(project, start)
    del expected["src/util.py"]
    expected.update(
        {
            "src/app.py": ("100644", b"print('changed')\n"),
            "notes.txt": ("100644", b"new\n"),
            "README.md": ("100755", b"hello\n"),
            "link": ("120000", b"src/app.py"),
        }
    )
    assert tree(project, outcome.commit_sha) == expected
    assert outcome.unsupported == ["pipe"]


def test_worktree_symlinks_out_of_the_tree_are_committed_as_links(
    repo: Repo, project: Path, start: str, worktree: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET host file\n")
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "loot.txt").write_text("TOP SECRET in a host dir\n")
    os.symlink(secret, worktree / "leak")
    os.symlink(outside_dir, worktree / "leakdir")
    (worktree / "README.md").unlink()
    os.symlink(secret, worktree / "README.md")  # a tracked file replaced by a link

    outcome = commit_workspace(
        request(repo, start), from_worktree(worktree, tree_listing(repo, start))
    )

    entries = tree(project, outcome.commit_sha)
    assert entries["leak"] == ("120000", os.fsencode(secret))
    assert entries["leakdir"] == ("120000", os.fsencode(outside_dir))
    assert entries["README.md"] == ("120000", os.fsencode(secret))
    assert not any(name.startswith("leakdir/") for name in entries)
    assert not any(b"TOP SECRET" in content for _, content in entries.values())


def test_unchanged_worktree_commits_nothing(
    repo: Repo, project: Path, start: str, worktree: Path
) -> None:
    (worktree / "README.md").write_text("hello\n")  # rewritten with the same content

    changes = from_worktree(worktree, tree_listing(repo, start))
    outcome = commit_workspace(request(repo, start), changes)

    assert changes.empty
    assert (outcome.commit_sha, outcome.created_commit) == (None, False)
    assert rev(project, f"refs/heads/{BRANCH}") == start


# ---------------------------------------------------------------------------------------------
# regressions


def dotgit_components(names: Iterable[str]) -> list[str]:
    return [n for n in names if any(part.lower() == ".git" for part in n.split("/"))]


# Regression (a bug found while writing these tests, since fixed): from_upper/from_worktree skip
# only the top-level '.git'; a nested repository's 'sub/.git/...' (or a '.GIT' dir) is committed
# into the tree, which git itself refuses to check out ('invalid path'), so e.g. a worktree of the
# branch cannot be created
def test_nested_dot_git_is_never_committed(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    write_files(
        upper,
        {
            "vendor/lib/.git/config": "[core]\n\tfsmonitor = touch /tmp/x\n",
            "vendor/lib/.git/HEAD": "ref: refs/heads/main\n",
            "vendor/lib/code.c": "int x;\n",
            ".GIT/hooks/post-checkout": Exe("#!/bin/sh\n"),
        },
    )

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    entries = tree(project, outcome.commit_sha)
    assert entries["vendor/lib/code.c"] == ("100644", b"int x;\n")
    assert dotgit_components(entries) == []
    assert {"vendor/lib/.git", ".GIT"} <= set(outcome.unsupported)  # reported, not silent


def test_nested_dot_git_in_a_worktree_is_never_committed(
    repo: Repo, project: Path, start: str, worktree: Path, tmp_path: Path
) -> None:
    nested = worktree / "vendor" / "lib"
    nested.mkdir(parents=True)
    git(nested, "init", "-q")  # the agent cloned something into its worktree
    (nested / "code.c").write_text("int x;\n")

    outcome = commit_workspace(
        request(repo, start), from_worktree(worktree, tree_listing(repo, start))
    )

    entries = tree(project, outcome.commit_sha)
    assert entries["vendor/lib/code.c"] == ("100644", b"int x;\n")
    assert dotgit_components(entries) == []
    # and the branch can be checked out again (git refuses trees with a .git in them)
    git(project, "worktree", "add", "-q", str(tmp_path / "again"), "--detach", BRANCH)


# Regression (a bug found while writing these tests, since fixed): from_worktree walks into a
# checked-out submodule (the start tree has a 160000 gitlink there) and commits its files, so the
# gitlink is replaced by a plain directory holding the submodule's files and its '.git' file
def test_checked_out_submodule_keeps_its_gitlink(repo: Repo, project: Path, tmp_path: Path) -> None:
    sub_commit = rev(project, "HEAD")
    git(project, "update-index", "--add", "--cacheinfo", f"160000,{sub_commit},sub")
    git(project, "commit", "-qm", "add submodule")
    start = rev(project, "HEAD")
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)
    worktree = tmp_path / "worktree"
    git(project, "worktree", "add", "-q", str(worktree), BRANCH)
    # the agent ran `git submodule update --init`: the submodule's files appear, unchanged
    write_files(worktree / "sub", {".git": "gitdir: ../.git/modules/sub\n", "lib.c": "int y;\n"})

    outcome = commit_workspace(
        request(repo, start), from_worktree(worktree, tree_listing(repo, start))
    )

    assert outcome.commit_sha is None
    assert tree(project, f"refs/heads/{BRANCH}")["sub"] == ("160000", sub_commit.encode())
