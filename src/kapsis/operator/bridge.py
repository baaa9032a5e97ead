"""The status bridge: from what the kubelet reports about an agent's Pod to the request's status.

A pure function of the Pod object (as the API server returns it) and the request's current
status. Only the kubelet's container states and the termination message of the *finisher*
container are read: the agent container's termination message, its files and its logs are
never used, since the agent writes them. The agent's exit code and OOMKilled come from the
agent container's ``state.terminated``, which only the kubelet sets.

Phases: Pending (Pod made, nothing started) -> Preparing (clone, then the gateway) -> Running
(agent started) -> Finishing (agent ended; the operator sets the exit annotation that releases
the finisher) -> Complete or Failed, with the Kapsis exit code of a local run (kapsis.errors):
agent non-zero 1, clone/gateway/image failure 3, OOMKilled 5, time limit 6, push failed 7,
commit failed 8.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, get_args

from kapsis.errors import ExitCode
from kapsis.k8s.names import (
    AGENT_CONTAINER,
    AGENT_FAILURE_ANNOTATION,
    CLONE_CONTAINER,
    FINISHER_CONTAINER,
    GATEWAY_CONTAINER,
)
from kapsis.k8s.resource import FINAL_PHASES, PushStatus

TIMEOUT_EXIT: Final = 124  # what `timeout` returns; the Pod's time limit ends the agent with it
TIMEOUT_KILL_EXIT: Final = 137  # `timeout --kill-after` had to SIGKILL the agent
# Waiting reasons after which the container will not start without someone fixing something.
_STUCK_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
_IMAGE_REASONS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
)
_SHA_RE: Final = re.compile(r"^[0-9a-f]{7,64}$")
_ERROR_TYPE_RE: Final = re.compile(r"^[a-z_]{1,40}$")
_PUSH_ERRORS: Final = frozenset({"push_failed", "push_diverged"})
_MAX_TEXT: Final = 1000
_PUSH_STATUSES: Final = frozenset(get_args(PushStatus))

PROGRESS: Final = {
    "Pending": 0,
    "Cloning": 10,
    "Gateway": 25,
    "Running": 50,
    "Finishing": 80,
    "Complete": 100,
    "Failed": 100,
}


@dataclass(frozen=True)
class Outcome:
    """Why a request ended the way it did, in the terms of a local run."""

    exit_code: int
    error_type: str | None
    message: str


@dataclass(frozen=True)
class Bridged:
    """The request's new status, and what the operator must act on."""

    status: dict[str, Any]
    # The agent container's exit code as the kubelet reported it, once it terminated: the
    # operator writes it to the Pod annotation that releases the finisher.
    agent_exit_code: int | None = None
    agent_oom_killed: bool = False
    # The finisher's result (its termination message), once it terminated.
    finisher_result: dict[str, Any] | None = None
    finisher_exit_code: int | None = None


