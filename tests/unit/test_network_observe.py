"""What the gateway saw: the resolver's query log, the firewall's blocked sets, the network log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kapsis.backends import podman_gateway
from kapsis.network.gateway_files import PROBE_CANDIDATES, probe_address
from kapsis.network.observe import (
    SELFTEST_NAME,
    SELFTEST_PORT,
    BlockedConnection,
    DnsEvent,
    NetworkReport,
    blocked_in_table,
    network_log_path,
    parse_blocked_set,
    parse_dns_log,
    without_selftest,
    write_network_log,
)
from kapsis.network.policy import PolicyBuilder

# dnsmasq 2.90 with log-queries=extra, as the gateway writes it (serial, client, event).
PREFIX = "Nov 26 18:55:10 dnsmasq[7]:"
LOG = f"""\
{PREFIX} started, version 2.90 cachesize 1000
{PREFIX} using nameserver 192.0.2.53#53 for domain github.com
{PREFIX} using only locally-known addresses for .pypi.org
{PREFIX} 1 127.0.0.1/41000 query[A] kapsis-selftest.invalid from 127.0.0.1
{PREFIX} 1 127.0.0.1/41000 config kapsis-selftest.invalid is NXDOMAIN
{PREFIX} 2 127.0.0.1/41001 query[A] github.com from 127.0.0.1
{PREFIX} 3 127.0.0.1/41002 query[AAAA] github.com from 127.0.0.1
{PREFIX} 2 127.0.0.1/41001 forwarded github.com to 192.0.2.53
{PREFIX} 3 127.0.0.1/41002 forwarded github.com to 192.0.2.53
{PREFIX} 2 127.0.0.1/41001 nftset add 4 inet kapsis names0_v4 140.82.121.3 github.com
{PREFIX} 2 127.0.0.1/41001 reply github.com is 140.82.121.3
{PREFIX} 3 127.0.0.1/41002 reply github.com is NODATA-IPv6
{PREFIX} 4 127.0.0.1/41003 query[A] evil.example from 127.0.0.1
{PREFIX} 4 127.0.0.1/41003 config evil.example is NXDOMAIN
{PREFIX} 5 127.0.0.1/41004 query[A] rebind.example.org from 127.0.0.1
{PREFIX} 5 127.0.0.1/41004 forwarded rebind.example.org to 192.0.2.53
{PREFIX} 5 127.0.0.1/41004 config rebind.example.org is NXDOMAIN
{PREFIX} 6 127.0.0.1/41005 query[A] github.com from 127.0.0.1
{PREFIX} 6 127.0.0.1/41005 cached github.com is 140.82.121.3
{PREFIX} 7 127.0.0.1/41006 query[A] www.pypi.org from 127.0.0.1
{PREFIX} 7 127.0.0.1/41006 config www.pypi.org is NXDOMAIN
{PREFIX} 8 127.0.0.1/41007 query[A] files.pythonhosted.org from 127.0.0.1
{PREFIX} 8 127.0.0.1/41007 forwarded files.pythonhosted.org to 192.0.2.53
{PREFIX} 8 127.0.0.1/41007 reply files.pythonhosted.org is <CNAME>
{PREFIX} 8 127.0.0.1/41007 reply dualstack.python.map.fastly.net is 151.101.0.223
{PREFIX} 8 127.0.0.1/41007 reply dualstack.python.map.fastly.net is 151.101.64.223
{PREFIX} 9 127.0.0.1/41008 query[A] gone.pypi.org from 127.0.0.1
{PREFIX} 9 127.0.0.1/41008 forwarded gone.pypi.org to 192.0.2.53
{PREFIX} 9 127.0.0.1/41008 reply gone.pypi.org is NXDOMAIN
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
        ("github.com", "A", "allowed", ["140.82.121.3"]),  # from the cache
        ("www.pypi.org", "A", "blocked", []),
        ("files.pythonhosted.org", "A", "allowed", ["151.101.0.223", "151.101.64.223"]),
        ("gone.pypi.org", "A", "blocked", []),  # the upstream's NXDOMAIN
    ]
    assert all(e.type == "dns" for e in events)


def test_nftset_lines_add_no_answers():
    log = (
        f"{PREFIX} 2 127.0.0.1/1 query[A] a.example from 127.0.0.1\n"
        f"{PREFIX} 2 127.0.0.1/1 forwarded a.example to 192.0.2.53\n"
        f"{PREFIX} 2 127.0.0.1/1 nftset add 4 inet kapsis names0_v4 203.0.113.5 a.example\n"
        f"{PREFIX} 2 127.0.0.1/1 reply a.example is 203.0.113.5\n"
    )

    assert _by_serial(parse_dns_log(log)) == [("a.example", "A", "allowed", ["203.0.113.5"])]


