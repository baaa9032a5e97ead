"""A run as pure data: :class:`SandboxPlan`, computed from the request, the config and the host.

Everything a backend needs is decided here, before any container exists: image, user, command,
environment names, mounts, limits, security settings, network policy, workspace and git target.
Backends only translate a plan, so ``--dry-run`` is this object printed, and the Podman and
Kubernetes backends cannot disagree about what a config means.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from typing import Any, Literal

from kapsis import paths
from kapsis.agents import AgentProfile
from kapsis.agents.profiles import ActivityLine, FailureSign
from kapsis.buildtools import BuildToolsPlan, plan_build_tools
from kapsis.config import base as config_base
from kapsis.config.loader import LoadedConfig
from kapsis.config.models import (
    SecurityProfileName,
    duration_to_seconds,
    memory_to_bytes,
)
from kapsis.errors import ConfigError, HostUnsupportedError
from kapsis.host.facts import HostFacts
from kapsis.sandbox.agent_options import agent_options
from kapsis.sandbox.ca_bundle import CA_TARGET, plan_ca_bundle
from kapsis.sandbox.network_plan import NetworkPlan, plan_network
from kapsis.sandbox.plan_model import PlanModel
from kapsis.sandbox.secrets_plan import (
    ENTRYPOINT,
    INBOX,
    INBOX_TARGET,
    INIT_SCRIPT,
    INIT_TARGET,
    SECRETS_TMPFS,
    SecretPlan,
    plan_secrets,
    uses_login,
)
from kapsis.sandbox.security import APPARMOR_PROFILE_NAME, PROFILES, effective_settings
from kapsis.sandbox.workspace_plan import (
    GitPlan,
    WorkspacePlan,
    plan_workspace_and_git,
    with_disk_quota,
)
from kapsis.ssh.trust import CLIENT_CONFIG_TARGET, KNOWN_HOSTS_TARGET, SshPlan, plan_ssh

AGENT_UID = 1000
AGENT_HOME = config_base.AGENT_HOME
SPEC_TARGET = "/task-spec.md"
USERNS_SIZE = 65536
# Linux refuses a single argv string longer than this (MAX_ARG_STRLEN).
MAX_ARG_LENGTH = 128 * 1024
_AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class Mount(PlanModel):
    source: str
    target: str
    read_only: bool = True


class Tmpfs(PlanModel):
    target: str
    options: tuple[str, ...]


class UserNamespacePlan(PlanModel):
    """How container uids map to host uids.

    ``mapped`` (rootful): a private range of ``size`` host uids, allocated at launch, so that no
    container uid - root included - is a real host user. ``keep-id`` (rootless): the agent runs
    as the invoking user, the most a rootless user can be.
    """

    kind: Literal["mapped", "keep-id"]
    size: int = USERNS_SIZE
    agent_uid: int = AGENT_UID


class SecurityPlan(PlanModel):
    profile: SecurityProfileName
    drop_all_capabilities: bool
    cap_add: tuple[str, ...]
    no_new_privileges: bool
    seccomp: bool
    read_only_root: bool
    noexec_tmp: bool
    apparmor_profile: str | None


class ResourcePlan(PlanModel):
    memory: str
    memory_bytes: int
    cpus: float
    pids_limit: int | None
    timeout_seconds: int | None
    limits_enforced: bool
    idle_timeout_seconds: int | None = None
    idle_action: str = "flag"
    # resources.disk: the size of the workspace's own filesystem and of each tmpfs.
    disk: str | None = None
    disk_bytes: int | None = None
    # Whether the workspace's size is enforced (a filesystem of its own); else why not.
    disk_enforced: bool = False
    disk_not_enforced: str | None = None


class SandboxPlan(PlanModel):
    """Everything about one agent's sandbox, decided before anything runs."""

    agent_id: str
    pod_name: str
    container_name: str
    project: str
    agent: str
    image: str
    requires: tuple[str, ...]
    command: tuple[str, ...]
    workdir: str
    env: dict[str, str]
    secrets: tuple[SecretPlan, ...]
    # Runs before ``command`` (which it execs): the secrets' init script, when there are secrets.
    entrypoint: tuple[str, ...]
    task_summary: str
    spec_source: str | None
    mounts: tuple[Mount, ...]
    tmpfs: tuple[Tmpfs, ...]
    workspace: WorkspacePlan
    userns: UserNamespacePlan
    security: SecurityPlan
    resources: ResourcePlan
    network: NetworkPlan
    git: GitPlan
    audit_enabled: bool
    labels: dict[str, str]
    # Host keys the sandbox's ssh and the host's push trust (None: ssh.verify_hosts is off).
    ssh: SshPlan | None = None
    build_tools: BuildToolsPlan | None = None
    # The profile's failure signs (kapsis.sandbox.agent_outcome).
    agent_failure: tuple[FailureSign, ...] = ()
    # Output lines that report the agent's actions (a CLI without hooks).
    agent_activity: tuple[ActivityLine, ...] = ()


