"""The network side of an agent's Pod: the allowlist policy, the gateway's files, the NetworkPolicy.

The policy is built from the request exactly as :func:`kapsis.sandbox.network_plan.plan_network`
builds it from ``agent-sandbox.yaml`` (hosts, categories, addresses, the agent profile's API
hosts), and the gateway's files are rendered by the same functions as the Podman gateway's
(:mod:`kapsis.network.gateway_config`, ``entrypoint.sh``, ``selftest.py``). Two additions, both
for the finishing step that pushes from inside the Pod: the git remote's name is resolvable
(but not filed into any allow set), and the finisher's uid may reach the remote's port.

The NetworkPolicy is defence in depth around the gateway: no ingress; egress to the cluster
resolver, the allowlisted ports and the git remote's port (the clone and finishing steps share
the Pod's network, and a NetworkPolicy cannot tell containers apart: the gateway keeps the agent
off that port).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from kapsis.agents.profiles import AgentProfile
from kapsis.errors import ConfigError
from kapsis.k8s.layout import FINISHER_UID
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings
from kapsis.network.gateway_config import gateway_config_files, probe_address
from kapsis.network.gateway_files import gateway_scripts
from kapsis.network.policy import DNS_PORT, NetworkPolicy, PolicyBuilder
from kapsis.sandbox.network_plan import add_allowlist, dns_limits

Transport = Literal["https", "http", "ssh"]
_TRANSPORTS: dict[str, Transport] = {"https": "https", "http": "http", "ssh": "ssh"}
_DEFAULT_PORTS: dict[Transport, int] = {"https": 443, "http": 80, "ssh": 22}
_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?(?P<host>[^/:\[\]]+|\[[^\]]+\]):(?!//)")


@dataclass(frozen=True)
class GitRemote:
    """Where the clone and finishing steps connect: host, TCP port, and how they authenticate."""

    host: str
    port: int
    transport: Transport


def git_remote(url: str) -> GitRemote:
    """The host and port of a clone URL (https://, http://, ssh:// or scp-like user@host:path)."""
    parts = urlsplit(url)
    if parts.password:
        raise ConfigError(
            "workspace.git.url: no credentials in the URL (the agent's clone shows it); put the "
            "token in the credentials Secret"
        )
    transport = _TRANSPORTS.get(parts.scheme)
    if transport is not None and parts.hostname:
        try:
            port = parts.port or _DEFAULT_PORTS[transport]
        except ValueError:
            raise ConfigError(f"workspace.git.url: {url!r} has an invalid port") from None
        return GitRemote(parts.hostname.lower(), port, transport)
    match = _SCP_LIKE.match(url)
    if "://" not in url and match:  # urlsplit takes "host:path" for a scheme and its path
        return GitRemote(match.group("host").strip("[]").lower(), 22, "ssh")
    raise ConfigError(
        f"workspace.git.url: {url!r} is not a remote the Pod can reach; use https://HOST/PATH, "
        "ssh://HOST/PATH or USER@HOST:PATH"
    )


def network_policy_of(
    spec: AgentRequestSpec, profile: AgentProfile, settings: OperatorSettings
) -> NetworkPolicy:
    """The effective allowlist, built like a local run's (minus flags and build tools)."""
    network = spec.network
    builder = PolicyBuilder(network.mode)
    endpoint = spec.agent.endpoint
    add_allowlist(
        builder,
        network.allowlist,
        profile,
        lambda key, index: f"spec.network.allowlist.{key}[{index}]",
        (endpoint, "spec.agent.endpoint") if endpoint else None,
        login=uses_login(spec, profile),
    )
    servers = upstreams(spec, settings) if network.mode == "filtered" else ()
    return builder.build(servers, dns=dns_limits(network.dns))


def uses_login(spec: AgentRequestSpec, profile: AgentProfile) -> bool:
    """Whether the request hands the CLI its subscription login (a Secret by its name)."""
    return profile.login is not None and profile.login.secret in spec.environment.secrets


def upstreams(spec: AgentRequestSpec, settings: OperatorSettings) -> tuple[str, ...]:
    """The gateway's resolvers: the request's, else the operator's (the cluster resolver)."""
    return tuple(spec.network.dns_servers) or settings.dns_servers


def gateway_files(
    spec: AgentRequestSpec,
    policy: NetworkPolicy,
    remote: GitRemote,
    settings: OperatorSettings,
) -> dict[str, str]:
    """The gateway ConfigMap's data: the Podman gateway's files, for this request."""
    servers = upstreams(spec, settings)
    if not servers:
        raise ConfigError(
            "spec.network.dns_servers: the gateway needs an upstream resolver and the operator "
            "knows none (KAPSIS_OPERATOR_DNS_SERVERS is empty and its resolv.conf names none); "
            "set one of them"
        )
    finisher = {FINISHER_UID: (remote.port,)} if spec.workspace.git.push else {}
    if spec.network.mode == "none":
        # Blocks everything (no allow rules, the resolver knows no name) but the push.
        policy = NetworkPolicy(mode="none", dns_servers=servers)
    try:
        probe_address(policy)
    except ValueError:
        raise ConfigError(
            "spec.network.allowlist.addresses: an allowed network covers every address the "
            "gateway's self-test could check; list narrower networks"
        ) from None
    resolve_only = (remote.host,) if spec.workspace.git.push else ()
    files = gateway_config_files(policy, servers, owner_ports=finisher, resolve_only=resolve_only)
    return files | gateway_scripts()


def _dns_peers(settings: OperatorSettings, servers: tuple[str, ...]) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": settings.cluster_dns_namespace}
            },
            "podSelector": {"matchLabels": dict(settings.cluster_dns_pod_labels)},
        }
    ]
    for server in servers:
        prefix = 128 if ":" in server else 32
        peers.append({"ipBlock": {"cidr": f"{server}/{prefix}"}})
    return peers


def _tcp(ports: tuple[int, ...] | list[int]) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in sorted(set(ports))]


def network_policy_object(
    spec: AgentRequestSpec,
    policy: NetworkPolicy,
    remote: GitRemote,
    settings: OperatorSettings,
    metadata: dict[str, Any],
    pod_labels: dict[str, str],
) -> dict[str, Any]:
    """The request's NetworkPolicy (networking.k8s.io/v1)."""
    egress: list[dict[str, Any]]
    if spec.network.mode == "open":
        egress = [{}]  # one empty rule: every destination, every port
    else:
        servers = upstreams(spec, settings)
        egress = [
            {
                "to": _dns_peers(settings, servers),
                "ports": [
                    {"protocol": "UDP", "port": DNS_PORT},
                    {"protocol": "TCP", "port": DNS_PORT},
                ],
            },
            # The clone and finishing steps; the gateway keeps the agent off this port.
            {"ports": _tcp([remote.port])},
        ]
        if spec.network.mode == "filtered":
            name_ports = sorted({port for rule in policy.names() for port in rule.ports})
            if name_ports:
                # Names resolve to addresses no policy can know in advance: any destination,
                # only on the listed ports; the gateway narrows it to the resolved addresses.
                egress.append({"ports": _tcp(name_ports)})
            for rule in policy.addresses():
                egress.append(
                    {"to": [{"ipBlock": {"cidr": rule.pattern}}], "ports": _tcp(rule.ports)}
                )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": pod_labels},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }
