"""filesystem.hide: the hidden files are absent from the agent's view and never committed away.

Each test has its control: with no pattern (``hide=()``) the same step shows the file, or
commits the deletion, or carries the user's change.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kapsis.config.models import DEFAULT_HIDE
from kapsis.git.changes import from_worktree
from kapsis.git.commit import CommitRequest, commit_workspace, tree_listing
from kapsis.git.hidden import hide_rules, mark_skip_worktree, view_tree
from kapsis.git.runner import Repo
from kapsis.git.snapshot import working_state
from kapsis.workspace.delta import build_delta
from kapsis.workspace.hiding import hide_in_worktree, whiteout_hidden

from .gitrepo import discover, git, init_repo, is_whiteout, isolate_home, rev, run_git, tree

BRANCH = "kapsis/hide-a1"
FILES = {
    "README.md": "hello\n",
    ".env": "TOKEN=s3cret\n",
    "config/.env.production": "DB=secret\n",
    "config/app.yaml": "port: 1\n",
    "certs/server.pem": "-----BEGIN-----\n",
    ".aws/credentials": "[default]\n",
    "deploy/.docker/config.json": "{}\n",
    ".docker/config.json": "{}\n",
    "keep.pem": "public\n",
}
PATTERNS = (*DEFAULT_HIDE, "!keep.pem")
HIDDEN = [
    ".aws/credentials",
    ".docker/config.json",
    ".env",
    "certs/server.pem",
    "config/.env.production",
]


@pytest.fixture(autouse=True)
def _git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "project", FILES)


@pytest.fixture
def repo(project: Path) -> Repo:
    return discover(project)


def objects_in(project: Path) -> str:
    return git(project, "count-objects", "-v")


def test_patterns_are_read_as_gitignore_lines_by_git(repo: Repo, project: Path) -> None:
    with hide_rules(PATTERNS) as rules:
        # .aws/ hides a folder anywhere; .docker/config.json (a slash inside) only at the top;
        # !keep.pem is an exception to *.pem.
        assert rules.tracked(repo, "HEAD") == HIDDEN
        assert rules.matching(["a/b/.env", "x.key", "src/main.py", "keep.pem"]) == {
            "a/b/.env",
            "x.key",
        }
    with hide_rules(()) as nothing:
        assert nothing.tracked(repo, "HEAD") == []


def test_the_view_tree_lacks_the_hidden_files_and_the_repository_gains_no_object(
    repo: Repo, project: Path
) -> None:
    before = objects_in(project)
    with hide_rules(PATTERNS) as rules:
        hidden = rules.tracked(repo, "HEAD")
        view, env = view_tree(repo, rules, "HEAD", hidden)
        listing = repo.run("ls-tree", "-r", "-t", "--name-only", view, env=env, as_owner=False)
    names = listing.stdout.decode().split()
    assert not set(HIDDEN) & set(names)
    assert "certs" not in names and ".aws" not in names  # emptied folders go too
    assert "config/app.yaml" in names and "keep.pem" in names
    assert objects_in(project) == before


def test_the_delta_whites_out_each_hidden_file_and_emptied_folder(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    head = rev(project, "HEAD")
    assert head is not None
    with hide_rules(PATTERNS) as rules:
        view, env = view_tree(repo, rules, head, rules.tracked(repo, head))
        build_delta(repo, head, view, tmp_path / "delta", tree_env=env)
    delta = tmp_path / "delta"
    for path in (".env", "config/.env.production", ".docker", "certs", ".aws"):
        assert is_whiteout(delta / path), path
    assert not (delta / "keep.pem").exists() and not (delta / "README.md").exists()
    # Control: with no pattern the view is the commit itself, and the delta is empty.
    build_delta(repo, head, head, tmp_path / "plain")
    assert list((tmp_path / "plain").iterdir()) == []


def test_a_project_that_is_no_repository_gets_whiteouts_above_it(tmp_path: Path) -> None:
    folder = tmp_path / "plain-project"
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "link.pem").symlink_to("/etc/hostname")
    # A repository nested in it: git's own walk would not enter it.
    init_repo(folder / "vendor" / "lib", {"README": "lib\n"})
    (folder / "vendor" / "lib" / ".env").write_text("NESTED=secret\n")
    delta = tmp_path / "delta"
    delta.mkdir()
    with hide_rules(PATTERNS) as rules:
        count = whiteout_hidden(folder, delta, rules)
    made = sorted(str(p.relative_to(delta)) for p in delta.rglob("*") if is_whiteout(p))
    assert made == [
        ".aws",
        ".docker/config.json",
        ".env",
        "certs/server.pem",
        "config/.env.production",
        "link.pem",
        "vendor/lib/.env",
    ]
    assert count == len(made)
    assert stat.S_ISCHR((delta / ".env").lstat().st_mode)


def commit(repo: Repo, start: str, worktree: Path, hide: tuple[str, ...]) -> tuple[str, list[str]]:
    changes = from_worktree(worktree, tree_listing(repo, start))
    outcome = commit_workspace(
        CommitRequest(
            repo=repo,
            branch=BRANCH,
            start_commit=start,
            message="work\n",
            committer_name="Bot",
            committer_email="bot@example.test",
            exclude=(),
            scratch_name="a1",
            hide=hide,
        ),
        changes,
    )
    assert outcome.commit_sha is not None
    return outcome.commit_sha, outcome.hidden


@pytest.mark.parametrize("hide", [PATTERNS, ()], ids=["hidden", "control"])
def test_the_commit_keeps_hidden_files_the_agent_could_not_see(
    repo: Repo, project: Path, tmp_path: Path, hide: tuple[str, ...]
) -> None:
    start = rev(project, "HEAD")
    assert start is not None
    git(project, "update-ref", f"refs/heads/{BRANCH}", start)
    worktree = tmp_path / "worktree"
    git(project, "worktree", "add", "-q", str(worktree), BRANCH)
    with hide_rules(hide) as rules:
        hidden = rules.tracked(repo, start)
    hide_in_worktree(worktree, hidden)
    assert all(not (worktree / path).exists() for path in hidden)
    assert not (worktree / "certs").exists() if hide else (worktree / "certs").exists()
    # The user's git sees nothing deleted in the worktree.
    assert git(worktree, "status", "--porcelain") == ""
    # The agent: removes a folder that held a hidden file, writes where one is hidden.
    git(worktree, "rm", "-r", "-q", "--ignore-unmatch", "config")
    (worktree / ".env").write_text("TOKEN=the-agents\n")
    (worktree / "notes.txt").write_text("work\n")

    sha, left_out = commit(repo, start, worktree, hide)
    committed = tree(project, sha)
    assert committed["notes.txt"][1] == b"work\n"
    assert "config/app.yaml" not in committed
    if hide:
        assert left_out == [".env"]
        for path in HIDDEN:
            assert committed[path][1] == FILES[path].encode(), path
    else:
        assert committed[".env"][1] == b"TOKEN=the-agents\n"
        assert "config/.env.production" not in committed


@pytest.mark.parametrize("hide", [PATTERNS, ()], ids=["hidden", "control"])
def test_the_users_uncommitted_secrets_are_not_carried(
    repo: Repo, project: Path, hide: tuple[str, ...]
) -> None:
    (project / ".env").write_text("TOKEN=changed-by-the-user\n")
    (project / "new.key").write_text("private\n")
    (project / "notes.md").write_text("mine\n")
    head = rev(project, "HEAD")
    assert head is not None
    state = working_state(repo, head, hide)
    assert sorted(state.changed) == (["notes.md"] if hide else [".env", "new.key", "notes.md"])


def test_the_agents_index_marks_hidden_files_skip_worktree(
    repo: Repo, project: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    repo.run("read-tree", "HEAD", env={"GIT_INDEX_FILE": str(index)}, as_owner=False)
    mark_skip_worktree(repo, [".env"], index)
    listed = repo.run("ls-files", "-t", env={"GIT_INDEX_FILE": str(index)}).stdout.decode()
    assert "S .env" in listed.splitlines() and "H README.md" in listed.splitlines()


@pytest.mark.parametrize("hide", [PATTERNS, ()], ids=["hidden", "control"])
def test_an_untracked_hidden_file_never_enters_the_object_store(
    repo: Repo, project: Path, hide: tuple[str, ...]
) -> None:
    """The agent's git view reads the project's objects: a secret hashed into them by the
    carry would be readable with `git cat-file --batch-all-objects`."""
    (project / "secrets").mkdir()
    (project / "secrets" / "prod.env").write_text("TOKEN=never-hashed\n")
    (project / ".env.local").write_text("TOKEN=never-hashed-either\n")
    (project / "notes.md").write_text("mine\n")
    head = rev(project, "HEAD")
    assert head is not None
    blobs = [
        git(project, "hash-object", str(project / name))
        for name in ("secrets/prod.env", ".env.local")
    ]
    patterns = (*hide, "secrets/") if hide else ()
    state = working_state(repo, head, patterns)
    stored = [
        run_git(project, "cat-file", "-e", blob, check=False).returncode == 0 for blob in blobs
    ]
    if hide:
        assert state.changed == ("notes.md",)
        assert stored == [False, False]
    else:
        assert stored == [True, True]