def container_statuses(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The Pod's init and regular container statuses by container name."""
    status = pod.get("status") or {}
    found: dict[str, Mapping[str, Any]] = {}
    for key in ("initContainerStatuses", "containerStatuses"):
        for entry in status.get(key) or ():
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                found[entry["name"]] = entry
    return found


def _state(container: Mapping[str, Any] | None, which: str) -> Mapping[str, Any] | None:
    if container is None:
        return None
    state = (container.get("state") or {}).get(which)
    return state if isinstance(state, Mapping) else None


def _exit_code(terminated: Mapping[str, Any]) -> int:
    code = terminated.get("exitCode")
    return code if isinstance(code, int) else -1


def _text(value: Any) -> str:
    return value[:_MAX_TEXT] if isinstance(value, str) else ""


def parse_finisher_result(message: Any) -> dict[str, Any]:
    """The finisher's ``{"branch","commitSha","pushStatus","message"}``; bad fields dropped."""
    if not isinstance(message, str):
        return {}
    try:
        data = json.loads(message)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    result: dict[str, Any] = {}
    branch = data.get("branch")
    if isinstance(branch, str) and 0 < len(branch) <= 255:
        result["branch"] = branch
    sha = data.get("commitSha")
    if isinstance(sha, str) and _SHA_RE.match(sha):
        result["commitSha"] = sha
    push = data.get("pushStatus")
    if push in _PUSH_STATUSES:
        result["pushStatus"] = push
    if isinstance(data.get("message"), str):
        result["message"] = _text(data["message"])
    error_type = data.get("errorType")
    if isinstance(error_type, str) and _ERROR_TYPE_RE.match(error_type):
        result["errorType"] = error_type
    return result


def _blocked_requests(gateway: Mapping[str, Any] | None) -> int | None:
    """What the gateway reported as blocked, from its own termination message (if any)."""
    for which in ("state", "lastState"):
        terminated = ((gateway or {}).get(which) or {}).get("terminated")
        if isinstance(terminated, Mapping):
            try:
                data = json.loads(terminated.get("message") or "")
            except ValueError:
                continue
            count = data.get("blockedRequests") if isinstance(data, dict) else None
            if isinstance(count, int) and count >= 0:
                return count
    return None


def _stuck(container: Mapping[str, Any] | None) -> str | None:
    waiting = _state(container, "waiting")
    if waiting and waiting.get("reason") in _STUCK_REASONS:
        reason = str(waiting["reason"])
        detail = _text(waiting.get("message"))
        return f"{reason}: {detail}" if detail else reason
    return None


def agent_outcome(
    terminated: Mapping[str, Any], memory: str | None = None, time_limited: bool = False
) -> Outcome | None:
    """The outcome the agent's own termination decides, or None when it succeeded.

    ``time_limited``: the agent runs under ``timeout --kill-after`` (the renderer's wrapper),
    which exits 124, or 137 when it had to SIGKILL an agent that ignored SIGTERM.
    """
    code = _exit_code(terminated)
    if terminated.get("reason") == "OOMKilled":
        limit = f" (limit {memory})" if memory else ""
        return Outcome(ExitCode.KILLED, "oom", f"the agent ran out of memory{limit} and was killed")
    if code == TIMEOUT_EXIT or (time_limited and code == TIMEOUT_KILL_EXIT):
        return Outcome(ExitCode.TIMEOUT, "timeout", "the agent exceeded its time limit")
    if code != 0:
        return Outcome(ExitCode.AGENT_FAILED, "agent_failed", f"the agent exited with code {code}")
    return None


def finisher_outcome(code: int, result: Mapping[str, Any]) -> Outcome | None:
    """The outcome of the finishing step (commit + push), or None when it succeeded.

    The finisher names its failure (``errorType``: push_failed, push_diverged, commit_failed,
    or the type of whatever stopped it before a commit); a push failure is exit code 7, any
    other failure means nothing was committed and pushed: 8.
    """
    detail = result.get("message") or f"the finishing step exited with code {code}"
    error_type = result.get("errorType")
    if code == 0 and error_type is None and result.get("pushStatus") != "failed":
        return None
    if error_type in _PUSH_ERRORS or (error_type is None and result.get("pushStatus") == "failed"):
        kind = str(error_type or "push_failed")
        return Outcome(ExitCode.PUSH_FAILED, kind, f"push failed: {detail}")
    return Outcome(ExitCode.COMMIT_FAILED, "commit_failed", f"commit failed: {detail}")


def _agent_spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for container in (pod.get("spec") or {}).get("containers") or ():
        if isinstance(container, Mapping) and container.get("name") == AGENT_CONTAINER:
            return container
    return {}


def _memory_limit(pod: Mapping[str, Any]) -> str | None:
    limits = (_agent_spec(pod).get("resources") or {}).get("limits") or {}
    memory = limits.get("memory")
    return str(memory) if memory else None


def _time_limited(pod: Mapping[str, Any]) -> bool:
    command = _agent_spec(pod).get("command") or []
    return bool(command) and command[0] == "timeout"


def _conditions(
    current: list[Mapping[str, Any]], wanted: list[tuple[str, str, str, str]], now: str
) -> list[dict[str, Any]]:
    """Conditions with ``lastTransitionTime`` kept where the status did not change."""
    before = {c.get("type"): c for c in current if isinstance(c, Mapping)}
    mine = {kind for kind, _, _, _ in wanted}
    # Conditions the bridge does not own (e.g. Accepted, set at admission) stay as they are.
    result: list[dict[str, Any]] = [dict(c) for t, c in before.items() if t not in mine]
    for kind, status, reason, message in wanted:
        old = before.get(kind)
        changed = old is None or old.get("status") != status
        since = now if changed else (old or {}).get("lastTransitionTime") or now
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
            }
        )
    return result


