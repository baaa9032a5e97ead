"""Render one ``AgentRequest`` into the Kubernetes objects that run it: Pod, NetworkPolicy,
ConfigMaps. Pure data (no API calls), so the operator, the tests and the validator share it.

The meaning comes from the local planning code: the agent profile gives command, image and API
hosts (:mod:`kapsis.agents`), the security profile the agent's security context
(:mod:`kapsis.k8s.render_pod`), the network policy the gateway's files and the NetworkPolicy
(:mod:`kapsis.k8s.render_network`). Every object is owned by the request (controller), so
deleting the request deletes them.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from typing import Any

from kapsis.agents.profiles import AgentProfile, find_profile
from kapsis.config.models import (
    DEFAULT_COMMIT_EXCLUDE,
    DEFAULT_COMMIT_MESSAGE,
    AgentSection,
    duration_to_seconds,
)
from kapsis.errors import ConfigError
from kapsis.git.branches import BRANCH_PREFIX, check_branch_name
from kapsis.k8s import layout
from kapsis.k8s.names import MANAGED_BY_LABEL, MANAGED_BY_VALUE, REQUEST_LABEL
from kapsis.k8s.render_network import (
    gateway_files,
    git_remote,
    network_policy_object,
    network_policy_of,
)
from kapsis.k8s.render_pod import (
    CA_KEY,
    agent_command,
    agent_container,
    clone_container,
    finisher_container,
    gateway_container,
    pod_deadline,
    volumes,
)
from kapsis.k8s.resource import GROUP, KIND, VERSION, AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings
from kapsis.network.gateway_layout import UNPRIVILEGED_PORT_START
from kapsis.sandbox.agent_options import AgentOptions, agent_options
from kapsis.sandbox.ca_bundle import ca_variables
from kapsis.sandbox.plan import (
    MAX_ARG_LENGTH,
    agent_command as local_agent_command,
    fits_one_string,
    task_summary,
)

# Set by Kapsis in the agent's environment; a request may not set them (KAPSIS_* is refused by
# the model already).
RESERVED_ENV_NAMES = frozenset({"HOME"})
MAX_NAME = 253
MAX_LABEL = 63
GATEWAY_RESOLVER = "127.0.0.1"


@dataclass(frozen=True)
class RenderedRequest:
    """The objects of one request, as plain dicts ready for the kubernetes client."""

    pod: dict[str, Any]
    network_policy: dict[str, Any]
    config_maps: tuple[dict[str, Any], ...]
    image: str  # the agent's (checked against the allowed prefixes)

    def objects(self) -> tuple[dict[str, Any], ...]:
        """Every object, in creation order (ConfigMaps before the Pod that mounts them)."""
        return (*self.config_maps, self.network_policy, self.pod)


def _short(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else a prefix and a hash of the whole."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-.')}-{digest}"


def object_name(request: str, suffix: str = "") -> str:
    """The name of an object of request ``request``: ``kapsis-NAME[-SUFFIX]``, at most 253."""
    tail = f"-{suffix}" if suffix else ""
    return _short(f"kapsis-{request}", MAX_NAME - len(tail)) + tail


def pod_name(request: str) -> str:
    # A Pod's name is also its hostname, a DNS label: 63 characters.
    return _short(f"kapsis-{request}", MAX_LABEL)


def request_label_value(request: str) -> str:
    """The value of the request label on the Pod (a label value is at most 63 characters)."""
    return _short(request, MAX_LABEL)


def pod_labels(request: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY_VALUE, REQUEST_LABEL: request_label_value(request)}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(object_name: str, namespace: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "name": object_name,
        "namespace": namespace,
        "labels": pod_labels(name),
        "ownerReferences": [owner_reference(name, uid)],
    }


def agent_image(spec: AgentRequestSpec, profile: AgentProfile, settings: OperatorSettings) -> str:
    """The request's image, else the profile's, else the operator's default; checked."""
    image = spec.agent.image or profile.image or settings.agent_image
    if not settings.image_allowed(image):
        allowed = ", ".join(settings.allowed_image_prefixes) or "none"
        raise ConfigError(
            f"spec.agent.image: {image} is not allowed: it does not start with an allowed "
            f"prefix ({allowed}); "
            "the operator's KAPSIS_OPERATOR_ALLOWED_IMAGE_PREFIXES decides"
        )
    return image


