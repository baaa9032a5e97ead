"""Adversarial: nothing the agent (or a repository's content) names is ever run by host git.

The agent plants, in its own git dir, executable hooks and config that makes git run programs
(core.fsmonitor, core.hooksPath, core.sshCommand, filter and diff drivers), and in its workspace
a ``.gitattributes`` that routes every file through a filter driver and a diff driver the
user's config defines (as git-lfs does). Every program writes a marker file. Each host step
(commit from an upper dir or a worktree, push, worktree checkout) must leave no marker; each
test then runs the same thing with plain git as a control, which must leave markers, so a
planted program that could never have run does not make a test pass.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kapsis.errors import FileChangedError
from kapsis.git.changes import WorkspaceChanges, from_upper, from_worktree
from kapsis.git.commit import CommitOutcome, CommitRequest, commit_workspace, tree_listing
from kapsis.git.push import push_branch
from kapsis.git.runner import Repo
from kapsis.workspace.delta import build_delta
from kapsis.workspace.gitview import build_agent_git
from kapsis.workspace.worktree import add_worktree

from .gitrepo import (
    Exe,
    commit_files,
    discover,
    git,
    init_repo,
    isolate_home,
    rev,
    run_git,
    tree,
    write_files,
)

BRANCH = "kapsis/planted-a1"
EVIL_BRANCH = "evil-attrs"
HOOKS = (
    "pre-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "reference-transaction",
    "pre-push",
    "post-checkout",
    "post-index-change",
    "post-rewrite",
    "pre-auto-gc",
)
ATTRIBUTES = "* filter=evil diff=evil\n*.g filter=glob\n"
EVIL_ATTRIBUTES = ATTRIBUTES + "*.p filter=proc\n"


@dataclass
class Setup:
    project: Path
    repo: Repo
    start: str
    origin: Path
    agent_git: Path
    agent_work: Path
    markers: Path
    tmp: Path

    def fired(self) -> list[str]:
        return sorted(os.listdir(self.markers))

    def agent_git_cmd(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Plain git on the agent's git dir, with whatever the agent configured in it."""
        return run_git(
            self.agent_work,
            f"--git-dir={self.agent_git}",
            f"--work-tree={self.agent_work}",
            *args,
            check=False,
        )


def marker_command(markers: Path, name: str, then: str = "cat") -> str:
    return f"sh -c 'touch {markers}/{name}; {then}'"


