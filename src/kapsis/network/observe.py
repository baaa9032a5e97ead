"""What the gateway saw: every DNS decision and every blocked connection, per agent.

The resolver's query log (written by the gateway, on the host side of the sandbox) is parsed
into DNS decisions; the firewall's dynamic set of refused destinations, with a packet counter
each, gives the blocked connection attempts. Both are written as JSON Lines to
``~/.kapsis/network/AGENT_ID.jsonl`` and summed into the status's ``blocked_requests``.

Only the standard library is imported at module level: the gateway container runs this module
too (``gateway/report.py``), where Kapsis itself is not installed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

DnsDecision = Literal["allowed", "blocked", "rebind"]
PROTOCOLS = {6: "tcp", 17: "udp"}

# "Nov 26 18:55:10 dnsmasq[1]: 12 127.0.0.1/38680 query[A] example.com from 127.0.0.1"
_LINE_RE = re.compile(r"dnsmasq\[\d+\]: (?P<serial>\d+) \S+ (?P<event>.+)$")
_QUERY_RE = re.compile(r"^query\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from ")
_NXDOMAIN_RE = re.compile(r"^config (?P<name>\S+) is NXDOMAIN")
_FORWARDED_RE = re.compile(r"^forwarded (?P<name>\S+) to ")
_ANSWER_RE = re.compile(r"^(reply|cached) (?P<name>\S+) is (?P<answer>\S+)")
_REBIND_RE = re.compile(r"possible DNS-rebind attack detected: (?P<name>\S+)")


@dataclass
class DnsEvent:
    name: str
    qtype: str
    decision: DnsDecision = "allowed"
    answers: list[str] = field(default_factory=list)
    type: str = "dns"
    forwarded: bool = field(default=False, repr=False)


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


def parse_dns_log(text: str) -> list[DnsEvent]:
    """DNS decisions, one per query, in the order the queries arrived."""
    events: dict[str, DnsEvent] = {}
    for line in text.splitlines():
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
            events[serial] = DnsEvent(name=query["name"], qtype=query["qtype"])
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
            elif value == "NXDOMAIN" and event.decision == "allowed" and not event.answers:
                event.decision = "blocked"
    return list(events.values())


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


def without_selftest(
    dns: list[DnsEvent], blocked: list[BlockedConnection], probe: str
) -> tuple[list[DnsEvent], list[BlockedConnection]]:
    """Drop what the gateway's own self-test caused (one query, one refused connection)."""
    agent_dns = [event for event in dns if event.name != SELFTEST_NAME]
    agent_blocked = []
    for entry in blocked:
        if (entry.address, entry.protocol, entry.port) == (probe, "tcp", SELFTEST_PORT):
            if entry.packets <= 1:
                continue
            entry = BlockedConnection(entry.address, entry.protocol, entry.port, entry.packets - 1)
        agent_blocked.append(entry)
    return agent_dns, agent_blocked


@dataclass
class NetworkReport:
    dns: list[DnsEvent]
    blocked: list[BlockedConnection]
    gateway_ran_to_the_end: bool = True

    @property
    def blocked_requests(self) -> int:
        """Refused DNS queries plus refused packets (one per attempt: the firewall rejects)."""
        refused_names = sum(1 for event in self.dns if event.decision != "allowed")
        return refused_names + sum(entry.packets for entry in self.blocked)


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
        records: list[DnsEvent | BlockedConnection] = [*report.dns, *report.blocked]
        for record in records:
            fields = asdict(record)
            fields.pop("forwarded", None)
            handle.write(json.dumps(fields, sort_keys=True) + "\n")
    return path
