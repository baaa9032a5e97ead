"""Root on someone else's repository: host git runs as the repository's owner.

Needs root (to own nothing, and to switch uid); the owner is ``nobody``, which every Debian has.
The integration tests (test_root_on_user_repository.py) do the same through whole runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapsis.git.owner import RepoOwner, foreign_entries
from kapsis.git.runner import Repo
from kapsis.workspace.worktree import remove_worktree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to the owner needs root")


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A scratch dir the owner can reach (pytest's own tmp dirs are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kapsis-owner-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")


def _repo_owned_by(path: Path, account: pwd.struct_passwd) -> Repo:
    env = {"PATH": os.environ["PATH"], "HOME": str(path), "GIT_CONFIG_NOSYSTEM": "1"}
    for command in (
        ["git", "init", "-q", "-b", "main", str(path)],
        ["git", "-C", str(path), "-c", "user.name=U", "-c", "user.email=u@x", "commit", "-q",
         "--allow-empty", "-m", "init"],
    ):  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True)
    subprocess.run(["chown", "-R", f"{account.pw_uid}:{account.pw_gid}", str(path)], check=True)
    repo = Repo.discover(path)
    assert repo is not None
    return repo


def test_root_writes_into_a_users_repository_as_the_user(reachable: Path) -> None:
    account = _nobody()
    repo = _repo_owned_by(reachable / "project", account)

    assert repo.owner == RepoOwner(
        account.pw_uid,
        account.pw_gid,
        tuple(os.getgrouplist(account.pw_name, account.pw_gid)),
        account.pw_dir,
        account.pw_name,
    )
    head = repo.text("rev-parse", "HEAD")
    repo.run("update-ref", "refs/heads/kapsis/agent", head)
    blob = repo.text("hash-object", "-w", "--stdin", input=b"the agent's file\n")

    ref = repo.common_dir / "refs" / "heads" / "kapsis" / "agent"
    loose = repo.common_dir / "objects" / blob[:2] / blob[2:]
    for made in (ref, ref.parent, loose, loose.parent):
        assert made.stat().st_uid == account.pw_uid, made
    # The owner's own environment: their home, not root's.
    env = repo.environment()
    assert env["HOME"] == account.pw_dir and "XDG_CONFIG_HOME" not in env
    assert env["USER"] == env["LOGNAME"] == account.pw_name


def test_root_on_its_own_repository_stays_root(tmp_path: Path) -> None:
    """Control: a root-owned repository is written by root itself, as before."""
    repo = _repo_owned_by(tmp_path / "project", pwd.getpwuid(0))

    assert repo.owner is None
    assert repo.subprocess_options() == {}
    head = repo.text("rev-parse", "HEAD")
    repo.run("update-ref", "refs/heads/kapsis/agent", head)
    assert (repo.common_dir / "refs" / "heads" / "kapsis" / "agent").stat().st_uid == 0


def test_kapsis_own_files_are_written_by_root_even_on_a_users_repository(
    reachable: Path,
) -> None:
    """``as_owner=False``: the agent's index, in root's 0700 sandbox dir, which the owner
    could not reach."""
    account = _nobody()
    repo = _repo_owned_by(reachable / "project", account)
    private = reachable / "sandbox"
    private.mkdir(mode=0o700)
    index = private / "index"

    denied = repo.run("read-tree", "HEAD", env={"GIT_INDEX_FILE": str(index)}, check=False)
    assert denied.returncode != 0  # as the owner: no way into root's dir
    repo.run("read-tree", "HEAD", env={"GIT_INDEX_FILE": str(index)}, as_owner=False)
    assert index.stat().st_uid == 0


def test_a_users_worktree_is_deleted_by_the_user_never_through_their_symlinks(
    reachable: Path,
) -> None:
    """The user turns a parent of their worktree into a link to a directory of root's: root's
    delete would follow it; the user's own cannot delete anything there."""
    account = _nobody()
    owner = RepoOwner.for_uid(account.pw_uid)
    assert owner is not None
    victim = reachable / "roots"
    for attempt in ("as the owner", "as root (control)"):
        (victim / "project-abc123").mkdir(parents=True)
        (victim / "project-abc123" / "precious").write_text("root's\n")
        worktrees = reachable / "home" / ".kapsis" / "worktrees"
        worktrees.parent.mkdir(parents=True, exist_ok=True)
        worktrees.symlink_to(victim)  # where the user's worktrees dir was
        remove_worktree(
            None, worktrees / "project-abc123", owner if attempt == "as the owner" else None
        )
        survived = (victim / "project-abc123" / "precious").exists()
        assert survived == (attempt == "as the owner"), attempt
        worktrees.unlink()
        shutil.rmtree(victim, ignore_errors=True)


