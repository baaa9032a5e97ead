"""The host process killed (kill -9) in each phase of a run: the next status read ends the run as
``interrupted``, its audit chain verifies, no commit is half-made, and cleanup leaves nothing
(no pod, no network namespace, no sandbox or worktree).

The run stops itself (SIGSTOP) right after it writes the phase under test
(``KAPSIS_TEST_STOP_AT_PHASE``), and the test kills it there: the kill lands in that phase on
every run, not by luck of timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.status.store import FAULT_STOP_VARIABLE

from .kapsis_runner import Kapsis
from .repos import git, one_commit_repository

pytestmark = pytest.mark.integration

TASK = "echo work > /workspace/out.txt; sleep 3"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return one_commit_repository(tmp_path / "project")


def _record(kapsis: Kapsis, agent_id: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads((kapsis.home / "status" / f"{agent_id}.json").read_text()))
    except (OSError, ValueError):
        return None


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _stop_at(kapsis: Kapsis, agent_id: str, phase: str, timeout: float = 90) -> int:
    """Wait for the run to stop itself in ``phase``; return its supervisor's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _record(kapsis, agent_id)
        if record and record["phase"] == phase and record.get("supervisor"):
            pid = int(record["supervisor"]["pid"])
            if _stopped(pid):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"{agent_id} never stopped in {phase}: {_record(kapsis, agent_id)}")


def _pod_exists(agent_id: str) -> bool:
    result = subprocess.run(["podman", "pod", "exists", f"kapsis-{agent_id}"], check=False)
    return result.returncode == 0


def _agent_running(agent_id: str) -> bool:
    result = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.Running}}", f"kapsis-{agent_id}-agent"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "true"


def _check_interrupted_then_clean(kapsis: Kapsis, project: Path, agent_id: str, phase: str) -> None:
    record = kapsis.status(agent_id)
    assert record["phase"] == "failed" and record["error_type"] == "interrupted", record
    assert record["exit_code"] == 130
    assert f"during {phase}" in record["message"]
    if record["work_location"]:
        assert record["work_location"] in record["message"]
    assert not _agent_running(agent_id)  # nothing runs on unsupervised
    verified = kapsis("audit", "verify", agent_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    shown = kapsis("audit", "show", agent_id, "--json")
    events = [event["event_type"] for event in json.loads(shown.stdout)]
    assert events.count("session_end") == 1
    # No commit half-made: the repository is whole and the branch holds no work of the agent.
    fsck = subprocess.run(["git", "-C", str(project), "fsck", "--no-dangling"], check=False)
    assert fsck.returncode == 0
    branch = record["branch"]
    head = subprocess.run(
        ["git", "-C", str(project), "rev-parse", "--verify", "-q", f"refs/heads/{branch}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert head in ("", record["start_commit"])

    cleaned = kapsis("cleanup", "--agent", agent_id, "--force")

    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not _pod_exists(agent_id)
    containers = subprocess.run(
        ["podman", "ps", "-a", "-q", "--filter", f"label=io.kapsis.agent-id={agent_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert containers.stdout.strip() == ""
    assert not (kapsis.home / "sandboxes" / agent_id).exists()
    if record["workspace_mode"] == "worktree" and record["work_location"]:
        assert not Path(record["work_location"]).exists()
    assert kapsis("status", agent_id).returncode != 0  # the record is gone too


@pytest.mark.parametrize(
    ("phase", "mode"),
    [
        ("preparing", "overlay"),
        ("starting", "worktree"),
        ("running", "overlay"),
        ("post_processing", "worktree"),
    ],
)
def test_kill_9_of_the_host_process_in_each_phase(
    kapsis: Kapsis, project: Path, phase: str, mode: str
) -> None:
    agent_id = f"kill-{phase.replace('_', '-')}"
    launched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kapsis",
            "run",
            str(project),
            "--image",
            kapsis.image,
            "--task",
            TASK,
            "--network-mode",
            "none",
            "--mode",
            mode,
            "--agent-id",
            agent_id,
        ],
        env=kapsis.env({FAULT_STOP_VARIABLE: phase}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        supervisor = _stop_at(kapsis, agent_id, phase)
        os.kill(supervisor, signal.SIGKILL)
    finally:
        launched.kill()
        launched.wait(timeout=30)
    time.sleep(0.2)  # the kernel reaps the killed process

    _check_interrupted_then_clean(kapsis, project, agent_id, phase)


def test_kill_9_of_a_detached_supervisor_while_the_agent_runs(
    kapsis: Kapsis, project: Path
) -> None:
    """Filtered mode: the gateway goes with the pod at cleanup."""
    started = kapsis.run(project, "sleep 60", "--detach", "--agent-id", "kill-detached")
    assert started.returncode == 0, started.stderr
    record = _record(kapsis, "kill-detached")
    assert record is not None and record["phase"] == "running"
    supervisor = int(record["supervisor"]["pid"])
    assert "kapsis.sandbox.supervise" in Path(f"/proc/{supervisor}/cmdline").read_text()
    assert _agent_running("kill-detached")

    os.kill(supervisor, signal.SIGKILL)
    time.sleep(0.2)

    _check_interrupted_then_clean(kapsis, project, "kill-detached", "running")


def test_control_the_same_run_left_alone_completes_and_commits(
    kapsis: Kapsis, project: Path
) -> None:
    result = kapsis.run(project, TASK, "--network-mode", "none", "--json", "--agent-id", "calm")

    assert result.returncode == 0, result.stderr
    record = kapsis.status("calm")
    assert record["phase"] == "complete" and record["supervisor"]["pid"] > 0
    assert "out.txt" in git(project, "ls-tree", "--name-only", record["commit_sha"])
    assert kapsis("cleanup", "--agent", "calm").returncode == 0
    assert not _pod_exists("calm")
