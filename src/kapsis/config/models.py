"""Pydantic models of ``agent-sandbox.yaml``: the single source of truth for configuration.

Validation, the JSON Schema (``kapsis config schema``) and the README's config reference are all
derived from these classes, so a key exists exactly when it is declared here. Every field has a
description; ``scripts/gen_docs.py`` turns them into the reference.
"""

from __future__ import annotations

import ipaddress
import re
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from kapsis.config.agent_section import AgentSection as AgentSection

# Re-exported: the base and the variable-name type are shared with the section modules.
from kapsis.config.base import (
    AGENT_HOME,
    AT_MOST,
    AT_MOST_TIME,
    FREE,
    NEEDS_TRUST,
    RESERVED_ENV_PREFIX as RESERVED_ENV_PREFIX,
    SECRETS_TMPFS,
    SUBSET,
    SUPERSET,
    EnvName as EnvName,
    SandboxPath as SandboxPath,
    Section as Section,
    widest_first,
)
from kapsis.config.kubernetes_section import KubernetesSection
from kapsis.config.tool_sections import (
    GIT_PROVIDERS as GIT_PROVIDERS,
    BuildToolsSection as BuildToolsSection,
    GitProvider as GitProvider,
    KnownHostsLine as KnownHostsLine,
    MavenSection as MavenSection,
    MirrorUrl as MirrorUrl,
    NpmSection as NpmSection,
    PipSection as PipSection,
    SshSection as SshSection,
)

DEFAULT_IMAGE = "localhost/kapsis-base:latest"

SecurityProfileName = Literal["minimal", "standard", "strict", "paranoid"]
NetworkMode = Literal["none", "open", "filtered"]

_MEMORY_RE = re.compile(r"^(\d+)([bkmg]?)$")
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_RE = re.compile(r"^(\d+)([smh]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_HOST_RE = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(:\d{1,5})?$"
)
_CAPABILITY_RE = re.compile(r"^(CAP_)?[A-Z_]+$")


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


def _check_size(value: str) -> str:
    if memory_to_bytes(value) <= 0:
        raise ValueError("a size must be more than 0")
    return value.strip().lower()


def _check_duration(value: str | int) -> str | int:
    if duration_to_seconds(value) <= 0:
        raise ValueError("a duration must be positive")
    return value


def _check_host(value: str) -> str:
    if not _HOST_RE.match(value):
        raise ValueError(f"{value!r} is not a host name; use name, *.domain or name:port")
    if is_ip_address(value) or is_ip_address(value.rpartition(":")[0]):
        raise ValueError(f"{value!r} is an address; list it under network.allowlist.addresses")
    _, _, port = value.partition(":")
    if port and not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535")
    return value.lower()


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_address(value: str) -> str:
    text = value.strip()
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else "" if not rest else "x"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an address; use an IP, a network (10.0.0.0/8), IP:port or "
            "[IPv6]:port"
        ) from None
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be a number between 1 and 65535")
    shown = f"[{network}]" if network.version == 6 and port else str(network)
    return f"{shown}:{port}" if port else shown


def _check_category(value: str) -> str:
    from importlib import resources

    folder = resources.files("kapsis.network") / "categories"
    known = sorted(
        i.name.removesuffix(".yaml") for i in folder.iterdir() if i.name.endswith(".yaml")
    )
    if value not in known:
        raise ValueError(f"{value!r} is not a category; use one of {', '.join(known)}")
    return value


def _check_capability(value: str) -> str:
    upper = value.upper()
    if not _CAPABILITY_RE.match(upper):
        raise ValueError(f"{value!r} is not a capability name, e.g. CAP_CHOWN")
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


MemorySize = Annotated[str, AfterValidator(_check_memory)]
ByteSize = Annotated[str, AfterValidator(_check_size)]
Duration = Annotated[str | int, AfterValidator(_check_duration)]
HostPattern = Annotated[str, AfterValidator(_check_host)]
AddressPattern = Annotated[str, AfterValidator(_check_address)]
CategoryName = Annotated[str, AfterValidator(_check_category)]


