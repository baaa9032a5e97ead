"""Host git on the user's own repository never runs what the repository names: hooks planted in
``.git/hooks`` or in a directory ``core.hooksPath`` points at, and a ``core.fsmonitor`` command
in ``.git/config``. The host commits the agent's work, pushes it, and reads the user's uncommitted
state at launch; each such step must leave no marker, and plain git in the same repository (the
control) must leave markers, so a plant that could never have run does not make a test pass.
This guards the HARDENING settings of kapsis.git.runner (core.hooksPath, core.fsmonitor)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kapsis.git.changes import from_upper
from kapsis.git.commit import CommitRequest, commit_workspace
from kapsis.git.push import push_branch
from kapsis.git.runner import Repo
from kapsis.git.snapshot import working_state

from .gitrepo import Exe, discover, git, init_repo, isolate_home, rev, run_git, write_files

BRANCH = "kapsis/hooks-a1"
HOOKS = (
    "pre-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "reference-transaction",
    "pre-push",
    "post-index-change",
    "post-checkout",
    "post-rewrite",
    "pre-auto-gc",
)


@dataclass
class Planted:
    project: Path
    repo: Repo
    start: str
    origin: Path
    markers: Path
    tmp: Path

    def fired(self) -> list[str]:
        return sorted(os.listdir(self.markers))


@pytest.fixture(params=["git-dir-hooks", "hooks-path"])
def planted(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Planted:
    """A user's repository with a remote and the agent's branch, then the plants: executable
    hooks (in .git/hooks, or in another directory named by core.hooksPath) and an fsmonitor
    command, each of which creates a marker file named after itself."""
    isolate_home(tmp_path, monkeypatch)
    markers = tmp_path / "markers"
    markers.mkdir()
    origin = init_repo(tmp_path / "origin.git", {}, bare=True)
    project = init_repo(tmp_path / "project", {"README.md": "hello\n", "a.txt": "a1\n"})
    git(project, "remote", "add", "origin", str(origin))
    start = rev(project, "HEAD")
    assert start is not None
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)  # as prepare_workspace does

    if request.param == "hooks-path":
        hooks = tmp_path / "elsewhere" / "hooks"
        git(project, "config", "core.hooksPath", str(hooks))
    else:
        hooks = project / ".git" / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    for name in HOOKS:
        write_files(hooks, {name: Exe(f"#!/bin/sh\ntouch '{markers}/{name}'\nexit 0\n")})
    git(project, "config", "core.fsmonitor", f"touch '{markers}/fsmonitor'; false")
    setup = Planted(project, discover(project), start, origin, markers, tmp_path)
    assert setup.fired() == []
    return setup


def commit_agent_work(planted: Planted) -> str:
    upper = planted.tmp / "upper"
    write_files(upper, {"README.md": "hello from the agent\n", "new.txt": "new\n"})
    outcome = commit_workspace(
        CommitRequest(
            repo=planted.repo,
            branch=BRANCH,
            start_commit=planted.start,
            message="kapsis: hooks\n",
            committer_name="Kapsis Bot",
            committer_email="bot@kapsis.example",
            exclude=(".env",),
            scratch_name="a1",
        ),
        from_upper(upper),
    )
    assert outcome.created_commit and outcome.commit_sha is not None
    assert rev(planted.project, f"refs/heads/{BRANCH}") == outcome.commit_sha
    return outcome.commit_sha


def plain_commit(planted: Planted) -> None:
    """The control: the user's own `git commit` in the same repository runs the plants."""
    write_files(planted.project, {"a.txt": "the user's edit\n"})
    run_git(planted.project, "commit", "-q", "-am", "plain commit")
    fired = planted.fired()
    for expected in ("pre-commit", "commit-msg", "post-commit", "reference-transaction"):
        assert expected in fired, fired


def test_control_plain_git_runs_every_plant(planted: Planted) -> None:
    run_git(planted.project, "status", "--porcelain")
    plain_commit(planted)
    run_git(planted.project, "push", "-q", "origin", f"HEAD:refs/heads/{BRANCH}-plain")
    fired = planted.fired()
    for expected in ("fsmonitor", "post-index-change", "pre-push"):
        assert expected in fired, fired


def test_committing_the_agents_work_runs_no_hook(planted: Planted) -> None:
    commit_agent_work(planted)

    assert planted.fired() == []
    plain_commit(planted)


def test_pushing_the_agents_branch_runs_no_hook(planted: Planted) -> None:
    sha = commit_agent_work(planted)

    outcome = push_branch(planted.repo, "origin", BRANCH, sha, timeout=30)

    assert outcome.status == "pushed", outcome.message
    assert rev(planted.origin, f"refs/heads/{BRANCH}") == sha
    assert planted.fired() == []
    # control: a plain push of the same commit runs the pre-push hook
    run_git(planted.project, "push", "-q", "origin", f"{sha}:refs/heads/{BRANCH}-plain")
    assert "pre-push" in planted.fired()


def test_reading_the_users_uncommitted_work_runs_no_fsmonitor_and_no_hook(
    planted: Planted,
) -> None:
    # At launch the host reads the checkout (git status, then git add into a scratch index):
    # the commands that consult the fsmonitor and write an index.
    write_files(planted.project, {"a.txt": "unsaved edit\n", "untracked.txt": "mine\n"})

    state = working_state(planted.repo, planted.start)

    assert sorted(state.changed) == ["a.txt", "untracked.txt"]
    assert planted.fired() == []
    # control: plain git status on the same checkout asks the fsmonitor
    run_git(planted.project, "status", "--porcelain")
    assert "fsmonitor" in planted.fired()
    plain_commit(planted)
