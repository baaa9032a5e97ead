"""The gateway's DNS: the resolver's dnsmasq config and the DNS front's dnsdist config.

Syntax is checked by the real tools (``dnsmasq --test``, ``dnsdist --check-config``) when the
host has them. The resolver's answers are checked by running the rendered dnsmasq config (minus
its root-only lines) on 127.0.0.1 against another dnsmasq playing the upstream. As root, the
front runs for real in a throwaway network namespace, in front of the rendered resolver: what it
refuses, what it forwards, and the files the host reads of it.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import pytest

from kapsis.config.models import ExtraQueryType
from kapsis.network.gateway_layout import DNS_FRONT_SOURCE, RESOLVER_PORT, RESOLVER_USER
from kapsis.network.observe import DNS_REASONS, parse_dns_log, parse_dns_refusals
from kapsis.network.policy import (
    BASE_QUERY_TYPES,
    NON_PUBLIC_V4,
    NON_PUBLIC_V6,
    DnsLimits,
    NetworkPolicy,
)
from kapsis.network.resolver import (
    EDNS_COOKIE,
    REFUSALS_RECORDED,
    dns_front_config,
    dnsmasq_config,
    name_pattern,
)

from .netgw import (
    AAAA,
    DNSDIST,
    DNSMASQ,
    MX,
    NOERROR,
    NULL,
    NXDOMAIN,
    REFUSED,
    REPRESENTATIVE,
    TXT,
    UPSTREAMS,
    A,
    DnsChain,
    dns_packet,
    dns_query,
    free_port,
    make_policy,
    netns,
    runnable_resolver_config,
)

# ---------------------------------------------------------------------------------------------
# dnsmasq: structure


def test_dnsmasq_config_of_the_representative_policy():
    config = dnsmasq_config(REPRESENTATIVE, UPSTREAMS, "/var/log/kapsis/dns.log").splitlines()

    assert config[:10] == [
        "no-resolv",
        "no-hosts",
        "no-poll",
        "pid-file=",
        "bind-interfaces",
        "listen-address=127.0.0.1",
        "port=54",  # behind the DNS front, on a privileged loopback port only the front reaches
        f"user={RESOLVER_USER}",
        "group=nogroup",
        "cache-size=1000",
    ]
    assert RESOLVER_PORT == 54
    assert [line for line in config if line.startswith("bogus-nxdomain=")] == [
        f"bogus-nxdomain={network}" for network in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)
    ]
    assert "log-facility=/var/log/kapsis/dns.log" in config
    assert "log-queries=extra" in config
    per_name = config[config.index("address=/#/") + 1 :]
    assert per_name == [
        "server=/*.github.com/192.0.2.53",
        "server=/*.github.com/2001:db8::53",
        "server=/github.com/192.0.2.53",
        "server=/github.com/2001:db8::53",
        # no address=/*.github.com/: the wildcard lists them
        "server=/pypi.org/192.0.2.53",
        "server=/pypi.org/2001:db8::53",
        "address=/*.pypi.org/",
        "server=/registry.example/192.0.2.53",
        "server=/registry.example/2001:db8::53",
        "address=/*.registry.example/",
        "nftset=/github.com/4#inet#kapsis#names0_v4,6#inet#kapsis#names0_v6",
        "nftset=/pypi.org/4#inet#kapsis#names1_v4,6#inet#kapsis#names1_v6",
        "nftset=/registry.example/4#inet#kapsis#names2_v4,6#inet#kapsis#names2_v6",
    ]


def test_nftset_lines_never_use_the_wildcard_syntax():
    """dnsmasq takes '*.' literally in nftset= (unlike server=/address=): it would never match."""
    policy = make_policy(hosts=("*.wild.example", "*.both.example", "both.example:22"))

    config = dnsmasq_config(policy, UPSTREAMS, "/x").splitlines()

    nftsets = [line for line in config if line.startswith("nftset=")]
    assert [line.split("/")[1] for line in nftsets] == ["both.example", "wild.example"]
    assert "server=/*.wild.example/192.0.2.53" in config
    assert "address=/*.both.example/" not in config


def test_dnsmasq_never_forwards_without_a_listed_domain():
    config = dnsmasq_config(REPRESENTATIVE, UPSTREAMS, "/x").splitlines()

    servers = [line for line in config if line.startswith("server=")]
    assert servers and all(line.startswith("server=/") and "//" not in line for line in servers)
    assert "no-resolv" in config  # /etc/resolv.conf would be an upstream for everything
    assert not any(line.startswith(("resolv-file", "stop-dns-rebind")) for line in config)
    assert config.count("address=/#/") == 1


def test_addresses_do_not_reach_the_resolver():
    config = dnsmasq_config(make_policy(addresses=("203.0.113.0/24",)), UPSTREAMS, "/x")

    assert "203.0.113" not in config
    assert "server=/" not in config
    assert "nftset=" not in config


def test_resolve_only_names_are_answered_but_open_nothing():
    """Kubernetes: the git host for the finishing step resolves, but its answers go in no set
    (the agent still has no path there); a name also listed keeps its set."""
    policy = make_policy(hosts=("pypi.org", "*.example.org"))

    config = dnsmasq_config(
        policy,
        ("192.0.2.53",),
        "/x",
        resolve_only=("git.corp.example", "pypi.org", "a.example.org"),
    ).splitlines()

    assert config[config.index("address=/#/") + 1 :] == [
        "server=/*.example.org/192.0.2.53",
        "server=/pypi.org/192.0.2.53",
        "address=/*.pypi.org/",
        "server=/a.example.org/192.0.2.53",  # covered by the wildcard: subdomains stay open
        "server=/git.corp.example/192.0.2.53",
        "address=/*.git.corp.example/",
        "nftset=/example.org/4#inet#kapsis#names0_v4,6#inet#kapsis#names0_v6",
        "nftset=/pypi.org/4#inet#kapsis#names0_v4,6#inet#kapsis#names0_v6",
    ]


# ---------------------------------------------------------------------------------------------
# dnsmasq: real syntax check

SYNTAX_POLICIES = {
    "empty": make_policy(),
    "representative": REPRESENTATIVE,
    "wildcard-and-exact": make_policy(hosts=("example.org", "*.example.org", "*.example.org:8080")),
    "many-port-groups": make_policy(hosts=tuple(f"h{p}.example:{p}" for p in range(1, 40))),
    "v6-upstreams-only": make_policy(hosts=("a.example",), upstreams=("2001:db8::53",)),
    "no-upstreams": make_policy(hosts=("a.example",), upstreams=()),
}


def _dnsmasq_test(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    path = tmp_path / "dnsmasq.conf"
    path.write_text(config)
    return subprocess.run(
        [DNSMASQ, "--test", f"--conf-file={path}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )


def test_dnsmasq_test_catches_a_broken_config(tmp_path):
    """Control: --test checks option values (but not whether user kapsis-dns exists)."""
    config = dnsmasq_config(REPRESENTATIVE, UPSTREAMS, "/x")

    broken = _dnsmasq_test(config.replace("bogus-nxdomain=10.0.0.0/8", "bogus-nxdomain=10/99"),
                           tmp_path)  # fmt: skip

    assert broken.returncode != 0


@pytest.mark.parametrize("name", sorted(SYNTAX_POLICIES))
def test_dnsmasq_accepts_the_config(tmp_path, name):
    policy = SYNTAX_POLICIES[name]

    result = _dnsmasq_test(
        dnsmasq_config(policy, policy.dns_servers, "/var/log/kapsis/dns.log", ("git.example",)),
        tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# dnsmasq: real semantics (both resolvers on 127.0.0.1, unprivileged)


def _wait_answering(process: subprocess.Popen[bytes], port: int, probe: str, log: Path) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text() if log.exists() else ""
            if "failed to change" in said and "Operation not permitted" in said:
                # uid 0 without CAP_SETUID/CAP_SETGID: dnsmasq cannot drop to nobody.
                pytest.skip(f"dnsmasq cannot start here: {said.strip().splitlines()[-2]}")
            raise RuntimeError(f"dnsmasq exited: {said[-500:]!r}")
        try:
            dns_query(port, probe, timeout=0.1)
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"dnsmasq on port {port} did not answer")


# What the upstream resolver knows (dnsmasq --address matches the domain and its subdomains).
UPSTREAM_RECORDS = (
    "/allowed.test/203.0.113.5",
    "/allowed.test/2001:db8::5",
    "/sub.allowed.test/203.0.113.6",
    "/wild.test/203.0.113.7",
    "/unlisted.test/203.0.113.8",
    "/rebind.test/10.0.0.1",
    "/rebind6.test/fd00::1",
    "/metadata.test/169.254.169.254",
    "/loopback.test/127.0.0.1",
    "/missing.test/",  # NXDOMAIN upstream
)
LISTED = (
    "allowed.test",
    "sub.allowed.test",
    "*.wild.test",
    "api.wild.test",
    "rebind.test",
    "rebind6.test",
    "metadata.test",
    "loopback.test",
    "nodata.test",
    "missing.test",
)
QUERIES = (
    ("allowed.test", A),
    ("allowed.test", AAAA),
    ("sub.allowed.test", A),
    ("x.allowed.test", A),
    ("x.sub.allowed.test", A),
    ("unlisted.test", A),
    ("a.wild.test", A),
    ("deep.b.wild.test", A),
    ("wild.test", A),
    ("api.wild.test", A),
    ("x.api.wild.test", A),
    ("rebind.test", A),
    ("rebind6.test", AAAA),
    ("metadata.test", A),
    ("loopback.test", A),
    ("nodata.test", AAAA),
    ("missing.test", A),
    ("ALLOWED.test", A),
)


Answers = dict[tuple[str, int], tuple[int, list[str]]]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> Iterator[tuple[Answers, str]]:
    """Answers of the rendered resolver to QUERIES, and its query log."""
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    folder = tmp_path_factory.mktemp("dnsmasq")
    upstream_port, gateway_port = free_port(), free_port()
    policy = make_policy(hosts=LISTED, upstreams=(f"127.0.0.1#{upstream_port}",))
    config = folder / "gateway.conf"
    log = folder / "dns.log"
    config.write_text(runnable_resolver_config(policy, gateway_port, log))
    common = ["--keep-in-foreground", "--pid-file="]
    upstream_args = [DNSMASQ, *common, "--conf-file=/dev/null", "--no-resolv", "--no-hosts"]
    upstream_args += ["--bind-interfaces", "--listen-address=127.0.0.1", f"--port={upstream_port}"]
    upstream_args += [f"--log-facility={folder / 'upstream.log'}"]
    upstream_args += [f"--address={record}" for record in UPSTREAM_RECORDS]
    # An A only, and authoritative for the name: AAAA is NODATA.
    upstream_args += ["--host-record=nodata.test,203.0.113.9", "--local=/nodata.test/"]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # Start-up errors before the log is open go to stderr: into the log file as well.
        with (folder / "upstream.log").open("ab") as errors:
            processes.append(subprocess.Popen(upstream_args, stderr=errors))
        with log.open("ab") as errors:
            gateway_args = [DNSMASQ, *common, f"--conf-file={config}"]
            processes.append(subprocess.Popen(gateway_args, stderr=errors))
        _wait_answering(processes[0], upstream_port, "allowed.test", folder / "upstream.log")
        _wait_answering(processes[1], gateway_port, "kapsis-selftest.invalid", log)
        answers = {query: dns_query(gateway_port, *query) for query in QUERIES}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # log-async: the log is complete once the resolver has exited.
    yield answers, log.read_text()


def test_a_listed_name_is_answered(resolved):
    answers, _ = resolved

    assert answers[("allowed.test", A)] == (NOERROR, ["203.0.113.5"])
    assert answers[("allowed.test", AAAA)] == (NOERROR, ["2001:db8::5"])
    assert answers[("ALLOWED.test", A)] == (NOERROR, ["203.0.113.5"])
    assert answers[("sub.allowed.test", A)] == (NOERROR, ["203.0.113.6"])


def test_an_unlisted_name_is_nxdomain_even_if_upstream_knows_it(resolved):
    answers, _ = resolved

    assert answers[("unlisted.test", A)] == (NXDOMAIN, [])


def test_a_subdomain_of_an_exact_name_is_nxdomain(resolved):
    answers, _ = resolved

    assert answers[("x.allowed.test", A)] == (NXDOMAIN, [])
    assert answers[("x.sub.allowed.test", A)] == (NXDOMAIN, [])


def test_a_wildcard_allows_subdomains_at_any_depth_but_not_the_domain(resolved):
    answers, _ = resolved

    assert answers[("a.wild.test", A)] == (NOERROR, ["203.0.113.7"])
    assert answers[("deep.b.wild.test", A)] == (NOERROR, ["203.0.113.7"])
    assert answers[("api.wild.test", A)] == (NOERROR, ["203.0.113.7"])
    assert answers[("wild.test", A)] == (NXDOMAIN, [])


def test_an_exact_name_does_not_narrow_a_wildcard_above_it(resolved):
    answers, _ = resolved

    assert answers[("x.api.wild.test", A)] == (NOERROR, ["203.0.113.7"])


@pytest.mark.parametrize(
    "query",
    [("rebind.test", A), ("rebind6.test", AAAA), ("metadata.test", A), ("loopback.test", A)],
)
def test_non_public_answers_of_listed_names_become_nxdomain(resolved, query):
    answers, _ = resolved

    assert answers[query] == (NXDOMAIN, [])


def test_upstream_answers_pass_through(resolved):
    answers, _ = resolved

    assert answers[("nodata.test", AAAA)] == (NOERROR, [])  # NODATA: the name has only an A
    assert answers[("missing.test", A)] == (NXDOMAIN, [])


def test_the_real_query_log_parses_into_decisions(resolved):
    _, log = resolved

    events = parse_dns_log(log)

    # The readiness probe, then QUERIES in order.
    assert [(e.name, e.qtype) for e in events] == [
        ("kapsis-selftest.invalid", "A"),
        *[(name, "A" if qtype == A else "AAAA") for name, qtype in QUERIES],
    ]
    decisions = {(e.name, e.qtype): (e.decision, e.answers) for e in events}
    assert decisions[("allowed.test", "A")] == ("allowed", ["203.0.113.5"])
    assert decisions[("allowed.test", "AAAA")] == ("allowed", ["2001:db8::5"])
    assert decisions[("unlisted.test", "A")] == ("blocked", [])
    assert decisions[("x.allowed.test", "A")] == ("blocked", [])
    assert decisions[("wild.test", "A")] == ("blocked", [])
    assert decisions[("a.wild.test", "A")] == ("allowed", ["203.0.113.7"])
    assert decisions[("rebind.test", "A")] == ("rebind", [])
    assert decisions[("rebind6.test", "AAAA")] == ("rebind", [])
    assert decisions[("metadata.test", "A")] == ("rebind", [])
    assert decisions[("nodata.test", "AAAA")] == ("allowed", [])
    # Listed, forwarded, and the upstream had no such name: not the gateway's refusal.
    assert decisions[("missing.test", "A")] == ("unresolved", [])


def test_the_real_query_log_names_its_clients(resolved):
    """These queries came from 127.0.0.1, not from the DNS front's own address: the host's
    filter drops them."""
    _, log = resolved

    assert parse_dns_log(log, clients=("127.0.0.1",)) == parse_dns_log(log)
    assert parse_dns_log(log, clients=(DNS_FRONT_SOURCE,)) == []


# ---------------------------------------------------------------------------------------------
# the DNS front: the name pattern


def _front_matches(pattern: str, name: str) -> bool:
    """As dnsdist's RegexRule (POSIX ERE, REG_NOSUB): ``$`` is the end of the name only.
    Python's ``$`` also matches before a final newline; fullmatch rules that out."""
    return re.fullmatch(pattern, name) is not None