def _check_resolver(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    if address.is_loopback:
        raise ValueError(
            f"{value} is a loopback address: inside the sandbox that is the gateway itself; "
            "name a resolver the host can reach over the network"
        )
    return str(address)


IPAddress = Annotated[str, AfterValidator(_check_resolver)]
Capability = Annotated[str, AfterValidator(_check_capability)]


class ResourcesSection(Section):
    memory: MemorySize = Field(
        "4g",
        description="Memory limit (e.g. 512m, 2g); OOM-killed past it.",
        json_schema_extra=AT_MOST,
    )
    cpus: float = Field(
        2.0,
        gt=0,
        le=1024,
        description="CPU limit in cores (e.g. 0.5, 2).",
        json_schema_extra=AT_MOST,
    )
    pids: int | None = Field(
        None,
        ge=16,
        le=1_000_000,
        description="Process limit. Default: the security profile's (standard 1024, strict 256).",
        json_schema_extra=AT_MOST,
    )
    timeout: Duration | None = Field(
        "2h",
        description="Wall-clock limit for the agent (seconds, or 30s / 45m / 2h): past it the "
        "agent is stopped and the run exits 6. On by default, since an agent whose model "
        "endpoint cannot be reached may retry for ever; null: no limit.",
        json_schema_extra=AT_MOST_TIME,
    )
    idle_timeout: Duration | None = Field(
        None,
        description="A running agent with no output and no report for this long is flagged "
        "stalled in its status (and stopped, with idle_action: stop). Default: off.",
        json_schema_extra=FREE,
    )
    idle_action: Literal["flag", "stop"] = Field(
        "flag",
        description="What a stalled agent gets: flag (status only) or stop.",
        json_schema_extra=FREE,
    )
    disk: ByteSize | None = Field(
        "10g",
        description="What the agent can write to its workspace (its overlay layer or its "
        "worktree, on a filesystem of that size of its own) and to each tmpfs (/tmp, its home); "
        "past it, writes fail with ENOSPC inside the sandbox. Lowered, with a note, to what is "
        "free on the filesystem of ~/.kapsis at launch less 256 MiB (kept for the audit trail "
        "and status); a launch with less than 64 MiB to give is refused. null: no limit.",
        json_schema_extra=AT_MOST,
    )


class SecurityOverrides(Section):
    read_only_root: bool | None = Field(
        None,
        description="Mount the image's root filesystem read-only.",
        json_schema_extra=widest_first(False, None, True),
    )
    no_new_privileges: bool | None = Field(
        None,
        description="Forbid privilege gain via setuid/file caps.",
        json_schema_extra=widest_first(False, None, True),
    )
    seccomp: bool | None = Field(
        None,
        description="Apply the Kapsis seccomp filter.",
        json_schema_extra=widest_first(False, None, True),
    )
    noexec_tmp: bool | None = Field(
        None,
        description="Mount /tmp as a noexec tmpfs.",
        json_schema_extra=widest_first(False, None, True),
    )
    cap_add: list[Capability] = Field(
        default_factory=list,
        description="Capabilities to give back after all are dropped.",
        json_schema_extra=SUBSET,
    )


class SecuritySection(Section):
    profile: SecurityProfileName = Field(
        "standard",
        description="Hardening profile; see the security-profile table in the README.",
        json_schema_extra=widest_first("minimal", "standard", "strict", "paranoid"),
    )
    overrides: SecurityOverrides = Field(
        default_factory=SecurityOverrides, description="Per-setting changes on top of the profile."
    )


class AllowlistSection(Section):
    hosts: list[HostPattern] = Field(
        default_factory=list,
        description="Host names the agent may reach in filtered mode: name (exactly that name), "
        "*.domain (its subdomains), optionally with :port (default ports 80 and 443).",
        json_schema_extra=SUBSET,
    )
    categories: list[CategoryName] = Field(
        default_factory=list,
        description="Host lists shipped with Kapsis, by name: git-hosts, package-registries, "
        "ai-apis (see `kapsis policy show`).",
        json_schema_extra=SUBSET,
    )
    addresses: list[AddressPattern] = Field(
        default_factory=list,
        description="IP addresses or networks the agent may reach directly, optionally with "
        ":port ([IPv6]:port). The only way to reach private, loopback or link-local addresses.",
        json_schema_extra=SUBSET,
    )


# Query types a config may add to the DNS front's built-in A, AAAA, CNAME, HTTPS and SVCB.
ExtraQueryType = Literal[
    "MX", "TXT", "SRV", "NS", "SOA", "PTR", "CAA", "NAPTR", "TLSA", "SSHFP", "DS", "DNSKEY"
]


class DnsSection(Section):
    query_types: list[ExtraQueryType] = Field(
        default_factory=list,
        description="DNS query types the gateway forwards besides A, AAAA, CNAME, HTTPS and SVCB "
        "(each one is a way for data to leave in a query, so list only what the agent needs).",
        json_schema_extra=SUBSET,
    )
    max_label_length: int = Field(
        40,
        ge=1,
        le=63,
        description="Longest label of a name the gateway forwards; longer labels (random "
        "strings that carry data) are refused.",
        json_schema_extra=AT_MOST,
    )
    max_queries_per_second: int = Field(
        50,
        ge=1,
        le=10000,
        description="DNS queries a second the gateway answers (bursts of four times as many); "
        "the rest are refused.",
        json_schema_extra=AT_MOST,
    )


class NetworkPolicySection(Section):
    """The network policy shared by both backends (the Kubernetes ``AgentRequest`` uses it too)."""

    mode: NetworkMode = Field(
        "filtered",
        description="filtered: only the allowlist, enforced by a gateway the agent cannot touch. "
        "none: loopback only. open: unfiltered (marked loudly in the output and status).",
        json_schema_extra=widest_first("open", "filtered", "none"),
    )
    allowlist: AllowlistSection = Field(
        default_factory=AllowlistSection, description="What filtered mode lets through."
    )
    dns_servers: list[IPAddress] = Field(
        default_factory=list,
        description="Upstream resolvers of the gateway (default: the host's, from "
        "/etc/resolv.conf).",
        json_schema_extra=NEEDS_TRUST,
    )
    dns: DnsSection = Field(
        default_factory=DnsSection, description="What the gateway's DNS lets through."
    )


def _check_ca_bundle(value: str) -> str:
    if value != "host" and not value.startswith(("/", "~")):
        raise ValueError(f"{value!r}: use host (the host's own bundle) or a PEM file's path")
    return value


CaBundle = Annotated[str, AfterValidator(_check_ca_bundle)]


class NetworkSection(NetworkPolicySection):
    ca_bundle: CaBundle | None = Field(
        None,
        description="CA certificates the sandbox's HTTPS clients trust: host (the bundle the "
        "host trusts, e.g. with a TLS-inspecting proxy's CA) or a PEM file. Mounted read-only "
        "and named by SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE, PIP_CERT, "
        "GIT_SSL_CAINFO and CURL_CA_BUNDLE. Default: the image's own.",
        json_schema_extra=NEEDS_TRUST,
    )
    podman_network: str = Field(
        "podman",
        description="The Podman network a filtered sandbox's gateway (or an open sandbox) is "
        "attached to; a dual-stack network gives the sandbox IPv6, filtered like IPv4.",
        json_schema_extra=NEEDS_TRUST,
    )


class ReadOnlyMount(Section):
    source: str = Field(description="Host path (~ is expanded); must exist.")
    target: SandboxPath = Field(description="Absolute path inside the sandbox.")


WorkspaceMode = Literal["overlay", "worktree"]

# Files that hold secrets in many projects: never committed, and hidden from the agent.
SECRET_FILES = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".git-credentials",
)
DEFAULT_COMMIT_EXCLUDE = SECRET_FILES
DEFAULT_COMMIT_MESSAGE = (
    "{agent}: {task}\n\nAgent: {agent}\nAgent-Id: {agent_id}\nBranch: {branch}\n"
)
COMMIT_MESSAGE_FIELDS = frozenset({"task", "agent", "agent_id", "branch", "base", "project"})
_IDENTITY_RE = re.compile(r"^[^<>\n]+ <[^<>\s]+>$")


