"""Render one ``AgentRequest`` into the Kubernetes objects that run it: Pod, NetworkPolicy,
ConfigMaps. Pure data: no API calls, so the operator, the tests and the validator share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings


@dataclass(frozen=True)
class RenderedRequest:
    """The objects of one request, as plain dicts ready for the kubernetes client."""

    pod: dict[str, Any]
    network_policy: dict[str, Any]
    config_maps: tuple[dict[str, Any], ...]

    def objects(self) -> tuple[dict[str, Any], ...]:
        """Every object, in creation order (ConfigMaps before the Pod that mounts them)."""
        return (*self.config_maps, self.network_policy, self.pod)


def render_request(
    name: str,
    namespace: str,
    uid: str,
    spec: AgentRequestSpec,
    settings: OperatorSettings,
) -> RenderedRequest:
    """The objects that run request ``namespace/name`` (uid ``uid``, for owner references).

    Raises :class:`kapsis.errors.ConfigError` for a request the settings do not allow.
    """
    raise NotImplementedError("render_request: being written on branch k8s-render")
