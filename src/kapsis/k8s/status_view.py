"""An ``AgentRequest``'s status as the CLI shows it: the local status record and the run's result.

Pure data. The operator writes the status (phase, progress, message, the Kapsis ``exitCode`` and
``errorType``); this module translates it into the vocabulary of a local run, so ``kapsis status``
shows both backends alike and ``kapsis run --backend k8s`` exits with the same codes.
"""

from __future__ import annotations

from typing import Any

from kapsis.errors import (
    AgentFailedError,
    AgentTimeoutError,
    ConfigError,
    ExitCode,
    GitWorkflowError,
    HostUnsupportedError,
    ImageError,
    PushError,
    SandboxError,
)
from kapsis.k8s.resource import FINAL_PHASES, AgentRequestStatus
from kapsis.k8s.submission import Submission
from kapsis.sandbox.launcher import RunResult
from kapsis.status import AgentStatus
from kapsis.status.store import Phase, utc_now

BACKEND_NAME = "k8s"

PHASES: dict[str, Phase] = {
    "Pending": "initializing",
    "Preparing": "preparing",
    "Running": "running",
    "Finishing": "post_processing",
    "Complete": "complete",
    "Failed": "failed",
}

# errorType -> exit code, for a Failed status that carries no exitCode (the errors.py table).
_EXIT_CODES: dict[str, int] = {
    cls.error_type: int(cls.exit_code)
    for cls in (
        ConfigError,
        SandboxError,
        ImageError,
        HostUnsupportedError,
        AgentFailedError,
        AgentTimeoutError,
        GitWorkflowError,
        PushError,
    )
}
_EXIT_CODES.update(
    {
        "killed": ExitCode.KILLED,
        "oom": ExitCode.KILLED,
        "stopped": ExitCode.KILLED,
        "diverged": ExitCode.PUSH_FAILED,
        "interrupted": ExitCode.INTERRUPTED,
    }
)

# The operator says "verified" for a push it checked; locally that is "pushed".
_PUSH_STATUS = {"verified": "pushed"}


def parse_status(obj: dict[str, Any]) -> AgentRequestStatus:
    """The status of an AgentRequest object; unknown keys (a newer operator's) are ignored."""
    raw = obj.get("status") or {}
    known = {k: v for k, v in raw.items() if k in AgentRequestStatus.model_fields}
    return AgentRequestStatus.model_validate(known)


def exit_code(status: AgentRequestStatus) -> int:
    """The Kapsis exit code of a finished request."""
    if status.exitCode is not None:
        return status.exitCode
    if status.phase == "Complete":
        return int(ExitCode.SUCCESS)
    return _EXIT_CODES.get(status.errorType or "", int(ExitCode.AGENT_FAILED))


def initial_record(
    submission: Submission, namespace: str, context: str | None, project: str
) -> AgentStatus:
    """The local status record of a request just created (before the operator saw it)."""
    spec = submission.spec
    now = utc_now()
    return AgentStatus(
        agent_id=submission.agent_id,
        project=project,
        branch=spec.workspace.git.branch,
        backend=BACKEND_NAME,
        agent=spec.agent.profile,
        phase="initializing",
        message=f"AgentRequest {namespace}/{submission.name} created",
        started_at=now,
        updated_at=now,
        limits_enforced=True,  # the kubelet enforces a Pod's limits
        network_mode=spec.network.mode,
        security_profile=spec.security.profile,
        task=submission.task_summary,
        workspace_mode="clone",
        base=spec.workspace.git.baseBranch,
        push_status="pending" if spec.workspace.git.push else "not_requested",
        namespace=namespace,
        kube_context=context,
        work_location=f"AgentRequest {namespace}/{submission.name}",
    )


def record_changes(status: AgentRequestStatus) -> dict[str, Any]:
    """What a status says, as fields of the local record (for ``StatusStore.update``)."""
    changes: dict[str, Any] = {
        "phase": PHASES[status.phase],
        "progress": 100 if status.phase in FINAL_PHASES else status.progress,
        "message": status.message,
        "blocked_requests": status.blockedRequests,
    }
    for key, value in (
        ("branch", status.branch),
        ("commit_sha", status.commitSha),
        ("pr_url", status.prUrl),
        ("agent_exit_code", status.agentExitCode),
        ("error_type", status.errorType),
    ):
        if value is not None:
            changes[key] = value
    if status.pushStatus is not None:
        changes["push_status"] = _PUSH_STATUS.get(status.pushStatus, status.pushStatus)
    if status.phase in FINAL_PHASES:
        changes["exit_code"] = exit_code(status)
    return changes


def run_result(agent_id: str, status: AgentRequestStatus, *, detached: bool) -> RunResult:
    """What ``kapsis run`` reports: a finished request's outcome, or a detached start."""
    if detached or status.phase not in FINAL_PHASES:
        return RunResult(
            agent_id=agent_id,
            exit_code=int(ExitCode.SUCCESS),
            agent_exit_code=None,
            error_type=None,
            message=status.message or status.phase,
            detached=True,
        )
    code = exit_code(status)
    push = status.pushStatus
    return RunResult(
        agent_id=agent_id,
        exit_code=code,
        agent_exit_code=status.agentExitCode,
        error_type=status.errorType if code else None,
        message=status.message or status.phase.lower(),
        branch=status.branch,
        commit_sha=status.commitSha,
        push_status=_PUSH_STATUS.get(push, push) if push else "not_requested",
        pr_url=status.prUrl,
    )


def describe(status: AgentRequestStatus) -> str:
    """One progress line: ``Running 30%: message``."""
    text = f"{status.phase} {status.progress if status.phase not in FINAL_PHASES else 100}%"
    return f"{text}: {status.message}" if status.message else text