def quoted(value: str) -> str:
    """A value for a hand-written git config file (';' and '#' would start a comment)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plant_hooks(directory: Path, markers: Path, prefix: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in HOOKS:
        write_files(directory, {name: Exe(f"#!/bin/sh\ntouch {markers}/{prefix}-{name}\n")})


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    home = isolate_home(tmp_path, monkeypatch)
    markers = tmp_path / "markers"
    markers.mkdir()
    origin = init_repo(tmp_path / "origin.git", {}, bare=True)
    project = init_repo(
        tmp_path / "project",
        {"README.md": "hello\n", "a.txt": "a1\n", "data.g": "glob data\n", "data.p": "p\n"},
    )
    git(project, "remote", "add", "origin", str(origin))
    start = rev(project, "HEAD")
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)
    # a branch an agent committed earlier, whose .gitattributes routes files through filters
    git(project, "checkout", "-q", "-b", EVIL_BRANCH)
    commit_files(project, {".gitattributes": EVIL_ATTRIBUTES, "a.txt": "evil branch\n"}, "attrs")
    git(project, "checkout", "-q", "main")
    repo = discover(project)

    # the agent's git dir, one commit made in it (before anything was planted)
    agent_git = tmp_path / "sandbox" / "git"
    build_agent_git(repo, agent_git, branch=BRANCH, start=start, agent="claude", agent_id="a1")
    (agent_git / "objects" / "info" / "alternates").write_text(f"{repo.common_dir / 'objects'}\n")
    agent_work = tmp_path / "agent-work"
    agent_work.mkdir()
    quiet = (
        "-c",
        "core.hooksPath=/dev/null",
        f"--git-dir={agent_git}",
        f"--work-tree={agent_work}",
    )
    git(agent_work, *quiet, "checkout-index", "-a", "-f")
    write_files(agent_work, {"a.txt": "a2 by the agent\n"})
    git(agent_work, *quiet, "commit", "-q", "-am", "agent commit")
    # ... and then the plants: hooks, and config that runs programs
    plant_hooks(agent_git / "hooks", markers, "agent-hook")
    with (agent_git / "config").open("a") as config:
        config.write(
            "[core]\n"
            f"\tfsmonitor = {quoted(f'touch {markers}/agent-fsmonitor; false')}\n"
            f"\thooksPath = {quoted(str(agent_git / 'hooks'))}\n"
            f"\tsshCommand = {quoted(f'touch {markers}/agent-ssh; false')}\n"
            '[filter "evil"]\n'
            f"\tclean = {quoted(marker_command(markers, 'agent-filter-clean'))}\n"
            f"\tsmudge = {quoted(marker_command(markers, 'agent-filter-smudge'))}\n"
            '[diff "evil"]\n'
            f"\ttextconv = {quoted(marker_command(markers, 'agent-textconv', 'cat $0'))}\n"
        )
    # uncommitted work: the attributes file, and an edit
    write_files(agent_work, {".gitattributes": ATTRIBUTES, "README.md": "hello from the agent\n"})

    # the user's own config: filter and diff drivers (as git-lfs sets up), hooks in the repo
    for key, value in (
        ("filter.evil.clean", marker_command(markers, "user-filter-clean")),
        ("filter.evil.smudge", marker_command(markers, "user-filter-smudge")),
        ("diff.evil.textconv", marker_command(markers, "user-textconv", "cat $0")),
        ("diff.evil.command", f"touch {markers}/user-diff-command; true"),
    ):
        git(project, "config", key, value)
    (home / ".gitconfig").write_text(
        '[filter "glob"]\n'
        f"\tclean = {quoted(marker_command(markers, 'global-filter-clean'))}\n"
        f"\tsmudge = {quoted(marker_command(markers, 'global-filter-smudge'))}\n"
        '[filter "proc"]\n'
        f"\tprocess = {quoted(f'touch {markers}/global-filter-process; false')}\n"
    )
    plant_hooks(project / ".git" / "hooks", markers, "user-hook")
    return Setup(project, repo, start, origin, agent_git, agent_work, markers, tmp_path)


def commit(planted: Setup, changes: WorkspaceChanges, **fields) -> CommitOutcome:
    values = {
        "repo": planted.repo,
        "branch": BRANCH,
        "start_commit": planted.start,
        "message": "kapsis: planted\n",
        "committer_name": "Kapsis Bot",
        "committer_email": "bot@kapsis.example",
        "exclude": (".env",),
        "scratch_name": "a1",
        "agent_git": planted.agent_git,
    }
    values.update(fields)
    return commit_workspace(CommitRequest(**values), changes)


def agent_upper(planted: Setup) -> Path:
    """The overlay upper dir holding the agent's final files."""
    upper = planted.tmp / "upper"
    write_files(
        upper,
        {
            ".git": "gitdir: /kapsis/git\n",
            ".gitattributes": ATTRIBUTES,
            "README.md": "hello from the agent\n",
            "a.txt": "a2 by the agent\n",
            "new.g": "new glob file\n",
        },
    )
    return upper


EXPECTED_TREE = {
    ".gitattributes": ("100644", ATTRIBUTES.encode()),
    "README.md": ("100644", b"hello from the agent\n"),
    "a.txt": ("100644", b"a2 by the agent\n"),
    "data.g": ("100644", b"glob data\n"),
    "data.p": ("100644", b"p\n"),
    "new.g": ("100644", b"new glob file\n"),
}


# ---------------------------------------------------------------------------------------------
# controls on their own: each plant works when plain git runs where it is allowed to


