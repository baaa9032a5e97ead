"""The operator's own settings: images, admission rules, seccomp, DNS, where its audit lives.

Read once at operator start from ``KAPSIS_OPERATOR_*`` environment variables (the Deployment in
``deploy/operator.yaml`` sets them); the renderer and the admission checks take them as a plain
frozen value so that tests can pass any combination without touching the environment.

Environment variables (each optional; lists are comma-separated):

- ``KAPSIS_OPERATOR_AGENT_IMAGE``: image of a request naming neither an image nor a profile
  with one.
- ``KAPSIS_OPERATOR_GATEWAY_IMAGE``: the gateway sidecar (what ``kapsis setup --build`` builds
  for the Podman backend: nftables + dnsmasq).
- ``KAPSIS_OPERATOR_TOOLS_IMAGE``: image of the clone and finishing steps; the operator image,
  which carries kapsis itself (``python -m kapsis.k8s.inpod.clone`` / ``.finish``).
- ``KAPSIS_OPERATOR_ALLOWED_IMAGE_PREFIXES``: an agent image must start with one of these.
- ``KAPSIS_OPERATOR_OPEN_NETWORK_LABEL``: namespace label (value ``true``) allowing network
  mode ``open``.
- ``KAPSIS_OPERATOR_SECCOMP``: ``RuntimeDefault`` (the container runtime's filter) or
  ``Localhost`` (the Kapsis filter, installed on every node under the kubelet's seccomp
  directory, ``/var/lib/kubelet/seccomp/`` + ``KAPSIS_OPERATOR_SECCOMP_LOCALHOST_PROFILE``;
  ``python -m kapsis.k8s.node_profiles seccomp`` prints it; see docs/kubernetes.md).
- ``KAPSIS_OPERATOR_APPARMOR_PROFILE``: the Localhost AppArmor profile of ``paranoid`` requests,
  loaded on every node (``apparmor_parser``).
- ``KAPSIS_OPERATOR_DNS_SERVERS``: upstream resolvers of the gateway. Default: the operator's
  own ``/etc/resolv.conf`` nameservers, i.e. the cluster resolver (the agent's Pod cannot read
  it itself: its resolv.conf points at the gateway).
- ``KAPSIS_OPERATOR_DATA_DIR``: where the operator keeps its sealed audit logs and keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import ConfigError
from kapsis.host.facts import host_dns_servers
from kapsis.k8s.names import ALLOW_OPEN_NETWORK_LABEL
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

ENV_PREFIX = "KAPSIS_OPERATOR_"
DEFAULT_TOOLS_IMAGE = "localhost/kapsis-operator:latest"
# The newest schema set kubernetes-validate ships offline that has native sidecars (GA in 1.33).
KUBERNETES_VERSION = "1.33.0"
DEFAULT_SECCOMP_LOCALHOST_PROFILE = "kapsis/agent.json"
DEFAULT_APPARMOR_PROFILE = "kapsis-agent"
RESOLV_CONF = Path("/etc/resolv.conf")

SeccompMode = Literal["RuntimeDefault", "Localhost"]


class OperatorSettings(BaseModel):
    """What the cluster administrator decides; a request cannot change any of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent_image: str = Field(DEFAULT_IMAGE, min_length=1)
    gateway_image: str = Field(DEFAULT_GATEWAY_IMAGE, min_length=1)
    tools_image: str = Field(DEFAULT_TOOLS_IMAGE, min_length=1)
    allowed_image_prefixes: tuple[str, ...] = ("localhost/kapsis-",)
    open_network_label: str = ALLOW_OPEN_NETWORK_LABEL
    seccomp: SeccompMode = "RuntimeDefault"
    seccomp_localhost_profile: str = DEFAULT_SECCOMP_LOCALHOST_PROFILE
    apparmor_profile: str = DEFAULT_APPARMOR_PROFILE
    dns_servers: tuple[str, ...] = ()
    # Where the cluster resolver's Pods run: the NetworkPolicy lets DNS through to them only.
    cluster_dns_namespace: str = "kube-system"
    cluster_dns_pod_labels: tuple[tuple[str, str], ...] = (("k8s-app", "kube-dns"),)
    data_dir: Path = Path("/var/lib/kapsis-operator")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, resolv_conf: Path = RESOLV_CONF
    ) -> OperatorSettings:
        """Settings from ``KAPSIS_OPERATOR_*`` variables; an unknown such name fails."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for key, text in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            field = key.removeprefix(ENV_PREFIX).lower()
            if field not in cls.model_fields:
                known = ", ".join(ENV_PREFIX + name.upper() for name in cls.model_fields)
                raise ConfigError(f"{key}: unknown operator setting; known: {known}")
            values[field] = _parse(field, text)
        if "dns_servers" not in values:
            values["dns_servers"] = tuple(cluster_resolvers(resolv_conf))
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            name = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else ENV_PREFIX
            raise ConfigError(f"{name}: {first['msg']}") from None

    def image_allowed(self, image: str) -> bool:
        """True when ``image`` starts with one of the allowed prefixes."""
        return any(image.startswith(prefix) for prefix in self.allowed_image_prefixes)

    def namespace_allows_open(self, labels: Mapping[str, str] | None) -> bool:
        """True when a namespace with these labels may run ``network.mode: open``."""
        return (labels or {}).get(self.open_network_label) == "true"


def _parse(field: str, text: str) -> object:
    if field in ("allowed_image_prefixes", "dns_servers"):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if field == "cluster_dns_pod_labels":
        pairs = (item.partition("=") for item in text.split(",") if item.strip())
        return tuple((key.strip(), value.strip()) for key, _, value in pairs)
    return text


def cluster_resolvers(resolv_conf: Path = RESOLV_CONF) -> list[str]:
    """The nameservers of ``resolv_conf`` (in a Pod with ClusterFirst DNS: the cluster DNS),
    read as the host's are for a local run (valid, non-loopback addresses)."""
    return host_dns_servers((resolv_conf,))
