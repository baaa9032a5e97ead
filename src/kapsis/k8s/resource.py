"""The ``AgentRequest`` custom resource: pydantic models of its spec and status.

The CRD's OpenAPI schema is generated from these classes (``kapsis.k8s.crd``), and the sections
a user also writes in ``agent-sandbox.yaml`` (network, security) are the very same models, so
one policy means the same thing on a laptop and on a cluster. Top-level keys follow the
Kubernetes camelCase convention; the shared sections keep their local spelling.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kapsis.config.agent_section import MAX_ARGS, Endpoint, ModelName
from kapsis.config.models import (
    EnvName,
    MemorySize,
    NetworkPolicySection,
    ResourcesSection,
    SecuritySection,
)

GROUP = "kapsis.dev"
VERSION = "v1alpha1"
KIND = "AgentRequest"
PLURAL = "agentrequests"
SINGULAR = "agentrequest"
SHORT_NAMES = ("ar",)

Phase = Literal["Pending", "Preparing", "Running", "Finishing", "Complete", "Failed"]
# The phases a request never leaves.
FINAL_PHASES: frozenset[str] = frozenset({"Complete", "Failed"})
PushStatus = Literal["pending", "pushed", "skipped", "failed", "verified"]


class ResourceModel(BaseModel):
    """Strict: an unknown key in a request is rejected, as in ``agent-sandbox.yaml``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SecretKeyRef(ResourceModel):
    name: str = Field(min_length=1, description="Name of a Secret in the request's namespace.")
    key: str = Field(min_length=1, description="Key within that Secret.")


class ConfigMapKeyRef(ResourceModel):
    name: str = Field(min_length=1, description="Name of a ConfigMap in the request's namespace.")
    key: str = Field("task.md", min_length=1, description="Key holding the Markdown task spec.")


class AgentSpec(ResourceModel):
    profile: str = Field(
        "shell",
        description="Agent profile (built-in: shell, claude, codex, aider, gemini): its command, "
        "image and network needs.",
    )
    image: str | None = Field(None, description="Image to run instead of the profile's.")
    command: list[str] | None = Field(
        None, description="Command to run instead of the profile's (argv, no shell)."
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=MAX_ARGS,
        description="Arguments added after the command (agent.args).",
    )
    endpoint: Endpoint | None = Field(
        None, description="The model API's base URL (agent.endpoint); its host is allowed."
    )
    model: ModelName | None = Field(None, description="The model the agent uses (agent.model).")


class TaskSpec(ResourceModel):
    inline: str | None = Field(None, description="The task text.")
    configMapRef: ConfigMapKeyRef | None = Field(
        None, description="A ConfigMap key holding a Markdown spec (seen at /task-spec.md)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TaskSpec:
        if (self.inline is None) == (self.configMapRef is None):
            raise ValueError("task: give exactly one of inline or configMapRef")
        return self


class GitWorkspace(ResourceModel):
    url: str = Field(min_length=1, description="Repository to clone (https:// or ssh).")
    branch: str | None = Field(
        None, description="Branch the agent's work is committed to (default: kapsis/NAME)."
    )
    baseBranch: str | None = Field(
        None, description="Branch to start from (default: the remote's default branch)."
    )
    push: bool = Field(True, description="Push the agent's branch when it finishes.")
    credentialsSecret: str | None = Field(
        None,
        description="Secret with the clone/push credentials (key `token` for https, "
        "`ssh-privatekey` and `known_hosts` for ssh). Only the clone and finishing steps "
        "mount it; the agent never does.",
    )


class WorkspaceSpec(ResourceModel):
    git: GitWorkspace


class ResourcesSpec(ResourcesSection):
    """Local resource limits plus the workspace volume's size."""

    workspaceSize: MemorySize = Field(
        "10g", description="Size limit of the workspace volume (an emptyDir)."
    )


class EnvironmentSpec(ResourceModel):
    set: dict[EnvName, str] = Field(
        default_factory=dict, description="Plain variables (not for secrets)."
    )
    secrets: dict[EnvName, SecretKeyRef] = Field(
        default_factory=dict,
        description="Variables taken from Secret keys; redacted from the transcript and audit.",
    )


# A request is one object in etcd (at most ~1.5 MB): the bundle it carries is bounded well below.
MAX_CA_BUNDLE = 512 * 1024
_PEM_LINE = re.compile(r"^[A-Za-z0-9+/=\- ]*$")


def _pem_only(text: str) -> str:
    if (
        not text.isascii()
        or "-----BEGIN CERTIFICATE-----" not in text
        or not all(_PEM_LINE.match(line) for line in text.split("\n"))
    ):
        raise ValueError("not PEM certificates (BEGIN/END CERTIFICATE blocks of base64 only)")
    return text


class CaBundleSpec(ResourceModel):
    inline: Annotated[str, AfterValidator(_pem_only)] = Field(
        max_length=MAX_CA_BUNDLE,
        description="PEM certificates the agent's HTTPS clients trust (the submitting "
        "machine's network.ca_bundle): mounted read-only at /run/kapsis/ca-bundle.crt and named "
        "by SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE, PIP_CERT, GIT_SSL_CAINFO "
        "and CURL_CA_BUNDLE.",
    )


class AgentRequestSpec(ResourceModel):
    agent: AgentSpec = Field(default_factory=AgentSpec)
    task: TaskSpec
    workspace: WorkspaceSpec
    network: NetworkPolicySection = Field(default_factory=NetworkPolicySection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    environment: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    caBundle: CaBundleSpec | None = None


class Condition(ResourceModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None


class AgentRequestStatus(ResourceModel):
    phase: Phase = "Pending"
    progress: int = Field(0, ge=0, le=100)
    message: str = ""
    podName: str | None = None
    startedAt: str | None = None
    completedAt: str | None = None
    # The Kapsis exit code (README table, the same as a local run's) and the agent's own code.
    exitCode: int | None = None
    agentExitCode: int | None = None
    # The same vocabulary as a local run's status: KapsisError.error_type (kapsis.errors).
    errorType: str | None = None
    branch: str | None = None
    commitSha: str | None = None
    pushStatus: PushStatus | None = None
    prUrl: str | None = None
    blockedRequests: int = 0
    conditions: list[Condition] = Field(default_factory=list)