def test_a_swapped_mount_source_is_not_mounted(reachable: Path) -> None:
    """Root binds a worktree or project as planned: not a symlink put in its place, not a
    directory of another owner."""
    from kapsis.errors import SandboxError
    from kapsis.workspace.overlay import _idmapped

    account = _nobody()
    source = reachable / "worktree"
    source.mkdir()
    os.chown(source, account.pw_uid, account.pw_gid)
    target = reachable / "merged"
    with pytest.raises(SandboxError, match="replaced meanwhile"):
        _idmapped(str(reachable), str(target), 201000, 201000, planned_uid=account.pw_uid)
    link = reachable / "link"
    link.symlink_to(source)
    with pytest.raises(OSError):  # ELOOP: a symlink is never followed
        _idmapped(str(link), str(target), 201000, 201000, planned_uid=account.pw_uid)
    assert not os.path.ismount(target)


def test_a_shared_directory_is_opened_step_by_step_never_through_a_link_or_a_foreign_step(
    reachable: Path,
) -> None:
    """filesystem.share_ignored as root binds it: every step of the way is still the project
    owner's directory, the project included; a link or a directory of root's put in place of
    one after planning is not shared."""
    from kapsis.errors import SandboxError
    from kapsis.workspace.overlay import _open_beneath

    account = _nobody()
    project = reachable / "project"
    (project / "web" / "node_modules").mkdir(parents=True)
    subprocess.run(["chown", "-R", f"{account.pw_uid}:{account.pw_gid}", str(project)], check=True)
    os.close(_open_beneath(str(project), "web/node_modules", account.pw_uid))  # the control

    roots = reachable / "roots"
    (roots / "node_modules").mkdir(parents=True)
    swapped = reachable / "swapped"
    swapped.symlink_to(project)
    (project / "web").rename(project / "web-was")
    (project / "web").symlink_to(roots)
    for root, relative in ((str(project), "web/node_modules"), (str(swapped), "web-was")):
        with pytest.raises(SandboxError, match="no longer the directory"):
            _open_beneath(root, relative, account.pw_uid)
    (project / "web").unlink()
    (roots / "node_modules").rename(project / "web")  # root's own directory, moved in place
    with pytest.raises(SandboxError, match="no longer the directory"):
        _open_beneath(str(project), "web", account.pw_uid)


def test_a_read_only_bind_is_not_written_through(reachable: Path) -> None:
    """The base (shared by every agent of a project) is bound read-only: not even its mapped
    owner writes through the bind; the control is the same bind made writable."""
    from kapsis.workspace import _mountapi
    from kapsis.workspace.overlay import _idmapped

    account = _nobody()
    base = reachable / "base"
    base.mkdir()
    os.chown(base, account.pw_uid, account.pw_gid)
    agent = 201000  # the agent's host uid, as which the base's owner appears through the bind
    for read_only in (False, True):
        target = reachable / f"lower-{read_only}"
        _idmapped(str(base), str(target), agent, agent, account.pw_uid, read_only=read_only)
        try:
            written = subprocess.run(
                ["touch", str(target / "planted")], user=agent, group=agent, capture_output=True
            )
        finally:
            _mountapi.unmount(str(target))
        assert (written.returncode == 0) is not read_only, written.stderr
        assert (base / "planted").exists() is not read_only
        if read_only:
            assert b"Read-only file system" in written.stderr
        (base / "planted").unlink(missing_ok=True)


def test_files_of_roots_in_a_users_repository_are_found_before_a_run(reachable: Path) -> None:
    """An older Kapsis, run as root, left root-owned refs and object dirs in the user's .git;
    git as the user could not update them, so the run refuses up front and says how to fix."""
    account = _nobody()
    repo = _repo_owned_by(reachable / "project", account)
    assert foreign_entries(repo.common_dir, account.pw_uid) == []  # control: all theirs
    head = repo.text("rev-parse", "HEAD")
    left = repo.common_dir / "refs" / "heads" / "kapsis" / "old"
    left.parent.mkdir(parents=True)
    left.write_text(head + "\n")  # as root
    (repo.common_dir / "objects" / "ab").mkdir()

    found = foreign_entries(repo.common_dir, account.pw_uid)
    assert set(found) == {left.parent, left, repo.common_dir / "objects" / "ab"}
    assert foreign_entries(repo.common_dir, account.pw_uid, limit=1) in ([], found[:1])


def test_a_users_index_is_copied_for_the_agent_only_when_it_is_theirs(reachable: Path) -> None:
    """The agent's view starts from a copy of the checkout's index: root must not copy a file of
    root's that the user linked (or hard-linked) in its place."""
    from kapsis.workspace.gitview import _copy_index

    account = _nobody()
    repo = _repo_owned_by(reachable / "project", account)
    index = repo.git_dir / "index"
    repo.run("read-tree", "HEAD")  # the user's own index
    target = reachable / "agent-index"
    assert _copy_index(repo, index, target)  # control: theirs, copied
    assert target.read_bytes() == index.read_bytes()

    secret = reachable / "roots-file"
    secret.write_text("root's secret\n")
    index.unlink()
    index.symlink_to(secret)
    assert not _copy_index(repo, index, reachable / "copy-1")
    index.unlink()
    os.link(secret, index)
    assert not _copy_index(repo, index, reachable / "copy-2")
    assert not (reachable / "copy-1").exists() and not (reachable / "copy-2").exists()
