"""What the gateway saw: every DNS decision and every connection it judged, per agent.

Four sources, all written by the gateway on the host side of the sandbox: the resolver's query
log (what the agent's queries got), the DNS front's refusals (query type, name, rate, EDNS), the
proxy's log (each connection or HTTP request to an allowlisted address: the name it carried and
the verdict) and the firewall's dynamic set of refused destinations, with a packet counter each.
They are written as JSON Lines to ``~/.kapsis/network/AGENT_ID.jsonl``, summed into the status's
``blocked_requests`` and told in the end-of-run notes. Everything here is read from files the
agent's traffic shaped: each line is parsed on its own, bounded, and skipped when malformed.

Only the standard library is imported at module level: the gateway container runs this module
too (``gateway/report.py``), where Kapsis itself is not installed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

# allowed: answered; blocked: not on the allowlist; rebind: the answer was in a non-public range;
# unresolved: the upstream could not resolve it (NXDOMAIN, SERVFAIL, no answer); refused: the
# DNS front refused the query itself (see ``reason``).
DnsDecision = Literal["allowed", "blocked", "rebind", "unresolved", "refused"]
REFUSED_DNS: tuple[DnsDecision, ...] = ("blocked", "rebind", "refused")
PROTOCOLS = {6: "tcp", 17: "udp"}
QUERY_TYPES = {1: "A", 5: "CNAME", 15: "MX", 16: "TXT", 28: "AAAA", 64: "SVCB", 65: "HTTPS"}
DNS_REASONS = {
    "blocked": "not on the allowlist",
    "rebind": "its answer is in a non-public range (rebinding)",
    "rate": "over the query rate",
    "form": "not a plain query (one question of class IN, no records)",
    "type": "query type not allowed",
    "name": "a label too long or not of hostname characters",
    "edns": "an EDNS option other than a cookie",
}
PROXY_REASONS = {
    "no-name": "no TLS server name or HTTP Host",
    "not-allowed": "name not on the allowlist for the port",
    "unresolved": "the upstream could not resolve the name",
    "connect-method": "HTTP CONNECT",
    "bad-name": "a malformed name (one plain host name, labels within the DNS limit)",
    "upgrade": "a protocol upgrade other than WebSocket",
}
# No line of these logs is longer in honest use; a longer one is cut before it is parsed.
MAX_LINE = 2048

# "Nov 26 18:55:10 dnsmasq[1]: 12 127.0.0.1/38680 query[A] example.com from 127.0.0.1"
_LINE_RE = re.compile(r"dnsmasq\[\d+\]: (?P<serial>\d+) \S+ (?P<event>.+)$")
_QUERY_RE = re.compile(r"^query\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from (?P<client>\S+)$")
_NXDOMAIN_RE = re.compile(r"^config (?P<name>\S+) is NXDOMAIN")
_FORWARDED_RE = re.compile(r"^forwarded (?P<name>\S+) to ")
_ANSWER_RE = re.compile(r"^(reply|cached) (?P<name>\S+) is (?P<answer>\S+)")
_UPSTREAM_FAILURES = ("NXDOMAIN", "SERVFAIL", "REFUSED")
# "kapsis-proxy 198.51.100.2 443 tls other.test not-allowed PR -1 517 0" (kapsis.network.proxy)
_PROXY_RE = re.compile(
    r"^kapsis-proxy (?P<address>\S+) (?P<port>\d{1,5}) (?P<protocol>tls|http|-) (?P<name>\S+)"
    r" (?P<verdict>[a-z-]+) \S+ -?\d+ \d+ \d+$"
)
_REFUSAL_RE = re.compile(r"^(?P<reason>[a-z]+)\t(?P<qtype>\d{1,5})\t(?P<name>[^\t]+)$")
_REBIND_RE = re.compile(r"possible DNS-rebind attack detected: (?P<name>\S+)")


@dataclass
class DnsEvent:
    name: str
    qtype: str
    decision: DnsDecision = "allowed"
    answers: list[str] = field(default_factory=list)
    reason: str = ""
    type: str = "dns"
    forwarded: bool = field(default=False, repr=False)


@dataclass(frozen=True)
class ProxyDecision:
    """One connection (TLS) or request (HTTP) the proxy judged."""

    name: str  # the TLS server name or HTTP Host ("" when it carried none)
    port: int
    protocol: str  # "tls", "http", or "" when neither
    address: str  # the address the agent chose ("" when the proxy cannot tell: IPv6, direct)
    allowed: bool
    reason: str = ""
    type: str = "proxy"


@dataclass(frozen=True)
class BlockedConnection:
    address: str
    protocol: str
    port: int
    packets: int
    type: str = "blocked_connection"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False  # NXDOMAIN, NODATA, REFUSED, SERVFAIL, <CNAME>: not an answer
    return True


def _lines(text: str) -> list[str]:
    return [line[:MAX_LINE] for line in text.splitlines()]


def parse_dns_log(text: str, clients: tuple[str, ...] | None = None) -> list[DnsEvent]:
    """DNS decisions, one per query, in the order the queries arrived; only of queries from
    ``clients`` when given (the gateway's: the DNS front's address)."""
    events: dict[str, DnsEvent] = {}
    for line in _lines(text):
        match = _LINE_RE.search(line)
        if match is None:
            rebind = _REBIND_RE.search(line)
            if rebind:  # older dnsmasq logs this without the query's serial
                for event in events.values():
                    if event.name == rebind["name"]:
                        event.decision = "rebind"
            continue
        serial, text_ = match["serial"], match["event"]
        if query := _QUERY_RE.match(text_):
            if clients is None or query["client"] in clients:
                events[serial] = DnsEvent(name=query["name"], qtype=query["qtype"])
            else:
                events.pop(serial, None)
            continue
        found = events.get(serial)
        if found is None:
            continue
        event = found
        if _FORWARDED_RE.match(text_):
            event.forwarded = True
        elif _NXDOMAIN_RE.match(text_):
            # A listed name is forwarded first; its NXDOMAIN from "config" is a refused answer
            # in a non-public range (bogus-nxdomain), i.e. rebinding.
            event.decision = "rebind" if event.forwarded else "blocked"
        elif rebind := _REBIND_RE.search(text_):
            event.decision = "rebind"
        elif answer := _ANSWER_RE.match(text_):
            value = answer["answer"]
            if _is_address(value):
                event.answers.append(value)
            elif value in _UPSTREAM_FAILURES and event.decision == "allowed" and not event.answers:
                event.decision = "unresolved"  # the resolver asked; the upstream had no answer
    for event in events.values():
        if event.decision != "allowed":
            event.reason = DNS_REASONS.get(event.decision, "")
    return list(events.values())


def parse_dns_refusals(text: str, counts_text: str = "") -> tuple[list[DnsEvent], int]:
    """The DNS front's refusals: the recorded ones, and how many more it only counted."""
    events = []
    for line in _lines(text):
        match = _REFUSAL_RE.match(line)
        if match is None:
            continue
        qtype = int(match["qtype"])
        events.append(
            DnsEvent(
                name=match["name"],
                qtype=QUERY_TYPES.get(qtype, f"TYPE{qtype}"),
                decision="refused",
                reason=DNS_REASONS.get(match["reason"], match["reason"]),
            )
        )
    counted = 0
    for line in _lines(counts_text):
        reason, _, count = line.partition("\t")
        if reason in DNS_REASONS and count.isdecimal() and count.isascii():
            counted += min(int(count), 1 << 40)
    return events, max(counted - len(events), 0)