def _check_message_template(value: str) -> str:
    try:
        parsed = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(value)
            if name is not None
        ]
    except ValueError as error:
        raise ValueError(f"not a valid template ({error}); write {{{{ and }}}} for braces") from (
            None
        )
    if any(spec or conversion for _, spec, conversion in parsed):
        # "{task:>3000000000}" would have the host build a string of gigabytes.
        raise ValueError("fields take no format spec or conversion; write {task}, not {task:...}")
    fields = {name for name, _, _ in parsed}
    unknown = sorted(fields - COMMIT_MESSAGE_FIELDS)
    if unknown:
        allowed = ", ".join("{" + name + "}" for name in sorted(COMMIT_MESSAGE_FIELDS))
        raise ValueError(f"unknown field {{{unknown[0]}}}; the template may use {allowed}")
    return value


def _check_identity(value: str) -> str:
    if not _IDENTITY_RE.match(value.strip()):
        raise ValueError(f"{value!r} is not an identity; write 'Name <email>'")
    return value.strip()


CommitTemplate = Annotated[str, AfterValidator(_check_message_template)]
Identity = Annotated[str, AfterValidator(_check_identity)]


def _check_project_subdir(value: str) -> str:
    parts = [part for part in value.strip().split("/") if part not in ("", ".")]
    if value.strip().startswith("/") or not parts:
        raise ValueError(f"{value!r} is not a path inside the project; write it like node_modules")
    if any(part == ".." or part.lower() == ".git" for part in parts):
        raise ValueError(f"{value!r} leaves the project or names .git; name a folder inside it")
    if any(ord(char) < 32 for char in value):
        raise ValueError(f"{value!r} holds a control character")
    return "/".join(parts)


