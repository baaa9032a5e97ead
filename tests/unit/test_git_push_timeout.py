"""A push to a remote that never answers is stopped at its time limit, helpers included."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kapsis.git.push import push_branch
from kapsis.git.runner import Repo


def test_a_hanging_transport_is_killed_at_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    repo_dir = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo_dir)], check=True)
    run = ["git", "-C", str(repo_dir), "-c", "user.name=A", "-c", "user.email=a@x.test"]
    subprocess.run([*run, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    # The user's own ssh command stands in for a network that never answers; it leaves a
    # grandchild (sleep) holding git's pipes, which is what used to make a timeout hang.
    marker = tmp_path / "ssh-started"
    subprocess.run([*run, "config", "core.sshCommand", f"touch {marker}; sleep 60 #"], check=True)
    subprocess.run([*run, "remote", "add", "origin", "ssh://git.invalid/repo.git"], check=True)
    repo = Repo.discover(repo_dir)
    assert repo is not None
    sha = subprocess.run(
        [*run, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()

    started = time.monotonic()
    outcome = push_branch(repo, "origin", "main", sha, timeout=1.0)
    elapsed = time.monotonic() - started

    assert marker.exists()  # the transport really ran (and hung)
    assert outcome.status == "failed"
    assert "longer than 1s" in outcome.message
    assert elapsed < 10
    assert outcome.retry_command is not None and "push origin" in outcome.retry_command