def bridge(pod: Mapping[str, Any], current: Mapping[str, Any] | None, now: str) -> Bridged:
    """The request status that ``pod`` implies, given the request's ``current`` status.

    ``now`` (RFC 3339) stamps completedAt and condition transitions. A terminal phase never
    changes again: a later Pod event (deletion, eviction) cannot rewrite a finished request.
    """
    current = dict(current or {})
    statuses = container_statuses(pod)
    clone = statuses.get(CLONE_CONTAINER)
    gateway = statuses.get(GATEWAY_CONTAINER)
    agent = statuses.get(AGENT_CONTAINER)
    finisher = statuses.get(FINISHER_CONTAINER)
    pod_status = pod.get("status") or {}

    clone_done = _state(clone, "terminated")
    agent_running = _state(agent, "running")
    agent_done = _state(agent, "terminated")
    finisher_done = _state(finisher, "terminated")

    agent_exit = _exit_code(agent_done) if agent_done else None
    oom = bool(agent_done and agent_done.get("reason") == "OOMKilled")
    result = parse_finisher_result(finisher_done.get("message")) if finisher_done else None
    finisher_exit = _exit_code(finisher_done) if finisher_done else None

    if current.get("phase") in FINAL_PHASES:
        # Only the gateway's count may still arrive: a sidecar is stopped after the finisher.
        blocked = _blocked_requests(gateway)
        if blocked is not None:
            current["blockedRequests"] = blocked
        return Bridged(current, agent_exit, oom, result, finisher_exit)

    phase, stage, outcome, message = _phase(
        pod,
        pod_status,
        clone,
        clone_done,
        gateway,
        agent,
        agent_running,
        agent_done,
        finisher,
        finisher_done,
        result or {},
    )

    status: dict[str, Any] = dict(current)
    status["phase"] = phase
    status["progress"] = PROGRESS[stage]
    status["message"] = outcome.message if outcome else message
    if agent_running and agent_running.get("startedAt"):
        status["startedAt"] = agent_running["startedAt"]
    elif agent_done and agent_done.get("startedAt") and not status.get("startedAt"):
        status["startedAt"] = agent_done["startedAt"]
    if agent_exit is not None:
        status["agentExitCode"] = agent_exit
    if result:
        for key in ("branch", "commitSha", "pushStatus"):
            if key in result:
                status[key] = result[key]
    blocked = _blocked_requests(gateway)
    status["blockedRequests"] = (
        blocked if blocked is not None else current.get("blockedRequests", 0)
    )
    if phase in FINAL_PHASES:
        assert outcome is not None
        status["exitCode"] = outcome.exit_code
        status["errorType"] = outcome.error_type
        status["completedAt"] = now

    status["conditions"] = _conditions(
        list(current.get("conditions") or []),
        _wanted_conditions(clone_done, gateway, agent_done, finisher_done, result or {}),
        now,
    )
    return Bridged(status, agent_exit, oom, result, finisher_exit)


