"""An AgentRequest's status read as a local run's: phases, exit codes, `kapsis run`'s result."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest

from kapsis.errors import ExitCode
from kapsis.k8s import status_view
from kapsis.k8s.resource import AgentRequestStatus, Phase


def status(**fields: object) -> AgentRequestStatus:
    return AgentRequestStatus.model_validate(fields)


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("agent_failed", ExitCode.AGENT_FAILED),
        ("config", ExitCode.USAGE),
        ("sandbox", ExitCode.SANDBOX_FAILED),
        ("image", ExitCode.SANDBOX_FAILED),
        ("host", ExitCode.HOST_UNSUPPORTED),
        ("oom", ExitCode.KILLED),
        ("stopped", ExitCode.KILLED),
        ("timeout", ExitCode.TIMEOUT),
        ("push_failed", ExitCode.PUSH_FAILED),
        ("diverged", ExitCode.PUSH_FAILED),
        ("commit_failed", ExitCode.COMMIT_FAILED),
        ("something_new", ExitCode.AGENT_FAILED),
    ],
)
def test_a_failed_status_without_exit_code_maps_its_error_type(
    error_type: str, code: ExitCode
) -> None:
    assert status_view.exit_code(status(phase="Failed", errorType=error_type)) == code


def test_the_operators_exit_code_wins_and_complete_is_0() -> None:
    assert status_view.exit_code(status(phase="Failed", errorType="timeout", exitCode=7)) == 7
    assert status_view.exit_code(status(phase="Complete")) == 0


def test_record_changes_use_the_local_vocabulary() -> None:
    running = status_view.record_changes(status(phase="Running", progress=42, message="m"))
    assert running["phase"] == "running" and running["progress"] == 42
    assert "exit_code" not in running
    done = status_view.record_changes(
        status(phase="Complete", progress=90, pushStatus="verified", commitSha="c" * 40)
    )
    assert (done["phase"], done["progress"], done["exit_code"]) == ("complete", 100, 0)
    assert done["push_status"] == "pushed" and done["commit_sha"] == "c" * 40
    assert set(status_view.PHASES) == set(get_args(Phase))


def test_run_result_of_a_failure_and_of_a_detached_start() -> None:
    failed = status(phase="Failed", exitCode=1, errorType="agent_failed", agentExitCode=3)
    result = status_view.run_result("a1", failed, detached=False)
    assert (result.exit_code, result.agent_exit_code, result.error_type) == (1, 3, "agent_failed")
    assert not result.ok
    started = status_view.run_result("a1", status(phase="Pending"), detached=True)
    assert started.detached and started.exit_code == 0


def test_unknown_status_keys_from_a_newer_operator_are_ignored() -> None:
    obj = {"status": {"phase": "Running", "someday": True}}
    assert status_view.parse_status(obj).phase == "Running"
    assert status_view.parse_status({}).phase == "Pending"


def test_a_local_run_does_not_import_the_kubernetes_client() -> None:
    code = (
        "import sys; from kapsis.cli import app; from kapsis import api; "
        "from kapsis.sandbox.plan import RunRequest; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kopf')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
