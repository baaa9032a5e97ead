"""The effective network policy of a run: what the agent may reach, and where each rule came from.

Built from the config's ``network.allowlist`` (hosts, categories, addresses), ``--allow`` flags
and the agent profile's API hosts. The same policy drives the gateway on both backends and
``kapsis policy show``. Names are exact (``github.com`` does not allow ``api.github.com``);
``*.github.com`` allows every subdomain but not ``github.com`` itself. An entry without a port
allows the default ports, 80 and 443.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from importlib import resources
from typing import Literal

from kapsis.errors import ConfigError
from kapsis.sandbox.plan_model import PlanModel

DEFAULT_PORTS: tuple[int, ...] = (80, 443)
DNS_PORT = 53
# Hostname labels of real services stay well below this; random labels that carry data do not.
DEFAULT_MAX_LABEL_LENGTH = 40
DEFAULT_MAX_QUERIES_PER_SECOND = 50

# Answers in these ranges are refused for names (DNS rebinding): only an explicit address entry
# reaches them. The gateway's resolver and firewall both enforce it.
NON_PUBLIC_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "168.63.129.16/32",  # Azure's host endpoint (WireServer)
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
# IPv6 ranges that reach IPv4 (NAT64, 6to4, Teredo: a private IPv4 address inside) count too.
NON_PUBLIC_V6 = (
    "::/96",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
)

RuleKind = Literal["name", "wildcard", "address"]
# Query types every agent may ask (name to address, and the records that lead there).
BASE_QUERY_TYPES = ("A", "AAAA", "CNAME", "HTTPS", "SVCB")


class AllowRule(PlanModel):
    """One thing the agent may reach: a name, a ``*.domain`` or an address/network, on ports."""

    pattern: str
    kind: RuleKind
    ports: tuple[int, ...]
    sources: tuple[str, ...]


class DnsLimits(PlanModel):
    """What the gateway's DNS front lets through (see :mod:`kapsis.network.resolver`)."""

    query_types: tuple[str, ...] = ()  # beyond A, AAAA, CNAME, HTTPS and SVCB
    max_label_length: int = DEFAULT_MAX_LABEL_LENGTH
    max_queries_per_second: int = DEFAULT_MAX_QUERIES_PER_SECOND


class NetworkPolicy(PlanModel):
    mode: Literal["none", "open", "filtered"]
    rules: tuple[AllowRule, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns: DnsLimits = DnsLimits()

    def names(self) -> list[AllowRule]:
        return [rule for rule in self.rules if rule.kind != "address"]

    def addresses(self) -> list[AllowRule]:
        return [rule for rule in self.rules if rule.kind == "address"]

    def blocked_summary(self) -> list[str]:
        if self.mode == "none":
            return ["everything but loopback: the sandbox has no network interface"]
        if self.mode == "open":
            return ["nothing: the network is OPEN (unfiltered)"]
        return [
            "every name not listed (the resolver answers NXDOMAIN)",
            "a TCP connection to a listed name whose TLS server name or HTTP Host is not listed "
            "for its port, or that carries no name (TLS without SNI, other protocols): the "
            "gateway's proxy connects by name, never to the address the agent chose",
            "every address not resolved from a listed name or listed as an address",
            "every port not listed for its entry (default 80 and 443)",
            "names whose answers are loopback, private, link-local or cloud-metadata addresses",
            f"DNS query types but {', '.join(self.allowed_query_types())}; labels longer than "
            f"{self.dns.max_label_length} characters or not of hostname characters; more than "
            f"{self.dns.max_queries_per_second} queries a second",
            "UDP (but DNS to the gateway), ICMP, and DNS to any other resolver",
        ]

    def allowed_query_types(self) -> tuple[str, ...]:
        extra = sorted(set(self.dns.query_types) - set(BASE_QUERY_TYPES))
        return (*BASE_QUERY_TYPES, *extra)


class Category(PlanModel):
    name: str
    description: str
    hosts: tuple[str, ...]


def category_names() -> list[str]:
    folder = resources.files("kapsis.network") / "categories"
    return sorted(
        item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml")
    )


def load_category(name: str) -> Category:
    from ruamel.yaml import YAML

    folder = resources.files("kapsis.network") / "categories"
    item = folder / f"{name}.yaml"
    if not item.is_file():
        known = ", ".join(category_names())
        raise ConfigError(f"network.allowlist.categories: no category {name!r}; known: {known}")
    data = YAML(typ="safe", pure=True).load(item.read_text(encoding="utf-8"))
    return Category(name=name, description=data["description"], hosts=tuple(data["hosts"]))


def split_port(entry: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` / ``addr`` -> (host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port)
    return entry, None


def parse_address(entry: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    host, port = split_port(entry)
    return ipaddress.ip_network(host, strict=False), port


# Candidates for the gateway self-test's "an address not on the allowlist": documentation ranges,
# never routed on the internet, so even a broken gateway sends nothing anywhere real.
PROBE_CANDIDATES = ("192.0.2.1", "198.51.100.1", "203.0.113.254")


def probe_address(policy: NetworkPolicy) -> str:
    """An address the policy does not allow, for the self-test to connect to."""
    allowed = [parse_address(rule.pattern)[0] for rule in policy.addresses()]
    for candidate in PROBE_CANDIDATES:
        address = ipaddress.ip_address(candidate)
        if not any(address in network for network in allowed):
            return candidate
    raise ValueError("every self-test probe address is allowlisted")


class PolicyBuilder:
    """Collects entries from their sources and merges the ports of repeated patterns."""

    def __init__(self, mode: Literal["none", "open", "filtered"]) -> None:
        self.mode = mode
        self._rules: dict[str, tuple[RuleKind, set[int], list[str]]] = {}

    def add_host(self, entry: str, source: str) -> None:
        name, port = split_port(entry.lower())
        kind: RuleKind = "wildcard" if name.startswith("*.") else "name"
        self._add(name, kind, port, source)

    def add_address(self, entry: str, source: str) -> None:
        network, port = parse_address(entry)
        self._add(str(network), "address", port, source)

    def add_hosts(self, entries: Iterable[str], source: str) -> None:
        for entry in entries:
            self.add_host(entry, source)

    def _add(self, pattern: str, kind: RuleKind, port: int | None, source: str) -> None:
        _, ports, sources = self._rules.setdefault(pattern, (kind, set(), []))
        ports.update(DEFAULT_PORTS if port is None else (port,))
        if source not in sources:
            sources.append(source)

    def build(self, dns_servers: Iterable[str] = (), dns: DnsLimits | None = None) -> NetworkPolicy:
        rules = tuple(
            AllowRule(
                pattern=pattern, kind=kind, ports=tuple(sorted(ports)), sources=tuple(sources)
            )
            for pattern, (kind, ports, sources) in sorted(self._rules.items())
        )
        return NetworkPolicy(
            mode=self.mode, rules=rules, dns_servers=tuple(dns_servers), dns=dns or DnsLimits()
        )