@dataclass(frozen=True)
class RunRequest:
    """What a caller asks for. ``None`` means: take it from the config (or its defaults)."""

    project: Path
    task: str | None = None
    spec: Path | None = None
    agent: str | None = None
    agent_id: str | None = None
    network_mode: str | None = None
    security_profile: str | None = None
    memory: str | None = None
    cpus: float | None = None
    timeout: str | None = None
    disk: str | None = None
    model: str | None = None
    image: str | None = None
    branch: str | None = None
    base_branch: str | None = None
    mode: str | None = None
    push: bool | None = None
    config_file: Path | None = None
    allow: tuple[str, ...] = ()
    extra_flags: dict[str, tuple[str, Any]] = field(default_factory=dict)
    # "podman" (local) or "k8s" (an AgentRequest on a cluster; see kapsis.backends.kubernetes).
    backend: str = "podman"
    namespace: str | None = None

    def flag_values(self) -> dict[str, tuple[str, Any]]:
        """The request's overrides, keyed by config path, labelled with their flag."""
        return {
            "agent.name": ("--agent", self.agent),
            "network.mode": ("--network-mode", self.network_mode),
            "security.profile": ("--security-profile", self.security_profile),
            "resources.memory": ("--memory", self.memory),
            "resources.cpus": ("--cpus", self.cpus),
            "resources.timeout": ("--timeout", self.timeout),
            "resources.disk": ("--disk", self.disk),
            "agent.model": ("--model", self.model),
            "image.name": ("--image", self.image),
            "git.branch": ("--branch", self.branch),
            "git.base_branch": ("--base-branch", self.base_branch),
            "filesystem.mode": ("--mode", self.mode),
            "git.auto_push": ("--push" if self.push else "--no-push", self.push),
            "kubernetes.namespace": ("--namespace", self.namespace),
            **self.extra_flags,
        }


def new_agent_id() -> str:
    return token_hex(3)


