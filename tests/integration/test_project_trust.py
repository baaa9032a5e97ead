"""A project's own files cannot widen its sandbox or run host commands without the user's trust.

With real sandboxes: an agent writes ``agent-sandbox.yaml`` with a host hook and open network;
the run that made it says so; the next run from its worktree, and from the project after the
branch is merged, is refused before anything is made; trusted, the same file runs and its hook
runs once; changed by one byte it is refused again. And ``filesystem.hide``: a tracked ``.env``
is absent inside the sandbox in both workspace modes, rootful and rootless, and the commit
keeps it (control: with ``hide: []`` trusted, the agent reads it).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from kapsis.errors import ExitCode

from .kapsis_runner import Kapsis
from .repos import git, one_commit_repository
from .rootless_user import RootlessUser

pytestmark = pytest.mark.integration

SECRET = "TOKEN=s3cret-never-in-the-sandbox"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with a tracked .env and a key, and a bare origin to push to."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    root = one_commit_repository(tmp_path / "project")
    (root / ".env").write_text(SECRET + "\n")
    (root / "config").mkdir()
    (root / "config" / "app.yaml").write_text("port: 1\n")
    (root / "config" / "prod.key").write_text("private\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "secrets")
    git(root, "remote", "add", "origin", str(origin))
    return root


def run_json(kapsis: Kapsis, project: Path, task: str, *flags: str) -> dict[str, object]:
    result = kapsis.run(project, task, "--json", "--network-mode", "none", *flags)
    payload: dict[str, object] = json.loads(result.stdout) if result.stdout else {}
    payload["returncode"] = result.returncode
    payload["stderr"] = result.stderr
    return payload


def new_branch(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if "new branch " in line)
    return line.split("new branch ", 1)[1].split()[0]


def agent_config(hook_log: Path) -> str:
    return (
        "git:\n"
        "  auto_push: true\n"
        f"  post_push_hook: 'echo ran >> {hook_log}'\n"
        "network:\n"
        "  mode: open\n"
    )


def sandboxes(kapsis: Kapsis) -> list[str]:
    folder = kapsis.home / "sandboxes"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def refused_before_anything(kapsis: Kapsis, project: Path, hook_log: Path) -> str:
    before = sandboxes(kapsis)
    result = kapsis("run", str(project), "--image", kapsis.image, "--task", "echo x > x.txt")
    assert result.returncode == ExitCode.USAGE, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "agent-sandbox.yaml:" in line and f"kapsis trust {project}" in line
    assert not hook_log.exists()
    assert sandboxes(kapsis) == before
    return line


def test_an_agent_written_config_is_refused_until_trusted_and_again_once_changed(
    kapsis: Kapsis, repo: Path, tmp_path: Path
) -> None:
    hook_log = tmp_path / "hook.log"
    written = agent_config(hook_log).replace("'", "'\\''")
    made = run_json(
        kapsis, repo, f"printf '%s' '{written}' > agent-sandbox.yaml", "--mode", "worktree"
    )
    assert made["returncode"] == 0, made["stderr"]
    notes = made["notes"]
    assert isinstance(notes, list)
    assert "the agent changed agent-sandbox.yaml: review it before trusting it" in notes
    agent_id = str(made["agent_id"])
    assert any("agent-sandbox.yaml" in note for note in kapsis.status(agent_id)["notes"])
    branch = str(made["branch"])
    worktree = kapsis.home / "worktrees" / f"{repo.name}-{agent_id}"
    assert (worktree / "agent-sandbox.yaml").read_text() == agent_config(hook_log)

    # The next run from the agent's worktree, then from the project once the branch is merged.
    line = refused_before_anything(kapsis, worktree, hook_log)
    assert line.startswith(f"kapsis: error: {worktree / 'agent-sandbox.yaml'}:2: git.auto_push")
    git(repo, "merge", "-q", "--ff-only", branch)
    refused_before_anything(kapsis, repo, hook_log)

    # Trusted as it is: it runs, pushes, and its hook runs once.
    trusted = kapsis("trust", str(repo))
    assert trusted.returncode == 0, trusted.stderr
    assert "git.post_push_hook" in trusted.stdout and "network.mode" in trusted.stdout
    ran = kapsis.run(repo, "echo x > x.txt", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["push_status"] == "pushed"
    assert hook_log.read_text() == "ran\n"

    # One byte more and it is untrusted again.
    config = repo / "agent-sandbox.yaml"
    config.write_text(config.read_text() + "#")
    hook_log.unlink()
    refused_before_anything(kapsis, repo, hook_log)


def test_trust_cannot_be_borrowed_by_a_copy_elsewhere(
    kapsis: Kapsis, repo: Path, tmp_path: Path
) -> None:
    hook_log = tmp_path / "hook.log"
    (repo / "agent-sandbox.yaml").write_text(agent_config(hook_log))
    assert kapsis("trust", str(repo)).returncode == 0
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(repo), str(other)], check=True)
    (other / "agent-sandbox.yaml").write_text(agent_config(hook_log))
    refused_before_anything(kapsis, other, hook_log)


READ_SECRET = (
    "test -e .env && echo present || echo absent; cat .env config/prod.key 2>&1; ls -a config; "
    "git status --porcelain; echo work > notes.txt"
)


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_a_tracked_env_file_is_absent_inside_and_the_commit_keeps_it(
    kapsis: Kapsis, repo: Path, mode: str
) -> None:
    result = kapsis.run(repo, READ_SECRET, "--network-mode", "none", "--mode", mode)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "absent" in out and "s3cret" not in out and "private" not in out
    assert "app.yaml" in out
    assert " D " not in out and "D .env" not in out  # the agent's git sees nothing deleted
    branch = new_branch(result.stderr)
    assert git(repo, "diff", "--name-status", f"main..{branch}") == "A\tnotes.txt"
    assert git(repo, "show", f"{branch}:.env") == SECRET


def test_control_with_hide_emptied_and_trusted_the_agent_reads_it(
    kapsis: Kapsis, repo: Path
) -> None:
    (repo / ".kapsis").mkdir()
    (repo / ".kapsis" / "config.yaml").write_text("filesystem:\n  hide: []\n")
    refused = kapsis.run(repo, "cat .env", "--network-mode", "none")
    assert refused.returncode == ExitCode.USAGE and "filesystem.hide" in refused.stderr
    assert kapsis("trust", str(repo)).returncode == 0
    result = kapsis.run(repo, READ_SECRET, "--network-mode", "none")
    assert result.returncode == 0, result.stderr
    assert "present" in result.stdout and SECRET in result.stdout


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_rootless_a_tracked_env_file_is_absent_inside(user: RootlessUser, mode: str) -> None:
    project = user.make_repository(user.home / "projects" / f"hide-{mode}-{secrets.token_hex(3)}")
    made = user.run(
        ["sh", "-c", f"cd {project} && echo '{SECRET}' > .env && git add .env && "
         "git commit -q -m secret"]
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    result = user.kapsis(
        "run", str(project), "--task", READ_SECRET, "--network-mode", "none", "--mode", mode,
        env={"KAPSIS_NO_SERVER": "1"}, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "absent" in result.stdout and "s3cret" not in result.stdout
    branch = new_branch(result.stderr)
    shown = user.run(["git", "-C", str(project), "show", f"{branch}:.env"])
    assert shown.stdout.strip() == SECRET
