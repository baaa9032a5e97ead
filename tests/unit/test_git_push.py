"""Pushing the agent's branch and the post-push hook (kapsis.git.push), against bare repos."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path

import pytest

from kapsis.git.push import push_branch, run_post_push_hook
from kapsis.git.runner import Repo

from .gitrepo import commit_files, discover, git, init_repo, isolate_home, rev

BRANCH = "kapsis/push-a1"


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "origin.git", {}, bare=True)


@pytest.fixture
def project(tmp_path: Path, origin: Path) -> Path:
    path = init_repo(tmp_path / "project", {"README.md": "hello\n"})
    git(path, "remote", "add", "origin", str(origin))
    git(path, "push", "-q", "origin", "main")
    git(path, "checkout", "-q", "-b", BRANCH)
    commit_files(path, {"work.txt": "the agent's work\n"}, "agent work")
    git(path, "checkout", "-q", "main")
    return path


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


@pytest.fixture
def local(project: Path) -> str:
    sha = rev(project, f"refs/heads/{BRANCH}")
    assert sha is not None
    return sha


def remote_sha(origin: Path) -> str | None:
    return rev(origin, f"refs/heads/{BRANCH}")


def expected_retry(project: Path, remote: str = "origin") -> str:
    return shlex.join(
        ["git", "-C", str(project), "push", remote, f"refs/heads/{BRANCH}:refs/heads/{BRANCH}"]
    )


def push_from_elsewhere(origin: Path, tmp_path: Path, base: str | None) -> str:
    """Someone else pushes a commit to the agent's branch on the remote."""
    other = tmp_path / "someone-else"
    git(tmp_path, "clone", "-q", str(origin), str(other))
    for key, value in (("user.name", "Someone"), ("user.email", "s@x")):
        git(other, "config", key, value)
    git(other, "checkout", "-q", "-b", BRANCH, base or "origin/main")
    sha = commit_files(other, {"theirs.txt": "pushed by someone else\n"}, "theirs")
    git(other, "push", "-q", "origin", f"{BRANCH}:{BRANCH}")
    return sha


# ---------------------------------------------------------------------------------------------
# push_branch


def test_push_creates_the_remote_branch_and_updates_the_tracking_ref(
    repo: Repo, project: Path, origin: Path, local: str
) -> None:
    outcome = push_branch(repo, "origin", BRANCH, local, timeout=10)

    assert outcome.status == "pushed", outcome.message
    assert outcome.remote_url == str(origin)
    assert outcome.retry_command is None
    assert remote_sha(origin) == local
    assert rev(project, f"refs/remotes/origin/{BRANCH}") == local


def test_pushing_again_is_up_to_date(repo: Repo, project: Path, origin: Path, local: str) -> None:
    assert push_branch(repo, "origin", BRANCH, local, timeout=10).status == "pushed"

    outcome = push_branch(repo, "origin", BRANCH, local, timeout=10)

    assert outcome.status == "up_to_date"
    assert remote_sha(origin) == local


def test_diverged_remote_is_refused_and_nothing_moves(
    repo: Repo, project: Path, origin: Path, local: str, tmp_path: Path
) -> None:
    theirs = push_from_elsewhere(origin, tmp_path, None)
    assert rev(project, f"{theirs}^{{commit}}") is None  # unknown here until fetched

    outcome = push_branch(repo, "origin", BRANCH, local, timeout=10)

    assert outcome.status == "diverged"
    assert rev(project, f"refs/remotes/origin/{BRANCH}") == theirs  # fetched to compare
    assert theirs[:12] in outcome.message and local[:12] in outcome.message
    assert remote_sha(origin) == theirs
    assert rev(project, f"refs/heads/{BRANCH}") == local
    assert outcome.retry_command == expected_retry(project)


def test_remote_branch_that_is_an_ancestor_is_fast_forwarded(
    repo: Repo, project: Path, origin: Path, tmp_path: Path
) -> None:
    old = push_from_elsewhere(origin, tmp_path, None)
    # the agent's branch was continued from what was pushed before
    git(project, "fetch", "-q", "origin")
    git(project, "branch", "-f", BRANCH, old)
    git(project, "checkout", "-q", BRANCH)
    new = commit_files(project, {"more.txt": "more work\n"}, "more")
    git(project, "checkout", "-q", "main")

    outcome = push_branch(repo, "origin", BRANCH, new, timeout=10)

    assert outcome.status == "pushed", outcome.message
    assert remote_sha(origin) == new
    assert git(origin, "rev-parse", f"{BRANCH}^") == old


def test_unknown_remote_fails_naming_it(repo: Repo, local: str) -> None:
    outcome = push_branch(repo, "upstream", BRANCH, local, timeout=10)

    assert outcome.status == "failed"
    assert "'upstream'" in outcome.message
    assert outcome.retry_command == expected_retry(repo.root, "upstream")


def test_unreachable_remote_fails(repo: Repo, project: Path, local: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo.git"
    git(project, "remote", "add", "gone", str(missing))

    outcome = push_branch(repo, "gone", BRANCH, local, timeout=10)

    assert outcome.status == "failed"
    assert "gone" in outcome.message
    assert outcome.retry_command == expected_retry(project, "gone")
    assert not missing.exists()


def hanging_remote(project: Path, origin: Path, pid_file: Path) -> None:
    git(project, "remote", "add", "slow", str(origin))
    # the user's own setting: the program git runs for the remote side of ls-remote; it
    # records its pid and hangs ('#' comments out the repository path git appends)
    git(project, "config", "remote.slow.uploadpack", f"echo $$ > {pid_file}; exec sleep 30 #")


def is_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def pid_file(tmp_path: Path):
    """A file a test's hanging program writes its pid to; that process is killed afterwards."""
    path = tmp_path / "hanging.pid"
    yield path
    if path.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(path.read_text()), 9)