def check_environment(spec: AgentRequestSpec) -> None:
    """Reserved names and names given twice are refused (with the key that says so)."""
    for section, names in (("set", spec.environment.set), ("secrets", spec.environment.secrets)):
        for name in names:
            if name in RESERVED_ENV_NAMES:
                raise ConfigError(
                    f"spec.environment.{section}.{name}: {name} is reserved (Kapsis sets it)"
                )
    both = sorted(set(spec.environment.set) & set(spec.environment.secrets))
    if both:
        raise ConfigError(
            f"spec.environment: {', '.join(both)} is in both set and secrets; keep one"
        )


def branch_of(name: str, spec: AgentRequestSpec) -> str:
    branch = spec.workspace.git.branch or f"{BRANCH_PREFIX}{name}"
    return check_branch_name(branch, "spec.workspace.git.branch")


def _command_template(spec: AgentRequestSpec, profile: AgentProfile) -> str | list[str]:
    return spec.agent.command if spec.agent.command is not None else profile.command


def spec_agent_options(spec: AgentRequestSpec, profile: AgentProfile) -> AgentOptions:
    """agent.endpoint, agent.model and agent.args of the request, as a local run takes them."""
    section = AgentSection(
        name=profile.name, endpoint=spec.agent.endpoint, model=spec.agent.model,
        args=spec.agent.args,
    )  # fmt: skip
    return agent_options(section, profile, lambda key: "spec." + ".".join(key))


def command_argv(spec: AgentRequestSpec, profile: AgentProfile) -> tuple[str, ...]:
    """The agent's argv, as a local run builds it; ``{task}`` from a ConfigMap is read at start."""
    template = _command_template(spec, profile)
    extra = spec_agent_options(spec, profile).args
    if isinstance(template, str) or spec.task.inline is not None:
        try:  # as locally: a string goes through sh, {task} is the inline text
            return local_agent_command(template, spec.task.inline or "", extra)
        except ConfigError:
            raise ConfigError(
                f"spec.task.inline: longer than {MAX_ARG_LENGTH} bytes, too long for a command "
                "argument; put it in a ConfigMap (spec.task.configMapRef)"
            ) from None
    template = [*template, *extra]
    if not any("{task}" in part for part in template):
        return tuple(template)
    # The text is only known in the Pod: a shell reads the spec file and substitutes it.
    words = [
        '"' + _double_quoted(part).replace("{task}", "${KAPSIS_TASK}") + '"'
        if "{task}" in part
        else shlex.quote(part)
        for part in template
    ]
    script = f'KAPSIS_TASK="$(cat {layout.TASK_SPEC})"; export KAPSIS_TASK; exec {" ".join(words)}'
    return ("sh", "-c", script)


def _double_quoted(text: str) -> str:
    return "".join("\\" + c if c in '\\$`"' else c for c in text)


def _task_text_summary(name: str, spec: AgentRequestSpec) -> str:
    if spec.task.inline is not None:
        return task_summary(spec.task.inline, None) or "task"
    ref = spec.task.configMapRef
    assert ref is not None
    return f"spec configmap {ref.name}/{ref.key}"