def test_control_plain_git_in_the_agents_git_dir_runs_every_plant(planted: Setup) -> None:
    assert planted.fired() == []

    planted.agent_git_cmd("add", "-A")
    planted.agent_git_cmd("commit", "-q", "-m", "plain commit")
    planted.agent_git_cmd("diff", "HEAD~1", "--", "README.md")
    planted.agent_git_cmd("push", "-q", str(planted.origin), f"HEAD:refs/heads/{BRANCH}")
    planted.agent_git_cmd("checkout", "-q", "-b", "other")
    planted.agent_git_cmd("ls-remote", "ssh://kapsis.invalid/repo.git")

    fired = planted.fired()
    for expected in (
        "agent-fsmonitor",
        "agent-filter-clean",
        "agent-textconv",
        "agent-ssh",
        *(f"agent-hook-{name}" for name in ("pre-commit", "commit-msg", "post-commit")),
        *(f"agent-hook-{name}" for name in ("reference-transaction", "post-index-change")),
        *(f"agent-hook-{name}" for name in ("pre-push", "post-checkout")),
    ):
        assert expected in fired
    # (the user's global config applies to plain git anywhere; the project's config does not)
    assert not any(name.startswith("user-") for name in fired)


def test_control_plain_git_in_the_users_repo_runs_the_filters_and_hooks(planted: Setup) -> None:
    project = planted.project
    write_files(project, {".gitattributes": ATTRIBUTES, "a.txt": "edited\n", "x.g": "x\n"})

    run_git(project, "add", "-A")
    write_files(project, {"a.txt": "edited again\n"})
    run_git(project, "diff", "--no-ext-diff", "--", "a.txt")  # textconv
    run_git(project, "diff", "--ext-diff", "--", "a.txt")  # diff.evil.command
    run_git(project, "commit", "-q", "-m", "plain commit")
    # the process driver fails the checkout, after the other drivers and before the hook
    run_git(project, "worktree", "add", "-q", str(planted.tmp / "wt"), EVIL_BRANCH, check=False)

    fired = planted.fired()
    for expected in (
        "user-filter-clean",
        "user-filter-smudge",
        "global-filter-clean",
        "global-filter-smudge",
        "global-filter-process",
        "user-textconv",
        "user-diff-command",
        "user-hook-pre-commit",
        "user-hook-post-commit",
        "user-hook-reference-transaction",
        "user-hook-post-index-change",
    ):
        assert expected in fired
    assert not any(name.startswith("agent-") for name in fired)


def assert_agent_plants_are_live(planted: Setup) -> None:
    """The control: plain git with the agent's git dir runs what it planted."""
    planted.agent_git_cmd("add", "-A")
    planted.agent_git_cmd("commit", "-q", "-m", "plain commit")
    fired = planted.fired()
    for expected in ("agent-hook-pre-commit", "agent-hook-post-commit", "agent-filter-clean"):
        assert expected in fired


# ---------------------------------------------------------------------------------------------
# host steps: nothing planted runs


def test_commit_from_an_upper_dir_runs_nothing_planted(planted: Setup) -> None:
    outcome = commit(planted, from_upper(agent_upper(planted)))

    assert planted.fired() == []
    assert (outcome.agent_commits, outcome.created_commit) == (1, True)
    assert tree(planted.project, outcome.commit_sha) == EXPECTED_TREE
    agent_tip = (planted.agent_git / "refs" / "heads" / BRANCH).read_text().strip()
    assert git(planted.project, "rev-parse", f"{outcome.commit_sha}^") == agent_tip
    assert_agent_plants_are_live(planted)


def test_commit_from_a_worktree_runs_nothing_planted(planted: Setup) -> None:
    worktree = planted.tmp / "worktree"
    add_worktree(planted.repo, worktree, BRANCH)
    write_files(
        worktree,
        {
            ".gitattributes": ATTRIBUTES,
            "README.md": "hello from the agent\n",
            "a.txt": "a2 by the agent\n",
            "new.g": "new glob file\n",
        },
    )
    changes = from_worktree(worktree, tree_listing(planted.repo, planted.start))

    outcome = commit(planted, changes)

    assert planted.fired() == []
    assert (outcome.agent_commits, outcome.created_commit) == (1, True)
    assert tree(planted.project, outcome.commit_sha) == EXPECTED_TREE
    assert_agent_plants_are_live(planted)