@pytest.mark.parametrize(
    "name",
    [
        "github.com.",
        "github.com",
        "api.github.com.",
        "a.",
        "localhost",
        "_dmarc.example.com.",
        "xn--bcher-kva.example.",
        "Mixed-Case.Example.",
        "a" * 40 + ".example.",
        "x." + "b" * 40 + "." + "c" * 40 + ".",
        ".".join(["a"] * 100) + ".",  # many short labels are fine; the resolver bounds length
    ],
)
def test_the_name_pattern_accepts_hostnames(name):
    assert _front_matches(name_pattern(40), name)


@pytest.mark.parametrize(
    "name",
    [
        "a" * 41 + ".example.",  # the first label too long
        "x." + "b" * 41 + ".example.",  # a middle label
        "x.example." + "c" * 41 + ".",  # the last
        "a" * 63 + ".",
        "exa mple.com.",
        "ex@mple.com.",
        "a\\.b.example.",  # dnsdist's text form of a dot inside a label
        "a\\032b.example.",  # and of any other byte: a space
        "evil\\010.example.",  # a newline
        "café.example.",
        "github.com\n",
        "a..b.",
        ".",
        "",
    ],
)
def test_the_name_pattern_refuses_long_labels_and_other_characters(name):
    assert not _front_matches(name_pattern(40), name)


