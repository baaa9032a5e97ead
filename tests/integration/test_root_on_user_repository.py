"""Root runs Kapsis on a repository that belongs to a user (``sudo kapsis run ~/project``).

Rootful sandboxes, but every host-side write into the project (objects, refs, the index, the
worktree and its admin files, config) must be made as the repository's owner, so the user's own
git keeps working afterwards: ``gc``, deleting the agent's branch, ``worktree prune``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from kapsis.workspace import disk_helper

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
        # Its worktree is on a disk of its own (resources.disk), made for the owner at a path
        # of root's that they cannot swap for a link: theirs to open, every file theirs.
        listed = user.run(["git", "-C", str(project), "worktree", "list", "--porcelain"])
        worktrees = [line.split(" ", 1)[1] for line in listed.stdout.splitlines()
                     if line.startswith("worktree ")][1:]  # fmt: skip
        assert len(worktrees) == 1
        worktree = Path(worktrees[0])
        assert worktree.parent == disk_helper.mounts_dir(disk_helper.STATE, user.uid)
        assert os.path.ismount(worktree)
        assert user.not_owned(worktree) == []
        assert user.run(["cat", str(worktree / "work.txt")]).stdout == "work\n"
        # The user can empty it (then prune); the disk goes with `kapsis cleanup`.
        emptied = user.run(["find", str(worktree), "-mindepth", "1", "-delete"])
        assert emptied.returncode == 0, emptied.stderr
    users_git_still_works(user, project, branch)
    if mode == "worktree":
        cleaned = kapsis("cleanup", "--all", "--force")
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        assert not worktree.exists()


def test_root_bounds_the_worktree_it_makes_for_a_user(
    kapsis: Kapsis, user: RootlessUser, project: Path
) -> None:
    fill = (
        "dd if=/dev/zero of=/workspace/fill bs=1M count=120 2>&1; rm -f /workspace/fill; "
        "echo done > /workspace/result.txt"
    )
    result = kapsis.run(
        project, fill, "--network-mode", "none", "--mode", "worktree", "--disk", "48m",
        "--agent-id", "sudo-quota",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "No space left on device" in kapsis("logs", "sudo-quota").stdout
    record = kapsis.status("sudo-quota")
    assert record["disk_enforced"] and record["phase"] == "complete"
    worktree = Path(record["work_location"])
    assert worktree == disk_helper.mount_point(user.uid, "sudo-quota")
    assert user.run(["cat", str(worktree / "result.txt")]).stdout == "done\n"
    assert user.not_owned(worktree) == []
    cleaned = kapsis("cleanup", "--agent", "sudo-quota", "--force")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not worktree.exists()
    assert not (disk_helper.images_dir(disk_helper.STATE, user.uid) / "sudo-quota.img").exists()
