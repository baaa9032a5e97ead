"""The agent's Pod: clone step, gateway sidecar, agent, finishing step; one security context each.

The agent's security context is the local security profile's (:mod:`kapsis.sandbox.security`)
translated to Kubernetes: capabilities, no-new-privileges, seccomp, read-only root, AppArmor for
``paranoid``. What Kubernetes cannot express per container (a noexec ``/tmp``, a pids limit) is
listed in docs/kubernetes.md. Two things are stricter than locally, because the gateway tells
the finisher from the agent by uid and the agent shares the Pod's network namespace: the agent
always drops every capability and never gains privileges, whatever the profile says, and
capabilities that would let it change uid or touch the network cannot be given back.
"""

from __future__ import annotations

from typing import Any

from kapsis.config.models import duration_to_seconds, memory_to_bytes
from kapsis.errors import ConfigError
from kapsis.k8s import layout
from kapsis.k8s.names import AGENT_CONTAINER, CLONE_CONTAINER, FINISHER_CONTAINER, GATEWAY_CONTAINER
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings
from kapsis.network.gateway_layout import (
    CONFIG_TARGET,
    GATEWAY_CAPABILITIES,
    LOG_TARGET,
    VERDICT,
)
from kapsis.sandbox.ca_bundle import CA_TARGET
from kapsis.sandbox.security import effective_settings

# The clone step hands the workspace to the agent's uid and the trusted repo to the finisher's.
CLONE_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER")
# cap_add may not give these back: each lets the agent change uid (and so pass the gateway as
# the finisher), reconfigure the shared network namespace, or reach other containers.
FORBIDDEN_AGENT_CAPABILITIES = frozenset(
    {
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETFCAP",
        "CAP_SYS_ADMIN",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_PTRACE",
        "CAP_SYS_MODULE",
        "CAP_BPF",
        "CAP_DAC_READ_SEARCH",
    }
)
# Time for everything around the agent (clone, gateway start, commit, push) on top of its own
# limit: activeDeadlineSeconds ends a Pod stuck anywhere, but never cuts the agent's time.
POD_DEADLINE_MARGIN_SECONDS = 3600
# The wrapped agent is killed this long after its limit's SIGTERM if it ignores it.
TIMEOUT_KILL_AFTER = "30s"
WORKSPACE_VOLUME = "workspace"
TRUSTED_VOLUME = "kapsis-repo"
CREDENTIALS_VOLUME = "credentials"
POD_INFO_VOLUME = "pod-info"
TASK_VOLUME = "task"
GATEWAY_CONFIG_VOLUME = "gateway-config"
CA_VOLUME = "ca-bundle"
# A subscription login (the profile's ``login``): its Secret, mounted read-only here, is copied
# to where the CLI reads it (in the agent's home, a memory-backed emptyDir) before it starts.
LOGIN_VOLUME = "login"
LOGIN_DIR = "/run/kapsis/login"
LOGIN_COPY = f'umask 077 && mkdir -p "${{1%/*}}" && cp {LOGIN_DIR}/login "$1" && shift && exec "$@"'
CA_KEY = "ca-bundle.crt"
GATEWAY_LOG_VOLUME = "gateway-log"


def quantity(size_bytes: int) -> str:
    """A byte count as a Kubernetes quantity, in the largest binary unit that divides it."""
    for suffix, unit in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size_bytes % unit == 0:
            return f"{size_bytes // unit}{suffix}"
    return str(size_bytes)


def cpu_quantity(cpus: float) -> str:
    return f"{max(1, round(cpus * 1000))}m"


def _seccomp(settings: OperatorSettings, kapsis_filter: bool) -> dict[str, str]:
    if kapsis_filter and settings.seccomp == "Localhost":
        return {"type": "Localhost", "localhostProfile": settings.seccomp_localhost_profile}
    # A profile without the Kapsis filter gets the runtime's default, as podman gives locally.
    return {"type": "RuntimeDefault"}


