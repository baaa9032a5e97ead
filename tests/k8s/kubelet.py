"""What a kubelet would report about an agent's Pod, as plain status dicts.

Tests play the kubelet with these: ``pod_status(clone=..., agent=...)`` builds a Pod status
with the given container states, in the shape the API server returns (camelCase).
"""

from __future__ import annotations

import json
from typing import Any

from kapsis.k8s.names import AGENT_CONTAINER, CLONE_CONTAINER, FINISHER_CONTAINER, GATEWAY_CONTAINER

T0 = "2026-01-01T10:00:00Z"
T1 = "2026-01-01T10:01:00Z"
T2 = "2026-01-01T10:05:00Z"


def waiting(reason: str = "PodInitializing", message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {"waiting": {"reason": reason}}
    if message:
        state["waiting"]["message"] = message
    return state


def running(started: str = T1) -> dict[str, Any]:
    return {"running": {"startedAt": started}}


def terminated(
    code: int, reason: str | None = None, message: str | None = None, started: str = T1
) -> dict[str, Any]:
    term: dict[str, Any] = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "startedAt": started,
        "finishedAt": T2,
    }
    if message is not None:
        term["message"] = message
    return {"terminated": term}


def result_message(
    branch: str = "kapsis/req",
    sha: str = "0123456789abcdef0123456789abcdef01234567",
    push: str = "verified",
    message: str = "pushed",
) -> str:
    return json.dumps({"branch": branch, "commitSha": sha, "pushStatus": push, "message": message})


def container(name: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": extra.pop("image", f"localhost/kapsis-{name}:latest"),
        "imageID": extra.pop("imageID", ""),
        "state": state,
        "ready": extra.pop("ready", "running" in state),
        "restartCount": extra.pop("restartCount", 0),
        **extra,
    }


def pod_status(
    *,
    phase: str = "Pending",
    clone: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    finisher: dict[str, Any] | None = None,
    gateway_started: bool | None = None,
    gateway_restarts: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    init = []
    if clone is not None:
        init.append(container(CLONE_CONTAINER, clone))
    if gateway is not None:
        started = "running" in gateway if gateway_started is None else gateway_started
        init.append(
            container(
                GATEWAY_CONTAINER,
                gateway,
                started=started,
                ready=started,
                restartCount=gateway_restarts,
            )
        )
    main = []
    if agent is not None:
        main.append(container(AGENT_CONTAINER, agent))
    if finisher is not None:
        main.append(container(FINISHER_CONTAINER, finisher))
    status: dict[str, Any] = {"phase": phase, **extra}
    if init:
        status["initContainerStatuses"] = init
    if main:
        status["containerStatuses"] = main
    return status


# The lifecycle of a Pod that runs to the end, step by step.
def cloning() -> dict[str, Any]:
    return pod_status(clone=running(T0), gateway=waiting(), agent=waiting(), finisher=waiting())


def gateway_starting() -> dict[str, Any]:
    return pod_status(
        clone=terminated(0, started=T0),
        gateway=running(T0),
        gateway_started=False,
        agent=waiting(),
        finisher=waiting(),
    )


def agent_running() -> dict[str, Any]:
    return pod_status(
        phase="Running",
        clone=terminated(0, started=T0),
        gateway=running(T0),
        agent=running(T1),
        finisher=running(T1),
    )


def agent_done(
    code: int = 0, reason: str | None = None, message: str | None = None
) -> dict[str, Any]:
    return pod_status(
        phase="Running",
        clone=terminated(0, started=T0),
        gateway=running(T0),
        agent=terminated(code, reason, message),
        finisher=running(T1),
    )


def finished(
    agent_code: int = 0,
    finisher_code: int = 0,
    finisher_message: str | None = None,
    agent_reason: str | None = None,
    agent_message: str | None = None,
) -> dict[str, Any]:
    return pod_status(
        phase="Succeeded" if agent_code == 0 and finisher_code == 0 else "Failed",
        clone=terminated(0, started=T0),
        gateway=terminated(0, started=T0),
        agent=terminated(agent_code, agent_reason, agent_message),
        finisher=terminated(
            finisher_code,
            message=result_message() if finisher_message is None else finisher_message,
        ),
    )