def test_the_name_pattern_follows_the_label_limit():
    assert _front_matches(name_pattern(5), "abcde.fghij.")
    assert not _front_matches(name_pattern(5), "abcdef.ghij.")
    assert _front_matches(name_pattern(63), "a" * 63 + ".")


# ---------------------------------------------------------------------------------------------
# the DNS front: structure and dnsdist's own check

DEFAULT_TYPES = "{QTypeRule(DNSQType.A), QTypeRule(DNSQType.AAAA), QTypeRule(DNSQType.CNAME), "
DEFAULT_TYPES += "QTypeRule(DNSQType.HTTPS), QTypeRule(DNSQType.SVCB)}"


def _actions(config: str) -> list[str]:
    """Each addAction(...) of the configuration, on one line."""
    actions: list[str] = []
    for line in config.splitlines():
        if line.startswith("addAction("):
            actions.append(line)
        elif actions and line.startswith("  ") and not actions[-1].endswith("))"):
            actions[-1] += " " + line.strip()
    return actions


FORM = (
    "addAction(OrRule({NotRule(OpcodeRule(DNSOpcode.Query)), NotRule(QClassRule(DNSClass.IN)),"
    " NotRule(RecordsCountRule(DNSSection.Question, 1, 1)),"
    " NotRule(RecordsCountRule(DNSSection.Answer, 0, 0)),"
    " NotRule(RecordsCountRule(DNSSection.Authority, 0, 0)),"
    " NotRule(RecordsCountRule(DNSSection.Additional, 0, 1)),"
    " AndRule({RecordsCountRule(DNSSection.Additional, 1, 1),"
    " NotRule(RecordsTypeCountRule(DNSSection.Additional, DNSQType.OPT, 1, 1))}),"
    ' TrailingDataRule()}), LuaAction(refuse("form")))'
)


