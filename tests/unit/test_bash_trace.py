"""Every agent's bash traces its commands to the audit trail: BASH_ENV names a script that
points bash's xtrace at a pipe the host reads (whatever the agent's CLI reports itself).

Run here with the real bash and the real script (its pipe path moved to the test's dir): the
commands reach the record as typed and as expanded, the alert rules judge them, and the
host's reading neither ends nor blocks when the agent's shells come and go."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kapsis.audit import AuditLog
from kapsis.audit.agent_reports import (
    TRACE_FIFO,
    TRACE_TARGET,
    AgentReportServer,
    Redactor,
    install_bash_trace,
)
from kapsis.audit.alerts import AlertEngine

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def traced(kapsis_home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The sandbox dir with the script and the pipe; the script reads the pipe there."""
    root = tmp_path / "sandbox"
    root.mkdir()
    install_bash_trace(root)
    script = root / "bash-env.sh"
    script.write_text(script.read_text().replace(TRACE_TARGET, str(root / TRACE_FIFO)))
    return root, script


def run_traced(script: Path, command: str, cwd: Path) -> None:
    env = {"PATH": os.environ["PATH"], "BASH_ENV": str(script)}
    subprocess.run(["bash", "-c", command], env=env, cwd=cwd, check=True, timeout=30)


def test_each_command_of_each_bash_is_recorded_as_typed_and_expanded(
    traced: tuple[Path, Path], tmp_path: Path
) -> None:
    root, script = traced
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    log = AuditLog("t1", directory=tmp_path)
    server = AgentReportServer(
        log,
        root / "audit.sock",
        Redactor([]),
        alerts=AlertEngine(frozenset),
        trace=root / TRACE_FIFO,
    )
    server.start()
    run_traced(script, "echo one > /dev/null; rm -rf *", work)
    run_traced(script, "bash -c 'echo nested > /dev/null'", work)  # a bash the bash starts
    server.stop()
    commands = [
        r["detail"]["command"] for r in records(log.path) if r["event_type"] == "agent_command"
    ]
    assert any("echo one" in c for c in commands)
    typed = {
        r["detail"]["command"]: r["detail"].get("typed", "")
        for r in records(log.path)
        if r["event_type"] == "agent_command"
    }
    assert "rm -rf *" in typed["rm -rf a b"]
    assert any("echo nested" in c for c in commands)
    assert all(
        r["source"] == "agent" for r in records(log.path) if r["event_type"] == "agent_command"
    )
    alerts = [r for r in records(log.path) if r["event_type"] == "alert"]
    assert any(a["detail"]["rule"] == "mass_deletion" for a in alerts)


def test_control_without_the_script_nothing_is_recorded(
    traced: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = traced
    log = AuditLog("t2", directory=tmp_path)
    server = AgentReportServer(log, root / "audit.sock", Redactor([]), trace=root / TRACE_FIFO)
    server.start()
    subprocess.run(["bash", "-c", "echo one > /dev/null"], check=True, timeout=30,
                   env={"PATH": os.environ["PATH"]})  # fmt: skip
    server.stop()
    assert not [r for r in records(log.path) if r["event_type"] == "agent_command"]


def test_no_pipe_and_the_shells_run_untraced_and_unblocked(
    traced: tuple[Path, Path], tmp_path: Path
) -> None:
    """No pipe (or a file put in its place): bash runs as it would without Kapsis, silently."""
    root, script = traced
    (root / TRACE_FIFO).unlink()
    (root / TRACE_FIFO).write_text("")
    done = subprocess.run(
        ["bash", "-c", "echo fine"], env={"PATH": os.environ["PATH"], "BASH_ENV": str(script)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.stdout == "fine\n" and done.stderr == ""
    assert (root / TRACE_FIFO).read_text() == ""


def test_the_host_reads_a_pipe_only(traced: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = traced
    target = tmp_path / "elsewhere"
    target.write_text("+ 'forged'\tforged\n")
    (root / TRACE_FIFO).unlink()
    (root / TRACE_FIFO).symlink_to(target)
    log = AuditLog("t3", directory=tmp_path)
    server = AgentReportServer(log, root / "audit.sock", Redactor([]), trace=root / TRACE_FIFO)
    server.start()
    server.stop()
    assert not [r for r in records(log.path) if r["event_type"] == "agent_command"]


def test_any_uid_of_the_agent_can_open_the_pipe_without_waiting(traced: tuple[Path, Path]) -> None:
    """bash opens it read-write (write-only would wait for a reader): the agent's uid, which is
    not the owner, needs both."""
    root, _ = traced
    assert (root / TRACE_FIFO).stat().st_mode & 0o777 == 0o666
