"""The agent's own commits, read from its git dir as untrusted data (kapsis.git.agent_commits)."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from kapsis.errors import GitWorkflowError
from kapsis.git.agent_commits import read_branch_tip
from kapsis.git.changes import blob_id, from_worktree
from kapsis.git.commit import CommitOutcome, CommitRequest, commit_workspace, tree_listing
from kapsis.git.runner import Repo
from kapsis.workspace.gitview import build_agent_git

from .gitrepo import (
    FileSpec,
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

# Any of the host's refusals of damaged agent history: unreadable, incomplete, or not on start.
REFUSED = "could not be read|incomplete|rewrote its branch"

BRANCH = "kapsis/agent-work-a1"
AGENT_NAME = "Kapsis agent claude"
AGENT_EMAIL = "a1@agents.kapsis.invalid"
BOT_NAME = "Kapsis Bot"
EXCLUDE = (".env", ".env.*", "*.pem", "id_rsa*")


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(
        tmp_path / "project",
        {
            ".gitignore": "build/\n",
            "README.md": "hello\n",
            "a.txt": "a1\n",
            "src/lib.py": "x = 1\n",
        },
    )


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


@pytest.fixture
def start(project: Path) -> str:
    sha = rev(project, "HEAD")
    git(project, "update-ref", f"refs/heads/{BRANCH}", sha)
    return sha


@dataclass
class Agent:
    """The agent's git dir (as the sandbox gets it) and its work tree, driven by plain git."""

    git_dir: Path
    work: Path

    def git(self, *args: str, input: bytes | None = None) -> str:
        return git(
            self.work,
            "-c",
            "core.hooksPath=/dev/null",
            f"--git-dir={self.git_dir}",
            f"--work-tree={self.work}",
            *args,
            input=input,
        )

    def commit(self, files: dict[str, FileSpec], message: str, remove: tuple[str, ...] = ()) -> str:
        for name in remove:
            self.git("rm", "-q", "--", name)
        write_files(self.work, files)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def set_tip(self, sha: str) -> None:
        (self.git_dir / "refs" / "heads" / BRANCH).write_text(f"{sha}\n")

    def object_file(self, oid: str) -> Path:
        return self.git_dir / "objects" / oid[:2] / oid[2:]


@pytest.fixture
def agent(repo: Repo, project: Path, start: str, tmp_path: Path) -> Agent:
    git_dir = tmp_path / "sandbox" / "git"
    build_agent_git(repo, git_dir, branch=BRANCH, start=start, agent="claude", agent_id="a1")
    # in the container the project's objects are at /kapsis/objects; on the host, here
    (git_dir / "objects" / "info" / "alternates").write_text(f"{repo.common_dir / 'objects'}\n")
    work = tmp_path / "agent-workspace"
    work.mkdir()
    agent = Agent(git_dir, work)
    agent.git("checkout-index", "-a", "-f")
    return agent


def save(repo: Repo, start: str, agent: Agent, **fields) -> CommitOutcome:
    changes = from_worktree(agent.work, tree_listing(repo, start))
    values = {
        "repo": repo,
        "branch": BRANCH,
        "start_commit": start,
        "message": "kapsis: the task\n",
        "committer_name": BOT_NAME,
        "committer_email": "bot@kapsis.example",
        "exclude": EXCLUDE,
        "scratch_name": "a1",
        "agent_git": agent.git_dir,
    }
    values.update(fields)
    return commit_workspace(CommitRequest(**values), changes)


def history(project: Path, start: str) -> list[str]:
    return git(project, "rev-list", f"{start}..refs/heads/{BRANCH}").split()


def new_objects(cwd: Path, start: str, tip: str) -> list[str]:
    listing = git(cwd, "rev-list", "--objects", tip, f"^{start}")
    return [line.split(" ", 1)[0] for line in listing.splitlines()]


