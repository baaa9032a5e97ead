"""The in-pod clone and finishing steps, with real git against local bare repositories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import SandboxError
from kapsis.k8s.inpod import clone as clone_step, finish as finish_step
from kapsis.k8s.inpod.credentials import prepare
from kapsis.k8s.layout import STEP_CONFIG_ENV, StepConfig
from kapsis.k8s.names import AGENT_EXIT_ANNOTATION, AGENT_FAILURE_ANNOTATION

ENV = {
    "GIT_AUTHOR_NAME": "T",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "T",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def git(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"git {args}: {result.stderr}")
    return result.stdout.strip()


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    bare = tmp_path / "remote.git"
    git("init", "--bare", "-b", "main", str(bare))
    work = tmp_path / "seed"
    git("clone", str(bare), str(work))
    (work / "README.md").write_text("hello\n")
    (work / ".gitignore").write_text("*.log\n")
    git("add", "-A", cwd=work)
    git("commit", "-m", "seed", cwd=work)
    git("push", "origin", "HEAD:main", cwd=work)
    git("checkout", "-b", "dev", cwd=work)
    (work / "dev.txt").write_text("dev\n")
    git("add", "-A", cwd=work)
    git("commit", "-m", "dev", cwd=work)
    git("push", "origin", "dev", cwd=work)
    return bare


def _config(url: Path | str, **overrides: Any) -> StepConfig:
    values: dict[str, Any] = {
        "request": "t1",
        "url": str(url),
        "branch": "kapsis/t1",
        "message": "shell: task\n",
        "exclude": (".env",),
        "wait_timeout_seconds": 20,
        **overrides,
    }
    return StepConfig(**values)


class Pod:
    """The Pod's volumes as directories."""

    def __init__(self, root: Path) -> None:
        self.workspace = root / "workspace"
        self.trusted = root / "kapsis"
        self.secret = root / "secret"
        self.annotations = root / "pod-info" / "annotations"
        self.log = root / "termination-log"
        for path in (self.workspace, self.trusted, self.secret, self.annotations.parent):
            path.mkdir(parents=True)

    def clone(self, config: StepConfig, scratch: Path) -> dict[str, str]:
        return clone_step.clone(
            config,
            workspace=self.workspace,
            trusted_volume=self.trusted,
            secret_dir=self.secret,
            scratch=scratch,
            agent_uid=os.getuid(),
            finisher_uid=os.getuid(),
        )

    def finish(
        self, config: StepConfig, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[int, dict[str, Any]]:
        monkeypatch.setenv(STEP_CONFIG_ENV, config.to_env())
        code = finish_step.main(
            [
                "--workspace", str(self.workspace),
                "--trusted", str(self.trusted),
                "--credentials", str(self.secret),
                "--annotations", str(self.annotations),
                "--termination-log", str(self.log),
                "--poll", "0.05",
            ]
        )  # fmt: skip
        return code, json.loads(self.log.read_text())

    def annotate(self, exit_code: int, failure: str | None = None) -> None:
        reported = f'{AGENT_FAILURE_ANNOTATION}="{failure}"\n' if failure else ""
        self.annotations.write_text(
            f'kubernetes.io/config.seen="x"\n{AGENT_EXIT_ANNOTATION}="{exit_code}"\n' + reported
        )


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    return Pod(tmp_path / "pod")


def test_clone_makes_the_trusted_repo_and_the_agents_workspace(
    remote: Path, pod: Pod, tmp_path: Path
) -> None:
    state = pod.clone(_config(remote), tmp_path / "scratch")
    main = git("rev-parse", "main", cwd=remote)
    assert state == {"branch": "kapsis/t1", "start": main, "source": "origin/HEAD"}
    assert git("rev-parse", "refs/heads/kapsis/t1", cwd=pod.trusted / "repo") == main
    assert git("symbolic-ref", "HEAD", cwd=pod.workspace) == "refs/heads/kapsis/t1"
    assert (pod.workspace / "README.md").read_text() == "hello\n"
    assert git("remote", "get-url", "origin", cwd=pod.workspace) == str(remote)
    # The agent's objects are its own copy, not links into the trusted repository.
    assert not (pod.workspace / ".git" / "objects" / "info" / "alternates").exists()
    assert json.loads((pod.trusted / "state.json").read_text())["start"] == main


def test_clone_continues_an_existing_branch_and_honours_base_branch(
    remote: Path, tmp_path: Path
) -> None:
    continued = Pod(tmp_path / "a").clone(_config(remote, branch="dev"), tmp_path / "s1")
    assert continued["start"] == git("rev-parse", "dev", cwd=remote)
    assert continued["source"] == "origin/dev (continued)"
    based = Pod(tmp_path / "b").clone(_config(remote, base_branch="dev"), tmp_path / "s2")
    assert based["source"] == "origin/dev"
    with pytest.raises(SandboxError, match="no branch 'nope'"):
        Pod(tmp_path / "c").clone(_config(remote, base_branch="nope"), tmp_path / "s3")


def test_token_reaches_git_only_through_the_helper(remote: Path, pod: Pod, tmp_path: Path) -> None:
    token = "ghp_secretTOKEN123"
    (pod.secret / "token").write_text(token + "\n")
    config = _config(remote, credentials="token")
    credentials = prepare(config, pod.secret, tmp_path / "scratch")
    settings = [arg for item in credentials.config() for arg in ("-c", item)]
    answer = subprocess.run(
        ["git", *settings, "credential", "fill"],
        input="protocol=https\nhost=git.example.com\n\n",
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, **credentials.env},
        check=True,
    ).stdout
    assert f"password={token}\n" in answer
    assert "username=x-access-token\n" in answer
    pod.clone(config, tmp_path / "scratch2")
    for root in (pod.workspace, pod.trusted):
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def test_ssh_key_is_private_and_host_keys_are_strict(pod: Pod, tmp_path: Path) -> None:
    config = _config("git@git.example.com:team/repo.git", credentials="ssh")
    with pytest.raises(SandboxError, match="ssh-privatekey"):
        prepare(config, pod.secret, tmp_path / "scratch")
    (pod.secret / "ssh-privatekey").write_text("KEY\n")
    (pod.secret / "known_hosts").write_text("git.example.com ssh-ed25519 AAAA\n")
    pod.secret.joinpath("ssh-privatekey").chmod(0o444)
    credentials = prepare(config, pod.secret, tmp_path / "scratch")
    assert credentials.ssh_command is not None
    assert "StrictHostKeyChecking=yes" in credentials.ssh_command
    assert f"UserKnownHostsFile={pod.secret / 'known_hosts'}" in credentials.ssh_command
    key = tmp_path / "scratch" / "id_key"
    assert key.read_text() == "KEY\n"
    assert key.stat().st_mode & 0o777 == 0o600


