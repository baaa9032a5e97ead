"""Pydantic models of ``agent-sandbox.yaml``: the single source of truth for configuration.

Validation, the JSON Schema (``kapsis config schema``) and the README's config reference are all
derived from these classes, so a key exists exactly when it is declared here. Every field has a
description; ``scripts/gen_docs.py`` turns them into the reference.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DEFAULT_IMAGE = "localhost/kapsis-base:latest"

SecurityProfileName = Literal["minimal", "standard", "strict", "paranoid"]
NetworkMode = Literal["none", "open", "filtered"]

_MEMORY_RE = re.compile(r"^(\d+)([bkmg]?)$")
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_RE = re.compile(r"^(\d+)([smh]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_RE = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(:\d{1,5})?$"
)
_CAPABILITY_RE = re.compile(r"^(CAP_)?[A-Z_]+$")
RESERVED_ENV_PREFIX = "KAPSIS_"


def memory_to_bytes(value: str) -> int:
    match = _MEMORY_RE.match(value.strip().lower())
    if not match:
        raise ValueError(f"{value!r} is not a size; use a number with b, k, m or g, e.g. 2g")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def duration_to_seconds(value: str | int) -> int:
    match = _DURATION_RE.match(str(value).strip().lower())
    if not match:
        raise ValueError(f"{value!r} is not a duration; use seconds or s, m, h, e.g. 30m")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _check_memory(value: str) -> str:
    if memory_to_bytes(value) < 6 * 1024**2:
        raise ValueError("memory must be at least 6m (podman's minimum)")
    return value.strip().lower()


def _check_duration(value: str | int) -> str | int:
    if duration_to_seconds(value) <= 0:
        raise ValueError("a duration must be positive")
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _)")
    if value.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(f"{value!r}: names starting with {RESERVED_ENV_PREFIX} are reserved")
    return value


def _check_host(value: str) -> str:
    if not _HOST_RE.match(value):
        raise ValueError(f"{value!r} is not a host name; use name, *.domain or name:port")
    _, _, port = value.partition(":")
    if port and not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535")
    return value.lower()


def _check_capability(value: str) -> str:
    upper = value.upper()
    if not _CAPABILITY_RE.match(upper):
        raise ValueError(f"{value!r} is not a capability name, e.g. CAP_CHOWN")
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def _check_absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path inside the sandbox")
    return value


MemorySize = Annotated[str, AfterValidator(_check_memory)]
Duration = Annotated[str | int, AfterValidator(_check_duration)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
HostPattern = Annotated[str, AfterValidator(_check_host)]
Capability = Annotated[str, AfterValidator(_check_capability)]
SandboxPath = Annotated[str, AfterValidator(_check_absolute)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(Section):
    name: str = Field(
        "shell",
        description="Agent profile to run: a built-in (shell, claude, codex, aider, gemini) or a "
        "user profile from ~/.config/kapsis/agents/NAME.yaml.",
    )
    command: str | list[str] | None = Field(
        None,
        description="Replaces the profile's command. A string runs with `sh -c`; a list is the "
        "argv, where `{task}` stands for the task text. The task is also in $KAPSIS_TASK.",
    )
    workdir: SandboxPath | None = Field(
        None,
        description="Working directory inside the sandbox (default: the profile's, /workspace).",
    )


class ResourcesSection(Section):
    memory: MemorySize = Field(
        "4g", description="Memory limit (e.g. 512m, 2g); OOM-killed past it."
    )
    cpus: float = Field(2.0, gt=0, le=1024, description="CPU limit in cores (e.g. 0.5, 2).")
    pids: int | None = Field(
        None,
        ge=16,
        le=1_000_000,
        description="Process limit. Default: the security profile's (standard 1024, strict 256).",
    )
    timeout: Duration | None = Field(
        None, description="Wall-clock limit for the agent (seconds, or 30s / 45m / 2h)."
    )


class SecurityOverrides(Section):
    read_only_root: bool | None = Field(
        None, description="Mount the image's root filesystem read-only."
    )
    no_new_privileges: bool | None = Field(
        None, description="Forbid privilege gain via setuid/file caps."
    )
    seccomp: bool | None = Field(None, description="Apply the Kapsis seccomp filter.")
    noexec_tmp: bool | None = Field(None, description="Mount /tmp as a noexec tmpfs.")
    cap_add: list[Capability] = Field(
        default_factory=list, description="Capabilities to give back after all are dropped."
    )


class SecuritySection(Section):
    profile: SecurityProfileName = Field(
        "standard", description="Hardening profile; see the security-profile table in the README."
    )
    overrides: SecurityOverrides = Field(
        default_factory=SecurityOverrides, description="Per-setting changes on top of the profile."
    )


class AllowlistSection(Section):
    hosts: list[HostPattern] = Field(
        default_factory=list,
        description="Host names the agent may reach in filtered mode: name, *.domain, name:port.",
    )


class NetworkSection(Section):
    mode: NetworkMode = Field(
        "none",
        description="none: loopback only. open: unfiltered (marked loudly). filtered: domain "
        "allowlist through the gateway (not available yet: runs refuse it rather than go open).",
    )
    allowlist: AllowlistSection = Field(
        default_factory=AllowlistSection, description="What filtered mode lets through."
    )


class ReadOnlyMount(Section):
    source: str = Field(description="Host path (~ is expanded); must exist.")
    target: SandboxPath = Field(description="Absolute path inside the sandbox.")


class FilesystemSection(Section):
    mode: Literal["overlay"] = Field(
        "overlay",
        description="overlay: the project is a read-only lower layer; the agent's writes go to a "
        "per-agent upper dir on the host. The host project is never modified.",
    )
    mounts: list[ReadOnlyMount] = Field(
        default_factory=list, description="Extra host paths mounted read-only into the sandbox."
    )


class GitSection(Section):
    branch: str | None = Field(
        None, description="Branch the agent's work is for (shown in status)."
    )
    base_branch: str | None = Field(None, description="Branch the agent's branch starts from.")


class EnvironmentSection(Section):
    set: dict[EnvName, str] = Field(
        default_factory=dict, description="Variables set in the agent's environment (plain values)."
    )
    passthrough: list[EnvName] = Field(
        default_factory=list,
        description="Host variables copied into the agent's environment by name (values are never "
        "written into the plan or to disk).",
    )


class ImageSection(Section):
    name: str = Field(DEFAULT_IMAGE, description="Container image the agent runs in.")


class AuditSection(Section):
    enabled: bool = Field(
        True, description="Record lifecycle events in ~/.kapsis/audit/AGENT_ID.jsonl (host-side)."
    )


class KapsisConfig(Section):
    """The whole of ``agent-sandbox.yaml``."""

    agent: AgentSection = Field(default_factory=AgentSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    filesystem: FilesystemSection = Field(default_factory=FilesystemSection)
    git: GitSection = Field(default_factory=GitSection)
    environment: EnvironmentSection = Field(default_factory=EnvironmentSection)
    image: ImageSection = Field(default_factory=ImageSection)
    audit: AuditSection = Field(default_factory=AuditSection)
