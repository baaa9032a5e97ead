"""The host-side git workflow with real sandboxes: branches, both workspace modes, commit, push.

Each test runs ``kapsis run`` on a real repository whose ``origin`` is a bare repository in the
test's tmp dir, then checks the branch, the commit and the remote with plain git, and that the
user's checkout (HEAD, index, working tree) is exactly as it was.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kapsis.errors import ExitCode

from .kapsis_runner import Kapsis

pytestmark = pytest.mark.integration


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    return bare


@pytest.fixture
def repo(tmp_path: Path, origin: Path) -> Path:
    root = tmp_path / "project"
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    git(root, "config", "user.name", "Ada Tester")
    git(root, "config", "user.email", "ada@example.test")
    (root / "src").mkdir()
    (root / "README.md").write_text("# sample\n")
    (root / "src" / "app.py").write_text("print('hello')\n")
    (root / "old.txt").write_text("to be deleted\n")
    (root / "ren.txt").write_text("to be renamed\n")
    (root / ".gitignore").write_text("build/\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    git(root, "remote", "add", "origin", str(origin))
    git(root, "push", "-q", "origin", "main")
    return root


def checkout_state(repo: Path) -> tuple[str, str, str, str]:
    """HEAD, the current branch, the index's bytes and the working tree's status."""
    index = hashlib.sha256((repo / ".git" / "index").read_bytes()).hexdigest()
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    return git(repo, "rev-parse", "HEAD"), git(repo, "branch", "--show-current"), index, status


def run_json(kapsis: Kapsis, repo: Path, task: str, *flags: str) -> dict[str, object]:
    result = kapsis.run(repo, task, "--json", *flags)
    assert result.stdout, result.stderr
    payload: dict[str, object] = json.loads(result.stdout)
    payload["returncode"] = result.returncode
    payload["stderr"] = result.stderr
    return payload


EDIT_TASK = (
    "set -e; echo 'more' >> README.md; rm old.txt; mv ren.txt renamed.txt; "
    "chmod +x src/app.py; ln -s README.md readme-link; echo new > new.txt; "
    "mkdir -p build && echo artefact > build/out.o; echo TOKEN=s3cret > .env; "
    "echo key > id_rsa"
)


def assert_edit_commit(repo: Path, branch: str) -> None:
    changes = git(repo, "diff", "--name-status", "-M", f"main..{branch}").splitlines()
    assert sorted(changes) == sorted(
        [
            "M\tREADME.md",
            "D\told.txt",
            "R100\tren.txt\trenamed.txt",
            "M\tsrc/app.py",
            "A\treadme-link",
            "A\tnew.txt",
        ]
    )
    assert git(repo, "ls-tree", branch, "src/app.py").startswith("100755 ")
    assert git(repo, "ls-tree", branch, "readme-link").startswith("120000 ")
    assert git(repo, "show", f"{branch}:README.md") == "# sample\nmore"
    assert git(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>", branch) == (
        "Ada Tester <ada@example.test>|Ada Tester <ada@example.test>"
    )


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_run_commits_every_kind_of_change_and_leaves_the_checkout_alone(
    kapsis: Kapsis, repo: Path, mode: str
) -> None:
    before = checkout_state(repo)
    result = run_json(kapsis, repo, EDIT_TASK, "--mode", mode, "--agent-id", f"edit-{mode}")
    assert result["returncode"] == 0, result["stderr"]
    branch = str(result["branch"])
    assert branch.startswith("kapsis/") and branch.endswith(f"-edit-{mode}")
    assert_edit_commit(repo, branch)
    assert sorted(result["excluded_paths"]) == [".env", "id_rsa"]  # type: ignore[arg-type]
    assert git(repo, "rev-parse", branch) == result["commit_sha"]
    assert checkout_state(repo) == before
    status = kapsis.status(f"edit-{mode}")
    assert status["commit_sha"] == result["commit_sha"]
    assert status["branch"] == branch


def test_worktree_keeps_the_agents_own_commits_and_is_a_real_worktree(
    kapsis: Kapsis, repo: Path
) -> None:
    task = (
        "set -e; echo step1 > one.txt; git add one.txt; git commit -q -m 'agent: step one'; "
        "echo uncommitted > two.txt"
    )
    result = run_json(kapsis, repo, task, "--mode", "worktree", "--branch", "feature/wt")
    assert result["returncode"] == 0, result["stderr"]
    subjects = git(repo, "log", "--format=%s|%an", "main..feature/wt").splitlines()
    assert len(subjects) == 2
    assert subjects[1] == "agent: step one|Kapsis agent shell"
    assert subjects[0].endswith("|Ada Tester")
    worktree = Path(str(kapsis.status(str(result["agent_id"]))["work_location"]))
    assert worktree.is_relative_to(kapsis.home / "worktrees")
    # A real worktree of the project on the agent's branch, clean after the host's commit.
    assert git(worktree, "branch", "--show-current") == "feature/wt"
    assert git(worktree, "status", "--porcelain") == ""


def test_rerun_on_an_existing_branch_continues_from_its_tip(kapsis: Kapsis, repo: Path) -> None:
    first = run_json(kapsis, repo, "echo one > notes.txt; rm old.txt", "--branch", "feature/loop")
    assert first["returncode"] == 0, first["stderr"]
    # The second run sees the branch's files (not the checkout's): notes.txt, and no old.txt.
    second = run_json(
        kapsis,
        repo,
        "set -e; test ! -e old.txt; cat notes.txt; echo two >> notes.txt",
        "--branch",
        "feature/loop",
    )
    assert second["returncode"] == 0, second["stderr"]
    assert git(repo, "show", "feature/loop:notes.txt") == "one\ntwo"
    log = git(repo, "log", "--format=%H", "main..feature/loop").splitlines()
    assert log == [second["commit_sha"], first["commit_sha"]]


def test_push_is_verified_and_a_diverged_remote_is_refused(
    kapsis: Kapsis, repo: Path, origin: Path, tmp_path: Path
) -> None:
    pushed = run_json(kapsis, repo, "echo v1 > feature.txt", "--branch", "feature/p", "--push")
    assert pushed["returncode"] == 0, pushed["stderr"]
    assert pushed["push_status"] == "pushed"
    assert git(origin, "rev-parse", "refs/heads/feature/p") == pushed["commit_sha"]

    # Someone else pushes to the same branch.
    other = tmp_path / "other-clone"
    subprocess.run(["git", "clone", "-q", "-b", "feature/p", str(origin), str(other)], check=True)
    (other / "theirs.txt").write_text("theirs\n")
    git(other, "add", ".")
    git(other, "-c", "user.name=O", "-c", "user.email=o@x.test", "commit", "-q", "-m", "theirs")
    git(other, "push", "-q", "origin", "feature/p")
    theirs = git(other, "rev-parse", "HEAD")

    refused = run_json(kapsis, repo, "echo v2 > feature.txt", "--branch", "feature/p", "--push")
    assert refused["returncode"] == ExitCode.PUSH_FAILED, refused["stderr"]
    assert refused["error_type"] == "push_diverged"
    assert git(origin, "rev-parse", "refs/heads/feature/p") == theirs  # not overwritten
    local = git(repo, "rev-parse", "feature/p")
    assert local == refused["commit_sha"]  # the local commit is kept
    assert git(repo, "show", "feature/p:feature.txt") == "v2"
    status = kapsis.status(str(refused["agent_id"]))
    assert status["push_status"] == "diverged"
    assert "push origin refs/heads/feature/p:refs/heads/feature/p" in status["push_command"]


def test_post_push_hook_url_becomes_the_pr_url(kapsis: Kapsis, repo: Path, tmp_path: Path) -> None:
    seen = tmp_path / "hook-env.txt"
    config = tmp_path / "run.yaml"
    config.write_text(
        "git:\n"
        "  auto_push: true\n"
        f"  post_push_hook: 'echo $KAPSIS_BRANCH $KAPSIS_COMMIT > {seen}; "
        "echo created https://git.example.test/pr/7'\n"
    )
    result = run_json(kapsis, repo, "echo x > x.txt", "--branch", "feature/h", "--config", config)
    assert result["returncode"] == 0, result["stderr"]
    assert result["pr_url"] == "https://git.example.test/pr/7"
    assert seen.read_text().split() == ["feature/h", result["commit_sha"]]
    assert kapsis.status(str(result["agent_id"]))["pr_url"] == "https://git.example.test/pr/7"


def test_eight_agents_in_parallel_get_eight_branches(kapsis: Kapsis, repo: Path) -> None:
    def one(index: int) -> dict[str, object]:
        mode = "worktree" if index % 2 else "overlay"
        return run_json(
            kapsis,
            repo,
            f"echo agent{index} > agent{index}.txt; echo {index} >> README.md",
            "--agent-id",
            f"par{index}",
            "--mode",
            mode,
            # Eight default disks (10g each) may not fit beside what else the machine holds.
            "--disk",
            "1g",
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    for index, result in enumerate(results):
        assert result["returncode"] == 0, result
        assert "lock" not in str(result["stderr"])
        branch = str(result["branch"])
        names = git(repo, "diff", "--name-only", f"main..{branch}").splitlines()
        assert sorted(names) == ["README.md", f"agent{index}.txt"]
    assert len({r["branch"] for r in results}) == 8


def test_cleanup_removes_worktrees_and_pushed_branches_only(kapsis: Kapsis, repo: Path) -> None:
    pushed = run_json(kapsis, repo, "echo a > a.txt", "--mode", "worktree", "--push")
    local = run_json(kapsis, repo, "echo b > b.txt", "--mode", "worktree")
    assert pushed["returncode"] == 0 and local["returncode"] == 0
    worktrees = [
        Path(str(kapsis.status(str(r["agent_id"]))["work_location"])) for r in (pushed, local)
    ]
    assert all(w.is_dir() for w in worktrees)
    result = kapsis("cleanup", "--branches")
    assert result.returncode == 0, result.stderr
    assert not any(w.exists() for w in worktrees)
    assert str(local["agent_id"]) not in git(repo, "worktree", "list")
    branches = git(repo, "branch", "--format=%(refname:short)").splitlines()
    assert str(pushed["branch"]) not in branches  # pushed: deleted
    assert str(local["branch"]) in branches  # unpushed commits: kept


def test_a_project_that_is_not_a_repository_keeps_changes_in_the_upper_dir(
    kapsis: Kapsis, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("a\n")
    result = run_json(kapsis, plain, "echo b > b.txt")
    assert result["returncode"] == 0, result["stderr"]
    assert result["branch"] is None and result["commit_sha"] is None
    upper = Path(str(kapsis.status(str(result["agent_id"]))["work_location"]))
    assert (upper / "b.txt").read_text() == "b\n"
    assert not (plain / "b.txt").exists()


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_the_agent_sees_one_branch_and_none_of_the_users_git_config(
    kapsis: Kapsis, repo: Path, mode: str
) -> None:
    git(repo, "config", "http.extraHeader", "Authorization: token users-secret-token")
    git(repo, "config", "credential.helper", "store")
    git(repo, "branch", "private-work")
    task = (
        "set -e; echo status=[$(git status --porcelain)]; "
        "echo head=$(git rev-parse --abbrev-ref HEAD); "
        "echo branches=$(git branch --format='%(refname:short)' | tr '\\n' ' '); "
        "echo remotes=[$(git remote)]; git config --list; cat /workspace/.git; "
        "git log --oneline -1"
    )
    result = kapsis.run(repo, task, "--mode", mode, "--branch", f"view/{mode}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "status=[]" in lines  # the copied index matches the files: a clean start
    assert f"head=view/{mode}" in lines
    assert f"branches=view/{mode}" in lines  # not main, not private-work
    assert "remotes=[]" in lines
    assert "users-secret-token" not in result.stdout
    assert "credential.helper" not in result.stdout
    assert "gitdir: /kapsis/git" in lines
    assert any(line.endswith(" initial") for line in lines)  # history is readable


# --- the user's uncommitted state at launch (filesystem.uncommitted) ------------------------

USER_AT_WORK_TASK = (
    "set -e; cat README.md; cat notes.txt 2>/dev/null || echo 'no notes.txt'; "
    "echo 'the agent line' >> src/app.py"
)


def user_at_work(repo: Path) -> None:
    (repo / "README.md").write_text("# sample\nthe user's unfinished line\n")
    (repo / "notes.txt").write_text("the user's untracked notes\n")


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_include_carries_the_users_state_as_its_own_commit_before_the_agents(
    kapsis: Kapsis, repo: Path, mode: str
) -> None:
    user_at_work(repo)
    before = checkout_state(repo)

    payload = run_json(kapsis, repo, USER_AT_WORK_TASK, "--mode", mode)

    assert payload["returncode"] == 0, payload["stderr"]
    branch = str(payload["branch"])
    carried = str(payload["carried_commit"])
    log = git(repo, "log", "--format=%H %s", "main.." + branch).splitlines()
    assert len(log) == 2
    assert log[1] == f"{carried} Uncommitted work of {getpass.getuser()} at launch"
    # The user's state is its own commit; the agent's holds only the agent's line.
    assert git(repo, "diff-tree", "-r", "--name-only", "--no-commit-id", carried).split() == [
        "README.md",
        "notes.txt",
    ]
    agent_diff = git(repo, "diff", carried, branch)
    assert "+the agent line" in agent_diff
    assert "unfinished" not in agent_diff and "notes" not in agent_diff
    notes = payload["notes"]
    assert isinstance(notes, list)
    assert any("uncommitted changes at launch (2 path(s))" in note for note in notes)
    assert checkout_state(repo) == before  # the user's checkout, index and files untouched


def test_exclude_leaves_the_users_state_out_of_the_agents_view_and_branch(
    kapsis: Kapsis, repo: Path, tmp_path: Path
) -> None:
    user_at_work(repo)
    before = checkout_state(repo)
    config = tmp_path / "exclude.yaml"
    config.write_text("filesystem:\n  uncommitted: exclude\n")

    result = kapsis.run(repo, USER_AT_WORK_TASK, "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert "the user's unfinished line" not in result.stdout  # README.md as committed
    assert "no notes.txt" in result.stdout  # the untracked file is hidden
    branch = next(
        line.split("new branch ", 1)[1].split()[0]
        for line in result.stderr.splitlines()
        if "new branch " in line
    )
    assert git(repo, "rev-parse", f"{branch}^") == git(repo, "rev-parse", "main")
    diff = git(repo, "diff", "main", branch)
    assert "+the agent line" in diff and "unfinished" not in diff and "notes" not in diff
    assert checkout_state(repo) == before
    # Control: with the default (include) the same task sees the user's files.
    seen = kapsis.run(repo, USER_AT_WORK_TASK)
    assert "the user's unfinished line" in seen.stdout and "no notes.txt" not in seen.stdout
