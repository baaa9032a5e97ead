"""The gateway's configuration, rendered from a :class:`NetworkPolicy`: nftables rules, dnsmasq.

Pure text generation, so both backends (and the unit tests) share it. The firewall drops every
packet leaving the sandbox's network namespace except: loopback (where the resolver listens),
replies of established connections, DNS from the resolver's own uid to the upstream servers,
and TCP to the listed ports of addresses in the allow sets. Everything else is refused (TCP
and UDP, so the sender learns at once) or dropped (the rest, ICMP included). The resolver
fills the allow sets with the answers of listed names only, answers NXDOMAIN for every other
name, and refuses answers in private, loopback and link-local ranges (rebinding). Refused
packets are counted per destination in a dynamic set, which the host reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from kapsis.network.policy import (
    DNS_PORT,
    NON_PUBLIC_V4,
    NON_PUBLIC_V6,
    AllowRule,
    NetworkPolicy,
    parse_address,
)

TABLE = "kapsis"
RESOLVER_USER = "kapsis-dns"
RESOLVER_UID = 990
BLOCKED_SETS = ("blocked4", "blocked6")
# What the gateway container may do, on both backends (nothing else has NET_ADMIN).
GATEWAY_CAPABILITIES = ("NET_ADMIN", "NET_BIND_SERVICE", "SETUID", "SETGID")
ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert"


def _port_groups(rules: Iterable[AllowRule]) -> list[tuple[tuple[int, ...], list[AllowRule]]]:
    """Rules grouped by their exact port list, so each group is one set and one rule."""
    groups: dict[tuple[int, ...], list[AllowRule]] = {}
    for rule in rules:
        groups.setdefault(rule.ports, []).append(rule)
    return sorted(groups.items())


def _elements(values: Iterable[str]) -> str:
    items = sorted(set(values))
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def _ports(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"


def _name_domains(policy: NetworkPolicy) -> dict[str, tuple[int, ...]]:
    """Each listed domain with the ports its names may reach.

    dnsmasq files answers into sets by domain (a domain and its subdomains alike), so an exact
    name and a ``*.`` wildcard of the same domain share one set and their ports are merged.
    """
    domains: dict[str, set[int]] = {}
    for rule in policy.names():
        domains.setdefault(rule.pattern.removeprefix("*."), set()).update(rule.ports)
    # dnsmasq files an answer under the longest matching domain only: a name listed below a
    # wildcard must also carry the wildcard's ports, or they would be lost for it.
    for rule in policy.names():
        if rule.kind != "wildcard":
            continue
        wildcard = rule.pattern.removeprefix("*.")
        for domain, ports in domains.items():
            if domain.endswith(f".{wildcard}"):
                ports.update(rule.ports)
    return {domain: tuple(sorted(ports)) for domain, ports in domains.items()}


def _domain_groups(policy: NetworkPolicy) -> list[tuple[tuple[int, ...], list[str]]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    for domain, ports in sorted(_name_domains(policy).items()):
        groups.setdefault(ports, []).append(domain)
    return sorted(groups.items())


def name_sets(policy: NetworkPolicy) -> dict[str, tuple[str, str]]:
    """Each listed domain -> its (IPv4, IPv6) allow sets."""
    sets: dict[str, tuple[str, str]] = {}
    for index, (_, domains) in enumerate(_domain_groups(policy)):
        for domain in domains:
            sets[domain] = (f"names{index}_v4", f"names{index}_v6")
    return sets


def _covered_by_wildcard(name: str, policy: NetworkPolicy) -> bool:
    """Whether a listed ``*.domain`` already allows the subdomains of ``name``."""
    for rule in policy.names():
        if rule.kind == "wildcard":
            domain = rule.pattern.removeprefix("*.")
            if name == domain or name.endswith(f".{domain}"):
                return True
    return False


def nft_ruleset(
    policy: NetworkPolicy,
    upstreams: Iterable[str],
    owner_ports: Mapping[int, tuple[int, ...]] | None = None,
) -> str:
    """The nftables ruleset of a filtered sandbox (``nft -f`` input).

    ``owner_ports``: uid -> TCP ports that uid's sockets may reach anywhere. Only the Kubernetes
    backend uses it, for the finishing step that pushes from inside the Pod (its uid is one the
    agent can never take: no capabilities, no privilege escalation); Podman pushes from the host.
    """
    upstream4 = [a for a in upstreams if ipaddress.ip_address(a).version == 4]
    upstream6 = [a for a in upstreams if ipaddress.ip_address(a).version == 6]
    lines = [
        f"table inet {TABLE} {{",
        f"  set upstream_v4 {{ type ipv4_addr;{_elements(upstream4)} }}",
        f"  set upstream_v6 {{ type ipv6_addr;{_elements(upstream6)} }}",
        f"  set nonpublic_v4 {{ type ipv4_addr; flags interval;{_elements(NON_PUBLIC_V4)} }}",
        f"  set nonpublic_v6 {{ type ipv6_addr; flags interval;{_elements(NON_PUBLIC_V6)} }}",
        "  set blocked4 { type ipv4_addr . inet_proto . inet_service; flags dynamic, timeout;"
        " timeout 1d; size 65535; counter; }",
        "  set blocked6 { type ipv6_addr . inet_proto . inet_service; flags dynamic, timeout;"
        " timeout 1d; size 65535; counter; }",
    ]
    accepts: list[str] = []
    for index, (ports, _domains) in enumerate(_domain_groups(policy)):
        lines.append(f"  set names{index}_v4 {{ type ipv4_addr; }}")
        lines.append(f"  set names{index}_v6 {{ type ipv6_addr; }}")
        # Names never open a non-public address, even if the resolver let one through.
        accepts.append(
            f"    ip daddr @names{index}_v4 ip daddr != @nonpublic_v4 tcp dport {_ports(ports)}"
            " accept"
        )
        accepts.append(
            f"    ip6 daddr @names{index}_v6 ip6 daddr != @nonpublic_v6 tcp dport {_ports(ports)}"
            " accept"
        )
    for index, (ports, rules) in enumerate(_port_groups(policy.addresses())):
        networks = [parse_address(rule.pattern)[0] for rule in rules]
        # Overlapping entries (10.0.0.0/8 and 10.1.2.3) would be conflicting intervals for nft.
        v4 = [
            str(n)
            for n in ipaddress.collapse_addresses(
                n for n in networks if isinstance(n, ipaddress.IPv4Network)
            )
        ]
        v6 = [
            str(n)
            for n in ipaddress.collapse_addresses(
                n for n in networks if isinstance(n, ipaddress.IPv6Network)
            )
        ]
        lines.append(
            f"  set addresses{index}_v4 {{ type ipv4_addr; flags interval;{_elements(v4)} }}"
        )
        lines.append(
            f"  set addresses{index}_v6 {{ type ipv6_addr; flags interval;{_elements(v6)} }}"
        )
        accepts.append(f"    ip daddr @addresses{index}_v4 tcp dport {_ports(ports)} accept")
        accepts.append(f"    ip6 daddr @addresses{index}_v6 tcp dport {_ports(ports)} accept")
    lines += [
        "  chain output {",
        "    type filter hook output priority filter; policy drop;",
        '    oif "lo" accept',
        "    ct state established,related accept",
        # IPv6 neighbour discovery: without it no IPv6 packet leaves, allowed or not.
        f"    icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 accept",
        f"    meta skuid {RESOLVER_UID} ip daddr @upstream_v4 meta l4proto {{ tcp, udp }}"
        f" th dport {DNS_PORT} accept",
        f"    meta skuid {RESOLVER_UID} ip6 daddr @upstream_v6 meta l4proto {{ tcp, udp }}"
        f" th dport {DNS_PORT} accept",
        *(
            f"    meta skuid {uid} tcp dport {_ports(ports)} accept"
            for uid, ports in sorted((owner_ports or {}).items())
            if ports
        ),
        *accepts,
        "    meta l4proto { tcp, udp } meta nfproto ipv4"
        " update @blocked4 { ip daddr . meta l4proto . th dport }",
        "    meta l4proto { tcp, udp } meta nfproto ipv6"
        " update @blocked6 { ip6 daddr . meta l4proto . th dport }",
        # Refuse rather than drop: the agent's connect() fails at once instead of hanging, and
        # one attempt is one packet in the counters above.
        "    meta l4proto { tcp, udp } reject with icmpx type admin-prohibited",
        "    counter",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy drop;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        f"    icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 accept",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _dnsmasq_pattern(rule: AllowRule) -> str:
    return rule.pattern  # "*.example.com" is dnsmasq's own "subdomains only" syntax


def dnsmasq_config(
    policy: NetworkPolicy,
    upstreams: Iterable[str],
    log_file: str,
    resolve_only: Iterable[str] = (),
) -> str:
    """dnsmasq's configuration: NXDOMAIN for all but the listed names, answers into the sets.

    ``resolve_only``: exact names answered too but *not* filed into any allow set, so the
    firewall still refuses them to the agent (Kubernetes: the git host, for the finishing step).
    """
    servers = list(upstreams)
    lines = [
        "no-resolv",
        "no-hosts",
        "no-poll",
        "pid-file=",
        "bind-interfaces",
        "listen-address=127.0.0.1",
        "port=53",
        f"user={RESOLVER_USER}",
        "group=nogroup",
        "cache-size=1000",
        # Answers in non-public ranges become NXDOMAIN (DNS rebinding). Spelled out rather than
        # dnsmasq's stop-dns-rebind, whose list is fixed and differs from the firewall's.
        *(f"bogus-nxdomain={network}" for network in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)),
        "log-queries=extra",
        f"log-facility={log_file}",
        "log-async=25",
        # Every name not listed below: no such domain.
        "address=/#/",
    ]
    for rule in policy.names():
        pattern = _dnsmasq_pattern(rule)
        for server in servers:
            lines.append(f"server=/{pattern}/{server}")
        if rule.kind == "name" and not _covered_by_wildcard(rule.pattern, policy):
            # An exact name: its subdomains stay unknown.
            lines.append(f"address=/*.{rule.pattern}/")
    listed = {rule.pattern for rule in policy.names()}
    for name in sorted(set(resolve_only) - listed):
        lines += [f"server=/{name}/{server}" for server in servers]
        if not _covered_by_wildcard(name, policy):
            lines.append(f"address=/*.{name}/")
    for domain, (v4, v6) in sorted(name_sets(policy).items()):
        # nftset matches a domain and its subdomains ("*." is not special there).
        lines.append(f"nftset=/{domain}/4#inet#{TABLE}#{v4},6#inet#{TABLE}#{v6}")
    return "\n".join(lines) + "\n"