def agent_env(name: str, spec: AgentRequestSpec, profile: AgentProfile) -> list[dict[str, Any]]:
    secrets = spec.environment.secrets
    options = spec_agent_options(spec, profile)
    plain = {
        **{k: v for k, v in profile.env.items() if k not in secrets},
        **{k: v for k, v in options.env.items() if k not in secrets},
        **(ca_variables() if spec.caBundle is not None else {}),
        **spec.environment.set,
        "HOME": layout.AGENT_HOME,
        "KAPSIS_AGENT_ID": name,
        "KAPSIS_TASK_SPEC": layout.TASK_SPEC,
    }
    if spec.task.inline is not None and fits_one_string(f"KAPSIS_TASK={spec.task.inline}"):
        plain["KAPSIS_TASK"] = spec.task.inline
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    for variable, ref in secrets.items():
        if profile.login is not None and variable == profile.login.secret:
            continue  # a file, never a variable (render_pod mounts it)
        env.append(
            {"name": variable, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    return env


def step_config(name: str, spec: AgentRequestSpec, branch: str, profile: AgentProfile) -> str:
    git = spec.workspace.git
    remote = git_remote(git.url)
    kind = "none"
    if git.credentialsSecret:
        kind = "ssh" if remote.transport == "ssh" else "token"
    message = DEFAULT_COMMIT_MESSAGE.format(
        task=_task_text_summary(name, spec),
        agent=profile.name,
        agent_id=name,
        branch=branch,
        base=git.baseBranch or "",
        project=git.url,
    )
    timeout = spec.resources.timeout
    wait = (duration_to_seconds(timeout) if timeout is not None else 24 * 3600) + 3600
    return layout.StepConfig(
        request=name,
        url=git.url,
        branch=branch,
        base_branch=git.baseBranch,
        push=git.push,
        credentials=kind,
        message=message,
        # The agent CLI's own state files are left out as a local run leaves them.
        exclude=(*DEFAULT_COMMIT_EXCLUDE, *profile.state_files),
        wait_timeout_seconds=wait,
    ).to_env()


def render_request(
    name: str,
    namespace: str,
    uid: str,
    spec: AgentRequestSpec,
    settings: OperatorSettings,
) -> RenderedRequest:
    """The objects that run request ``namespace/name`` (uid ``uid``, for owner references).

    Raises :class:`kapsis.errors.ConfigError` for a request the settings do not allow (an
    image outside the allowed prefixes, a reserved variable, a capability the agent may not
    have, a bad branch name, an unknown profile); the message names the offending key.
    Whether the namespace allows ``open`` networking is checked by the operator
    (:func:`kapsis.operator.validation.validate_request`), which reads the namespace's labels.
    """
    profile = find_profile(spec.agent.profile)
    image = agent_image(spec, profile, settings)
    check_environment(spec)
    branch = branch_of(name, spec)
    remote = git_remote(spec.workspace.git.url)
    policy = network_policy_of(spec, profile, settings)
    config_maps: list[dict[str, Any]] = []

    if spec.task.inline is not None:
        task_map, task_key = object_name(name, "task"), "task-spec.md"
        config_maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _metadata(task_map, namespace, name, uid),
                "data": {task_key: spec.task.inline},
            }
        )
    else:
        assert spec.task.configMapRef is not None
        task_map, task_key = spec.task.configMapRef.name, spec.task.configMapRef.key

    gateway_map: str | None = None
    if spec.network.mode != "open":
        gateway_map = object_name(name, "gateway")
        config_maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _metadata(gateway_map, namespace, name, uid),
                "data": gateway_files(spec, policy, remote, settings),
            }
        )

    ca_map: str | None = None
    if spec.caBundle is not None:
        ca_map = object_name(name, "ca")
        config_maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _metadata(ca_map, namespace, name, uid),
                "data": {CA_KEY: spec.caBundle.inline},
            }
        )

    step_env = [
        {"name": layout.STEP_CONFIG_ENV, "value": step_config(name, spec, branch, profile)},
        {"name": "HOME", "value": "/tmp"},  # git and ssh want one; the root is read-only
    ]
    credentials = bool(spec.workspace.git.credentialsSecret)
    init_containers = [clone_container(settings, step_env, credentials)]
    if gateway_map is not None:
        init_containers.append(gateway_container(settings))
    login = spec.environment.secrets.get(profile.login.secret) if profile.login else None
    login_file = profile.login.file if profile.login and login else None
    command = agent_command(command_argv(spec, profile), spec, login_file)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "shareProcessNamespace": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": init_containers,
        "containers": [
            agent_container(
                spec,
                settings,
                image,
                command,
                profile.workdir,
                agent_env(name, spec, profile),
                login=login is not None,
            ),
            finisher_container(settings, step_env, credentials),
        ],
        "volumes": volumes(
            spec,
            task_map,
            task_key,
            gateway_map,
            ca_map,
            (login.name, login.key) if login else None,
        ),
    }
    if gateway_map is not None:
        # Ports below 1024 stay privileged in the Pod's network namespace whatever the runtime's
        # default (containerd 2 lowers it to 0): the gateway's resolver listens on one, and the
        # agent must never bind it (a safe sysctl, allowed by default).
        pod_spec["securityContext"]["sysctls"] = [
            {"name": "net.ipv4.ip_unprivileged_port_start", "value": str(UNPRIVILEGED_PORT_START)}
        ]
        # Every name the Pod looks up goes to the gateway's allowlisting resolver.
        pod_spec["dnsPolicy"] = "None"
        pod_spec["dnsConfig"] = {
            "nameservers": [GATEWAY_RESOLVER],
            "options": [{"name": "ndots", "value": "1"}],
        }
    deadline = pod_deadline(spec)
    if deadline is not None:
        pod_spec["activeDeadlineSeconds"] = deadline
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(pod_name(name), namespace, name, uid),
        "spec": pod_spec,
    }
    network_policy = network_policy_object(
        spec,
        policy,
        remote,
        settings,
        _metadata(object_name(name), namespace, name, uid),
        pod_labels(name),
    )
    return RenderedRequest(
        pod=pod, network_policy=network_policy, config_maps=tuple(config_maps), image=image
    )
