"""The ``kubernetes`` section of ``agent-sandbox.yaml``: where and with what ``--backend k8s`` runs.

Only cluster facts live here (namespace, kubeconfig context, Secret names). Everything a run
means - agent, task, network, security, resources - comes from the same sections as a local run,
so one file means the same thing on both backends.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from kapsis.config.base import NEEDS_TRUST, SUBSET, EnvName, Section

# RFC 1123: a label (namespaces) and a subdomain (Secret names), as the API server checks them.
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_OBJECT_NAME = 253


def is_object_name(text: str) -> bool:
    """Whether ``text`` is a valid name of a Secret or ConfigMap (an RFC 1123 subdomain)."""
    return len(text) <= MAX_OBJECT_NAME and bool(_SUBDOMAIN_RE.match(text))


def _check_label(value: str) -> str:
    if not _LABEL_RE.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes namespace name (lowercase letters, digits and '-', "
            "at most 63)"
        )
    return value


def _check_object_name(value: str) -> str:
    if not is_object_name(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
        )
    return value


NamespaceName = Annotated[str, AfterValidator(_check_label)]
ObjectName = Annotated[str, AfterValidator(_check_object_name)]


class KubernetesSecretRef(Section):
    name: ObjectName = Field(description="Name of a Secret in the run's namespace.")
    key: str = Field(min_length=1, description="Key within that Secret.")


class KubernetesSection(Section):
    namespace: NamespaceName | None = Field(
        None,
        description="Namespace of the AgentRequest (also: --namespace). Default: the kubeconfig "
        "context's namespace, else `default`.",
        json_schema_extra=NEEDS_TRUST,
    )
    context: str | None = Field(
        None,
        description="kubeconfig context to use. Default: the current context ($KUBECONFIG or "
        "~/.kube/config), or the in-cluster service account when there is no kubeconfig.",
        json_schema_extra=NEEDS_TRUST,
    )
    credentials_secret: ObjectName | None = Field(
        None,
        description="Secret holding the git credentials the cluster clones and pushes with "
        "(key `token` for https, `ssh-privatekey` and `known_hosts` for ssh); only the clone "
        "and finishing steps mount it, never the agent.",
        json_schema_extra=NEEDS_TRUST,
    )
    secrets: dict[EnvName, KubernetesSecretRef] = Field(
        default_factory=dict,
        description="Agent environment variables taken from Secret keys, e.g. "
        "`ANTHROPIC_API_KEY: {name: llm-keys, key: anthropic}`: the cluster's counterpart of "
        "environment.passthrough and environment.keychain.",
        json_schema_extra=SUBSET,
    )