def check_agent_id(agent_id: str) -> str:
    if not _AGENT_ID_RE.match(agent_id):
        raise ConfigError(
            f"--agent-id {agent_id!r}: use 1-32 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )
    return agent_id


def build_plan(
    request: RunRequest,
    loaded: LoadedConfig,
    profile: AgentProfile,
    host: HostFacts,
    environ: dict[str, str] | None = None,
) -> SandboxPlan:
    """Decide everything about the sandbox. Raises ConfigError / HostUnsupportedError early."""
    config = loaded.config
    environ = dict(os.environ) if environ is None else environ
    project = request.project.expanduser().resolve()
    if not project.is_dir():
        raise ConfigError(f"PROJECT {request.project}: no such directory; pass a project folder")
    agent_id = check_agent_id(request.agent_id) if request.agent_id else new_agent_id()
    task_text, spec_source = task_of(request)

    settings = effective_settings(config.security.profile, config.security.overrides)
    if settings["requires_lsm"] and not host.apparmor:
        raise HostUnsupportedError(
            f"security profile 'paranoid' ({loaded.origin_of(('security', 'profile'))}) needs "
            "AppArmor, which this host does not have enabled; use --security-profile strict, "
            "or enable AppArmor"
        )
    secrets_planned = plan_secrets(loaded, profile, environ)
    secret_names = {secret.name for secret in secrets_planned}

    agent_extras = agent_options(config.agent, profile, loaded.origin_of)
    command = agent_command(config.agent.command or profile.command, task_text, agent_extras.args)
    summary = task_summary(task_text, spec_source)
    workspace, git = plan_workspace_and_git(
        loaded, project, agent_id, task_text, profile.state_files
    )
    sandbox_root = paths.sandbox_dir(agent_id)
    env = {
        **{k: v for k, v in profile.env.items() if k not in secret_names},
        **{k: v for k, v in agent_extras.env.items() if k not in secret_names},
        **{k: v for k, v in config.environment.set.items() if k not in secret_names},
        "HOME": AGENT_HOME,
        "KAPSIS_AGENT_ID": agent_id,
    }
    if config.audit.enabled:
        # Each bash the agent starts traces its commands to the audit trail (every agent,
        # whatever its CLI reports itself): kapsis.audit.agent_reports.
        env.setdefault("BASH_ENV", config_base.BASH_ENV_TARGET)
    if spec_source is not None:
        env["KAPSIS_TASK_SPEC"] = SPEC_TARGET
    elif fits_one_string(f"KAPSIS_TASK={task_text}"):
        env["KAPSIS_TASK"] = task_text
    else:
        raise ConfigError(
            f"--task is longer than {MAX_ARG_LENGTH} bytes, too long for the environment; "
            "put it in a file and pass --spec FILE"
        )

    mounts = [_read_only_mount(m.source, m.target) for m in config.filesystem.mounts]
    ca_source, ca_env = plan_ca_bundle(loaded)
    if ca_source is not None:
        mounts.append(Mount(source=ca_source, target=CA_TARGET))
        for name, value in ca_env.items():
            env.setdefault(name, value)  # an explicit environment.set of the same name wins
    if spec_source is not None:
        mounts.append(Mount(source=str(sandbox_root / "task-spec.md"), target=SPEC_TARGET))
    ssh = plan_ssh(loaded, sandbox_root)
    tools = plan_build_tools(loaded, sandbox_root)
    mounts += _host_file_mounts(ssh, tools)
    disk_bytes = memory_to_bytes(config.resources.disk) if config.resources.disk else None
    workspace, disk_gap = with_disk_quota(workspace, disk_bytes, rootless=host.rootless)
    tmpfs = _sized(
        _tmpfs(settings["noexec_tmp"]) + _owned_dirs(tools), workspace.disk_bytes or disk_bytes
    )
    if secrets_planned:
        mounts += [
            Mount(source=str(sandbox_root / INBOX), target=INBOX_TARGET),
            Mount(source=str(sandbox_root / INIT_SCRIPT), target=INIT_TARGET),
        ]
        options = ("rw", "nosuid", "nodev", "noexec", "mode=0700", "U", "size=1m")
        tmpfs += (Tmpfs(target=SECRETS_TMPFS, options=options),)
    for name, value in (tools.env if tools else {}).items():
        env.setdefault(name, value)  # an explicit environment.set of the same name wins

    resources = config.resources
    pids = (
        resources.pids
        if resources.pids is not None
        else PROFILES[config.security.profile].pids_limit
    )
    return SandboxPlan(
        agent_id=agent_id,
        pod_name=f"kapsis-{agent_id}",
        container_name=f"kapsis-{agent_id}-agent",
        project=str(project),
        agent=profile.name,
        image=_image(loaded, profile),
        requires=tuple(profile.requires),
        command=command,
        workdir=config.agent.workdir or profile.workdir,
        env=env,
        secrets=secrets_planned,
        entrypoint=ENTRYPOINT if secrets_planned else (),
        task_summary=summary,
        spec_source=spec_source,
        mounts=tuple(mounts),
        tmpfs=tmpfs,
        workspace=workspace,
        userns=UserNamespacePlan(kind="keep-id" if host.rootless else "mapped"),
        security=SecurityPlan(
            profile=config.security.profile,
            drop_all_capabilities=settings["drop_all_capabilities"],
            cap_add=tuple(config.security.overrides.cap_add),
            no_new_privileges=settings["no_new_privileges"],
            seccomp=settings["seccomp"],
            read_only_root=settings["read_only_root"],
            noexec_tmp=settings["noexec_tmp"],
            apparmor_profile=APPARMOR_PROFILE_NAME if settings["requires_lsm"] else None,
        ),
        resources=ResourcePlan(
            memory=resources.memory,
            memory_bytes=memory_to_bytes(resources.memory),
            cpus=resources.cpus,
            pids_limit=pids,
            timeout_seconds=duration_to_seconds(resources.timeout) if resources.timeout else None,
            limits_enforced=host.limits_enforced,
            idle_timeout_seconds=(
                duration_to_seconds(resources.idle_timeout) if resources.idle_timeout else None
            ),
            idle_action=resources.idle_action,
            disk=_disk_size(resources.disk, disk_bytes, workspace.disk_bytes),
            disk_bytes=workspace.disk_bytes or disk_bytes,
            disk_enforced=workspace.disk_bytes is not None,
            disk_not_enforced=disk_gap,
        ),
        network=plan_network(
            loaded,
            profile,
            agent_id,
            request.allow,
            host.dns_servers,
            login=uses_login(profile, secrets_planned),
        ),
        git=git,
        audit_enabled=config.audit.enabled,
        ssh=ssh,
        build_tools=tools,
        agent_failure=tuple(profile.failure),
        agent_activity=tuple(profile.activity),
        labels={
            "io.kapsis.agent-id": agent_id,
            "io.kapsis.agent": profile.name,
            "io.kapsis.project": str(project),
        },
    )


def _image(loaded: LoadedConfig, profile: AgentProfile) -> str:
    """--image or image.name when given, else the profile's image, else the default image."""
    if loaded.origin_of(("image", "name")).kind == "default" and profile.image:
        return profile.image
    return loaded.config.image.name


def task_of(request: RunRequest) -> tuple[str, str | None]:
    """The task text of a request, and the spec file it came from (None for --task)."""
    if request.task is not None and request.spec is not None:
        raise ConfigError("--task and --spec: give one of them, not both")
    if request.spec is not None:
        spec = request.spec.expanduser()
        try:
            return spec.read_text(encoding="utf-8"), str(spec.resolve())
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"--spec {request.spec}: cannot read it ({error}); pass a Markdown file"
            ) from None
    if request.task is None or not request.task.strip():
        raise ConfigError("no task: pass --task TEXT or --spec FILE")
    return request.task, None