def test_finish_commits_pushes_and_verifies(
    remote: Path, pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(remote)
    pod.clone(config, tmp_path / "scratch")
    # The agent works: edits, a commit of its own, a new file, a secret and a log it leaves.
    (pod.workspace / "README.md").write_text("hello, world\n")
    git("commit", "-am", "agent: readme", cwd=pod.workspace)
    (pod.workspace / "new.py").write_text("print(1)\n")
    (pod.workspace / ".env").write_text("TOKEN=x\n")
    (pod.workspace / "debug.log").write_text("noise\n")
    # The operator annotates the Pod a moment later.
    timer = threading.Timer(0.3, pod.annotate, args=(0,))
    timer.start()
    started = time.monotonic()
    code, result = pod.finish(config, monkeypatch)
    timer.join()
    assert time.monotonic() - started >= 0.3  # it did wait for the annotation
    assert code == 0, result
    assert result["pushStatus"] == "verified"
    assert result["branch"] == "kapsis/t1"
    remote_sha = git("rev-parse", "refs/heads/kapsis/t1", cwd=remote)
    assert result["commitSha"] == remote_sha
    files = git("ls-tree", "-r", "--name-only", remote_sha, cwd=remote).splitlines()
    assert "new.py" in files and ".env" not in files and "debug.log" not in files
    log = git("log", "--format=%s", remote_sha, cwd=remote).splitlines()
    assert log[:2] == ["shell: task", "agent: readme"]  # the agent's commit is kept
    assert "excluded" in result["message"]


def test_a_failed_agent_is_committed_but_not_pushed(
    remote: Path, pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(remote)
    pod.clone(config, tmp_path / "scratch")
    (pod.workspace / "half.txt").write_text("half done\n")
    pod.annotate(3)
    code, result = pod.finish(config, monkeypatch)
    assert code == 0
    assert result["commitSha"] and result["pushStatus"] == "skipped"
    assert "exited 3" in result["message"]
    assert git("ls-remote", str(remote), "refs/heads/kapsis/t1") == ""


def test_an_agent_whose_output_says_it_failed_is_committed_but_not_pushed(
    remote: Path, pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 0, and the operator found a failure sign in its log (Aider's way)."""
    config = _config(remote)
    pod.clone(config, tmp_path / "scratch")
    (pod.workspace / "half.txt").write_text("half done\n")
    pod.annotate(0, failure="aider could not reach its model: litellm.APIConnectionError")
    code, result = pod.finish(config, monkeypatch)
    assert code == 0
    assert result["commitSha"] and result["pushStatus"] == "skipped"
    assert "aider could not reach its model" in result["message"]
    assert git("ls-remote", str(remote), "refs/heads/kapsis/t1") == ""


def test_no_annotation_means_no_commit(
    remote: Path, pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(remote, wait_timeout_seconds=1)
    pod.clone(config, tmp_path / "scratch")
    (pod.workspace / "x.txt").write_text("x\n")
    code, result = pod.finish(config, monkeypatch)
    assert code == 1
    assert result["pushStatus"] == "failed" and result["commitSha"] is None
    assert AGENT_EXIT_ANNOTATION in result["message"]
    assert git("ls-remote", str(remote), "refs/heads/kapsis/t1") == ""


def _plant(workspace: Path, markers: Path) -> list[str]:
    """Everything an agent could plant in its git view to run code in a later git command."""
    markers.mkdir()
    names = []
    hooks = workspace / ".git" / "hooks"
    for hook in ("pre-commit", "post-commit", "pre-push", "reference-transaction", "pre-auto-gc"):
        (hooks / hook).write_text(f"#!/bin/sh\ntouch {markers}/hook-{hook}\n")
        (hooks / hook).chmod(0o755)
        names.append(f"hook-{hook}")
    fsmonitor = workspace / ".git" / "fsmonitor.sh"
    fsmonitor.write_text(f"#!/bin/sh\ntouch {markers}/fsmonitor\n")
    fsmonitor.chmod(0o755)
    helper = workspace / ".git" / "helper.sh"
    helper.write_text(f"#!/bin/sh\ntouch {markers}/credential-helper\n")
    helper.chmod(0o755)
    git("config", "core.fsmonitor", str(fsmonitor), cwd=workspace)
    git("config", "credential.helper", str(helper), cwd=workspace)
    git("config", "filter.evil.clean", f"sh -c 'touch {markers}/filter; cat'", cwd=workspace)
    (workspace / ".gitattributes").write_text("*.txt filter=evil\n")
    (workspace / "work.txt").write_text("the agent's work\n")
    return [*names, "fsmonitor", "credential-helper", "filter"]


def test_planted_hooks_fsmonitor_helpers_and_filters_never_run(
    remote: Path, pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(remote)
    pod.clone(config, tmp_path / "scratch")
    control_markers = tmp_path / "control-markers"
    markers = tmp_path / "markers"
    planted = _plant(pod.workspace, markers)

    # Control: in a copy of the same workspace, ordinary git runs every planted program.
    control = tmp_path / "control"
    shutil.copytree(pod.workspace, control, symlinks=True)
    for path in [control / ".git" / "config", *(control / ".git" / "hooks").iterdir()]:
        path.write_text(path.read_text().replace(str(markers), str(control_markers)))
    for name in ("fsmonitor.sh", "helper.sh"):
        script = control / ".git" / name
        script.write_text(script.read_text().replace(str(markers), str(control_markers)))
    git("config", "core.fsmonitor", str(control / ".git" / "fsmonitor.sh"), cwd=control)
    git("config", "credential.helper", str(control / ".git" / "helper.sh"), cwd=control)
    control_markers.mkdir()
    git("add", "-A", cwd=control)
    git("commit", "-m", "control", cwd=control)
    subprocess.run(
        ["git", "credential", "fill"],
        input="protocol=https\nhost=example.com\n\n",
        cwd=control, capture_output=True, text=True, check=False,
        env={**os.environ, **ENV, "GIT_TERMINAL_PROMPT": "0"},
    )  # fmt: skip
    fired = {p.name for p in control_markers.iterdir()}
    assert {"hook-pre-commit", "hook-post-commit", "fsmonitor", "filter"} <= fired
    assert "credential-helper" in fired

    # The finisher commits and pushes the same planted workspace: nothing planted runs.
    pod.annotate(0)
    code, result = pod.finish(config, monkeypatch)
    assert code == 0, result
    assert result["pushStatus"] == "verified"
    assert sorted(p.name for p in markers.iterdir()) == [], planted
    sha = result["commitSha"]
    assert git("show", f"{sha}:work.txt", cwd=remote) == "the agent's work"