ProjectSubdir = Annotated[str, AfterValidator(_check_project_subdir)]

# Absent from every agent's view unless the user's own config (or a trusted project file)
# says otherwise: the secret files, and the tools' credential files.
DEFAULT_HIDE = (
    *SECRET_FILES,
    ".npmrc",
    ".pypirc",
    ".aws/",
    ".docker/config.json",
    "*.tfstate",
    "*.tfstate.backup",
)


def _check_hide_pattern(value: str) -> str:
    if not value.strip() or value.lstrip().startswith("#"):
        raise ValueError(f"{value!r} is not a pattern (empty, or a comment)")
    if any(ord(char) < 32 or ord(char) == 127 for char in value) or len(value) > 1024:
        raise ValueError(f"{value[:80]!r} holds a control character or is over 1024 characters")
    return value


HidePattern = Annotated[str, AfterValidator(_check_hide_pattern)]


class FilesystemSection(Section):
    mode: WorkspaceMode = Field(
        "overlay",
        description="overlay: the project is a read-only lower layer and the agent's writes go to "
        "a per-agent upper dir on the host (set-up time does not depend on the project's size). "
        "worktree: a git worktree under ~/.kapsis/worktrees that you can watch live in an IDE. "
        "The agent never modifies the host project in either mode.",
        json_schema_extra=widest_first("worktree", "overlay"),
    )
    mounts: list[ReadOnlyMount] = Field(
        default_factory=list,
        description="Extra host paths mounted read-only into the sandbox.",
        json_schema_extra=SUBSET,
    )
    uncommitted: Literal["include", "exclude"] = Field(
        "include",
        description="Your uncommitted changes and untracked (not ignored) files when an agent "
        "starts a new branch from the checked-out commit. include (the default: the agent sees "
        "the files as you do, which is what a task about them needs): they are carried onto the "
        "branch as a commit of their own, named as yours, before the agent's work, so the "
        "agent's commit holds only its own changes (with --push that commit is published too). "
        "exclude: the agent starts from the checked-out commit alone.",
        json_schema_extra=widest_first("include", "exclude"),
    )
    share_ignored: list[ProjectSubdir] = Field(
        default_factory=list,
        description="Directories of the project that git ignores and the agent needs as they "
        "are in your checkout (dependencies, build output: node_modules, .venv), mounted "
        "read-only at the same place in the agent's view. The agent otherwise sees only the "
        "project's files as committed at launch (plus your uncommitted work with uncommitted: "
        "include), frozen. Trade-off: these directories are live, not frozen (what you change in "
        "them during a run, the agent sees), and read-only (the agent cannot install into them). "
        "A directory that does not exist is skipped; one holding tracked files is refused, and "
        "so is one that filesystem.hide hides.",
        json_schema_extra=SUBSET,
    )
    hide: list[HidePattern] = Field(
        default_factory=lambda: list(DEFAULT_HIDE),
        description="Paths absent from the agent's view in both modes, as .gitignore patterns "
        "(`*.pem` anywhere, `.aws/` a folder and all in it, `/secrets` from the top, "
        "`!keep.pem` an exception): the agent cannot read them, their absence is never "
        "committed as a deletion, and what the agent writes there is not committed. The default "
        "hides common secret files; a project's own file may add patterns, and may remove one "
        "only once trusted. Files in share_ignored folders are not hidden.",
        json_schema_extra=SUPERSET,
    )


