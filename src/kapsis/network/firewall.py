"""The gateway's nftables ruleset, rendered from a :class:`NetworkPolicy` (pure text).

The firewall drops every packet leaving the sandbox's network namespace except:

* loopback, where the gateway's DNS front and proxy listen (the resolver behind the front is
  reachable only from the front's and the proxy's uids);
* DNS from the resolver's uid to the upstream servers;
* TCP from the proxy's uid to public addresses on the ports that allowlisted names may use;
* TCP to the listed ports of the allowed addresses (address rules: the agent's own flows);
* packets of a flow already accepted, and only from the flow's owner.

Every accepted new flow is stamped with its owner in its connection mark, and a packet of a
marked flow from another uid is dropped whatever its connection-tracking state says: a UDP flow
has no owner in connection tracking, so without the mark the agent could send from the port of
the resolver's upstream query and be taken for the resolver's reply traffic. Packets the kernel
sends without a socket (a TCP reset, a time-wait acknowledgement) carry no uid and cannot carry
the agent's data; they pass as part of their flow.

Connections of the agent to an address resolved from an allowlisted name (on one of that name's
ports) are redirected to the proxy (:mod:`kapsis.network.proxy`), which checks the name the
connection carries and connects by itself; the agent has no direct path to those addresses.
Everything else is refused (TCP and UDP, so the sender learns at once) or dropped (the rest,
ICMP included), and refused packets are counted per destination in a dynamic set the host reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from kapsis.network.gateway_layout import (
    DNS_FRONT_UID,
    GATEWAY_UIDS,
    MARK_AGENT,
    MARK_OWNER_BASE,
    MARK_PROXY,
    MARK_RESOLVER,
    PROXY_UID,
    RESOLVER_PORT,
    RESOLVER_UID,
    TABLE,
)
from kapsis.network.policy import (
    DNS_PORT,
    NON_PUBLIC_V4,
    NON_PUBLIC_V6,
    AllowRule,
    NetworkPolicy,
    parse_address,
)
from kapsis.network.proxy import proxy_ports

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


def _set_of(values: Iterable[int]) -> str:
    items = sorted(set(values))
    return str(items[0]) if len(items) == 1 else "{ " + ", ".join(map(str, items)) + " }"


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
    """Each listed domain -> its (IPv4, IPv6) sets of resolved addresses."""
    sets: dict[str, tuple[str, str]] = {}
    for index, (_, domains) in enumerate(_domain_groups(policy)):
        for domain in domains:
            sets[domain] = (f"names{index}_v4", f"names{index}_v6")
    return sets


def _address_sets(policy: NetworkPolicy) -> list[tuple[tuple[int, ...], list[str], list[str]]]:
    """Per port group of address rules: (ports, IPv4 networks, IPv6 networks)."""
    groups = []
    for ports, rules in _port_groups(policy.addresses()):
        networks = [parse_address(rule.pattern)[0] for rule in rules]
        # Overlapping entries (10.0.0.0/8 and 10.1.2.3) would be conflicting intervals for nft.
        v4 = ipaddress.collapse_addresses(
            n for n in networks if isinstance(n, ipaddress.IPv4Network)
        )
        v6 = ipaddress.collapse_addresses(
            n for n in networks if isinstance(n, ipaddress.IPv6Network)
        )
        groups.append((ports, [str(n) for n in v4], [str(n) for n in v6]))
    return groups


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
    owners = sorted((uid, ports) for uid, ports in (owner_ports or {}).items() if ports)
    if clash := sorted({uid for uid, _ in owners} & set(GATEWAY_UIDS)):
        raise ValueError(f"uid {clash[0]} is one of the gateway's own; give the owner another")
    trusted = (*GATEWAY_UIDS, *(uid for uid, _ in owners))
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
    listen = proxy_ports(policy)
    redirects: list[str] = []
    for index, (ports, _domains) in enumerate(_domain_groups(policy)):
        lines.append(f"  set names{index}_v4 {{ type ipv4_addr; }}")
        lines.append(f"  set names{index}_v6 {{ type ipv6_addr; }}")
        for port in ports:
            # Names never lead to a non-public address, even if the resolver let one through.
            redirects.append(
                f"    ip daddr @names{index}_v4 ip daddr != @nonpublic_v4 tcp dport {port}"
                f" redirect to :{listen[port]}"
            )
            redirects.append(
                f"    ip6 daddr @names{index}_v6 ip6 daddr != @nonpublic_v6 tcp dport {port}"
                f" redirect to :{listen[port]}"
            )
    direct: list[str] = []  # address rules: nat leaves them alone, the filter accepts them
    accepts: list[str] = []
    for index, (ports, v4, v6) in enumerate(_address_sets(policy)):
        lines.append(
            f"  set addresses{index}_v4 {{ type ipv4_addr; flags interval;{_elements(v4)} }}"
        )
        lines.append(
            f"  set addresses{index}_v6 {{ type ipv6_addr; flags interval;{_elements(v6)} }}"
        )
        for family, name in (("ip", f"addresses{index}_v4"), ("ip6", f"addresses{index}_v6")):
            match = f"{family} daddr @{name} tcp dport {_set_of(ports)}"
            direct.append(f"    {match} return")
            accepts.append(f"    {match} ct mark set {MARK_AGENT} accept")
    lines += [
        # The agent's connections to resolved names go to the proxy; the gateway's own (and the
        # extra owners') go out as they are, under the output chain's rules.
        "  chain to_proxy {",
        "    type nat hook output priority -100; policy accept;",
        f"    meta skuid {_set_of(trusted)} return",
        *direct,
        *redirects,
        "  }",
        "  chain refuse {",
        "    meta nfproto ipv4 update @blocked4 { ip daddr . meta l4proto . th dport }",
        "    meta nfproto ipv6 update @blocked6 { ip6 daddr . meta l4proto . th dport }",
        # Refuse rather than drop: the agent's connect() fails at once instead of hanging, and
        # one attempt is one packet in the counters above.
        "    reject with icmpx type admin-prohibited",
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy drop;",
        # The resolver behind the DNS front answers the front only: every query, the agent's
        # and the proxy's, passes the front's checks.
        f'    oif "lo" meta l4proto {{ tcp, udp }} th dport {RESOLVER_PORT}'
        f" meta skuid != {DNS_FRONT_UID} jump refuse",
        '    oif "lo" accept',
        # The agent's connections redirected to the proxy: the output device was chosen before
        # the redirect, so they do not show as loopback.
        *(
            f"    {family} daddr {address} tcp dport {_set_of(listen.values())} ct status dnat"
            " accept"
            for family, address in (("ip", "127.0.0.1"), ("ip6", "::1"))
            if listen
        ),
        # A packet of an owned flow leaves only from its owner, whatever its state.
        f"    ct mark {MARK_RESOLVER} meta skuid != {RESOLVER_UID} drop",
        f"    ct mark {MARK_PROXY} meta skuid != {PROXY_UID} drop",
        *(
            f"    ct mark {MARK_OWNER_BASE + index} meta skuid != {uid} drop"
            for index, (uid, _ports) in enumerate(owners)
        ),
        f"    ct mark {MARK_AGENT} meta skuid {_set_of(trusted)} drop",
        "    ct state established,related accept",
        # IPv6 neighbour discovery: without it no IPv6 packet leaves, allowed or not.
        f"    icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 accept",
        f"    meta skuid {RESOLVER_UID} ip daddr @upstream_v4 meta l4proto {{ tcp, udp }}"
        f" th dport {DNS_PORT} ct mark set {MARK_RESOLVER} accept",
        f"    meta skuid {RESOLVER_UID} ip6 daddr @upstream_v6 meta l4proto {{ tcp, udp }}"
        f" th dport {DNS_PORT} ct mark set {MARK_RESOLVER} accept",
    ]
    if listen:
        name_ports = _set_of(listen)
        lines += [
            f"    meta skuid {PROXY_UID} ip daddr != @nonpublic_v4 tcp dport {name_ports}"
            f" ct mark set {MARK_PROXY} accept",
            f"    meta skuid {PROXY_UID} ip6 daddr != @nonpublic_v6 tcp dport {name_ports}"
            f" ct mark set {MARK_PROXY} accept",
        ]
    lines += [
        *(
            f"    meta skuid {uid} tcp dport {_set_of(ports)}"
            f" ct mark set {MARK_OWNER_BASE + index} accept"
            for index, (uid, ports) in enumerate(owners)
        ),
        *accepts,
        "    meta l4proto { tcp, udp } jump refuse",
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
