"""The status bridge: Pod states (as the kubelet reports them) -> AgentRequest status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kapsis.k8s.resource import AgentRequestStatus
from kapsis.operator.bridge import bridge, parse_finisher_result
from tests.k8s import kubelet as k

NOW = "2026-01-01T11:00:00Z"


def pod(status: dict[str, Any], memory: str = "2Gi") -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "agent", "resources": {"limits": {"memory": memory}}}]},
        "status": status,
    }


def run(status: dict[str, Any], current: dict[str, Any] | None = None) -> Any:
    bridged = bridge(pod(status), current or {"phase": "Pending", "podName": "p"}, NOW)
    AgentRequestStatus.model_validate(bridged.status)  # always a status the CRD accepts
    return bridged


@pytest.mark.parametrize(
    ("status", "phase", "progress"),
    [
        ({}, "Pending", 0),
        (k.pod_status(clone=k.waiting(), agent=k.waiting()), "Pending", 0),
        (k.cloning(), "Preparing", 10),
        (k.gateway_starting(), "Preparing", 25),
        (k.agent_running(), "Running", 50),
        (k.agent_done(0), "Finishing", 80),
        (k.finished(), "Complete", 100),
    ],
)
def test_phases_follow_the_pod(status: dict[str, Any], phase: str, progress: int):
    bridged = run(status)
    assert bridged.status["phase"] == phase
    assert bridged.status["progress"] == progress


def test_complete_carries_the_finishers_result_and_times():
    status = run(k.finished()).status
    assert status["exitCode"] == 0 and status["agentExitCode"] == 0
    assert status.get("errorType") is None
    assert status["branch"] == "kapsis/req"
    assert status["commitSha"] == "0123456789abcdef0123456789abcdef01234567"
    assert status["pushStatus"] == "verified"
    assert status["startedAt"] == k.T1 and status["completedAt"] == NOW
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Cloned"]["status"] == "True"
    assert conditions["AgentExited"]["status"] == "True"
    assert conditions["Finished"]["reason"] == "PushVerified"


def test_agent_exit_is_reported_only_once_the_agent_terminated():
    assert run(k.agent_running()).agent_exit_code is None
    assert run(k.agent_done(3)).agent_exit_code == 3
    assert run(k.agent_done(0)).agent_exit_code == 0


@pytest.mark.parametrize(
    ("status", "exit_code", "error_type", "agent_exit"),
    [
        (k.finished(agent_code=3), 1, "agent_failed", 3),
        (k.finished(agent_code=137, agent_reason="OOMKilled"), 5, "oom", 137),
        (k.finished(agent_code=124), 6, "timeout", 124),
        (k.finished(finisher_code=7, finisher_message=k.result_message(push="failed")), 7,
         "push_failed", 0),
        (k.finished(finisher_code=1, finisher_message=k.result_message(push="failed")), 7,
         "push_failed", 0),
        (k.finished(finisher_code=8, finisher_message='{"message": "nothing to commit?"}'), 8,
         "commit_failed", 0),
        # What the finisher writes (kapsis.k8s.inpod.finish): errorType names the failure.
        (k.finished(finisher_code=1, finisher_message=json.dumps(
            {"branch": "b", "commitSha": "abcdef1", "pushStatus": "failed",
             "message": "rejected", "errorType": "push_diverged"})), 7, "push_diverged", 0),
        (k.finished(finisher_code=1, finisher_message=json.dumps(
            {"branch": "b", "commitSha": None, "pushStatus": "skipped",
             "message": "commit failed: x", "errorType": "commit_failed"})), 8, "commit_failed", 0),
        (k.finished(finisher_code=1, finisher_message=json.dumps(
            {"branch": None, "commitSha": None, "pushStatus": "failed",
             "message": "finishing failed: no annotation", "errorType": "sandbox"})), 8,
         "commit_failed", 0),
        # The agent's own failure is what a local run reports first, even if the push failed.
        (k.finished(agent_code=2, finisher_code=7), 1, "agent_failed", 2),
    ],
)  # fmt: skip
def test_failures_map_to_the_local_exit_codes(
    status: dict[str, Any], exit_code: int, error_type: str, agent_exit: int
):
    result = run(status).status
    assert result["phase"] == "Failed"
    assert result["exitCode"] == exit_code
    assert result["errorType"] == error_type
    assert result["agentExitCode"] == agent_exit


def test_oom_message_names_the_limit():
    status = run(k.finished(agent_code=137, agent_reason="OOMKilled")).status
    assert "out of memory (limit 2Gi)" in status["message"]


def test_clone_failure_is_a_sandbox_error_with_the_clone_message():
    status = run(
        k.pod_status(clone=k.terminated(128, message="repository not found"), agent=k.waiting())
    ).status
    assert (status["phase"], status["exitCode"], status["errorType"]) == ("Failed", 3, "sandbox")
    assert "repository not found" in status["message"]
    assert "agentExitCode" not in status


@pytest.mark.parametrize(
    "gateway_state",
    [
        {"gateway": k.waiting("CrashLoopBackOff"), "gateway_started": False},
        {"gateway": k.running(), "gateway_started": False, "gateway_restarts": 1},
        {"gateway": k.terminated(1), "gateway_started": False},
    ],
)
def test_gateway_never_ready_fails_the_request(gateway_state: dict[str, Any]):
    status = run(
        k.pod_status(
            clone=k.terminated(0), agent=k.waiting(), finisher=k.waiting(), **gateway_state
        )
    ).status
    assert (status["phase"], status["exitCode"], status["errorType"]) == ("Failed", 3, "sandbox")
    assert "gateway" in status["message"]


def test_a_gateway_still_starting_is_not_a_failure():
    assert run(k.gateway_starting()).status["phase"] == "Preparing"


def test_unpullable_agent_image_is_an_image_error():
    status = run(
        k.pod_status(
            clone=k.terminated(0),
            gateway=k.running(),
            agent=k.waiting("ImagePullBackOff", "no such image"),
        )
    ).status
    assert (status["exitCode"], status["errorType"]) == (3, "image")


def test_deadline_exceeded_is_a_timeout():
    status = run(k.pod_status(phase="Failed", reason="DeadlineExceeded")).status
    assert (status["exitCode"], status["errorType"]) == (6, "timeout")


def test_a_pod_that_ends_without_the_finisher_reports_commit_failed():
    status = run(
        k.pod_status(
            phase="Failed",
            clone=k.terminated(0),
            gateway=k.terminated(0),
            agent=k.terminated(0),
            finisher=k.waiting("ContainerCreating"),
        )
    ).status
    assert (status["phase"], status["exitCode"]) == ("Failed", 8)


def test_the_agents_termination_message_is_never_read():
    """Adversarial: the agent writes a result into its own termination message."""
    forged = k.result_message(branch="main", sha="f" * 40, push="verified", message="all good")
    status = run(
        k.finished(
            agent_message=forged,
            finisher_code=8,
            finisher_message='{"message": "commit failed"}',
        )
    ).status
    assert status["phase"] == "Failed" and status["exitCode"] == 8
    assert "branch" not in status and "commitSha" not in status and "pushStatus" not in status
    assert "all good" not in status["message"]
    # Control: the same JSON from the finisher is taken.
    control = run(k.finished(finisher_message=forged)).status
    assert control["branch"] == "main" and control["commitSha"] == "f" * 40


def test_a_terminal_status_never_changes():
    done = run(k.finished()).status
    again = bridge(pod(k.pod_status(phase="Failed", reason="Evicted")), done, "later")
    assert again.status == done


def test_the_gateways_count_may_arrive_after_the_end():
    late = k.finished()
    late["initContainerStatuses"][1]["state"] = k.terminated(0, message='{"blockedRequests": 7}')
    status = bridge(pod(late), {"phase": "Complete", "exitCode": 0}, "later").status
    assert status == {"phase": "Complete", "exitCode": 0, "blockedRequests": 7}


def test_condition_times_move_only_on_transitions():
    first = run(k.agent_running()).status
    second = bridge(pod(k.agent_running()), first, "2099-01-01T00:00:00Z").status
    assert second["conditions"] == first["conditions"]
    third = bridge(pod(k.agent_done(0)), second, "2099-01-01T00:00:00Z").status
    exited = {c["type"]: c for c in third["conditions"]}["AgentExited"]
    assert exited["lastTransitionTime"] == "2099-01-01T00:00:00Z"


def test_other_conditions_are_kept():
    current = {
        "phase": "Pending",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": ""}],
    }
    status = bridge(pod(k.agent_running()), current, NOW).status
    assert "Accepted" in {c["type"] for c in status["conditions"]}


def test_blocked_requests_come_from_the_gateways_termination_message_only():
    status = k.finished(agent_message='{"blockedRequests": 99}')
    status["initContainerStatuses"][1]["state"] = k.terminated(0, message='{"blockedRequests": 4}')
    assert run(status).status["blockedRequests"] == 4
    assert run(k.finished(agent_message='{"blockedRequests": 99}')).status["blockedRequests"] == 0


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("not json", {}),
        ("[1, 2]", {}),
        ('{"commitSha": "not-a-sha", "pushStatus": "sure"}', {}),
        ('{"branch": "b", "commitSha": "abcdef1", "pushStatus": "pushed"}',
         {"branch": "b", "commitSha": "abcdef1", "pushStatus": "pushed"}),
        ('{"commitSha": null, "errorType": "push_failed"}', {"errorType": "push_failed"}),
        ('{"errorType": "Not A Type!"}', {}),
    ],
)  # fmt: skip
def test_finisher_result_fields_are_checked(message: str, expected: dict[str, Any]):
    assert parse_finisher_result(message) == expected