class GitSection(Section):
    branch: str | None = Field(
        None,
        description="The agent's branch. Default: kapsis/<task-slug>-<agent-id>. An existing "
        "branch is continued from its tip.",
        json_schema_extra=NEEDS_TRUST,
    )
    base_branch: str | None = Field(
        None,
        description="Where a new branch starts (default: the project's checked-out commit).",
        json_schema_extra=FREE,
    )
    auto_commit: bool = Field(
        True,
        description="After the run, the host commits the agent's work to its branch (a project "
        "that is not a git repository keeps the work in the sandbox dir instead).",
        json_schema_extra=FREE,
    )
    auto_push: bool = Field(
        False,
        description="Push the branch after a successful run (also: --push).",
        json_schema_extra=widest_first(True, False),
    )
    remote: str = Field(
        "origin", description="The remote to push to.", json_schema_extra=NEEDS_TRUST
    )
    push_timeout: Duration = Field(
        "120s", description="Time limit for each fetch and push.", json_schema_extra=AT_MOST_TIME
    )
    commit_message: CommitTemplate = Field(
        DEFAULT_COMMIT_MESSAGE,
        description="Template of the host's commit message; fields: {task}, {agent}, "
        "{agent_id}, {branch}, {base}, {project}.",
        json_schema_extra=FREE,
    )
    co_authors: list[Identity] = Field(
        default_factory=list,
        description="'Name <email>' entries added as Co-authored-by trailers.",
        json_schema_extra=FREE,
    )
    committer: Identity | None = Field(
        None,
        description="'Name <email>' of the host's commits. Default: the user's git identity "
        "(user.name / user.email as git sees them in the project).",
        json_schema_extra=NEEDS_TRUST,
    )
    commit_exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COMMIT_EXCLUDE),
        description="Glob patterns (matched against the path and the file name) that are never "
        "committed; the run lists what it skipped.",
        json_schema_extra=SUPERSET,
    )
    commit_agent_state: bool = Field(
        False,
        description="Commit the agent CLI's own state files too (its profile's state_files, "
        "e.g. Aider's .aider* history); by default they are left out, with a note.",
        json_schema_extra=FREE,
    )
    max_file_size: ByteSize = Field(
        "100m",
        description="Files larger than this are left out of the commit, with a note, as "
        "commit_exclude does (100m is GitHub's own limit); the host never reads them.",
        json_schema_extra=AT_MOST,
    )
    post_push_hook: str | None = Field(
        None,
        description="Shell command run on the host after a successful push, with KAPSIS_BRANCH, "
        "KAPSIS_COMMIT, KAPSIS_REMOTE, KAPSIS_REMOTE_URL, KAPSIS_BASE_BRANCH in its environment; "
        "a URL it prints becomes the status's pr_url.",
        json_schema_extra=NEEDS_TRUST,
    )


