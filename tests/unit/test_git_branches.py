"""Branch names and where the agent's branch starts (kapsis.git.branches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.errors import ConfigError
from kapsis.git.branches import (
    BRANCH_PREFIX,
    BranchTarget,
    auto_branch_name,
    check_branch_name,
    checked_out_branches,
    resolve_target,
    slugify,
)
from kapsis.git.runner import Repo

from .gitrepo import commit_files, discover, git, init_repo, isolate_home, rev


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "project", {"README.md": "hello\n"})


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


def resolve(repo: Repo, branch: str, base: str | None = None, **kwargs) -> BranchTarget:
    return resolve_target(
        repo, branch, base, branch_origin="--branch", base_origin="--base-branch", **kwargs
    )


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("Fix the login bug", "fix-the-login-bug"),
        ("  Add OAuth2 support, please!!  ", "add-oauth2-support-please"),
        ("UPPER_case and snake_case", "upper-case-and-snake-case"),
        ("!!! ???", "task"),
        ("", "task"),
    ],
)
def test_slugify(text: str, slug: str) -> None:
    assert slugify(text) == slug


def test_slugify_stops_at_a_word_boundary_within_40_characters() -> None:
    text = "refactor the payment service so that retries are idempotent and logged"
    slug = slugify(text)

    assert slug == "refactor-the-payment-service-so-that"
    assert len(slug) <= 40
    longer = slug + "-" + "retries"
    assert len(longer) > 40  # the next word would not have fitted


def test_slugify_of_one_overlong_word_falls_back_to_task() -> None:
    assert slugify("x" * 41) == "task"
    assert slugify("x" * 40) == "x" * 40


def test_auto_branch_name_is_prefixed_slug_and_agent_id_and_valid() -> None:
    name = auto_branch_name("Fix the login bug", "a1b2c3")

    assert name == f"{BRANCH_PREFIX}fix-the-login-bug-a1b2c3"
    assert check_branch_name(name, "auto") == name


@pytest.mark.parametrize("name", ["a..b", "x y", "-x", "HEAD", "a.lock", "a~1", "a:b", "a/"])
def test_check_branch_name_rejects_bad_names_naming_where(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_branch_name(name, "git.branch in agent-sandbox.yaml")

    message = str(raised.value)
    assert message.startswith("git.branch in agent-sandbox.yaml: ")
    assert repr(name) in message


@pytest.mark.parametrize("name", ["feature/x", "kapsis/fix-bug-a1", "v1.2"])
def test_check_branch_name_accepts_good_names(name: str) -> None:
    assert check_branch_name(name, "--branch") == name


# Regression (a bug found while writing these tests, since fixed): check_branch_name runs `git
# check-ref-format --branch` in the process's cwd, which expands '@{-1}' to the previously checked-
# out branch inside a repository, so the literal name '@{-1}' is accepted (it is rejected outside a
# repository)
def test_check_branch_name_rejects_previous_branch_syntax_inside_a_repository(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(project, "checkout", "-q", "-b", "other")
    git(project, "checkout", "-q", "main")
    monkeypatch.chdir(project)

    with pytest.raises(ConfigError):
        check_branch_name("@{-1}", "--branch")


def test_check_branch_name_rejects_previous_branch_syntax_outside_a_repository() -> None:
    # conftest makes the cwd an empty tmp dir
    with pytest.raises(ConfigError):
        check_branch_name("@{-1}", "--branch")


# ---------------------------------------------------------------------------------------------
# resolve_target


def test_new_branch_starts_at_head_with_the_current_branch_as_base(
    repo: Repo, project: Path
) -> None:
    head = rev(project, "HEAD")

    target = resolve(repo, "kapsis/new")

    assert target == BranchTarget(
        branch="kapsis/new", start_commit=head, resume=False, base="main", release_worktree=None
    )
    assert rev(project, "refs/heads/kapsis/new") is None  # resolving creates nothing


def test_new_branch_on_a_detached_head_uses_the_short_sha_as_base(
    repo: Repo, project: Path
) -> None:
    head = rev(project, "HEAD")
    git(project, "checkout", "-q", "--detach")

    target = resolve(repo, "kapsis/new")

    assert (target.start_commit, target.base, target.resume) == (head, head[:12], False)


def test_new_branch_from_base_branch(repo: Repo, project: Path) -> None:
    main = rev(project, "HEAD")
    git(project, "checkout", "-q", "-b", "develop")
    develop = commit_files(project, {"dev.txt": "dev\n"})
    git(project, "checkout", "-q", "main")

    target = resolve(repo, "kapsis/new", "develop")

    assert target == BranchTarget("kapsis/new", develop, resume=False, base="develop")
    assert develop != main


def test_base_branch_may_be_a_tag_or_commit(repo: Repo, project: Path) -> None:
    first = rev(project, "HEAD")
    commit_files(project, {"b.txt": "b\n"})
    git(project, "tag", "-a", "-m", "release", "v1", first)

    assert resolve(repo, "kapsis/a", "v1").start_commit == first
    assert resolve(repo, "kapsis/b", first[:10]).start_commit == first


def test_unknown_base_branch_is_a_config_error_naming_its_origin(repo: Repo) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve(repo, "kapsis/new", "no-such-branch")

    assert str(raised.value).startswith("--base-branch: ")
    assert "'no-such-branch'" in str(raised.value)


def test_existing_branch_is_resumed_from_its_tip(repo: Repo, project: Path) -> None:
    git(project, "checkout", "-q", "-b", "kapsis/old")
    tip = commit_files(project, {"work.txt": "earlier run\n"})
    git(project, "checkout", "-q", "main")

    # a base branch is irrelevant when the branch exists
    target = resolve(repo, "kapsis/old", "main")

    assert target == BranchTarget("kapsis/old", tip, resume=True, base="kapsis/old")


def test_branch_checked_out_in_the_main_worktree_is_refused(repo: Repo) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve(repo, "main")

    assert str(raised.value).startswith("--branch: ")
    assert "'main'" in str(raised.value)


def test_branch_checked_out_in_another_worktree_is_refused(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    worktree = tmp_path / "wt"
    git(project, "worktree", "add", "-q", "-b", "kapsis/wt", str(worktree))

    with pytest.raises(ConfigError, match="checked out in"):
        resolve(repo, "kapsis/wt", releasable=frozenset({tmp_path / "elsewhere"}))


def test_branch_checked_out_in_a_releasable_worktree_is_resumed_with_release(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    worktree = (tmp_path / "wt").resolve()
    git(project, "worktree", "add", "-q", "-b", "kapsis/wt", str(worktree))
    tip = rev(project, "refs/heads/kapsis/wt")

    assert checked_out_branches(repo) == {"main": project.resolve(), "kapsis/wt": worktree}
    target = resolve(repo, "kapsis/wt", releasable=frozenset({worktree}))

    assert target == BranchTarget(
        "kapsis/wt", tip, resume=True, base="kapsis/wt", release_worktree=worktree
    )


def test_repository_without_commits_is_a_config_error(tmp_path: Path) -> None:
    empty = init_repo(tmp_path / "empty", {})
    repo = discover(empty)

    with pytest.raises(ConfigError, match="no commits yet"):
        resolve(repo, "kapsis/new")