def agent_command(
    template: str | list[str], task_text: str, extra: Sequence[str] = ()
) -> tuple[str, ...]:
    """The agent's argv from a profile's command template and the ``extra`` arguments after it
    (:func:`~kapsis.sandbox.agent_options.agent_options`); both backends build it so."""
    if isinstance(template, str):
        # A string command goes through sh; the task reaches it only as $KAPSIS_TASK, the
        # extra arguments as $1, $2, ...
        return ("sh", "-c", template, *(("sh", *extra) if extra else ()))
    argv = (*(part.replace("{task}", task_text) for part in template), *extra)
    if not all(fits_one_string(part) for part in argv):
        raise ConfigError(
            f"the task is longer than {MAX_ARG_LENGTH} bytes, too long for a command argument; "
            "shorten it, or use an agent command that reads $KAPSIS_TASK_SPEC"
        )
    return argv


def fits_one_string(text: str) -> bool:
    """Whether the kernel accepts ``text`` as one argv or environment string (NUL included)."""
    return len(text.encode()) + 1 <= MAX_ARG_LENGTH


def task_summary(task_text: str, spec_source: str | None) -> str:
    """The task's first line (cut at 80 characters), and the spec file it came from."""
    first_line = task_text.strip().splitlines()[0] if task_text.strip() else ""
    summary = first_line if len(first_line) <= 80 else first_line[:77] + "..."
    return f"spec {spec_source}: {summary}" if spec_source else summary


def _read_only_mount(source: str, target: str) -> Mount:
    host_path = Path(source).expanduser()
    if not host_path.exists():
        raise ConfigError(
            f"filesystem.mounts: {source} does not exist on the host; fix the path or remove it"
        )
    return Mount(source=str(host_path.resolve()), target=target, read_only=True)


def _disk_size(asked: str | None, asked_bytes: int | None, planned: int | None) -> str | None:
    """resources.disk as the run has it: as asked, or what the host's free space allowed."""
    if planned is None or planned == asked_bytes:
        return asked
    return f"{planned // 1024**2}m (lowered from {asked}: the free space left for agents' disks)"


def _sized(mounts: tuple[Tmpfs, ...], disk_bytes: int | None) -> tuple[Tmpfs, ...]:
    """Each tmpfs holds at most resources.disk (the kernel refuses writes past it: ENOSPC)."""
    if disk_bytes is None:
        return mounts
    return tuple(Tmpfs(target=m.target, options=(*m.options, f"size={disk_bytes}")) for m in mounts)


def _tmpfs(noexec_tmp: bool) -> tuple[Tmpfs, ...]:
    tmp_options = ("rw", "nosuid", "nodev", "noexec") if noexec_tmp else ("rw", "nosuid", "nodev")
    return (
        Tmpfs(target="/tmp", options=(*tmp_options, "mode=1777")),
        # U: owned by the container user, so the home is writable even with a read-only root.
        Tmpfs(target=AGENT_HOME, options=("rw", "nosuid", "nodev", "mode=0700", "U")),
    )


def _host_file_mounts(ssh: SshPlan | None, tools: BuildToolsPlan | None) -> list[Mount]:
    """Files the host renders into the sandbox dir at launch, each mounted read-only."""
    mounts = []
    if ssh is not None:
        mounts.append(Mount(source=ssh.known_hosts, target=KNOWN_HOSTS_TARGET))
        mounts.append(Mount(source=ssh.client_config, target=CLIENT_CONFIG_TARGET))
    for item in tools.files if tools else ():
        mounts.append(Mount(source=item.source, target=item.target))
    return mounts


def _owned_dirs(tools: BuildToolsPlan | None) -> tuple[Tmpfs, ...]:
    # A mount point made inside the home tmpfs would belong to root; these stay the agent's.
    options = ("rw", "nosuid", "nodev", "mode=0700", "U")
    return tuple(Tmpfs(target=d, options=options) for d in (tools.writable_dirs if tools else ()))