def test_a_remote_that_hangs_fails_after_the_timeout(
    repo: Repo, project: Path, origin: Path, local: str, pid_file: Path
) -> None:
    hanging_remote(project, origin, pid_file)

    started = time.monotonic()
    outcome = push_branch(repo, "slow", BRANCH, local, timeout=0.5)

    assert time.monotonic() - started < 2.5
    assert outcome.status == "failed"
    assert "longer than 0.5s" in outcome.message
    assert outcome.retry_command == expected_retry(project, "slow")
    assert remote_sha(origin) is None


# Regression (a bug found while writing these tests, since fixed): on a push/fetch/ls-remote timeout
# Repo.run (subprocess.run(timeout=...)) kills only the git process; the transport it started (ssh,
# or the remote's upload-pack) keeps running after push_branch returned
def test_a_timed_out_remote_leaves_no_process_behind(
    repo: Repo, project: Path, origin: Path, local: str, pid_file: Path
) -> None:
    hanging_remote(project, origin, pid_file)

    assert push_branch(repo, "slow", BRANCH, local, timeout=0.5).status == "failed"

    time.sleep(0.2)
    assert not is_alive(int(pid_file.read_text()))


# ---------------------------------------------------------------------------------------------
# run_post_push_hook

HOOK_FIELDS = {
    "branch": BRANCH,
    "commit": "c0ffee" * 6 + "c0ff",
    "remote": "origin",
    "remote_url": "git@example.com:org/repo.git",
    "base": "main",
    "agent_id": "a1",
}


@pytest.fixture
def hook_repo(tmp_path: Path) -> Repo:
    return discover(init_repo(tmp_path / "hooked", {"README.md": "hello\n"}))


def hook(command: str, repo: Repo, timeout: float = 10) -> tuple[int, str | None, str]:
    return run_post_push_hook(command, repo, timeout=timeout, **HOOK_FIELDS)


def test_hook_gets_the_kapsis_variables_and_runs_in_the_project(hook_repo: Repo) -> None:
    names = [
        "KAPSIS_BRANCH",
        "KAPSIS_COMMIT",
        "KAPSIS_REMOTE",
        "KAPSIS_REMOTE_URL",
        "KAPSIS_BASE_BRANCH",
        "KAPSIS_AGENT_ID",
        "KAPSIS_PROJECT",
    ]
    command = "; ".join(f'printf "%s\\n" "${name}"' for name in names) + '; printf "%s\\n" "$PWD"'

    code, url, output = hook(command, hook_repo)

    assert code == 0
    assert url is None
    assert output.splitlines() == [
        BRANCH,
        HOOK_FIELDS["commit"],
        "origin",
        "git@example.com:org/repo.git",
        "main",
        "a1",
        str(hook_repo.root),
        str(hook_repo.root),
    ]


def test_hook_returns_the_first_url_it_prints(hook_repo: Repo) -> None:
    command = (
        "echo 'Creating pull request...'; echo 'https://github.com/org/repo/pull/42'; "
        "echo 'docs: http://example.com/other'"
    )

    code, url, output = hook(command, hook_repo)

    assert (code, url) == (0, "https://github.com/org/repo/pull/42")
    assert "Creating pull request" in output


def test_hook_url_on_stderr_only_is_not_taken(hook_repo: Repo) -> None:
    code, url, output = hook("echo 'https://example.com/x' >&2", hook_repo)

    assert (code, url) == (0, None)
    assert "https://example.com/x" in output


def test_hook_failure_is_reported_with_its_output(hook_repo: Repo) -> None:
    code, url, output = hook(
        "echo 'https://example.com/pr/1'; echo 'gh: not logged in' >&2; exit 3", hook_repo
    )

    assert code == 3
    assert url == "https://example.com/pr/1"
    assert "gh: not logged in" in output


def test_hook_that_runs_too_long_is_stopped(hook_repo: Repo, pid_file: Path) -> None:
    started = time.monotonic()

    code, url, output = hook(f"echo $$ > {pid_file}; exec sleep 20", hook_repo, timeout=1)

    assert time.monotonic() - started < 5
    assert code == 124
    assert url is None
    assert "longer than 1s" in output
    time.sleep(0.1)
    assert not is_alive(int(pid_file.read_text()))


# Regression (a bug found while writing these tests, since fixed): on timeout only the `sh -c`
# process is killed; programs the hook started keep running after run_post_push_hook returned
# (subprocess.run kills the direct child only)
def test_hook_timeout_also_stops_what_the_hook_started(hook_repo: Repo, pid_file: Path) -> None:
    command = f"sleep 30 & echo $! > {pid_file}; wait"

    code, _, _ = hook(command, hook_repo, timeout=1)

    assert code == 124
    time.sleep(0.2)
    assert not is_alive(int(pid_file.read_text()))


# Regression (a bug found while writing these tests, since fixed): the URL regex keeps trailing
# sentence punctuation, so 'Created https://github.com/org/repo/pull/7.' gives pr_url '...pull/7.'
def test_hook_url_does_not_include_trailing_punctuation(hook_repo: Repo) -> None:
    _, url, _ = hook("echo 'Created https://github.com/org/repo/pull/7.'", hook_repo)

    assert url == "https://github.com/org/repo/pull/7"