def test_interleaved_serials_are_kept_apart():
    log = (
        f"{PREFIX} 10 127.0.0.1/1 query[A] a.example from 127.0.0.1\n"
        f"{PREFIX} 11 127.0.0.1/2 query[A] b.example from 127.0.0.1\n"
        f"{PREFIX} 12 127.0.0.1/3 query[A] c.example from 127.0.0.1\n"
        f"{PREFIX} 11 127.0.0.1/2 config b.example is NXDOMAIN\n"
        f"{PREFIX} 12 127.0.0.1/3 forwarded c.example to 192.0.2.53\n"
        f"{PREFIX} 10 127.0.0.1/1 forwarded a.example to 192.0.2.53\n"
        f"{PREFIX} 10 127.0.0.1/1 reply a.example is 203.0.113.1\n"
        f"{PREFIX} 12 127.0.0.1/3 config c.example is NXDOMAIN\n"
    )

    assert _by_serial(parse_dns_log(log)) == [
        ("a.example", "A", "allowed", ["203.0.113.1"]),
        ("b.example", "A", "blocked", []),
        ("c.example", "A", "rebind", []),
    ]


def test_lines_of_unknown_serials_and_other_programs_are_ignored():
    log = (
        f"{PREFIX} 99 127.0.0.1/1 reply orphan.example is 203.0.113.1\n"
        "Nov 26 18:55:10 other[3]: 1 127.0.0.1/1 query[A] x.example from 127.0.0.1\n"
        "garbage\n"
        "\n"
    )

    assert parse_dns_log(log) == []
    assert parse_dns_log("") == []


def test_a_serial_less_rebind_warning_marks_every_query_of_that_name():
    log = (
        f"{PREFIX} 1 127.0.0.1/1 query[A] evil.example from 127.0.0.1\n"
        f"{PREFIX} 2 127.0.0.1/1 query[A] fine.example from 127.0.0.1\n"
        f"{PREFIX} 1 127.0.0.1/1 forwarded evil.example to 192.0.2.53\n"
        f"{PREFIX} possible DNS-rebind attack detected: evil.example\n"
    )

    decisions = [(e.name, e.decision) for e in parse_dns_log(log)]

    assert decisions == [("evil.example", "rebind"), ("fine.example", "allowed")]


def test_a_reply_nxdomain_after_answers_does_not_block():
    log = (
        f"{PREFIX} 1 127.0.0.1/1 query[A] a.example from 127.0.0.1\n"
        f"{PREFIX} 1 127.0.0.1/1 reply a.example is 203.0.113.1\n"
        f"{PREFIX} 1 127.0.0.1/1 reply b.example is NXDOMAIN\n"
    )

    assert _by_serial(parse_dns_log(log)) == [("a.example", "A", "allowed", ["203.0.113.1"])]


def test_a_refused_query_of_an_unnamed_type_is_recorded():
    # dnsmasq names the types it knows (query[HTTPS], query[TSIG]) and numbers the rest.
    log = (
        f"{PREFIX} 14 127.0.0.1/59156 query[HTTPS] other.test from 127.0.0.1\n"
        f"{PREFIX} 14 127.0.0.1/59156 config other.test is NXDOMAIN\n"
        f"{PREFIX} 15 127.0.0.1/48722 query[type=999] other.test from 127.0.0.1\n"
        f"{PREFIX} 15 127.0.0.1/48722 config other.test is NXDOMAIN\n"
    )

    assert [(e.name, e.qtype, e.decision) for e in parse_dns_log(log)] == [
        ("other.test", "HTTPS", "blocked"),
        ("other.test", "type=999", "blocked"),
    ]


@pytest.mark.parametrize("failure", ["REFUSED", "SERVFAIL"])
def test_an_upstream_failure_is_not_an_answer(failure):
    log = (
        f"{PREFIX} 17 127.0.0.1/58620 query[AAAA] nodata.test from 127.0.0.1\n"
        f"{PREFIX} 17 127.0.0.1/58620 forwarded nodata.test to 192.0.2.53\n"
        f"{PREFIX} 17 127.0.0.1/58620 reply error is {failure}\n"
    )

    (event,) = parse_dns_log(log)

    assert (event.decision, event.answers) == ("allowed", [])


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


def test_blocked_requests_counts_refused_names_and_packets():
    report = NetworkReport(
        dns=[_dns("a.example"), _dns("b.example", "rebind"), _dns("ok.example", "allowed")],
        blocked=[
            BlockedConnection("192.0.2.7", "tcp", 443, 3),
            BlockedConnection("2001:db8::1", "udp", 53, 2),
        ],
    )

    assert report.blocked_requests == 2 + 3 + 2
    assert report.gateway_ran_to_the_end is True
    assert NetworkReport(dns=[_dns("x", "allowed")], blocked=[]).blocked_requests == 0


def test_write_network_log_writes_json_lines_without_internal_fields(kapsis_home):
    event = DnsEvent(name="github.com", qtype="A", answers=["140.82.121.3"], forwarded=True)
    report = NetworkReport(
        dns=[event, _dns("evil.example")],
        blocked=[BlockedConnection("192.0.2.7", "tcp", 443, 3)],
    )

    path = write_network_log("net1", report)

    assert path == network_log_path("net1") == kapsis_home / "network" / "net1.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"type": "dns", "name": "github.com", "qtype": "A", "decision": "allowed",
         "answers": ["140.82.121.3"]},
        {"type": "dns", "name": "evil.example", "qtype": "A", "decision": "blocked",
         "answers": []},
        {"type": "blocked_connection", "address": "192.0.2.7", "protocol": "tcp", "port": 443,
         "packets": 3},
    ]  # fmt: skip
    assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in lines)