def test_the_front_of_the_default_limits():
    config = dns_front_config(make_policy(hosts=("a.example",)), "/logs/refused", "/logs/counts")

    assert 'setLocal("127.0.0.1:53", {reusePort=false})' in config
    assert 'setACL({"127.0.0.0/8"})' in config
    assert (
        f'newServer({{address="127.0.0.1:{RESOLVER_PORT}", source="{DNS_FRONT_SOURCE}",' in config
    )
    assert 'assert(io.open("/logs/refused", "a"))' in config
    assert 'assert(io.open("/logs/counts", "w"))' in config
    assert f"if recorded < {REFUSALS_RECORDED} then" in config
    assert REFUSALS_RECORDED == 1000
    assert f"if code ~= {EDNS_COOKIE} then return true end" in config
    assert _actions(config) == [
        'addAction(NotRule(MaxQPSRule(50, 200)), LuaAction(refuse("rate")))',
        FORM,  # one question of class IN, no records but the EDNS one, nothing after them
        f'addAction(NotRule(OrRule({DEFAULT_TYPES})), LuaAction(refuse("type")))',
        f'addAction(NotRule(RegexRule("{name_pattern(40)}")), LuaAction(refuse("name")))',
        'addAction(LuaRule(foreign_edns_option), LuaAction(refuse("edns")))',
    ]
    # Every reason the front refuses for is counted (a Lua error at the first refusal if not),
    # and is one the host explains.
    reasons = set(re.findall(r'refuse\("(\w+)"\)', config))
    counted = re.search(r"local REASONS = \{(.*)\}", config)
    assert counted and set(re.findall(r'"(\w+)"', counted[1])) == reasons
    started = re.search(r"local recorded, counts, dirty = 0, \{(.*)\}, false", config)
    assert started and set(re.findall(r"(\w+)=0", started[1])) == reasons
    assert reasons <= set(DNS_REASONS)