def parse_proxy_log(text: str) -> list[ProxyDecision]:
    """The proxy's decisions, one per connection (TLS) or request (HTTP)."""
    decisions = []
    for line in _lines(text):
        match = _PROXY_RE.match(line)
        if match is None:
            continue  # the proxy's own notices, or a line cut short
        address = match["address"]
        if not _is_address(address) or ipaddress.ip_address(address).is_loopback:
            address = ""  # the proxy was reached directly, or cannot tell (IPv6)
        verdict = match["verdict"]
        decisions.append(
            ProxyDecision(
                name="" if match["name"] == "-" else match["name"],
                port=int(match["port"]),
                protocol="" if match["protocol"] == "-" else match["protocol"],
                address=address,
                allowed=verdict == "allowed",
                reason=PROXY_REASONS.get(verdict, ""),
            )
        )
    return decisions


def parse_blocked_set(listing: dict[str, Any]) -> list[BlockedConnection]:
    """Entries of ``nft -j list set`` of a blocked set (address . protocol . port, counter)."""
    blocked = []
    for item in listing.get("nftables", []):
        for element in item.get("set", {}).get("elem", []):
            value = element.get("elem", element)
            address, protocol, port = value["val"]["concat"]
            packets = int(value.get("counter", {}).get("packets", 1))
            # nft -j names well-known protocols ("tcp") and numbers the rest.
            name = PROTOCOLS.get(protocol, str(protocol)) if isinstance(protocol, int) else protocol
            blocked.append(
                BlockedConnection(
                    address=str(address),
                    protocol=str(name),
                    port=int(port),
                    packets=packets,
                )
            )
    return blocked


SELFTEST_NAME = "kapsis-selftest.invalid"
SELFTEST_PORT = 9


SELFTEST_INTERNAL = ("127.0.0.1", "udp", 54)  # its query to the resolver behind the front


def without_selftest(
    dns: list[DnsEvent], blocked: list[BlockedConnection], probe: str
) -> tuple[list[DnsEvent], list[BlockedConnection]]:
    """Drop what the gateway's own self-test caused: its queries, its refused connection to the
    probe address and its query to the resolver behind the front (one packet each)."""
    agent_dns = [event for event in dns if event.name.rstrip(".") != SELFTEST_NAME]
    own = {(probe, "tcp", SELFTEST_PORT), SELFTEST_INTERNAL}
    agent_blocked = []
    for entry in blocked:
        if (entry.address, entry.protocol, entry.port) in own:
            if entry.packets <= 1:
                continue
            entry = BlockedConnection(entry.address, entry.protocol, entry.port, entry.packets - 1)
        agent_blocked.append(entry)
    return agent_dns, agent_blocked