def test_push_runs_nothing_planted(planted: Setup) -> None:
    sha = commit(planted, from_upper(agent_upper(planted))).commit_sha

    outcome = push_branch(planted.repo, "origin", BRANCH, sha, timeout=10)

    assert outcome.status == "pushed", outcome.message
    assert rev(planted.origin, f"refs/heads/{BRANCH}") == sha
    assert planted.fired() == []
    # control: a plain push runs the pre-push hooks, the agent's and the user's
    planted.agent_git_cmd("push", "-q", str(planted.origin), f"HEAD:refs/heads/{BRANCH}-plain")
    run_git(planted.project, "push", "-q", "origin", f"{sha}:refs/heads/{BRANCH}-plain2")
    fired = planted.fired()
    assert "agent-hook-pre-push" in fired
    assert "user-hook-pre-push" in fired


def test_add_worktree_runs_no_filter_driver_and_no_hook(planted: Setup) -> None:
    worktree = planted.tmp / "worktree"

    add_worktree(planted.repo, worktree, EVIL_BRANCH)

    assert planted.fired() == []
    # checked out as stored: no smudge filter touched the files
    assert (worktree / ".gitattributes").read_text() == EVIL_ATTRIBUTES
    assert (worktree / "a.txt").read_text() == "evil branch\n"
    assert (worktree / "data.g").read_text() == "glob data\n"
    assert (worktree / "data.p").read_text() == "p\n"
    assert git(worktree, "rev-parse", "--abbrev-ref", "HEAD") == EVIL_BRANCH
    # control: plain git runs the drivers and the hook
    run_git(planted.project, "worktree", "add", "-q", str(planted.tmp / "plain"), BRANCH)
    run_git(
        planted.project,
        "worktree",
        "add",
        "-q",
        str(planted.tmp / "plain2"),
        "--detach",
        EVIL_BRANCH,
        check=False,
    )
    fired = planted.fired()
    for expected in (
        "user-hook-post-checkout",
        "user-filter-smudge",
        "global-filter-smudge",
        "global-filter-process",
    ):
        assert expected in fired


# Regression (a bug found while writing these tests, since fixed): build_delta ran `git diff-index
# <start>` against the checkout without blanking filter drivers, so racily-clean index entries were
# re-hashed through the filter the checkout's .gitattributes names (the user's filter.<name>.clean,
# e.g. git-lfs) although runner.py promises that filter drivers never run. The delta is now read
# from two commits alone; the checkout is not looked at.
def test_build_delta_runs_no_filter_driver(planted: Setup) -> None:
    project = planted.project
    write_files(project, {".gitattributes": ATTRIBUTES})
    # an index not newer than the files it lists: "racily clean" entries, as when the files and
    # the index were written in the same second; git re-hashes such files to compare them
    os.utime(project / ".git" / "index", (1, 1))

    build_delta(
        planted.repo, rev(project, "HEAD"), rev(project, EVIL_BRANCH), planted.tmp / "delta"
    )

    assert planted.fired() == []
    # control: the same comparison with plain git runs the clean filter
    run_git(project, "diff-index", "--name-only", rev(project, EVIL_BRANCH))
    assert "user-filter-clean" in planted.fired()


@pytest.mark.parametrize("swap", ["symlink", "hard link", "fifo", "parent symlink"])
def test_a_file_replaced_after_listing_is_refused_not_read(tmp_path: Path, swap: str) -> None:
    """Root reads listed files later, by path; whoever can still write there (the user, in a
    worktree of theirs) must not get it to read something else, or hang it on a fifo."""

    upper = tmp_path / "upper"
    (upper / "dir").mkdir(parents=True)
    (upper / "dir" / "work.txt").write_text("the agent's work\n")
    secret = tmp_path / "secret"
    (secret / "dir").mkdir(parents=True)
    (secret / "dir" / "work.txt").write_text("root's secret\n")
    written = from_upper(upper).written["dir/work.txt"]
    assert written.content() == b"the agent's work\n"  # control: unchanged, it is read

    target = upper / "dir" / "work.txt"
    target.unlink()
    if swap == "symlink":
        target.symlink_to(secret / "dir" / "work.txt")
    elif swap == "hard link":  # another existing file (protected_hardlinks aside)
        os.link(secret / "dir" / "work.txt", target)
    elif swap == "fifo":
        os.mkfifo(target)
    else:
        (upper / "dir").rmdir()
        (upper / "dir").symlink_to(secret / "dir")
    with pytest.raises(FileChangedError):
        written.content()