def has_object(project: Path, oid: str) -> bool:
    return run_git(project, "cat-file", "-e", oid, check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# kept


def test_agents_commits_are_kept_and_no_host_commit_when_nothing_else_changed(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    first = agent.commit({"a.txt": "a2\n"}, "agent: edit a")
    second = agent.commit({"b.txt": "b\n"}, "agent: add b")
    assert not has_object(project, second)  # only in the agent's store so far

    outcome = save(repo, start, agent)

    assert (outcome.agent_commits, outcome.created_commit) == (2, False)
    assert outcome.commit_sha == second
    assert rev(project, f"refs/heads/{BRANCH}") == second
    assert history(project, start) == [second, first]
    authors = git(project, "log", "--format=%an <%ae>", f"{start}..{second}").splitlines()
    assert authors == [f"{AGENT_NAME} <{AGENT_EMAIL}>"] * 2
    assert git(project, "fsck", "--no-dangling", "--connectivity-only") == ""


def test_host_commit_goes_on_top_of_the_agents_commits_for_uncommitted_work(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    agent_tip = agent.commit({"a.txt": "a2\n"}, "agent: edit a")
    write_files(agent.work, {"later.txt": "not committed by the agent\n"})

    outcome = save(repo, start, agent)

    assert (outcome.agent_commits, outcome.created_commit) == (1, True)
    host = outcome.commit_sha
    assert rev(project, f"refs/heads/{BRANCH}") == host
    assert history(project, start) == [host, agent_tip]
    assert git(project, "rev-parse", f"{host}^") == agent_tip
    assert git(project, "log", "-1", "--format=%an", host) == BOT_NAME
    entries = tree(project, host)
    assert entries["a.txt"] == ("100644", b"a2\n")
    assert entries["later.txt"] == ("100644", b"not committed by the agent\n")


def test_agent_git_without_new_commits_gives_a_plain_host_commit(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    write_files(agent.work, {"a.txt": "edited\n"})

    outcome = save(repo, start, agent)

    assert (outcome.agent_commits, outcome.created_commit) == (0, True)
    assert git(project, "rev-parse", f"{outcome.commit_sha}^") == start


def test_agent_tip_in_packed_refs_is_read(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    tip = agent.commit({"a.txt": "a2\n"}, "agent: edit a")
    agent.git("pack-refs", "--all")
    assert not (agent.git_dir / "refs" / "heads" / BRANCH).exists()

    outcome = save(repo, start, agent)

    assert (outcome.agent_commits, outcome.commit_sha) == (1, tip)


def test_agent_ref_that_is_a_symlink_is_not_followed(
    repo: Repo, project: Path, start: str, agent: Agent, tmp_path: Path
) -> None:
    tip = agent.commit({"a.txt": "a2\n"}, "agent: edit a")
    elsewhere = tmp_path / "ref-elsewhere"
    elsewhere.write_text(f"{tip}\n")
    ref = agent.git_dir / "refs" / "heads" / BRANCH
    ref.unlink()
    ref.symlink_to(elsewhere)

    assert read_branch_tip(agent.git_dir, BRANCH) is None
    outcome = save(repo, start, agent)

    # the workspace is still committed, by the host, but the agent's commit is not taken
    assert outcome.agent_commits == 0
    assert git(project, "rev-parse", f"{outcome.commit_sha}^") == start
    assert outcome.commit_sha != tip


# Regression (a bug found while writing these tests, since fixed): read_branch_tip refuses a
# symlinked ref file but follows a symlinked directory on the way to it (refs/heads/kapsis -> any
# host dir), so the host reads a file of the agent's choosing outside the agent's git dir
def test_agent_ref_behind_a_symlinked_directory_is_not_followed(
    repo: Repo, project: Path, start: str, agent: Agent, tmp_path: Path
) -> None:
    tip = agent.commit({"a.txt": "a2\n"}, "agent: edit a")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    leaf = BRANCH.rsplit("/", 1)[1]
    (host_dir / leaf).write_text(f"{tip}\n")
    refs_dir = agent.git_dir / "refs" / "heads" / BRANCH.rsplit("/", 1)[0]
    shutil.rmtree(refs_dir)
    refs_dir.symlink_to(host_dir)

    assert read_branch_tip(agent.git_dir, BRANCH) is None


def test_agent_ref_with_garbage_is_ignored(tmp_path: Path) -> None:
    ref = tmp_path / "git" / "refs" / "heads" / "b"
    ref.parent.mkdir(parents=True)
    ref.write_text("../../../etc/passwd\n")
    assert read_branch_tip(tmp_path / "git", "b") is None
    ref.write_text("ref: refs/heads/main\n")
    assert read_branch_tip(tmp_path / "git", "b") is None
    ref.write_text("A" * 40 + "\n")  # upper case is not how git writes a ref
    assert read_branch_tip(tmp_path / "git", "b") is None


# ---------------------------------------------------------------------------------------------
# squashed


def test_agent_commit_with_an_excluded_file_is_squashed_out_of_history(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    agent.commit({".env": "TOKEN=secret\n", "a.txt": "a2\n"}, "agent: add config")
    agent.commit({"README.md": "hello agent\n"}, "agent: readme")

    outcome = save(repo, start, agent)

    assert outcome.squashed_agent_commits is True
    assert outcome.agent_commits == 2
    assert outcome.excluded == [".env"]
    assert outcome.created_commit is True
    tip = outcome.commit_sha
    assert history(project, start) == [tip]
    assert git(project, "rev-parse", f"{tip}^") == start
    assert (
        git(project, "log", "--format=", "--name-only", f"refs/heads/{BRANCH}").count(".env") == 0
    )
    entries = tree(project, tip)
    assert ".env" not in entries
    assert entries["a.txt"] == ("100644", b"a2\n")
    assert entries["README.md"] == ("100644", b"hello agent\n")
    assert "squashed" in git(project, "log", "-1", "--format=%B", tip)
    # The refused commits were checked in quarantine: the secret's blob never entered the
    # user's object store, not even as an unreachable object.
    secret_blob = blob_id(b"TOKEN=secret\n")
    probe = subprocess.run(
        ["git", "-C", str(project), "cat-file", "-e", secret_blob], capture_output=True
    )
    assert probe.returncode != 0


def test_excluded_file_committed_then_removed_still_squashes(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    agent.commit({"id_rsa": "KEY\n"}, "agent: oops")
    agent.commit({"a.txt": "a2\n"}, "agent: fix", remove=("id_rsa",))

    outcome = save(repo, start, agent)

    assert outcome.squashed_agent_commits is True
    assert outcome.excluded == ["id_rsa"]
    assert history(project, start) == [outcome.commit_sha]
    all_paths = git(project, "log", "--format=", "--name-only", f"refs/heads/{BRANCH}")
    assert "id_rsa" not in all_paths


def test_agent_commit_of_an_ignored_file_is_kept_without_squash(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    write_files(agent.work, {"build/keep.txt": "force-added\n"})
    agent.git("add", "-f", "build/keep.txt")
    tip = agent.commit({"a.txt": "a2\n"}, "agent: force-add a build file")

    outcome = save(repo, start, agent)

    assert outcome.commit_sha == tip
    assert tree(project, tip)["build/keep.txt"] == ("100644", b"force-added\n")


# Regression (a bug found while writing these tests, since fixed): when the agent's commits are
# squashed (they touched an excluded path), a file the agent force-added in a gitignored place is
# dropped as 'ignored', because only the start tree counts as tracked then; without the .env the
# same file is kept
def test_squash_keeps_files_the_agent_committed_in_ignored_places(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    write_files(agent.work, {"build/keep.txt": "force-added\n"})
    agent.git("add", "-f", "build/keep.txt")
    agent.commit({".env": "TOKEN=1\n"}, "agent: force-add a build file, and a secret")

    outcome = save(repo, start, agent)

    assert outcome.squashed_agent_commits is True
    assert outcome.ignored == []
    assert tree(project, outcome.commit_sha)["build/keep.txt"] == ("100644", b"force-added\n")


# ---------------------------------------------------------------------------------------------
# refused


def test_agent_tip_not_descending_from_start_is_refused(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    agent.commit({"a.txt": "a2\n"}, "agent: edit")
    orphan = agent.git("commit-tree", "HEAD^{tree}", "-m", "orphan")
    agent.set_tip(orphan)

    with pytest.raises(GitWorkflowError, match="does not descend"):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start


def test_agent_tip_that_is_not_a_commit_is_refused(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    blob = agent.git("hash-object", "-w", "--stdin", input=b"just a blob\n")
    agent.set_tip(blob)

    with pytest.raises(GitWorkflowError, match="not a commit"):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start


def test_missing_object_in_the_agents_store_is_refused(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    tip = agent.commit({"new.txt": "brand new content\n"}, "agent: add")
    blob = agent.git("rev-parse", f"{tip}:new.txt")
    agent.object_file(blob).unlink()

    with pytest.raises(GitWorkflowError, match=REFUSED):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start
    assert not has_object(project, tip)


def test_corrupt_object_in_the_agents_store_is_refused(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    tip = agent.commit({"new.txt": "brand new content\n"}, "agent: add")
    path = agent.object_file(tip)
    path.unlink()
    path.write_bytes(b"this is not zlib data at all")

    with pytest.raises(GitWorkflowError, match=REFUSED):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start


def test_object_whose_content_does_not_match_its_name_is_refused(
    repo: Repo, project: Path, start: str, agent: Agent
) -> None:
    tip = agent.commit({"new.txt": "brand new content\n"}, "agent: add")
    forged = (
        f"tree {git(project, 'rev-parse', f'{start}^{{tree}}')}\nparent {start}\n"
        f"author X <x@x> 0 +0000\ncommitter X <x@x> 0 +0000\n\nforged\n"
    ).encode()
    path = agent.object_file(tip)
    path.unlink()
    path.write_bytes(zlib.compress(b"commit %d\0" % len(forged) + forged))

    # index-pack names objects by their content, so the forged commit cannot pose as the tip
    with pytest.raises(GitWorkflowError, match=REFUSED):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start


# ---------------------------------------------------------------------------------------------
# objects of another repository


@pytest.fixture
def other_repo(project: Path, start: str, tmp_path: Path) -> tuple[Path, str]:
    """Another repository of the user's holding a commit on top of start, loose."""
    other = tmp_path / "other-repo"
    git(tmp_path, "clone", "-q", "--no-local", str(project), str(other))
    for key, value in (("user.name", "Other"), ("user.email", "o@x"), ("gc.auto", "0")):
        git(other, "config", key, value)
    commit = commit_files(other, {"private.txt": "the other repository's private file\n"})
    return other, commit


def plant_other_objects(agent: Agent, other: Path, start: str, commit: str, how: str) -> None:
    objects = other / ".git" / "objects"
    oids = new_objects(other, start, commit)
    agent_objects = agent.git_dir / "objects"
    if how == "objects-dir":
        shutil.rmtree(agent_objects)
        agent_objects.symlink_to(objects)
    elif how == "alternates":
        (agent_objects / "info" / "alternates").write_text(f"{objects}\n")
    elif how == "pack-dir":
        git(other, "repack", "-a", "-d", "-q")
        shutil.rmtree(agent_objects / "pack")
        (agent_objects / "pack").symlink_to(objects / "pack")
    else:
        for oid in oids:
            source = objects / oid[:2] / oid[2:]
            target = agent.object_file(oid)
            if how == "fan-out-dir":
                if not target.parent.is_symlink():
                    if target.parent.exists():
                        shutil.rmtree(target.parent)
                    target.parent.symlink_to(source.parent)
            elif how == "object-file":
                target.parent.mkdir(exist_ok=True)
                target.symlink_to(source)
            elif how == "copy":
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
            else:  # pragma: no cover
                raise AssertionError(how)
    agent.set_tip(commit)


@pytest.mark.parametrize(
    "how", ["fan-out-dir", "object-file", "pack-dir", "objects-dir", "alternates"]
)
def test_objects_reached_through_links_to_another_repository_are_not_imported(
    repo: Repo,
    project: Path,
    start: str,
    agent: Agent,
    other_repo: tuple[Path, str],
    how: str,
) -> None:
    other, commit = other_repo
    plant_other_objects(agent, other, start, commit, how)

    with pytest.raises(GitWorkflowError, match=REFUSED):
        save(repo, start, agent)

    assert rev(project, f"refs/heads/{BRANCH}") == start
    leaked = [oid for oid in new_objects(other, start, commit) if has_object(project, oid)]
    assert leaked == []


def test_control_the_same_objects_as_plain_files_are_imported(
    repo: Repo, project: Path, start: str, agent: Agent, other_repo: tuple[Path, str]
) -> None:
    other, commit = other_repo
    plant_other_objects(agent, other, start, commit, "copy")
    write_files(agent.work, {"private.txt": "the other repository's private file\n"})

    outcome = save(repo, start, agent)

    assert outcome.commit_sha == commit
    assert tree(project, commit)["private.txt"] == (
        "100644",
        b"the other repository's private file\n",
    )
