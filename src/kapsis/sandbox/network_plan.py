"""The network part of a plan: the mode, the effective allowlist policy and the gateway.

``filtered`` puts a gateway sidecar in the sandbox's pod: it owns the network namespace, which
the agent joins, and enforces the :class:`~kapsis.network.policy.NetworkPolicy` computed here
from the config, ``--allow`` flags, categories and the agent profile's API hosts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from kapsis.agents import AgentProfile
from kapsis.buildtools import allowlist_entries
from kapsis.config.agent_section import endpoint_allow_entry
from kapsis.config.loader import LoadedConfig
from kapsis.config.models import AllowlistSection, DnsSection, NetworkMode
from kapsis.errors import ConfigError
from kapsis.network.policy import (
    PROBE_CANDIDATES,
    DnsLimits,
    NetworkPolicy,
    PolicyBuilder,
    load_category,
    parse_address,
    probe_address,
)
from kapsis.sandbox.plan_model import PlanModel

# Digits and dots (IPv4), hex and colons (IPv6), an optional /prefix: meant as an address.
_ADDRESS_LIKE = re.compile(r"[0-9.]+(/\d*)?|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*(/\d*)?")
DEFAULT_GATEWAY_IMAGE = "localhost/kapsis-gateway:latest"


def _probes_covered(policy: NetworkPolicy) -> str:
    """Why no self-test address is left: the allowed networks that hold the candidates."""
    probes = [ipaddress.ip_address(candidate) for candidate in PROBE_CANDIDATES]

    def holds(rule_pattern: str) -> list[bool]:
        network = parse_address(rule_pattern)[0]
        return [probe in network for probe in probes]

    rules = policy.addresses()
    whole = next((rule for rule in rules if all(holds(rule.pattern))), None)
    if whole is not None:
        return (
            f"{whole.sources[0]}: the allowed address {whole.pattern} covers every address "
            "the gateway's self-test could check; list narrower networks, or use network mode "
            "open"
        )
    blamed = [rule for rule in rules if any(holds(rule.pattern))]
    return (
        f"{blamed[0].sources[0]}: the allowed addresses "
        f"{', '.join(f'{rule.pattern} ({rule.sources[0]})' for rule in blamed)} together cover "
        "every address the gateway's self-test could check; list narrower networks, or use "
        "network mode open"
    )


class GatewayPlan(PlanModel):
    image: str
    container_name: str
    upstreams: tuple[str, ...]


class NetworkPlan(PlanModel):
    mode: NetworkMode
    policy: NetworkPolicy
    podman_network: str = "podman"
    gateway: GatewayPlan | None = None


def check_flag_entry(entry: str) -> tuple[str, bool]:
    """``--allow`` takes a host or an address; validated like the config's entries."""
    host = entry.rpartition(":")[0] if entry.count(":") == 1 else entry
    is_address = host.startswith("[") or bool(_ADDRESS_LIKE.fullmatch(host))
    field = "addresses" if is_address else "hosts"
    try:
        section = AllowlistSection.model_validate({field: [entry]})
    except ValidationError as error:
        detail = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"flag --allow: {detail}") from None
    value = section.addresses[0] if is_address else section.hosts[0]
    return value, is_address


def add_allowlist(
    builder: PolicyBuilder,
    allowlist: AllowlistSection,
    profile: AgentProfile,
    source_of: Callable[[str, int], str],
    endpoint: tuple[str, str] | None = None,
    login: bool = False,
) -> None:
    """The allowlist section, the profile's API hosts and the agent's endpoint (its URL and
    where it was set), on both backends; ``source_of(key, index)`` says where an entry came
    from (a config file:line, or a request's spec key). ``login``: the run hands the CLI its
    subscription login, whose hosts are allowed too."""
    if endpoint is not None:
        url, where = endpoint
        entry, is_address = endpoint_allow_entry(url)
        (builder.add_address if is_address else builder.add_host)(
            entry, f"agent.endpoint ({where})"
        )
    for index, host in enumerate(allowlist.hosts):
        builder.add_host(host, source_of("hosts", index))
    for index, name in enumerate(allowlist.categories):
        builder.add_hosts(
            load_category(name).hosts, f"category {name} ({source_of('categories', index)})"
        )
    for index, address in enumerate(allowlist.addresses):
        builder.add_address(address, source_of("addresses", index))
    builder.add_hosts(profile.network.hosts, f"agent profile {profile.name}")
    if login and profile.login is not None:
        builder.add_hosts(profile.login.hosts, f"agent profile {profile.name} (its login)")


def dns_limits(section: DnsSection) -> DnsLimits:
    """The config's ``network.dns`` as the plan's limits (both backends)."""
    return DnsLimits(
        query_types=tuple(section.query_types),
        max_label_length=section.max_label_length,
        max_queries_per_second=section.max_queries_per_second,
    )


def plan_network(
    loaded: LoadedConfig,
    profile: AgentProfile,
    agent_id: str,
    allow_flags: Sequence[str],
    host_dns_servers: Sequence[str],
    login: bool = False,
) -> NetworkPlan:
    network = loaded.config.network
    builder = PolicyBuilder(network.mode)
    endpoint = loaded.config.agent.endpoint
    add_allowlist(
        builder,
        network.allowlist,
        profile,
        lambda key, index: str(loaded.origin_of(("network", "allowlist", key, index))),
        (endpoint, str(loaded.origin_of(("agent", "endpoint")))) if endpoint else None,
        login,
    )
    for entry, key, is_address in allowlist_entries(loaded.config.build_tools):
        # The approved package source is reachable without listing it twice.
        source = f"{key} ({loaded.origin_of(tuple(key.split('.')))})"
        (builder.add_address if is_address else builder.add_host)(entry, source)
    for entry in allow_flags:
        value, is_address = check_flag_entry(entry)
        if is_address:
            builder.add_address(value, "flag --allow")
        else:
            builder.add_host(value, "flag --allow")
    upstreams = list(network.dns_servers) or list(host_dns_servers)
    policy = builder.build(
        upstreams if network.mode == "filtered" else (), dns=dns_limits(network.dns)
    )
    if network.mode != "filtered":
        return NetworkPlan(mode=network.mode, policy=policy, podman_network=network.podman_network)
    if not upstreams:
        raise ConfigError(
            f"{loaded.origin_of(('network', 'mode'))}: network.mode 'filtered' needs a DNS "
            "server for the gateway and the host's /etc/resolv.conf names none it can reach; "
            "set network.dns_servers"
        )
    try:
        probe_address(policy)
    except ValueError:
        raise ConfigError(_probes_covered(policy)) from None
    gateway = GatewayPlan(
        # KAPSIS_GATEWAY_IMAGE: another gateway image (a locally patched one, or a test's).
        image=os.environ.get("KAPSIS_GATEWAY_IMAGE") or DEFAULT_GATEWAY_IMAGE,
        container_name=f"kapsis-{agent_id}-gateway",
        upstreams=tuple(upstreams),
    )
    return NetworkPlan(
        mode=network.mode, policy=policy, podman_network=network.podman_network, gateway=gateway
    )