def test_the_front_follows_the_configured_limits():
    limits = DnsLimits(
        query_types=("TXT", "MX", "A"), max_label_length=63, max_queries_per_second=7
    )
    config = dns_front_config(make_policy(dns=limits), "/r", "/c")

    rate, _, types, names, _ = _actions(config)
    assert rate == 'addAction(NotRule(MaxQPSRule(7, 28)), LuaAction(refuse("rate")))'
    assert re.findall(r"DNSQType\.(\w+)", types) == [*BASE_QUERY_TYPES, "MX", "TXT"]
    assert name_pattern(63) in names


def _dnsdist_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if DNSDIST is None:
        pytest.skip("dnsdist is not installed")
    path = tmp_path / "dnsdist.conf"
    path.write_text(config)
    return subprocess.run(
        [DNSDIST, "--check-config", "-C", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )


@pytest.mark.parametrize(
    "broken",
    [("MaxQPSRule(", "MaxQPSRul("), ("DNSQType.SVCB", "DNSQType.NOPE")],
    ids=["lua-error", "unknown-query-type"],
)
def test_dnsdist_check_catches_a_broken_config(tmp_path, broken):
    """Control: the check runs the configuration's Lua (an unknown query type is an error)."""
    config = dns_front_config(make_policy(), str(tmp_path / "r"), str(tmp_path / "c"))

    result = _dnsdist_check(config.replace(*broken), tmp_path)

    assert result.returncode != 0


@pytest.mark.parametrize(
    "limits",
    [
        DnsLimits(),
        DnsLimits(query_types=get_args(ExtraQueryType)),  # every type a config may add
        DnsLimits(max_label_length=1, max_queries_per_second=1),
        DnsLimits(max_label_length=63, max_queries_per_second=10000),
    ],
    ids=["default", "every-extra-type", "smallest", "largest"],
)
def test_dnsdist_accepts_the_config(tmp_path, limits):
    policy = make_policy(hosts=("a.example",), dns=limits)
    config = dns_front_config(policy, str(tmp_path / "refused"), str(tmp_path / "counts"))

    result = _dnsdist_check(config, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# the DNS front for real, as root, in front of the rendered resolver, in a network namespace

# Runs inside the namespace: sends each packet of argv[1] (hex) to the front, in order, and
# prints the response code of each reply (or the error when none came).
QUERY_SCRIPT = """
import json, socket, sys
out = []
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(2.0)
    for packet in map(bytes.fromhex, json.loads(sys.argv[1])):
        sock.sendto(packet, ("127.0.0.1", 53))
        try:
            while True:
                reply = sock.recv(4096)
                if reply[:2] == packet[:2]:
                    out.append(reply[3] & 15)
                    break
        except OSError as error:
            out.append(str(error))
print(json.dumps(out))
"""
COOKIE = (EDNS_COOKIE, b"\x01" * 8)
ALLOWED_A = struct.pack(">HHHIH", 0xC00C, A, 1, 60, 4) + bytes([192, 0, 2, 1])
FOREIGN_OPTION = (65001, b"data")


def query(
    name: str | list[bytes],
    qtype: int = A,
    options: list[tuple[int, bytes]] | None = None,
    *,
    qclass: int = 1,
    opcode: int = 0,
    extra_question: bool = False,
    answer: bool = False,
    additional: bool = False,
    trailing: bytes = b"",
) -> bytes:
    """A query as the agent could send it, well-formed or not."""
    _, packet = dns_packet(name, qtype, options)
    header, body = bytearray(packet[:12]), bytearray(packet[12:])
    question_end = body.index(0) + 5  # the name, its type, its class
    body[question_end - 2 : question_end] = struct.pack(">H", qclass)
    struct.pack_into(">H", header, 2, 0x0100 | opcode << 11)
    if extra_question:
        body[question_end:question_end] = bytes(body[:question_end])
        struct.pack_into(">H", header, 4, 2)
    if answer:  # an A record for the name, by a compression pointer to the question
        body[question_end:question_end] = ALLOWED_A
        struct.pack_into(">H", header, 6, 1)
    if additional:  # the same record as the one additional record, where EDNS's OPT goes
        assert options is None
        body += ALLOWED_A
        struct.pack_into(">H", header, 10, 1)
    return bytes(header + body + trailing)


def _ask(namespace: Any, packets: list[bytes]) -> list[Any]:
    result = namespace.python(QUERY_SCRIPT, json.dumps([packet.hex() for packet in packets]))
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


class Front(DnsChain):
    """The rendered front and resolver, and an upstream that knows allowed.test, running in
    ``namespace``."""

    def __init__(
        self,
        namespace: Any,
        policy: NetworkPolicy,
        folder: Path,
        edit: Callable[[str], str] | None = None,
    ) -> None:
        # --local: authoritative for the name, other types are NODATA
        upstream = ["--address=/allowed.test/203.0.113.5", "--local=/allowed.test/"]
        super().__init__(namespace, policy, folder, upstream, "allowed.test", edit)


@contextlib.contextmanager
def _front(
    tmp_path: Path, policy: NetworkPolicy, edit: Callable[[str], str] | None = None
) -> Iterator[Front]:
    with netns(DNSDIST, DNSMASQ) as namespace:
        yield Front(namespace, policy, tmp_path, edit)


FRONT_POLICY = make_policy(
    hosts=("allowed.test",), upstreams=("127.0.0.1#5300",), dns=DnsLimits(query_types=("MX",))
)
FRONT_QUERIES = [
    query("allowed.test"),
    query("unlisted.test"),
    query("allowed.test", NULL),
    query("allowed.test", TXT),
    query("allowed.test", MX),  # configured
    query("allowed.test", 65),  # HTTPS
    query("allowed.test", 64),  # SVCB
    query("allowed.test", 5),  # CNAME
    query("allowed.test", AAAA),
    query("a" * 40 + ".allowed.test"),
    query("a" * 41 + ".allowed.test"),
    query([b"a.b", b"allowed", b"test"]),
    query([b"evil\nname\tx", b"test"]),
    query("allowed.test", A, [COOKIE]),
    query("allowed.test", A, [FOREIGN_OPTION]),
    query("allowed.test", A, [COOKIE, FOREIGN_OPTION]),
    query("allowed.test", qclass=3),  # CHAOS
    query("allowed.test", opcode=2),  # STATUS
    query("allowed.test", extra_question=True),
    query("allowed.test", answer=True),
    query("allowed.test", additional=True),  # an additional record that is not EDNS's
    query("allowed.test", trailing=b"\x00" * 11),  # bytes after the question (an OPT's size)
    query("allowed.test", A, [COOKIE], trailing=b"tunnel"),  # and after the EDNS record
    query("allowed.test", A, []),  # one plain OPT record, no option: fine
]


@pytest.fixture(scope="module")
def front_run(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("front")
    with _front(folder, FRONT_POLICY) as front:
        answers = _ask(front.namespace, FRONT_QUERIES)
        refused, counts, log = front.stop()
    return {"answers": answers, "refused": refused, "counts": counts, "log": log}


def test_in_a_namespace_the_front_refuses_what_it_must_and_forwards_the_rest(front_run):
    assert front_run["answers"] == [
        NOERROR,  # listed
        NXDOMAIN,  # unlisted: forwarded, the resolver says no
        REFUSED,  # NULL
        REFUSED,  # TXT, not configured
        NOERROR,  # MX, configured
        NOERROR,
        NOERROR,
        NOERROR,
        NOERROR,
        NXDOMAIN,  # a 40-character label passes (and is no listed name)
        REFUSED,  # a 41-character label
        REFUSED,  # a dot inside a label
        REFUSED,  # control characters
        NOERROR,  # an EDNS cookie is fine
        REFUSED,  # another EDNS option is not
        REFUSED,  # nor beside a cookie
        REFUSED,  # class CHAOS
        REFUSED,  # not a standard query
        REFUSED,  # two questions
        REFUSED,  # a record in the answer section
        REFUSED,  # an additional record that is not OPT
        REFUSED,  # trailing bytes after the question
        REFUSED,  # trailing bytes after the OPT record
        NOERROR,  # one plain OPT record
    ]


FORM_ADDITIONS = (
    ",\n  AndRule({RecordsCountRule(DNSSection.Additional, 1, 1),\n"
    "    NotRule(RecordsTypeCountRule(DNSSection.Additional, DNSQType.OPT, 1, 1))}),\n"
    "  TrailingDataRule()}"
)


def test_in_a_namespace_the_form_rule_is_what_refuses_odd_additional_records_and_trailing_data(
    tmp_path,
):
    """Control: without the OPT and trailing-data parts of the "form" rule, the same queries
    pass the front (and the resolver answers them)."""

    def without_them(config: str) -> str:
        assert FORM_ADDITIONS in config
        return config.replace(FORM_ADDITIONS, "}")

    with _front(tmp_path, FRONT_POLICY, without_them) as front:
        answers = _ask(front.namespace, FRONT_QUERIES[-4:-1])
        refused, _, _ = front.stop()

    assert answers == [NOERROR] * 3
    assert refused == ""


def test_in_a_namespace_each_refusal_is_one_line_the_host_reads(front_run):
    events, unrecorded = parse_dns_refusals(front_run["refused"], front_run["counts"])

    assert [(e.qtype, e.decision, e.reason) for e in events] == [
        ("TYPE10", "refused", DNS_REASONS["type"]),
        ("TXT", "refused", DNS_REASONS["type"]),
        ("A", "refused", DNS_REASONS["name"]),
        ("A", "refused", DNS_REASONS["name"]),
        ("A", "refused", DNS_REASONS["name"]),
        ("A", "refused", DNS_REASONS["edns"]),
        ("A", "refused", DNS_REASONS["edns"]),
        *[("A", "refused", DNS_REASONS["form"])] * 7,
    ]
    names = [e.name for e in events]
    assert names[:3] == ["allowed.test.", "allowed.test.", "a" * 41 + ".allowed.test."]
    assert names[3] == "a\\.b.allowed.test."
    assert names[4].startswith("evil\\") and names[4].endswith(".test.")
    assert not re.search(r"\s", names[4])  # the agent's newline and tab are escaped
    assert len(front_run["refused"].splitlines()) == len(events)
    assert unrecorded == 0
    assert front_run["counts"].splitlines() == [
        "rate\t0",
        "form\t7",
        "type\t2",
        "name\t3",
        "edns\t2",
    ]


def test_in_a_namespace_the_resolver_sees_the_front_as_its_client(front_run):
    """Only what passed the front reaches the resolver, from the front's own address: the host
    keeps exactly those queries (the proxy's lookups pass the front too)."""
    events = parse_dns_log(front_run["log"], clients=(DNS_FRONT_SOURCE,))

    seen = [(e.name, e.qtype) for e in events]
    passed = [
        ("allowed.test", "A"),
        ("unlisted.test", "A"),
        ("allowed.test", "MX"),
        ("allowed.test", "HTTPS"),
        ("allowed.test", "SVCB"),
        ("allowed.test", "CNAME"),
        ("allowed.test", "AAAA"),
        ("a" * 40 + ".allowed.test", "A"),
        ("allowed.test", "A"),  # with a cookie
        ("allowed.test", "A"),  # with a plain OPT record
    ]
    # The readiness probes first (listed A queries), then the queries that passed, in order.
    assert seen[-len(passed) :] == passed
    assert set(seen[: -len(passed)]) == {("allowed.test", "A")}
    decisions = {(e.name, e.qtype): e.decision for e in events}
    assert decisions[("unlisted.test", "A")] == "blocked"
    assert decisions[("allowed.test", "A")] == "allowed"
    assert "a" * 41 not in front_run["log"]
    assert "a\\.b" not in front_run["log"] and "a.b.allowed" not in front_run["log"]
    assert len(parse_dns_log(front_run["log"])) == len(events)  # nobody else asked


def test_in_a_namespace_refusals_beyond_the_record_are_counted(tmp_path):
    """With a rate of 1 a second, a flood is refused; the front writes 1000 lines of it and
    counts the rest, and the host adds the two up to what the client saw refused."""
    policy = make_policy(
        hosts=("allowed.test",),
        upstreams=("127.0.0.1#5300",),
        dns=DnsLimits(max_queries_per_second=1),
    )
    flood = 1010
    with _front(tmp_path, policy) as front:
        answers = _ask(front.namespace, [query("allowed.test") for _ in range(flood)])
        refused, counts, _ = front.stop()

    refusals = answers.count(REFUSED)
    assert refusals > REFUSALS_RECORDED and answers.count(NOERROR) == flood - refusals
    events, unrecorded = parse_dns_refusals(refused, counts)
    assert len(events) == REFUSALS_RECORDED
    assert {(e.name, e.reason) for e in events} == {("allowed.test.", DNS_REASONS["rate"])}
    assert unrecorded == refusals - REFUSALS_RECORDED
    assert f"rate\t{refusals}" in counts.splitlines()