def _phase(
    pod: Mapping[str, Any],
    pod_status: Mapping[str, Any],
    clone: Mapping[str, Any] | None,
    clone_done: Mapping[str, Any] | None,
    gateway: Mapping[str, Any] | None,
    agent: Mapping[str, Any] | None,
    agent_running: Mapping[str, Any] | None,
    agent_done: Mapping[str, Any] | None,
    finisher: Mapping[str, Any] | None,
    finisher_done: Mapping[str, Any] | None,
    result: Mapping[str, Any],
) -> tuple[str, str, Outcome | None, str]:
    """(phase, progress stage, outcome when terminal, message) of the Pod's current state."""
    sandbox = ExitCode.SANDBOX_FAILED
    if clone_done and _exit_code(clone_done) != 0:
        why = _text(clone_done.get("message")) or str(clone_done.get("reason") or "error")
        return "Failed", "Failed", Outcome(sandbox, "sandbox", f"the clone step failed: {why}"), ""

    for name, container in (
        (CLONE_CONTAINER, clone),
        (GATEWAY_CONTAINER, gateway),
        (AGENT_CONTAINER, agent),
        (FINISHER_CONTAINER, finisher),
    ):
        stuck = _stuck(container)
        if stuck:
            waiting = _state(container, "waiting") or {}
            kind = "image" if waiting.get("reason") in _IMAGE_REASONS else "sandbox"
            outcome = Outcome(sandbox, kind, f"the {name} container cannot start: {stuck}")
            return "Failed", "Failed", outcome, ""

    if pod_status.get("reason") == "DeadlineExceeded":
        outcome = Outcome(ExitCode.TIMEOUT, "timeout", "the request exceeded its time limit")
        return "Failed", "Failed", outcome, ""

    if not agent_running and not agent_done:
        if gateway is not None and _gateway_failed(gateway):
            outcome = Outcome(sandbox, "sandbox", "the network gateway never became ready")
            return "Failed", "Failed", outcome, ""
        if pod_status.get("phase") in ("Failed", "Succeeded"):
            why = _text(pod_status.get("message")) or str(pod_status.get("reason") or "")
            outcome = Outcome(
                ExitCode.KILLED, "killed", f"the Pod ended before the agent ran {why}"
            )
            return "Failed", "Failed", outcome, ""
        if clone_done:
            return "Preparing", "Gateway", None, "starting the network gateway"
        if _state(clone, "running"):
            return "Preparing", "Cloning", None, "cloning the repository"
        return "Pending", "Pending", None, "waiting for the Pod to be scheduled"

    if agent_running and not agent_done:
        return "Running", "Running", None, "the agent is running"

    assert agent_done is not None
    agent_end = agent_outcome(agent_done, _memory_limit(pod), _time_limited(pod))
    reported = _text(
        ((pod.get("metadata") or {}).get("annotations") or {}).get(AGENT_FAILURE_ANNOTATION)
    )
    if reported and (agent_end is None or agent_end.error_type == "agent_failed"):
        # The agent's output said why (its profile's failure signs), as a local run says it.
        agent_end = Outcome(ExitCode.AGENT_FAILED, "agent_error", reported)
    if finisher_done:
        finish_end = finisher_outcome(_exit_code(finisher_done), result)
        ending = agent_end or finish_end
        if ending is None:
            push = result.get("pushStatus")
            done = "finished" + (f"; push {push}" if push else "")
            if result.get("message"):
                done += f": {result['message']}"
            return "Complete", "Complete", Outcome(ExitCode.SUCCESS, None, done), ""
        return "Failed", "Failed", ending, ""
    if pod_status.get("phase") in ("Failed", "Succeeded"):
        # The Pod ended without the finisher reporting (killed, evicted): nothing was committed.
        fallback = Outcome(
            ExitCode.COMMIT_FAILED, "commit_failed", "the finishing step did not report a result"
        )
        return "Failed", "Failed", agent_end or fallback, ""
    code = _exit_code(agent_done)
    return "Finishing", "Finishing", None, f"the agent exited ({code}); committing its work"


def _gateway_failed(gateway: Mapping[str, Any]) -> bool:
    """The sidecar gave up or is being restarted before it ever became ready."""
    if gateway.get("started") or gateway.get("ready"):
        return False
    waiting = _state(gateway, "waiting")
    if waiting and waiting.get("reason") == "CrashLoopBackOff":
        return True
    if _state(gateway, "terminated"):
        return True
    restarts = gateway.get("restartCount")
    return isinstance(restarts, int) and restarts >= 1


def _wanted_conditions(
    clone_done: Mapping[str, Any] | None,
    gateway: Mapping[str, Any] | None,
    agent_done: Mapping[str, Any] | None,
    finisher_done: Mapping[str, Any] | None,
    result: Mapping[str, Any],
) -> list[tuple[str, str, str, str]]:
    wanted: list[tuple[str, str, str, str]] = []
    if clone_done is None:
        wanted.append(("Cloned", "Unknown", "Pending", ""))
    elif _exit_code(clone_done) == 0:
        wanted.append(("Cloned", "True", "Cloned", ""))
    else:
        wanted.append(("Cloned", "False", "CloneFailed", _text(clone_done.get("message"))))
    ready = bool(gateway and (gateway.get("started") or gateway.get("ready")))
    wanted.append(("NetworkReady", "True" if ready else "Unknown", "Gateway", ""))
    if agent_done is None:
        wanted.append(("AgentExited", "False", "NotExited", ""))
    else:
        reason = str(agent_done.get("reason") or "Exited")
        wanted.append(("AgentExited", "True", reason, f"exit code {_exit_code(agent_done)}"))
    if finisher_done is None:
        wanted.append(("Finished", "False", "NotFinished", ""))
    else:
        push = str(result.get("pushStatus") or "unknown")
        wanted.append(
            ("Finished", "True", f"Push{push.capitalize()}", _text(result.get("message")))
        )
    return wanted
