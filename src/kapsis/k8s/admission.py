"""Admission of an ``AgentRequest``: every reason the operator must refuse it, in one list.

Checked on create and on every reconcile (the operator turns a non-empty list into a Failed
status and an event). Rendering does the request-only checks; this adds what needs the
cluster: the namespace's labels, for ``network.mode: open``.
"""

from __future__ import annotations

from collections.abc import Mapping

from kapsis.errors import KapsisError
from kapsis.k8s.render import render_request
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings


def admission_problems(
    name: str,
    namespace: str,
    spec: AgentRequestSpec,
    settings: OperatorSettings,
    namespace_labels: Mapping[str, str] | None,
) -> list[str]:
    """Why the request may not run (empty: it may). Each reason names the key to fix."""
    problems: list[str] = []
    if spec.network.mode == "open" and not settings.namespace_allows_open(namespace_labels):
        problems.append(
            f"spec.network.mode: open is not allowed in namespace {namespace} (label it "
            f"{settings.open_network_label}=true to allow it)"
        )
    try:
        render_request(name, namespace, "admission-check", spec, settings)
    except KapsisError as error:
        problems.append(str(error))
    return problems