# A secret file must land on a tmpfs of the sandbox: the agent's home or Kapsis's secrets dir.
SECRET_FILE_ROOTS = (f"{AGENT_HOME}/", f"{SECRETS_TMPFS}/")
_SECRET_PATH_RE = re.compile(r"^/[A-Za-z0-9._/@+-]+$")


def _check_secret_file(value: str) -> str:
    if not _SECRET_PATH_RE.match(value) or "/../" in f"{value}/" or "//" in value:
        raise ValueError(
            f"{value!r} is not a plain absolute path (letters, digits, . _ - + @ and /)"
        )
    if not value.startswith(SECRET_FILE_ROOTS) or value.endswith("/"):
        raise ValueError(
            f"{value!r} is not on a tmpfs of the sandbox; put the file under "
            + " or ".join(SECRET_FILE_ROOTS)
        )
    return value


SecretFilePath = Annotated[str, AfterValidator(_check_secret_file)]


class KeychainSecret(Section):
    """One secret read from the host's keychain when the run starts."""

    service: str = Field(min_length=1, description="Keychain service (Secret Service attribute).")
    account: str | list[str] = Field(
        description="Account name, or a list tried in order until one holds the secret."
    )
    inject_to_file: SecretFilePath | None = Field(
        None,
        description="Write the secret to this file in the sandbox (on a tmpfs, mode 0600) "
        "instead of the agent's environment. Must be under /home/agent/ or /run/kapsis/secrets/.",
    )
    template: str | None = Field(
        None,
        description="The file's content, with `{value}` standing for the secret "
        "(only with inject_to_file; default: the secret alone).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> KeychainSecret:
        if not self.accounts() or not all(self.accounts()):
            raise ValueError("account: name at least one account (non-empty)")
        if self.template is not None and self.inject_to_file is None:
            raise ValueError("template is only used with inject_to_file; set both or neither")
        return self

    def accounts(self) -> tuple[str, ...]:
        return (self.account,) if isinstance(self.account, str) else tuple(self.account)


class EnvironmentSection(Section):
    set: dict[EnvName, str] = Field(
        default_factory=dict,
        description="Variables set in the agent's environment (plain values, shown in the plan: "
        "not for secrets).",
        json_schema_extra=FREE,
    )
    passthrough: list[EnvName] = Field(
        default_factory=list,
        description="Host variables handed to the agent by name, as secrets: the value is read "
        "when the run starts, never written to disk, and redacted from transcripts and the audit.",
        json_schema_extra=SUBSET,
    )
    keychain: dict[EnvName, KeychainSecret] = Field(
        default_factory=dict,
        description="Secrets read from the host keychain (the `keyring` library, else "
        "`secret-tool`) when the run starts. Wins over passthrough and set for the same name.",
        json_schema_extra=SUBSET,
    )


class ImageSection(Section):
    name: str = Field(
        DEFAULT_IMAGE,
        description="Container image the agent runs in. Unless set (here or with --image), the "
        "agent profile's image is used, and this default only for a profile without one.",
        json_schema_extra=NEEDS_TRUST,
    )


class AuditSection(Section):
    enabled: bool = Field(
        True,
        description="Record lifecycle events in ~/.kapsis/audit/AGENT_ID.jsonl (host-side).",
        json_schema_extra=widest_first(False, True),
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
    ssh: SshSection = Field(default_factory=SshSection)
    build_tools: BuildToolsSection = Field(default_factory=BuildToolsSection)
    kubernetes: KubernetesSection = Field(
        default_factory=KubernetesSection,
        description="Settings of `kapsis run --backend k8s` (ignored by local runs).",
    )
