"""An agent that plants git hooks and config must not get code run on the host.

The agent, in a real sandbox, writes every git trap it can reach: hooks and config (fsmonitor,
hooksPath, sshCommand, a filter driver) in its git directory, a fake ``.git`` in the overlay,
and a ``.gitattributes`` that routes files through a filter driver the *user's* config defines
(as git-lfs would). Each trap runs a command that creates a marker file at a host path the
sandbox cannot see. Then the host commits and pushes. No marker may appear; the controls run
plain git on the same planted files and show each trap does fire when git is used naively.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .test_git_workflow import git

pytestmark = pytest.mark.integration

HOOKS = (
    "pre-commit",
    "post-commit",
    "commit-msg",
    "reference-transaction",
    "pre-push",
    "post-checkout",
    "post-index-change",
    "fsmonitor-watchman",
)


def plant_task(marker_dir: Path, *, replace_dot_git: bool) -> str:
    trap = f"touch {marker_dir}/$(basename $0)-ran"
    lines = ["set -e", "G=/kapsis/git", "mkdir -p $G/hooks"]
    for hook in HOOKS:
        lines.append(f"printf '#!/bin/sh\\n{trap}\\n' > $G/hooks/{hook}; chmod +x $G/hooks/{hook}")
    lines += [
        f"git config core.fsmonitor 'touch {marker_dir}/fsmonitor-ran; false'",
        "git config core.hooksPath $G/hooks",
        f"git config core.sshCommand 'touch {marker_dir}/ssh-ran; ssh'",
        f"git config filter.evil.clean 'touch {marker_dir}/agent-filter-ran; cat'",
        f"git config diff.evil.textconv 'touch {marker_dir}/textconv-ran; cat'",
        "printf '* filter=evil diff=evil\\n' > .gitattributes",
        "echo changed >> README.md",
        "echo new > added.txt",
    ]
    if replace_dot_git:
        # In overlay mode /workspace/.git is the agent's own (upper dir): make it a full repo.
        lines += [
            "rm -f .git && mkdir -p .git/hooks",
            "cp -r $G/hooks/. .git/hooks/",
            "cp $G/config .git/config",
        ]
    else:
        # Worktree mode: .git is a read-only mount. (Not `! cmd`: set -e ignores a negated
        # command, so a write that succeeded would go unnoticed.)
        lines.append("if echo 'gitdir: /etc' > .git 2>/dev/null; then exit 97; fi")
    return "; ".join(lines)


@pytest.fixture
def trapped_repo(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A project whose user config defines a marker-writing filter driver, and its remote."""
    markers = tmp_path / "markers"
    markers.mkdir()
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    repo = tmp_path / "project"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    git(repo, "config", "user.name", "Ada Tester")
    git(repo, "config", "user.email", "ada@example.test")
    git(repo, "config", "filter.evil.clean", f"touch {markers}/user-filter-clean-ran; cat")
    git(repo, "config", "filter.evil.smudge", f"touch {markers}/user-filter-smudge-ran; cat")
    (repo / "README.md").write_text("# sample\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    git(repo, "remote", "add", "origin", str(origin))
    return repo, origin, markers


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_planted_hooks_and_config_never_run_on_the_host(
    kapsis: Kapsis, trapped_repo: tuple[Path, Path, Path], mode: str
) -> None:
    repo, origin, markers = trapped_repo
    task = plant_task(markers, replace_dot_git=mode == "overlay")
    result = kapsis.run(repo, task, "--mode", mode, "--branch", f"trap/{mode}", "--push", "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["push_status"] == "pushed"
    # The work did land: the agent's files are committed and pushed ...
    assert git(origin, "show", f"trap/{mode}:added.txt") == "new"
    assert git(origin, "show", f"trap/{mode}:.gitattributes") == "* filter=evil diff=evil"
    # ... and not one trap fired on the host.
    assert sorted(p.name for p in markers.iterdir()) == []

    # A second run continues the branch: the checkout of the agent's .gitattributes (worktree
    # mode) must not run the user's smudge filter either.
    again = kapsis.run(repo, "echo more >> added.txt", "--mode", mode, "--branch", f"trap/{mode}")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in markers.iterdir()) == []

    # Controls: the planted traps are real. Plain git with the agent's git directory runs its
    # hooks, and plain `git add` in the user's repo with the agent's .gitattributes runs the
    # user's filter driver.
    agent_id = outcome["agent_id"]
    agent_git = kapsis.home / "sandboxes" / agent_id / "agent-git"
    scratch = repo.parent / "control-worktree"
    scratch.mkdir()
    (scratch / "f.txt").write_text("x\n")
    # Git itself refuses a repository owned by another user; a naive host tool that trusts
    # it (safe.directory) and maps the sandbox path /kapsis/git to the host gets trapped.
    env_git = [
        "git",
        "-c",
        "safe.directory=*",
        f"--git-dir={agent_git}",
        f"--work-tree={scratch}",
    ]
    # The agent's alternates name a path inside the sandbox; point it at the real objects.
    (agent_git / "objects" / "info" / "alternates").write_text(f"{repo}/.git/objects\n")
    subprocess.run([*env_git, "status"], check=False, capture_output=True)
    assert (markers / "fsmonitor-ran").exists()
    subprocess.run([*env_git, "add", "f.txt"], check=False, capture_output=True)
    subprocess.run(
        [
            *env_git,
            "-c",
            f"core.hooksPath={agent_git}/hooks",
            "-c",
            "user.name=c",
            "-c",
            "user.email=c@x.test",
            "commit",
            "-qm",
            "c",
        ],
        check=False,
        capture_output=True,
    )
    assert (markers / "pre-commit-ran").exists()
    (repo / ".gitattributes").write_text("* filter=evil\n")
    (repo / "other.txt").write_text("y\n")
    git(repo, "add", "other.txt")
    assert (markers / "user-filter-clean-ran").exists()
