"""What the gateway saw: the resolver's query log, the DNS front's refusals, the proxy's log,
the firewall's blocked sets; the report, its notes and the network log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kapsis.backends import podman_gateway
from kapsis.network import gateway_layout
from kapsis.network.observe import (
    DNS_REASONS,
    MAX_LINE,
    PROXY_REASONS,
    SELFTEST_INTERNAL,
    SELFTEST_NAME,
    SELFTEST_PORT,
    BlockedConnection,
    DnsEvent,
    NetworkReport,
    ProxyDecision,
    blocked_in_table,
    network_log_path,
    parse_blocked_set,
    parse_dns_log,
    parse_dns_refusals,
    parse_proxy_log,
    proxy_without_selftest,
    report_notes,
    without_selftest,
    write_network_log,
)

FRONT = gateway_layout.DNS_FRONT_SOURCE  # the DNS front's address for the resolver: 127.0.0.2

# dnsmasq 2.90 with log-queries=extra, as the gateway writes it (serial, client, event). The
# agent's queries come through the DNS front (127.0.0.2); the proxy asks from 127.0.0.1.
PREFIX = "Nov 26 18:55:10 dnsmasq[7]:"
LOG = f"""\
{PREFIX} started, version 2.90 cachesize 1000
{PREFIX} using nameserver 192.0.2.53#53 for domain github.com
{PREFIX} using only locally-known addresses for .pypi.org
{PREFIX} 1 127.0.0.2/41000 query[A] kapsis-selftest.invalid from 127.0.0.2
{PREFIX} 1 127.0.0.2/41000 config kapsis-selftest.invalid is NXDOMAIN
{PREFIX} 2 127.0.0.2/41001 query[A] github.com from 127.0.0.2
{PREFIX} 3 127.0.0.2/41002 query[AAAA] github.com from 127.0.0.2
{PREFIX} 2 127.0.0.2/41001 forwarded github.com to 192.0.2.53
{PREFIX} 3 127.0.0.2/41002 forwarded github.com to 192.0.2.53
{PREFIX} 2 127.0.0.2/41001 nftset add 4 inet kapsis names0_v4 140.82.121.3 github.com
{PREFIX} 2 127.0.0.2/41001 reply github.com is 140.82.121.3
{PREFIX} 3 127.0.0.2/41002 reply github.com is NODATA-IPv6
{PREFIX} 4 127.0.0.2/41003 query[A] evil.example from 127.0.0.2
{PREFIX} 4 127.0.0.2/41003 config evil.example is NXDOMAIN
{PREFIX} 5 127.0.0.2/41004 query[A] rebind.example.org from 127.0.0.2
{PREFIX} 5 127.0.0.2/41004 forwarded rebind.example.org to 192.0.2.53
{PREFIX} 5 127.0.0.2/41004 config rebind.example.org is NXDOMAIN
{PREFIX} 6 127.0.0.1/51000 query[A] github.com from 127.0.0.1
{PREFIX} 6 127.0.0.1/51000 cached github.com is 140.82.121.3
{PREFIX} 7 127.0.0.2/41005 query[A] github.com from 127.0.0.2
{PREFIX} 7 127.0.0.2/41005 cached github.com is 140.82.121.3
{PREFIX} 8 127.0.0.2/41006 query[A] www.pypi.org from 127.0.0.2
{PREFIX} 8 127.0.0.2/41006 config www.pypi.org is NXDOMAIN
{PREFIX} 9 127.0.0.2/41007 query[A] files.pythonhosted.org from 127.0.0.2
{PREFIX} 9 127.0.0.2/41007 forwarded files.pythonhosted.org to 192.0.2.53
{PREFIX} 9 127.0.0.2/41007 reply files.pythonhosted.org is <CNAME>
{PREFIX} 9 127.0.0.2/41007 reply dualstack.python.map.fastly.net is 151.101.0.223
{PREFIX} 9 127.0.0.2/41007 reply dualstack.python.map.fastly.net is 151.101.64.223
{PREFIX} 10 127.0.0.2/41008 query[A] gone.pypi.org from 127.0.0.2
{PREFIX} 10 127.0.0.2/41008 forwarded gone.pypi.org to 192.0.2.53
{PREFIX} 10 127.0.0.2/41008 reply gone.pypi.org is NXDOMAIN
{PREFIX} 11 127.0.0.1/51001 query[A] proxy-only.example from 127.0.0.1
{PREFIX} 11 127.0.0.1/51001 config proxy-only.example is NXDOMAIN
"""


def _by_serial(events: list[DnsEvent]) -> list[tuple[str, str, str, list[str]]]:
    return [(e.name, e.qtype, e.decision, e.answers) for e in events]


def test_parse_dns_log_gives_one_decision_per_query_in_arrival_order():
    events = parse_dns_log(LOG)

    assert _by_serial(events) == [
        (SELFTEST_NAME, "A", "blocked", []),
        ("github.com", "A", "allowed", ["140.82.121.3"]),
        ("github.com", "AAAA", "allowed", []),  # NODATA is not an answer, nor a refusal
        ("evil.example", "A", "blocked", []),
        ("rebind.example.org", "A", "rebind", []),  # forwarded, then refused: bogus-nxdomain
        ("github.com", "A", "allowed", ["140.82.121.3"]),  # the proxy's, from the cache
        ("github.com", "A", "allowed", ["140.82.121.3"]),
        ("www.pypi.org", "A", "blocked", []),
        ("files.pythonhosted.org", "A", "allowed", ["151.101.0.223", "151.101.64.223"]),
        ("gone.pypi.org", "A", "unresolved", []),  # the upstream's NXDOMAIN: not our refusal
        ("proxy-only.example", "A", "blocked", []),
    ]
    assert all(e.type == "dns" for e in events)


def test_parse_dns_log_keeps_only_the_queries_of_the_clients_given():
    """The host keeps the agent's queries (through the front), not the proxy's own lookups."""
    events = parse_dns_log(LOG, clients=(FRONT,))

    assert [(e.name, e.decision) for e in events] == [
        (SELFTEST_NAME, "blocked"),
        ("github.com", "allowed"),
        ("github.com", "allowed"),
        ("evil.example", "blocked"),
        ("rebind.example.org", "rebind"),
        ("github.com", "allowed"),
        ("www.pypi.org", "blocked"),
        ("files.pythonhosted.org", "allowed"),
        ("gone.pypi.org", "unresolved"),
    ]
    assert parse_dns_log(LOG, clients=("127.0.0.1",)) == [
        DnsEvent("github.com", "A", answers=["140.82.121.3"]),
        DnsEvent("proxy-only.example", "A", "blocked", reason=DNS_REASONS["blocked"]),
    ]
    assert parse_dns_log(LOG, clients=()) == []


def test_a_decision_carries_its_reason():
    reasons = {(e.name, e.decision): e.reason for e in parse_dns_log(LOG, clients=(FRONT,))}

    assert reasons[("evil.example", "blocked")] == "not on the allowlist"
    assert reasons[("rebind.example.org", "rebind")] == (
        "its answer is in a non-public range (rebinding)"
    )
    assert reasons[("gone.pypi.org", "unresolved")] == ""
    assert reasons[("github.com", "allowed")] == ""


def test_nftset_lines_add_no_answers():
    log = (
        f"{PREFIX} 2 127.0.0.2/1 query[A] a.example from 127.0.0.2\n"
        f"{PREFIX} 2 127.0.0.2/1 forwarded a.example to 192.0.2.53\n"
        f"{PREFIX} 2 127.0.0.2/1 nftset add 4 inet kapsis names0_v4 203.0.113.5 a.example\n"
        f"{PREFIX} 2 127.0.0.2/1 reply a.example is 203.0.113.5\n"
    )

    assert _by_serial(parse_dns_log(log)) == [("a.example", "A", "allowed", ["203.0.113.5"])]


def test_interleaved_serials_are_kept_apart():
    log = (
        f"{PREFIX} 10 127.0.0.2/1 query[A] a.example from 127.0.0.2\n"
        f"{PREFIX} 11 127.0.0.2/2 query[A] b.example from 127.0.0.2\n"
        f"{PREFIX} 12 127.0.0.2/3 query[A] c.example from 127.0.0.2\n"
        f"{PREFIX} 11 127.0.0.2/2 config b.example is NXDOMAIN\n"
        f"{PREFIX} 12 127.0.0.2/3 forwarded c.example to 192.0.2.53\n"
        f"{PREFIX} 10 127.0.0.2/1 forwarded a.example to 192.0.2.53\n"
        f"{PREFIX} 10 127.0.0.2/1 reply a.example is 203.0.113.1\n"
        f"{PREFIX} 12 127.0.0.2/3 config c.example is NXDOMAIN\n"
    )

    assert _by_serial(parse_dns_log(log)) == [
        ("a.example", "A", "allowed", ["203.0.113.1"]),
        ("b.example", "A", "blocked", []),
        ("c.example", "A", "rebind", []),
    ]


def test_lines_of_unknown_serials_and_other_programs_are_ignored():
    log = (
        f"{PREFIX} 99 127.0.0.2/1 reply orphan.example is 203.0.113.1\n"
        "Nov 26 18:55:10 other[3]: 1 127.0.0.2/1 query[A] x.example from 127.0.0.2\n"
        "garbage\n"
        "\n"
    )

    assert parse_dns_log(log) == []
    assert parse_dns_log("") == []


def test_the_other_clients_follow_up_lines_are_ignored_too():
    log = (
        f"{PREFIX} 1 127.0.0.1/1 query[A] a.example from 127.0.0.1\n"
        f"{PREFIX} 2 127.0.0.2/2 query[A] b.example from 127.0.0.2\n"
        f"{PREFIX} 1 127.0.0.1/1 config a.example is NXDOMAIN\n"
        f"{PREFIX} 2 127.0.0.2/2 reply b.example is 203.0.113.2\n"
    )

    assert _by_serial(parse_dns_log(log, clients=(FRONT,))) == [
        ("b.example", "A", "allowed", ["203.0.113.2"])
    ]


def test_an_overlong_line_is_cut_and_skipped():
    """The agent chooses the names: a line longer than any honest one is cut before parsing,
    and what is left of it no longer parses (its neighbours do)."""
    long_name = "a" * MAX_LINE + ".example"
    log = (
        f"{PREFIX} 1 127.0.0.2/1 query[A] {long_name} from 127.0.0.2\n"
        f"{PREFIX} 1 127.0.0.2/1 config {long_name} is NXDOMAIN\n"
        f"{PREFIX} 2 127.0.0.2/2 query[A] b.example from 127.0.0.2\n"
        f"{PREFIX} 2 127.0.0.2/2 config b.example is NXDOMAIN\n"
    )

    assert _by_serial(parse_dns_log(log)) == [("b.example", "A", "blocked", [])]


def test_a_serial_less_rebind_warning_marks_every_query_of_that_name():
    log = (
        f"{PREFIX} 1 127.0.0.2/1 query[A] evil.example from 127.0.0.2\n"
        f"{PREFIX} 2 127.0.0.2/1 query[A] fine.example from 127.0.0.2\n"
        f"{PREFIX} 1 127.0.0.2/1 forwarded evil.example to 192.0.2.53\n"
        f"{PREFIX} possible DNS-rebind attack detected: evil.example\n"
    )

    decisions = [(e.name, e.decision) for e in parse_dns_log(log)]

    assert decisions == [("evil.example", "rebind"), ("fine.example", "allowed")]


def test_a_reply_nxdomain_after_answers_does_not_block():
    log = (
        f"{PREFIX} 1 127.0.0.2/1 query[A] a.example from 127.0.0.2\n"
        f"{PREFIX} 1 127.0.0.2/1 reply a.example is 203.0.113.1\n"
        f"{PREFIX} 1 127.0.0.2/1 reply b.example is NXDOMAIN\n"
    )

    assert _by_serial(parse_dns_log(log)) == [("a.example", "A", "allowed", ["203.0.113.1"])]


def test_a_refused_query_of_an_unnamed_type_is_recorded():
    # dnsmasq names the types it knows (query[HTTPS], query[TSIG]) and numbers the rest.
    log = (
        f"{PREFIX} 14 127.0.0.2/59156 query[HTTPS] other.test from 127.0.0.2\n"
        f"{PREFIX} 14 127.0.0.2/59156 config other.test is NXDOMAIN\n"
        f"{PREFIX} 15 127.0.0.2/48722 query[type=999] other.test from 127.0.0.2\n"
        f"{PREFIX} 15 127.0.0.2/48722 config other.test is NXDOMAIN\n"
    )

    assert [(e.name, e.qtype, e.decision) for e in parse_dns_log(log)] == [
        ("other.test", "HTTPS", "blocked"),
        ("other.test", "type=999", "blocked"),
    ]


@pytest.mark.parametrize("failure", ["REFUSED", "SERVFAIL", "NXDOMAIN"])
def test_an_upstream_failure_is_unresolved_not_blocked(failure):
    log = (
        f"{PREFIX} 17 127.0.0.2/58620 query[AAAA] nodata.test from 127.0.0.2\n"
        f"{PREFIX} 17 127.0.0.2/58620 forwarded nodata.test to 192.0.2.53\n"
        f"{PREFIX} 17 127.0.0.2/58620 reply error is {failure}\n"
    )

    (event,) = parse_dns_log(log)

    assert (event.decision, event.answers, event.reason) == ("unresolved", [], "")


# ---------------------------------------------------------------------------------------------
# the DNS front's refusals

# As the front writes them (resolver.dns_front_config): reason, query type, name as dnsdist
# spells it; then the counts it rewrites every second.
REFUSALS = (
    "type\t10\tallowed.test.\n"
    "type\t16\tallowed.test.\n"
    "name\t1\t" + "a" * 41 + ".allowed.test.\n"
    "name\t1\tevil\\010name.test.\n"
    "edns\t28\tgithub.com.\n"
    "rate\t1\tgithub.com.\n"
    "form\t65\tgithub.com.\n"
)
COUNTS = "rate\t4\nform\t1\ntype\t2\nname\t2\nedns\t1\n"


def test_parse_dns_refusals_reads_each_line():
    events, unrecorded = parse_dns_refusals(REFUSALS, COUNTS)

    assert [(e.name, e.qtype, e.decision, e.reason) for e in events] == [
        ("allowed.test.", "TYPE10", "refused", "query type not allowed"),
        ("allowed.test.", "TXT", "refused", "query type not allowed"),
        ("a" * 41 + ".allowed.test.", "A", "refused", DNS_REASONS["name"]),
        ("evil\\010name.test.", "A", "refused", DNS_REASONS["name"]),
        ("github.com.", "AAAA", "refused", "an EDNS option other than a cookie"),
        ("github.com.", "A", "refused", "over the query rate"),
        ("github.com.", "HTTPS", "refused", DNS_REASONS["form"]),
    ]
    assert unrecorded == 10 - 7  # three more rate refusals were only counted


@pytest.mark.parametrize(
    "line",
    [
        "type\tTXT\tallowed.test.",  # a type by name
        "type\t1",  # no name
        "type\t1\t",  # an empty one
        "type\t1\ta.test.\textra",  # a field too many
        "Type\t1\ta.test.",  # not a reason
        "type\t123456\ta.test.",  # not a query type
        "type 1 a.test.",
        "",
        "garbage",
    ],
)
def test_a_malformed_refusal_line_is_skipped(line):
    events, _ = parse_dns_refusals(f"{line}\ntype\t1\tkept.test.\n")

    assert [e.name for e in events] == ["kept.test."]


def test_the_counts_beyond_the_recorded_lines():
    one = "rate\t1\ta.test.\n"

    assert parse_dns_refusals(one * 2, "rate\t1002\n")[1] == 1000
    assert parse_dns_refusals(one * 2, "rate\t2\n")[1] == 0
    assert parse_dns_refusals(one * 2, "rate\t1\n")[1] == 0  # never below nothing
    assert parse_dns_refusals(one * 2, "")[1] == 0  # not written yet
    # Lines that are not counts of a known reason add nothing.
    assert parse_dns_refusals("", "rate\t5\nbogus\t100\nname\tmany\nedns 7\n")[1] == 5
    # A count too large for honest use is bounded.
    assert parse_dns_refusals("", "rate\t" + "9" * 40 + "\n")[1] == 1 << 40


@pytest.mark.parametrize(
    "count",
    [
        "\u00b2",  # superscript two: a digit to str.isdigit, yet int() refuses it
        "\u0661\u0662\u0663",  # Arabic-Indic 123: int() reads it
        "\uff15",  # fullwidth 5
        "1\u00b2",
        "-1",
        "+1",
        " 1",
        "1_000",
        "0x10",
        "",
    ],
)
def test_a_count_of_anything_but_ascii_digits_adds_nothing(count):
    """The counts file is the front's, in the namespace the agent shares: only ASCII decimal
    counts are read, and nothing in it can make the host fail."""
    assert parse_dns_refusals("", f"rate\t{count}\nname\t3\n") == ([], 3)


# ---------------------------------------------------------------------------------------------
# the proxy's log

# As HAProxy 2.6 writes them with the gateway's log-format (kapsis.network.proxy).
PROXY_LOG = """\
kapsis-proxy 203.0.113.5 443 tls allowed.test allowed -- -1 524 0
kapsis-proxy 198.51.100.2 443 tls other.test not-allowed PR -1 517 0
kapsis-proxy 127.0.0.1 443 tls - no-name PR -1 517 0
kapsis-proxy ::1 443 - - no-name PR -1 19 0
kapsis-proxy 2001:db8::5 80 http other.test not-allowed LR 403 48 151
kapsis-proxy 198.51.100.2 80 http - connect-method PR 403 68 192
kapsis-proxy 198.51.100.2 80 http missing.test unresolved LR 502 49 156
kapsis-proxy 198.51.100.2 8443 tls x.wild.test. bad-name PR -1 517 0
kapsis-proxy 198.51.100.2 80 http other.test,allowed.test bad-name LR 403 65 151
kapsis-proxy 198.51.100.2 80 http allowed.test upgrade LR 403 133 144
kapsis-proxy 198.51.100.2 80 http - - PR 400 33 206
kapsis-proxy - 443 tls kapsis-selftest.invalid not-allowed PR -1 517 0
"""


def test_parse_proxy_log_reads_every_decision():
    assert parse_proxy_log(PROXY_LOG) == [
        ProxyDecision("allowed.test", 443, "tls", "203.0.113.5", True),
        ProxyDecision("other.test", 443, "tls", "198.51.100.2", False,
                      "name not on the allowlist for the port"),
        ProxyDecision("", 443, "tls", "", False, "no TLS server name or HTTP Host"),
        ProxyDecision("", 443, "", "", False, PROXY_REASONS["no-name"]),
        ProxyDecision("other.test", 80, "http", "2001:db8::5", False, PROXY_REASONS["not-allowed"]),
        ProxyDecision("", 80, "http", "198.51.100.2", False, "HTTP CONNECT"),
        ProxyDecision("missing.test", 80, "http", "198.51.100.2", False,
                      "the upstream could not resolve the name"),
        ProxyDecision("x.wild.test.", 8443, "tls", "198.51.100.2", False,
                      "a malformed name (one plain host name, labels within the DNS limit)"),
        ProxyDecision("other.test,allowed.test", 80, "http", "198.51.100.2", False,
                      PROXY_REASONS["bad-name"]),
        ProxyDecision("allowed.test", 80, "http", "198.51.100.2", False,
                      "a protocol upgrade other than WebSocket"),
        # Refused by HAProxy's own HTTP parser, before any rule: no verdict, still a refusal.
        ProxyDecision("", 80, "http", "198.51.100.2", False, ""),
        ProxyDecision(SELFTEST_NAME, 443, "tls", "", False, PROXY_REASONS["not-allowed"]),
    ]  # fmt: skip
    assert all(decision.type == "proxy" for decision in parse_proxy_log(PROXY_LOG))


@pytest.mark.parametrize(
    "line",
    [
        "[NOTICE]   (7) : haproxy version is 2.6.12-1+deb12u4",
        "kapsis-proxy 198.51.100.2 443 tls a.test allowed -- -1 524",  # cut short
        "kapsis-proxy 198.51.100.2 443 tls a.test b.test allowed -- -1 524 0",  # a field more
        "kapsis-proxy 198.51.100.2 443 tls a.test allowed -- -1 524 0 kapsis-proxy",
        " kapsis-proxy 198.51.100.2 443 tls a.test allowed -- -1 524 0",
        "xkapsis-proxy 198.51.100.2 443 tls a.test allowed -- -1 524 0",
        "kapsis-proxy 198.51.100.2 443 ssh a.test allowed -- -1 524 0",  # no such protocol
        "kapsis-proxy 198.51.100.2 443 tls a.test ALLOWED -- -1 524 0",
        "kapsis-proxy 198.51.100.2 4430000 tls a.test allowed -- -1 524 0",
        "kapsis-proxy 198.51.100.2 443 tls " + "a" * MAX_LINE + " allowed -- -1 524 0",  # cut
    ],
)
def test_a_malformed_or_injected_proxy_line_is_skipped(line):
    log = f"{line}\nkapsis-proxy 198.51.100.2 443 tls kept.test not-allowed PR -1 517 0\n"

    assert [decision.name for decision in parse_proxy_log(log)] == ["kept.test"]


def test_proxy_without_selftest_drops_the_self_tests_connections_only():
    decisions = parse_proxy_log(PROXY_LOG)

    kept = proxy_without_selftest(decisions)

    assert kept == [decision for decision in decisions if decision.name != SELFTEST_NAME]
    assert len(kept) == len(decisions) - 1


# ---------------------------------------------------------------------------------------------
# blocked sets

# `nft -j -n list set inet kapsis blocked4`: numeric, protocols as numbers.
NUMERIC_LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {
            "set": {
                "family": "inet",
                "name": "blocked4",
                "table": "kapsis",
                "flags": ["timeout"],
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["192.0.2.1", 6, 9]},
                            "expires": 86398,
                            "counter": {"packets": 2, "bytes": 120},
                        }
                    },
                    {
                        "elem": {
                            "val": {"concat": ["198.51.100.7", 17, 53]},
                            "expires": 86399,
                            "counter": {"packets": 1, "bytes": 29},
                        }
                    },
                    {"elem": {"val": {"concat": ["203.0.113.9", 132, 5000]}, "expires": 1}},
                ],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "blocked6",
                "table": "kapsis",
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["2001:db8::99", 6, 443]},
                            "counter": {"packets": 4, "bytes": 320},
                        }
                    }
                ],
            }
        },
        {"set": {"family": "inet", "name": "empty", "table": "kapsis"}},
    ]
}

# What nftables 1.0.6 (Debian 12, the gateway image's) really prints for
# `nft -j list table inet kapsis` after refused connections (trimmed to a few items).
REAL_TABLE_LISTING = {
    "nftables": [
        {
            "metainfo": {
                "version": "1.0.6",
                "release_name": "Lester Gooch #5",
                "json_schema_version": 1,
            }
        },
        {"table": {"family": "inet", "name": "kapsis", "handle": 1}},
        {
            "set": {
                "family": "inet",
                "name": "upstream_v4",
                "table": "kapsis",
                "type": "ipv4_addr",
                "handle": 4,
                "elem": ["192.0.2.53"],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "blocked4",
                "table": "kapsis",
                "type": ["ipv4_addr", "inet_proto", "inet_service"],
                "handle": 8,
                "size": 65535,
                "flags": ["timeout"],
                "timeout": 86400,
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["192.0.2.1", "tcp", 9]},
                            "expires": 86398,
                            "counter": {"packets": 2, "bytes": 120},
                        }
                    },
                    {
                        "elem": {
                            "val": {"concat": ["198.51.100.7", "udp", 53]},
                            "expires": 86399,
                            "counter": {"packets": 1, "bytes": 29},
                        }
                    },
                ],
                "stmt": [{"counter": None}],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "blocked6",
                "table": "kapsis",
                "type": ["ipv6_addr", "inet_proto", "inet_service"],
                "handle": 9,
                "size": 65535,
                "flags": ["timeout"],
                "timeout": 86400,
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["2001:db8::99", "tcp", 9]},
                            "expires": 86399,
                            "counter": {"packets": 2, "bytes": 160},
                        }
                    }
                ],
                "stmt": [{"counter": None}],
            }
        },
        {
            "set": {
                "family": "inet",
                "name": "names0_v4",
                "table": "kapsis",
                "type": "ipv4_addr",
                "handle": 10,
                "elem": ["140.82.121.3"],
            }
        },
        {
            "chain": {
                "family": "inet",
                "table": "kapsis",
                "name": "output",
                "handle": 1,
                "type": "filter",
                "hook": "output",
                "prio": 0,
                "policy": "drop",
            }
        },
    ]
}


def test_parse_blocked_set_reads_a_numeric_listing():
    assert parse_blocked_set(NUMERIC_LISTING) == [
        BlockedConnection("192.0.2.1", "tcp", 9, 2),
        BlockedConnection("198.51.100.7", "udp", 53, 1),
        BlockedConnection("203.0.113.9", "132", 5000, 1),  # no counter: one packet
        BlockedConnection("2001:db8::99", "tcp", 443, 4),
    ]


def test_parse_blocked_set_of_nothing():
    assert parse_blocked_set({}) == []
    assert parse_blocked_set({"nftables": [{"metainfo": {}}]}) == []


def test_blocked_connection_records_its_type():
    assert BlockedConnection("192.0.2.1", "tcp", 9, 1).type == "blocked_connection"


def test_the_blocked_sets_of_nfts_real_listing_are_read_and_nothing_else():
    assert blocked_in_table(REAL_TABLE_LISTING, ("blocked4", "blocked6")) == [
        BlockedConnection("192.0.2.1", "tcp", 9, 2),
        BlockedConnection("198.51.100.7", "udp", 53, 1),
        BlockedConnection("2001:db8::99", "tcp", 9, 2),
    ]


def test_blocked_connections_reads_the_gateways_real_listing(make_plan, monkeypatch):
    plan = make_plan()
    calls: list[list[str]] = []

    def fake_run(args, **kwargs):
        calls.append(args)
        stdout = json.dumps(REAL_TABLE_LISTING)
        if "-n" in args:  # numeric output, should the gateway ask for it
            stdout = stdout.replace('"tcp"', "6").replace('"udp"', "17")
        return subprocess.CompletedProcess(args, 0, stdout, "")

    monkeypatch.setattr(podman_gateway.subprocess, "run", fake_run)

    blocked, ran = podman_gateway.blocked_connections(plan)

    assert ran is True
    assert calls and calls[0][:4] == ["podman", "exec", "kapsis-unit1-gateway", "nft"]
    assert {(b.address, b.protocol, b.port, b.packets) for b in blocked} == {
        ("192.0.2.1", "tcp", 9, 2),
        ("198.51.100.7", "udp", 53, 1),
        ("2001:db8::99", "tcp", 9, 2),
    }


def test_blocked_connections_of_a_gateway_that_is_gone(make_plan, monkeypatch):
    plan = make_plan()
    monkeypatch.setattr(
        podman_gateway.subprocess,
        "run",
        lambda args, **kwargs: subprocess.CompletedProcess(args, 125, "", "no such container"),
    )

    assert podman_gateway.blocked_connections(plan) == ([], False)


def test_blocked_connections_without_a_gateway_runs_nothing(make_plan, monkeypatch):
    plan = make_plan(network_mode="none")

    def refuse(*args, **kwargs):
        raise AssertionError("nothing to run without a gateway")

    monkeypatch.setattr(podman_gateway.subprocess, "run", refuse)

    assert podman_gateway.blocked_connections(plan) == ([], True)


# ---------------------------------------------------------------------------------------------
# the self-test's traces, the report, the log

PROBE = "192.0.2.1"


def _dns(name: str, decision: str = "blocked") -> DnsEvent:
    return DnsEvent(name=name, qtype="A", decision=decision)  # type: ignore[arg-type]


def test_without_selftest_drops_the_query_and_exactly_one_probe_packet():
    dns = [_dns(SELFTEST_NAME), _dns("evil.example"), _dns("github.com", "allowed")]
    blocked = [
        BlockedConnection(PROBE, "tcp", SELFTEST_PORT, 3),  # the probe, then the agent twice
        BlockedConnection("198.51.100.7", "udp", 53, 1),
    ]

    agent_dns, agent_blocked = without_selftest(dns, blocked, PROBE)

    assert [e.name for e in agent_dns] == ["evil.example", "github.com"]
    assert agent_blocked == [
        BlockedConnection(PROBE, "tcp", SELFTEST_PORT, 2),
        BlockedConnection("198.51.100.7", "udp", 53, 1),
    ]


def test_without_selftest_drops_the_probe_entry_of_one_packet():
    blocked = [BlockedConnection(PROBE, "tcp", SELFTEST_PORT, 1)]

    assert without_selftest([], blocked, PROBE) == ([], [])


@pytest.mark.parametrize(
    "entry",
    [
        BlockedConnection(PROBE, "udp", SELFTEST_PORT, 1),  # another protocol
        BlockedConnection(PROBE, "tcp", 443, 1),  # another port
        BlockedConnection("198.51.100.1", "tcp", SELFTEST_PORT, 1),  # another address
    ],
)
def test_without_selftest_keeps_what_only_looks_like_the_probe(entry):
    assert without_selftest([], [entry], PROBE) == ([], [entry])


def test_without_selftest_keeps_the_order_and_does_not_change_its_input():
    blocked = [
        BlockedConnection("198.51.100.7", "udp", 53, 1),
        BlockedConnection(PROBE, "tcp", SELFTEST_PORT, 2),
    ]
    original = list(blocked)

    _, agent_blocked = without_selftest([], blocked, PROBE)

    assert agent_blocked == [
        BlockedConnection("198.51.100.7", "udp", 53, 1),
        BlockedConnection(PROBE, "tcp", SELFTEST_PORT, 1),
    ]
    assert blocked == original


def test_without_selftest_drops_its_refused_queries_and_one_query_to_the_internal_resolver():
    dns = [
        DnsEvent(f"{SELFTEST_NAME}.", "TYPE10", "refused", reason=DNS_REASONS["type"]),
        DnsEvent("evil.example.", "TYPE10", "refused", reason=DNS_REASONS["type"]),
    ]
    internal = BlockedConnection(*SELFTEST_INTERNAL, packets=3)  # the self-test, then the agent

    agent_dns, agent_blocked = without_selftest(dns, [internal], PROBE)

    assert [e.name for e in agent_dns] == ["evil.example."]
    assert agent_blocked == [BlockedConnection(*SELFTEST_INTERNAL, packets=2)]
    assert SELFTEST_INTERNAL == ("127.0.0.1", "udp", gateway_layout.RESOLVER_PORT)
    assert without_selftest([], [BlockedConnection(*SELFTEST_INTERNAL, 1)], PROBE) == ([], [])


def test_blocked_requests_counts_every_refusal_and_nothing_else():
    report = NetworkReport(
        dns=[
            _dns("a.example"),
            _dns("b.example", "rebind"),
            _dns("c.example.", "refused"),
            _dns("ok.example", "allowed"),
            _dns("gone.example", "unresolved"),  # the upstream's doing, not a refusal
        ],
        blocked=[
            BlockedConnection("192.0.2.7", "tcp", 443, 3),
            BlockedConnection("2001:db8::1", "udp", 53, 2),
        ],
        proxy=[
            ProxyDecision("other.test", 443, "tls", "198.51.100.2", False, "x"),
            ProxyDecision("", 80, "http", "", False, "y"),
            ProxyDecision("allowed.test", 443, "tls", "203.0.113.5", True),
        ],
        dns_refused_unrecorded=7,
    )

    assert report.blocked_requests == 3 + 7 + 3 + 2 + 2
    assert report.gateway_ran_to_the_end is True
    assert NetworkReport(dns=[_dns("x", "allowed")], blocked=[]).blocked_requests == 0
    assert NetworkReport([_dns("x", "unresolved")], []).blocked_requests == 0


def test_write_network_log_writes_json_lines_without_internal_fields(kapsis_home):
    event = DnsEvent(name="github.com", qtype="A", answers=["140.82.121.3"], forwarded=True)
    report = NetworkReport(
        dns=[event, DnsEvent("evil.example", "A", "blocked", reason="not on the allowlist")],
        blocked=[BlockedConnection("192.0.2.7", "tcp", 443, 3)],
        proxy=[ProxyDecision("other.test", 443, "tls", "", False, "no-name reason")],
    )

    path = write_network_log("net1", report)

    assert path == network_log_path("net1") == kapsis_home / "network" / "net1.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"type": "dns", "name": "github.com", "qtype": "A", "decision": "allowed",
         "answers": ["140.82.121.3"], "reason": ""},
        {"type": "dns", "name": "evil.example", "qtype": "A", "decision": "blocked",
         "answers": [], "reason": "not on the allowlist"},
        {"type": "proxy", "name": "other.test", "port": 443, "protocol": "tls", "address": "",
         "allowed": False, "reason": "no-name reason"},
        {"type": "blocked_connection", "address": "192.0.2.7", "protocol": "tcp", "port": 443,
         "packets": 3},
    ]  # fmt: skip
    assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in lines)


def test_write_network_log_replaces_an_older_log(kapsis_home):
    write_network_log("net2", NetworkReport(dns=[_dns("a.example")], blocked=[]))

    path = write_network_log("net2", NetworkReport(dns=[], blocked=[]))

    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------
# the end-of-run notes


def test_report_notes_say_what_was_refused_and_why():
    report = NetworkReport(
        dns=[
            DnsEvent("evil.example", "A", "blocked", reason=DNS_REASONS["blocked"]),
            DnsEvent("x.example.", "TXT", "refused", reason=DNS_REASONS["type"]),
            DnsEvent("gone.example", "A", "unresolved"),
            DnsEvent("ok.example", "A", "allowed"),
        ],
        blocked=[BlockedConnection("192.0.2.7", "tcp", 443, 3)],
        proxy=[
            ProxyDecision("other.test", 443, "tls", "198.51.100.2", False, "not listed"),
            ProxyDecision("", 443, "", "198.51.100.3", False, "no name"),
            ProxyDecision("", 80, "http", "", False, "no name"),
            ProxyDecision("allowed.test", 443, "tls", "203.0.113.5", True),
        ],
        dns_refused_unrecorded=2,
    )

    assert report_notes(report) == [
        "the gateway refused the names evil.example A (not on the allowlist),"
        " x.example TXT (query type not allowed) (and 2 more queries, counted only)",
        "the upstream could not resolve gone.example",
        "the gateway refused the connections other.test:443 (not listed),"
        " 198.51.100.3:443 (no name), a connection:80 (no name), 192.0.2.7:443/tcp",
    ]


def test_report_notes_of_a_clean_run_say_nothing():
    report = NetworkReport(
        dns=[DnsEvent("ok.example", "A", "allowed")],
        blocked=[],
        proxy=[ProxyDecision("allowed.test", 443, "tls", "203.0.113.5", True)],
    )

    assert report_notes(report) == []


def test_report_notes_name_five_and_count_the_rest_once_each():
    names = [f"n{i}.example" for i in range(8)]
    report = NetworkReport(
        dns=[DnsEvent(name, "A", "blocked", reason="r") for name in [*names, names[0]]],
        blocked=[],
    )

    (note,) = report_notes(report)

    assert note == (
        "the gateway refused the names n0.example A (r), n1.example A (r), n2.example A (r),"
        " n3.example A (r), n4.example A (r) and 3 more"
    )


# ---------------------------------------------------------------------------------------------
# the gateway's own report (Kubernetes) and the host's record


def test_the_gateways_own_report_counts_what_the_host_counts(tmp_path):
    """gateway/report.py (the Kubernetes gateway's termination message) runs on a bare Python
    with only the shipped scripts - no Kapsis installed - reads the gateway's logs and gives
    the host's count."""
    import ast

    from kapsis.network.gateway_files import gateway_scripts

    scripts = gateway_scripts()
    names = ("TABLE", "BLOCKED_SETS", "DNS_FRONT_SOURCE")
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(scripts["report.py"]).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in names
    }
    assert constants == {name: getattr(gateway_layout, name) for name in names}
    for log_name in ("DNS_LOG", "DNS_REFUSED_LOG", "DNS_REFUSED_COUNTS", "PROXY_LOG"):
        assert f'logs / "{getattr(gateway_layout, log_name)}"' in scripts["report.py"]
    config = tmp_path / "etc"
    config.mkdir()
    for name, text in scripts.items():
        (config / name).write_text(text)
    (config / "probe-address").write_text("192.0.2.1\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "dns.log").write_text(LOG)
    (logs / "dns-refused.tsv").write_text(REFUSALS)
    (logs / "dns-refused.counts").write_text(COUNTS)
    (logs / "proxy.log").write_text(PROXY_LOG)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nft").write_text(
        f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(REAL_TABLE_LISTING)}\nEOF\n"
    )
    (fake_bin / "nft").chmod(0o755)
    result = subprocess.run(
        ["/usr/bin/python3", "-S", "-I", str(config / "report.py"), str(logs)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
    )

    refusals, unrecorded = parse_dns_refusals(REFUSALS, COUNTS)
    dns, blocked = without_selftest(
        parse_dns_log(LOG, clients=(FRONT,)) + refusals,
        blocked_in_table(REAL_TABLE_LISTING, gateway_layout.BLOCKED_SETS),
        "192.0.2.1",
    )
    proxy = proxy_without_selftest(parse_proxy_log(PROXY_LOG))
    expected = NetworkReport(dns, blocked, proxy=proxy, dns_refused_unrecorded=unrecorded)
    assert json.loads(result.stdout) == {"blockedRequests": expected.blocked_requests}
    # Every source counts, and the proxy's own lookups do not (proxy-only.example).
    parts = {
        "resolver": sum(1 for e in dns if e.decision in ("blocked", "rebind")),
        "front": len(refusals),
        "unrecorded": unrecorded,
        "firewall": sum(entry.packets for entry in blocked),
        "proxy": sum(1 for decision in proxy if not decision.allowed),
    }
    assert all(parts.values()), parts
    assert expected.blocked_requests == sum(parts.values())
    assert "proxy-only.example" not in {e.name for e in dns}


def test_a_secret_spelled_in_a_looked_up_name_is_redacted_in_the_audit_and_network_log(
    make_plan, kapsis_home
):
    """Exfiltration by DNS: the agent resolves `<secret>.evil.example` (or sends it as a TLS
    server name); the gateway's records of it reach the audit trail and the network log only
    redacted (control: another name is kept)."""
    from kapsis.audit import AuditLog
    from kapsis.network.gateway_files import gateway_dirs
    from kapsis.sandbox.launcher import initial_status
    from kapsis.sandbox.network_record import record_network
    from kapsis.secrets.redact import Redactor
    from kapsis.status.store import StatusStore

    secret = "sk-live-0123456789abcdef"
    plan = make_plan()
    dirs = gateway_dirs(Path(plan.workspace.root))
    dirs.log.mkdir(parents=True, exist_ok=True)
    dirs.dns_log.write_text(
        f"{PREFIX} 1 127.0.0.2/41000 query[A] {secret}.evil.example from 127.0.0.2\n"
        f"{PREFIX} 1 127.0.0.2/41000 config {secret}.evil.example is NXDOMAIN\n"
        f"{PREFIX} 2 127.0.0.2/41001 query[A] plain.evil.example from 127.0.0.2\n"
        f"{PREFIX} 2 127.0.0.2/41001 config plain.evil.example is NXDOMAIN\n"
        f"{PREFIX} 3 127.0.0.1/41002 query[A] proxy-lookup.example from 127.0.0.1\n"
        f"{PREFIX} 3 127.0.0.1/41002 config proxy-lookup.example is NXDOMAIN\n"
    )
    dirs.dns_refused_log.write_text(f"type\t16\t{secret}.txt.example.\n")
    dirs.dns_refused_counts.write_text("type\t1\n")
    dirs.proxy_log.write_text(
        f"kapsis-proxy 198.51.100.2 443 tls {secret}.sni.example not-allowed PR -1 517 0\n"
        "kapsis-proxy 198.51.100.2 443 tls plain.sni.example not-allowed PR -1 517 0\n"
    )

    class Gateway:
        name = "podman"

        def blocked_connections(self, plan):
            return [], True

    store = StatusStore()
    store.write(initial_status(plan, Gateway()))
    audit = AuditLog(plan.agent_id, redactor=Redactor([secret]))
    audit.record("session_start")
    notes, _ = record_network(plan, Gateway(), store, audit, Redactor([secret]))

    audit_text = audit.path.read_text()
    network_text = network_log_path(plan.agent_id).read_text()
    for text in (audit_text, network_text, "\n".join(notes)):
        assert secret not in text
        assert "[REDACTED].evil.example" in text
        assert "[REDACTED].txt.example" in text
        assert "[REDACTED].sni.example" in text
        assert "plain.evil.example" in text
        assert "plain.sni.example" in text
        assert "proxy-lookup.example" not in text  # the proxy's own lookups are not the agent's
    assert store.read(plan.agent_id).blocked_requests == 5


# ---------------------------------------------------------------------------------------------
# the host reading the gateway's logs: regular files only, bounded, cut at a line


class _Gateway:
    name = "podman"

    def blocked_connections(self, plan):
        return [], True


def _proxy_line(name: str, tail: str = "0") -> str:
    return f"kapsis-proxy 198.51.100.2 443 tls {name} not-allowed PR -1 517 {tail}\n"


def _record(plan) -> tuple[list[str], list[dict], int]:
    """record_network for ``plan``: (notes, audit records, blocked_requests)."""
    from kapsis.audit import AuditLog
    from kapsis.sandbox.launcher import initial_status
    from kapsis.sandbox.network_record import record_network
    from kapsis.secrets.redact import Redactor
    from kapsis.status.store import StatusStore

    store = StatusStore()
    store.write(initial_status(plan, _Gateway()))
    audit = AuditLog(plan.agent_id)
    audit.record("session_start")
    notes, _ = record_network(plan, _Gateway(), store, audit, Redactor([]))
    records = [json.loads(line) for line in audit.path.read_text().splitlines()]
    return notes, records, store.read(plan.agent_id).blocked_requests


def _logs(plan):
    from kapsis.network.gateway_files import gateway_dirs

    dirs = gateway_dirs(Path(plan.workspace.root))
    dirs.log.mkdir(parents=True, exist_ok=True)
    return dirs


def _proxy_names(records: list[dict]) -> list[str]:
    return [r["detail"]["name"] for r in records if r["event_type"] == "connection_blocked"]


def test_a_gateway_log_past_the_limit_is_cut_at_its_last_whole_line_and_said(
    make_plan, kapsis_home, monkeypatch
):
    from kapsis.sandbox import network_record

    plan = make_plan()
    dirs = _logs(plan)
    kept = _proxy_line("one.test") + _proxy_line("two.test")
    # Cut anywhere but at a line, the third line would still parse: "... 517 12".
    third = _proxy_line("three.test", tail="123456")
    limit = len(kept) + len(third) - 5
    dirs.proxy_log.write_text(kept + third + _proxy_line("four.test"))
    dirs.dns_log.write_text("")  # within the limit: not said
    monkeypatch.setattr(network_record, "MAX_GATEWAY_LOG_BYTES", limit)

    notes, records, blocked = _record(plan)

    assert _proxy_names(records) == ["one.test", "two.test"]
    assert blocked == 2
    (cut,) = [r for r in records if r["event_type"] == "network_log_cut"]
    assert cut["source"] == "gateway"
    assert cut["detail"] == {"logs": ["proxy.log"], "limit": limit}
    assert notes[-1].startswith("the gateway's proxy.log went past ")
    assert notes[-1].endswith(" MiB: only the decisions before that point are recorded")


def test_a_gateway_log_of_exactly_the_limit_is_read_whole(make_plan, kapsis_home, monkeypatch):
    from kapsis.sandbox import network_record

    plan = make_plan()
    text = _proxy_line("one.test") + _proxy_line("two.test")
    _logs(plan).proxy_log.write_text(text)
    monkeypatch.setattr(network_record, "MAX_GATEWAY_LOG_BYTES", len(text))

    notes, records, _ = _record(plan)

    assert _proxy_names(records) == ["one.test", "two.test"]
    assert not [r for r in records if r["event_type"] == "network_log_cut"]
    assert not [note for note in notes if "went past" in note]


def test_the_limit_is_16_mib_and_the_note_says_so(make_plan, kapsis_home):
    from kapsis.sandbox.network_record import MAX_GATEWAY_LOG_BYTES

    plan = make_plan()
    dirs = _logs(plan)
    padding = "x" * MAX_GATEWAY_LOG_BYTES + "\n"  # one line the parser skips
    dirs.proxy_log.write_text(_proxy_line("early.test") + padding + _proxy_line("late.test"))
    dirs.dns_refused_log.write_text("type\t16\tlate.example.\n" * 3)  # under the limit

    notes, records, blocked = _record(plan)

    assert MAX_GATEWAY_LOG_BYTES == 16 << 20
    assert _proxy_names(records) == ["early.test"]
    assert blocked == 1 + 3
    assert notes[-1] == (
        "the gateway's proxy.log went past 16 MiB: only the decisions before that point are"
        " recorded"
    )
    (cut,) = [r for r in records if r["event_type"] == "network_log_cut"]
    assert cut["detail"] == {"logs": ["proxy.log"], "limit": 16 << 20}


@pytest.mark.parametrize(
    "kind",
    [
        "symlink",
        "fifo",
        "directory",
    ],
)
def test_a_gateway_log_that_is_no_regular_file_is_not_read(make_plan, kapsis_home, tmp_path, kind):
    """The log folder is written from inside the gateway: a log that is a symlink is not
    followed (it could name any file of the host user's), a FIFO not waited on (it would hang
    the host), a directory not read. The other logs still are."""
    import os
    import threading

    plan = make_plan()
    dirs = _logs(plan)
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text(_proxy_line("elsewhere.test"))
    if kind == "symlink":
        dirs.proxy_log.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(dirs.proxy_log)
    else:
        dirs.proxy_log.mkdir()
    dirs.dns_refused_log.write_text("type\t16\tread.example.\n")
    outcome: list[Any] = []

    def read() -> None:
        try:
            outcome.append(_record(plan))
        except Exception as error:  # raised again below, in the test
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked on the FIFO: a writer lets it go before the test fails
        os.close(os.open(dirs.proxy_log, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5)
        pytest.fail(f"reading the gateway's logs waited on a {kind}")

    (result,) = outcome
    if isinstance(result, Exception):
        raise result
    _, records, blocked = result
    assert _proxy_names(records) == []
    assert [r["detail"]["name"] for r in records if r["event_type"] == "dns_query"] == [
        "read.example."
    ]
    assert blocked == 1
    assert not [r for r in records if r["event_type"] == "network_log_cut"]
