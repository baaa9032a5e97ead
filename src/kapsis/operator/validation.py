"""Admission rules of the operator, checked on create and on every reconcile.

Pure: the caller passes the request's raw spec, its namespace's labels and the operator
settings; the result is the parsed spec, or :class:`RequestRejected` whose message is the one
reason a user sees in the Warning event and in ``status.message``. The rules are the cluster
administrator's (``OperatorSettings``): a request cannot widen them.

- ``network.mode: open`` only in a namespace labelled ``<open_network_label>=true``;
- no reserved environment names (``KAPSIS_*`` and the names the Pod sets itself, e.g. HOME);
- the agent image (explicit, the profile's, or the default) starts with an allowed prefix;
- ConfigMap, Secret and key references are well-formed Kubernetes names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from kapsis.config.kubernetes_section import MAX_OBJECT_NAME, is_object_name
from kapsis.errors import ConfigError
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings

# A ConfigMap or Secret data key.
_DATA_KEY_RE: Final = re.compile(r"^[-._a-zA-Z0-9]+$")


class RequestRejected(ConfigError):
    """The request breaks an admission rule; the message says which and how to fix it."""


def validate_request(
    spec: Mapping[str, Any] | None,
    namespace_labels: Mapping[str, str] | None,
    settings: OperatorSettings,
) -> AgentRequestSpec:
    """The parsed spec of an admissible request; raises :class:`RequestRejected` otherwise."""
    parsed = parse_spec(spec)
    check_network(parsed, namespace_labels, settings)
    check_environment(parsed)
    check_image(parsed, settings)
    check_references(parsed)
    return parsed


def parse_spec(spec: Mapping[str, Any] | None) -> AgentRequestSpec:
    try:
        return AgentRequestSpec.model_validate(dict(spec or {}))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        raise RequestRejected(f"spec.{where}: {first['msg']}") from None


def check_network(
    spec: AgentRequestSpec, namespace_labels: Mapping[str, str] | None, settings: OperatorSettings
) -> None:
    if spec.network.mode == "open" and not settings.namespace_allows_open(namespace_labels):
        raise RequestRejected(
            "spec.network.mode open is not allowed in this namespace: a cluster administrator "
            f"must label it {settings.open_network_label}=true (or use mode filtered with an "
            "allowlist)"
        )


def check_environment(spec: AgentRequestSpec) -> None:
    """Reserved names and names given twice: the renderer's rule, as a rejection."""
    from kapsis.k8s import render

    try:
        render.check_environment(spec)
    except ConfigError as error:
        raise RequestRejected(str(error)) from None


def agent_image(spec: AgentRequestSpec, settings: OperatorSettings) -> str:
    """The image the agent runs in (the request's, else its profile's, else the default), if
    the settings allow it: the renderer's rule, as a rejection."""
    from kapsis.agents import find_profile
    from kapsis.k8s import render

    try:
        return render.agent_image(spec, find_profile(spec.agent.profile), settings)
    except ConfigError as error:
        raise RequestRejected(str(error)) from None


def check_image(spec: AgentRequestSpec, settings: OperatorSettings) -> None:
    agent_image(spec, settings)


def check_references(spec: AgentRequestSpec) -> None:
    if spec.task.configMapRef is not None:
        _check_name("spec.task.configMapRef.name", spec.task.configMapRef.name)
        _check_key("spec.task.configMapRef.key", spec.task.configMapRef.key)
    secret = spec.workspace.git.credentialsSecret
    if secret is not None:
        _check_name("spec.workspace.git.credentialsSecret", secret)
    for variable, ref in spec.environment.secrets.items():
        _check_name(f"spec.environment.secrets.{variable}.name", ref.name)
        _check_key(f"spec.environment.secrets.{variable}.key", ref.key)


def _check_name(where: str, name: str) -> None:
    if not is_object_name(name):
        raise RequestRejected(
            f"{where}: {name!r} is not a Kubernetes object name (lowercase letters, digits, "
            "'-' and '.', at most 253 characters)"
        )


def _check_key(where: str, key: str) -> None:
    if len(key) > MAX_OBJECT_NAME or not _DATA_KEY_RE.match(key):
        raise RequestRejected(
            f"{where}: {key!r} is not a ConfigMap/Secret key (letters, digits, '-', '_', '.')"
        )