def proxy_without_selftest(decisions: list[ProxyDecision]) -> list[ProxyDecision]:
    return [decision for decision in decisions if decision.name != SELFTEST_NAME]


@dataclass
class NetworkReport:
    dns: list[DnsEvent]
    blocked: list[BlockedConnection]
    gateway_ran_to_the_end: bool = True
    proxy: list[ProxyDecision] = field(default_factory=list)
    dns_refused_unrecorded: int = 0  # refusals the DNS front counted beyond its recorded ones

    @property
    def blocked_requests(self) -> int:
        """Refused DNS queries, refused packets (one per attempt: the firewall rejects) and
        connections or requests the proxy refused. A name the upstream could not resolve was
        not refused by the gateway and is not counted."""
        refused_names = sum(1 for event in self.dns if event.decision in REFUSED_DNS)
        refused_proxy = sum(1 for decision in self.proxy if not decision.allowed)
        packets = sum(entry.packets for entry in self.blocked)
        return refused_names + self.dns_refused_unrecorded + packets + refused_proxy


def blocked_in_table(
    listing: dict[str, Any], set_names: tuple[str, ...]
) -> list[BlockedConnection]:
    """The entries of the named blocked sets in ``nft -j list table`` output."""
    sets = [
        item for item in listing.get("nftables", []) if item.get("set", {}).get("name") in set_names
    ]
    return parse_blocked_set({"nftables": sets})


def network_log_path(agent_id: str) -> Path:
    from kapsis import paths

    return paths.kapsis_home() / "network" / f"{agent_id}.jsonl"


def write_network_log(agent_id: str, report: NetworkReport) -> Path:
    path = network_log_path(agent_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        records: list[DnsEvent | BlockedConnection | ProxyDecision] = [
            *report.dns,
            *report.proxy,
            *report.blocked,
        ]
        for record in records:
            fields = asdict(record)
            fields.pop("forwarded", None)
            handle.write(json.dumps(fields, sort_keys=True) + "\n")
    return path


def _listed(items: list[str], limit: int = 5) -> str:
    unique = list(dict.fromkeys(items))
    shown = ", ".join(unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


API_QUERY_TYPES = ("A", "AAAA", "HTTPS")


def api_notes(report: NetworkReport, api_hosts: Iterable[str]) -> list[str]:
    """The model API's side first: an agent that retried an unreachable endpoint until it gave
    up (or its time ran out) says why in one line per API host the gateway could not serve."""
    hosts = {host.lower().rstrip(".") for host in api_hosts}
    said: dict[str, str] = {}
    for event in report.dns:
        name = event.name.lower().rstrip(".")
        # Only the lookups a client of the API makes, refused for the name itself: a refused
        # TXT query, or one over the rate (which the agent can make on purpose), says nothing
        # of whether the API answers.
        if name not in hosts or name in said or event.qtype not in API_QUERY_TYPES:
            continue
        if event.decision in ("blocked", "rebind"):
            said[name] = f"no answer from {name}: the gateway refused its name ({event.reason})"
        elif event.decision == "unresolved":
            said[name] = f"no answer from {name}: it could not be resolved"
    for decision in report.proxy:
        name = decision.name.lower().rstrip(".")
        if not decision.allowed and name in hosts and name not in said:
            said[name] = (
                f"no answer from {name}: the gateway refused the connection ({decision.reason})"
            )
    return list(said.values())


def report_notes(report: NetworkReport) -> list[str]:
    """What the end-of-run message says about the network: refused names, names the upstream
    could not resolve, refused connections (by name, or by address when there was none)."""
    notes = []
    refused = [
        f"{event.name.rstrip('.')} {event.qtype} ({event.reason})"
        for event in report.dns
        if event.decision in REFUSED_DNS
    ]
    if refused or report.dns_refused_unrecorded:
        more = report.dns_refused_unrecorded
        counted = f"{more} more queries, counted only" if more else ""
        if refused:
            notes.append(
                f"the gateway refused the names {_listed(refused)}"
                + (f" (and {counted})" if counted else "")
            )
        else:
            notes.append(f"the gateway refused {counted}")
    unresolved = [event.name.rstrip(".") for event in report.dns if event.decision == "unresolved"]
    if unresolved:
        notes.append(f"the upstream could not resolve {_listed(unresolved)}")
    connections = [
        f"{decision.name or decision.address or 'a connection'}:{decision.port} ({decision.reason})"
        for decision in report.proxy
        if not decision.allowed
    ]
    connections += [f"{entry.address}:{entry.port}/{entry.protocol}" for entry in report.blocked]
    if connections:
        notes.append(f"the gateway refused the connections {_listed(connections)}")
    return notes
