"""Root runs Kapsis on a repository that belongs to a user (``sudo kapsis run ~/project``).

Rootful sandboxes, but every host-side write into the project (objects, refs, the index, the
worktree and its admin files, config) must be made as the repository's owner, so the user's own
git keeps working afterwards: ``gc``, deleting the agent's branch, ``worktree prune``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .rootless_user import RootlessUser

pytestmark = pytest.mark.integration


@pytest.fixture
def project(user: RootlessUser, request: pytest.FixtureRequest) -> Path:
    return user.make_repository(
        user.home / "sudo-projects" / f"{request.node.name[:30]}-{secrets.token_hex(3)}"
    )


def agent_branch(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if "new branch " in line)
    return line.split("new branch ", 1)[1].split()[0]


def users_git_still_works(user: RootlessUser, project: Path, branch: str) -> None:
    for command in (
        ["status", "--porcelain"],
        ["gc", "--quiet"],
        ["worktree", "prune"],
        ["branch", "-D", branch],
        ["commit", "-q", "--allow-empty", "-m", "the user's own commit"],
    ):
        done = user.run(["git", "-C", str(project), *command])
        assert done.returncode == 0, (command, done.stderr)


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_a_root_run_writes_into_a_users_repository_only_as_the_user(
    kapsis: Kapsis, user: RootlessUser, project: Path, mode: str
) -> None:
    remote = user.home / "sudo-remotes" / f"{project.name}-{mode}.git"
    made = user.run(
        ["sh", "-c", f"git init -q --bare {remote} && git -C {project} remote add origin {remote}"]
    )
    assert made.returncode == 0, made.stderr
    # The user has work in progress: it is carried as a commit of theirs, made as them too.
    assert user.run(["sh", "-c", f"echo wip > {project}/wip.txt"]).returncode == 0
    task = "echo work > work.txt && mkdir -p deep/er && echo x > deep/er/file && git add -A"

    result = kapsis.run(project, task, "--network-mode", "none", "--mode", mode, "--push")

    assert result.returncode == 0, result.stderr
    branch = agent_branch(result.stderr)
    log = user.run(["git", "-C", str(project), "log", "-1", "--format=%cn <%ce>", branch])
    assert log.stdout.strip() == "Rootless User <user@example.test>"  # the owner's identity
    subjects = user.run(["git", "-C", str(project), "log", "--format=%s", f"main..{branch}"])
    assert subjects.stdout.splitlines()[1] == f"Uncommitted work of {user.name} at launch"
    assert user.not_owned(project, remote) == []
    if mode == "worktree":
        # Its worktree is under the owner's ~/.kapsis, theirs to open, not under root's.
        listed = user.run(["git", "-C", str(project), "worktree", "list", "--porcelain"])
        worktrees = [line.split(" ", 1)[1] for line in listed.stdout.splitlines()
                     if line.startswith("worktree ")][1:]  # fmt: skip
        assert len(worktrees) == 1
        assert worktrees[0].startswith(str(user.home / ".kapsis" / "worktrees"))
        assert user.not_owned(user.home / ".kapsis") == []
        assert (Path(worktrees[0]) / "work.txt").read_text() == "work\n"
        removed = user.run(["rm", "-rf", worktrees[0]])  # the user can remove it (then prune)
        assert removed.returncode == 0, removed.stderr
    users_git_still_works(user, project, branch)