def agent_security_context(spec: AgentRequestSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The agent container's securityContext, from the request's security profile."""
    security = spec.security
    effective = effective_settings(security.profile, security.overrides)
    added = [cap.removeprefix("CAP_") for cap in security.overrides.cap_add]
    forbidden = sorted(
        f"CAP_{cap}" for cap in added if f"CAP_{cap}" in FORBIDDEN_AGENT_CAPABILITIES
    )
    if forbidden:
        raise ConfigError(
            f"spec.security.overrides.cap_add: {', '.join(forbidden)} cannot be given to the "
            "agent on Kubernetes: it would let the agent pass the network gateway"
        )
    context: dict[str, Any] = {
        "runAsUser": layout.AGENT_UID,
        "runAsGroup": layout.AGENT_UID,
        "runAsNonRoot": True,
        "privileged": False,
        # Always false (even for minimal / no_new_privileges: false): see the module docstring.
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], **({"add": sorted(set(added))} if added else {})},
        "readOnlyRootFilesystem": bool(effective["read_only_root"]),
        "seccompProfile": _seccomp(settings, bool(effective["seccomp"])),
    }
    if effective["requires_lsm"]:
        context["appArmorProfile"] = {
            "type": "Localhost",
            "localhostProfile": settings.apparmor_profile,
        }
    return context


def _step_context(uid: int, capabilities: tuple[str, ...] = ()) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": uid != 0,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], **({"add": list(capabilities)} if capabilities else {})},
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return context


def _mount(volume: str, path: str, read_only: bool = False, **extra: str) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": volume, "mountPath": path, **extra}
    if read_only:
        mount["readOnly"] = True
    return mount


def _scratch(name: str, size: str = "256Mi") -> dict[str, Any]:
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def agent_command(
    argv: tuple[str, ...], spec: AgentRequestSpec, login_file: str | None = None
) -> list[str]:
    """The agent's argv, inside ``timeout`` when the request has a time limit.

    Why a wrapper rather than only activeDeadlineSeconds: the deadline kills the whole Pod, the
    finishing step with it, so the agent's partial work would be lost; ``timeout`` (PID 1 of the
    agent container, which the agent cannot SIGKILL) ends the agent alone with exit code 124
    (137 when it had to SIGKILL), which the operator reports as errorType ``timeout``, and the
    finisher still commits. activeDeadlineSeconds remains as the Pod's backstop.
    """
    if login_file is not None:
        # The CLI may rewrite its login file (a refreshed token): a copy of its own, not the
        # read-only Secret.
        argv = ("sh", "-c", LOGIN_COPY, "kapsis-login", login_file, *argv)
    if spec.resources.timeout is None:
        return list(argv)
    seconds = duration_to_seconds(spec.resources.timeout)
    return ["timeout", f"--kill-after={TIMEOUT_KILL_AFTER}", f"{seconds}s", *argv]


def agent_container(
    spec: AgentRequestSpec,
    settings: OperatorSettings,
    image: str,
    command: list[str],
    workdir: str,
    env: list[dict[str, Any]],
    login: bool = False,
) -> dict[str, Any]:
    memory = quantity(memory_to_bytes(spec.resources.memory))
    cpu = cpu_quantity(spec.resources.cpus)
    return {
        "name": AGENT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "workingDir": workdir,
        "env": env,
        # requests = limits: Guaranteed QoS, so the limit the user set is what the agent gets.
        "resources": {
            "limits": {"memory": memory, "cpu": cpu},
            "requests": {"memory": memory, "cpu": cpu},
        },
        "securityContext": agent_security_context(spec, settings),
        "volumeMounts": [
            _mount(WORKSPACE_VOLUME, layout.WORKSPACE),
            _mount(TASK_VOLUME, layout.TASK_SPEC, read_only=True, subPath="task-spec.md"),
            _mount("agent-home", layout.AGENT_HOME),
            _mount("agent-tmp", "/tmp"),
            *(
                [_mount(CA_VOLUME, CA_TARGET, read_only=True, subPath=CA_KEY)]
                if spec.caBundle
                else []
            ),
            *([_mount(LOGIN_VOLUME, LOGIN_DIR, read_only=True)] if login else []),
        ],
    }


def _tools_step(
    name: str,
    step: str,
    settings: OperatorSettings,
    step_env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    credentials: bool,
    security_context: dict[str, Any],
) -> dict[str, Any]:
    """A step of the tools image (``python3 -m kapsis.k8s.inpod.STEP``): the clone or the
    finisher, the only containers that mount the credentials Secret."""
    if credentials:
        mounts = [*mounts, _mount(CREDENTIALS_VOLUME, layout.CREDENTIALS, read_only=True)]
    return {
        "name": name,
        "image": settings.tools_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", f"kapsis.k8s.inpod.{step}"],
        "env": step_env,
        "resources": {
            "limits": {"memory": "1Gi", "cpu": "1"},
            "requests": {"memory": "128Mi", "cpu": "100m"},
        },
        "securityContext": security_context,
        "volumeMounts": mounts,
    }


def clone_container(
    settings: OperatorSettings, step_env: list[dict[str, Any]], credentials: bool
) -> dict[str, Any]:
    mounts = [
        _mount(WORKSPACE_VOLUME, layout.WORKSPACE),
        _mount(TRUSTED_VOLUME, layout.TRUSTED_VOLUME),
        _mount("clone-tmp", "/tmp"),
    ]
    context = _step_context(0, CLONE_CAPABILITIES)
    return _tools_step(CLONE_CONTAINER, "clone", settings, step_env, mounts, credentials, context)


def gateway_container(settings: OperatorSettings) -> dict[str, Any]:
    """The native sidecar: same image, files and capabilities as the Podman gateway."""
    verdict = f"{LOG_TARGET}/{VERDICT}"
    return {
        "name": GATEWAY_CONTAINER,
        "image": settings.gateway_image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": ["/bin/bash", f"{CONFIG_TARGET}/entrypoint.sh"],
        # The agent starts only after this passes: the rules are loaded and the self-test said
        # "ok". A gateway that fails it never lets the Pod reach the agent.
        "startupProbe": {
            "exec": {"command": ["/bin/sh", "-c", f'test "$(cat {verdict})" = ok']},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        # The proxy carries every connection of the agent to a name: a tight CPU limit would
        # throttle the agent's downloads.
        "resources": {
            "limits": {"memory": "256Mi", "cpu": "1"},
            "requests": {"memory": "64Mi", "cpu": "50m"},
        },
        "securityContext": _step_context(0, GATEWAY_CAPABILITIES),
        "volumeMounts": [
            _mount(GATEWAY_CONFIG_VOLUME, CONFIG_TARGET, read_only=True),
            _mount(GATEWAY_LOG_VOLUME, LOG_TARGET),
            _mount("gateway-run", "/run"),
            _mount("gateway-tmp", "/tmp"),
        ],
    }


def finisher_container(
    settings: OperatorSettings, step_env: list[dict[str, Any]], credentials: bool
) -> dict[str, Any]:
    mounts = [
        # Read-only: the finisher reads the agent's files and git objects, never runs in them.
        _mount(WORKSPACE_VOLUME, layout.WORKSPACE, read_only=True),
        _mount(TRUSTED_VOLUME, layout.TRUSTED_VOLUME),
        _mount(POD_INFO_VOLUME, layout.POD_INFO, read_only=True),
        _mount("finisher-tmp", "/tmp"),
    ]
    context = _step_context(layout.FINISHER_UID)
    container = _tools_step(
        FINISHER_CONTAINER, "finish", settings, step_env, mounts, credentials, context
    )
    # Its result (the operator's only source for commit and push) is its termination message.
    container["terminationMessagePath"] = layout.TERMINATION_LOG
    container["terminationMessagePolicy"] = "File"
    return container


def volumes(
    spec: AgentRequestSpec,
    task_config_map: str,
    task_key: str,
    gateway_config_map: str | None,
    ca_config_map: str | None = None,
    login: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    workspace_size = quantity(memory_to_bytes(spec.resources.workspaceSize))
    items: list[dict[str, Any]] = [
        {"name": WORKSPACE_VOLUME, "emptyDir": {"sizeLimit": workspace_size}},
        {"name": TRUSTED_VOLUME, "emptyDir": {"sizeLimit": workspace_size}},
        {
            "name": TASK_VOLUME,
            "configMap": {
                "name": task_config_map,
                "items": [{"key": task_key, "path": "task-spec.md"}],
                "defaultMode": 0o444,
            },
        },
        {
            "name": POD_INFO_VOLUME,
            "downwardAPI": {
                "items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
                ],
                "defaultMode": 0o444,
            },
        },
        _scratch("agent-home", "1Gi"),
        {"name": "agent-tmp", "emptyDir": {"sizeLimit": "2Gi"}},
        _scratch("clone-tmp"),
        {"name": "finisher-tmp", "emptyDir": {"sizeLimit": workspace_size}},
    ]
    credentials = spec.workspace.git.credentialsSecret
    if credentials:
        # Readable by the finisher's uid; only the clone and finishing steps mount it.
        items.append(
            {
                "name": CREDENTIALS_VOLUME,
                "secret": {"secretName": credentials, "defaultMode": 0o444},
            }
        )
    if login is not None:
        secret_name, key = login
        items.append(
            {
                "name": LOGIN_VOLUME,
                "secret": {
                    "secretName": secret_name,
                    "items": [{"key": key, "path": "login"}],
                    "defaultMode": 0o444,
                },
            }
        )
    if ca_config_map:
        items.append(
            {
                "name": CA_VOLUME,
                "configMap": {
                    "name": ca_config_map,
                    "items": [{"key": CA_KEY, "path": CA_KEY}],
                    "defaultMode": 0o444,
                },
            }
        )
    if gateway_config_map:
        items += [
            {
                "name": GATEWAY_CONFIG_VOLUME,
                "configMap": {"name": gateway_config_map, "defaultMode": 0o444},
            },
            {"name": GATEWAY_LOG_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}},
            _scratch("gateway-run", "16Mi"),
            _scratch("gateway-tmp", "16Mi"),
        ]
    return items


def pod_deadline(spec: AgentRequestSpec) -> int | None:
    if spec.resources.timeout is None:
        return None
    return duration_to_seconds(spec.resources.timeout) + POD_DEADLINE_MARGIN_SECONDS