def test_write_network_log_replaces_an_older_log(kapsis_home):
    write_network_log("net2", NetworkReport(dns=[_dns("a.example")], blocked=[]))

    path = write_network_log("net2", NetworkReport(dns=[], blocked=[]))

    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------
# the self-test's probe address


def _policy_with_addresses(*addresses: str):
    builder = PolicyBuilder("filtered")
    for address in addresses:
        builder.add_address(address, "test")
    builder.add_host("192-0-2-1.example", "test")  # names do not count
    return builder.build(["192.0.2.53"])


def test_probe_address_is_the_first_candidate_when_nothing_is_allowed():
    assert probe_address(_policy_with_addresses()) == PROBE_CANDIDATES[0] == "192.0.2.1"


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (("192.0.2.1",), "198.51.100.1"),
        (("192.0.2.1:443",), "198.51.100.1"),  # allowed on any port: not a probe
        (("192.0.2.0/24", "198.51.100.0/24"), "203.0.113.254"),
        (("192.0.0.0/8", "2001:db8::/32"), "198.51.100.1"),
        (("198.51.100.1",), "192.0.2.1"),
    ],
)
def test_probe_address_avoids_allowed_addresses(addresses, expected):
    assert probe_address(_policy_with_addresses(*addresses)) == expected


def test_probe_address_raises_when_every_candidate_is_allowed():
    with pytest.raises(ValueError, match="every self-test probe address is allowlisted"):
        probe_address(_policy_with_addresses("0.0.0.0/0"))


def test_the_gateways_own_report_counts_what_the_host_counts(tmp_path):
    """gateway/report.py (the Kubernetes gateway's termination message) runs on a bare Python
    with only the shipped scripts - no Kapsis installed - and gives the host's count."""
    import ast

    from kapsis.network.gateway_config import BLOCKED_SETS, TABLE
    from kapsis.network.gateway_files import gateway_scripts

    scripts = gateway_scripts()
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(scripts["report.py"]).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("TABLE", "BLOCKED_SETS")
    }
    assert constants == {"TABLE": TABLE, "BLOCKED_SETS": BLOCKED_SETS}
    config = tmp_path / "etc"
    config.mkdir()
    for name, text in scripts.items():
        (config / name).write_text(text)
    (config / "probe-address").write_text("192.0.2.1\n")
    (tmp_path / "dns.log").write_text(LOG)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nft").write_text(
        f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(REAL_TABLE_LISTING)}\nEOF\n"
    )
    (fake_bin / "nft").chmod(0o755)
    result = subprocess.run(
        ["/usr/bin/python3", "-S", "-I", str(config / "report.py"), str(tmp_path / "dns.log")],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
    )
    dns, blocked = without_selftest(
        parse_dns_log(LOG), blocked_in_table(REAL_TABLE_LISTING, BLOCKED_SETS), "192.0.2.1"
    )
    expected = NetworkReport(dns, blocked).blocked_requests
    assert blocked and expected > len(blocked)  # both refused names and refused packets count
    assert json.loads(result.stdout) == {"blockedRequests": expected}


def test_a_secret_spelled_in_a_looked_up_name_is_redacted_in_the_audit_and_network_log(
    make_plan, kapsis_home
):
    """Exfiltration by DNS: the agent resolves `<secret>.evil.example`; the gateway's records of
    it reach the audit trail and the network log only redacted (control: another name is kept)."""
    from kapsis.audit import AuditLog
    from kapsis.network.gateway_files import gateway_dirs
    from kapsis.sandbox.launcher import _observe_network, initial_status
    from kapsis.secrets.redact import Redactor
    from kapsis.status.store import StatusStore

    secret = "sk-live-0123456789abcdef"
    plan = make_plan()
    log = gateway_dirs(Path(plan.workspace.root)).dns_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        f"{PREFIX} 1 127.0.0.1/41000 query[A] {secret}.evil.example from 127.0.0.1\n"
        f"{PREFIX} 1 127.0.0.1/41000 config {secret}.evil.example is NXDOMAIN\n"
        f"{PREFIX} 2 127.0.0.1/41001 query[A] plain.evil.example from 127.0.0.1\n"
        f"{PREFIX} 2 127.0.0.1/41001 config plain.evil.example is NXDOMAIN\n"
    )

    class Gateway:
        name = "podman"

        def blocked_connections(self, plan):
            return [], True

    store = StatusStore()
    store.write(initial_status(plan, Gateway()))
    audit = AuditLog(plan.agent_id, redactor=Redactor([secret]))
    audit.record("session_start")
    _observe_network(plan, Gateway(), store, audit, Redactor([secret]))

    audit_text = audit.path.read_text()
    network_text = network_log_path(plan.agent_id).read_text()
    for text in (audit_text, network_text):
        assert secret not in text
        assert "[REDACTED].evil.example" in text
        assert "plain.evil.example" in text
