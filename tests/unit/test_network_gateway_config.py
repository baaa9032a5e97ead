"""The gateway's rendered nftables ruleset and dnsmasq config: structure, real syntax, semantics.

Syntax is checked by the real tools (``nft -c``, ``dnsmasq --test``) when the host has them.
The resolver's behaviour is checked by running the rendered dnsmasq config (minus its root-only
lines) on 127.0.0.1 against another dnsmasq playing the upstream resolver; nothing here sends a
packet anywhere but 127.0.0.1. As root, one more check runs dnsmasq with its ``nftset`` lines in
a throwaway network namespace to see which firewall set each answer lands in.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapsis.network.gateway_config import (
    BLOCKED_SETS,
    RESOLVER_UID,
    RESOLVER_USER,
    dnsmasq_config,
    name_sets,
    nft_ruleset,
)
from kapsis.network.observe import parse_blocked_set, parse_dns_log
from kapsis.network.policy import NON_PUBLIC_V4, NON_PUBLIC_V6, NetworkPolicy, PolicyBuilder

NFT = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
DNSMASQ = shutil.which("dnsmasq") or (
    "/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None
)
UPSTREAMS = ("192.0.2.53", "2001:db8::53")
ND = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert }"


def _policy(
    hosts: tuple[str, ...] = (),
    addresses: tuple[str, ...] = (),
    upstreams: tuple[str, ...] = UPSTREAMS,
) -> NetworkPolicy:
    builder = PolicyBuilder("filtered")
    builder.add_hosts(hosts, "test")
    for address in addresses:
        builder.add_address(address, "test")
    return builder.build(upstreams)


REPRESENTATIVE_HOSTS = (
    "github.com",
    "github.com:22",
    "*.github.com",
    "pypi.org",
    "registry.example:8443",
)
REPRESENTATIVE = _policy(
    hosts=REPRESENTATIVE_HOSTS,
    addresses=("10.0.0.0/8", "[2001:db8::1]:8443", "192.0.2.10:5432"),
)


def _chain(ruleset: str, name: str) -> list[str]:
    lines = ruleset.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1 : end]]


# ---------------------------------------------------------------------------------------------
# nftables: structure


def test_sets_of_the_representative_policy():
    ruleset = nft_ruleset(REPRESENTATIVE, UPSTREAMS)

    sets = [line.strip() for line in ruleset.splitlines() if line.startswith("  set ")]
    assert sets == [
        "set upstream_v4 { type ipv4_addr; elements = { 192.0.2.53 }; }",
        "set upstream_v6 { type ipv6_addr; elements = { 2001:db8::53 }; }",
        "set nonpublic_v4 { type ipv4_addr; flags interval; elements = { "
        + ", ".join(NON_PUBLIC_V4)
        + " }; }",
        "set nonpublic_v6 { type ipv6_addr; flags interval; elements = { "
        + ", ".join(NON_PUBLIC_V6)
        + " }; }",
        "set blocked4 { type ipv4_addr . inet_proto . inet_service; flags dynamic, timeout;"
        " timeout 1d; size 65535; counter; }",
        "set blocked6 { type ipv6_addr . inet_proto . inet_service; flags dynamic, timeout;"
        " timeout 1d; size 65535; counter; }",
        # One pair per port group of names: (22, 80, 443), (80, 443), (8443,).
        "set names0_v4 { type ipv4_addr; }",
        "set names0_v6 { type ipv6_addr; }",
        "set names1_v4 { type ipv4_addr; }",
        "set names1_v6 { type ipv6_addr; }",
        "set names2_v4 { type ipv4_addr; }",
        "set names2_v6 { type ipv6_addr; }",
        # One pair per port group of addresses: (80, 443), (5432,), (8443,).
        "set addresses0_v4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8 }; }",
        "set addresses0_v6 { type ipv6_addr; flags interval; }",
        "set addresses1_v4 { type ipv4_addr; flags interval; elements = { 192.0.2.10/32 }; }",
        "set addresses1_v6 { type ipv6_addr; flags interval; }",
        "set addresses2_v4 { type ipv4_addr; flags interval; }",
        "set addresses2_v6 { type ipv6_addr; flags interval; elements = { 2001:db8::1/128 }; }",
    ]
    assert BLOCKED_SETS == ("blocked4", "blocked6")


def test_name_sets_follow_the_port_groups():
    # dnsmasq files answers by domain: github.com and *.github.com share one set (and ports).
    assert name_sets(REPRESENTATIVE) == {
        "github.com": ("names0_v4", "names0_v6"),
        "pypi.org": ("names1_v4", "names1_v6"),
        "registry.example": ("names2_v4", "names2_v6"),
    }


def test_output_chain_of_the_representative_policy():
    output = _chain(nft_ruleset(REPRESENTATIVE, UPSTREAMS), "output")

    assert output == [
        "type filter hook output priority filter; policy drop;",
        'oif "lo" accept',
        "ct state established,related accept",
        f"{ND} ip6 hoplimit 255 accept",
        f"meta skuid {RESOLVER_UID} ip daddr @upstream_v4 meta l4proto {{ tcp, udp }}"
        " th dport 53 accept",
        f"meta skuid {RESOLVER_UID} ip6 daddr @upstream_v6 meta l4proto {{ tcp, udp }}"
        " th dport 53 accept",
        "ip daddr @names0_v4 ip daddr != @nonpublic_v4 tcp dport { 22, 80, 443 } accept",
        "ip6 daddr @names0_v6 ip6 daddr != @nonpublic_v6 tcp dport { 22, 80, 443 } accept",
        "ip daddr @names1_v4 ip daddr != @nonpublic_v4 tcp dport { 80, 443 } accept",
        "ip6 daddr @names1_v6 ip6 daddr != @nonpublic_v6 tcp dport { 80, 443 } accept",
        "ip daddr @names2_v4 ip daddr != @nonpublic_v4 tcp dport 8443 accept",
        "ip6 daddr @names2_v6 ip6 daddr != @nonpublic_v6 tcp dport 8443 accept",
        "ip daddr @addresses0_v4 tcp dport { 80, 443 } accept",
        "ip6 daddr @addresses0_v6 tcp dport { 80, 443 } accept",
        "ip daddr @addresses1_v4 tcp dport 5432 accept",
        "ip6 daddr @addresses1_v6 tcp dport 5432 accept",
        "ip daddr @addresses2_v4 tcp dport 8443 accept",
        "ip6 daddr @addresses2_v6 tcp dport 8443 accept",
        "meta l4proto { tcp, udp } meta nfproto ipv4"
        " update @blocked4 { ip daddr . meta l4proto . th dport }",
        "meta l4proto { tcp, udp } meta nfproto ipv6"
        " update @blocked6 { ip6 daddr . meta l4proto . th dport }",
        "meta l4proto { tcp, udp } reject with icmpx type admin-prohibited",
        "counter",
    ]


def test_input_and_forward_chains_drop_by_default():
    ruleset = nft_ruleset(REPRESENTATIVE, UPSTREAMS)

    assert _chain(ruleset, "input") == [
        "type filter hook input priority filter; policy drop;",
        'iif "lo" accept',
        "ct state established,related accept",
        f"{ND} ip6 hoplimit 255 accept",
    ]
    assert _chain(ruleset, "forward") == ["type filter hook forward priority filter; policy drop;"]


@pytest.mark.parametrize(
    "policy",
    [
        _policy(),
        REPRESENTATIVE,
        _policy(hosts=("a.example",), upstreams=("2001:db8::53",)),
        _policy(addresses=("0.0.0.0/0", "::/0")),
    ],
    ids=["empty", "representative", "v6-upstream", "everything-by-address"],
)
def test_invariants_of_every_ruleset(policy):
    ruleset = nft_ruleset(policy, policy.dns_servers)
    output = _chain(ruleset, "output")

    assert ruleset.startswith("table inet kapsis {\n")
    assert ruleset.endswith("}\n")
    # ICMPv6 is only ever neighbour discovery, and only on-link (hop limit 255).
    icmp = [line for line in ruleset.splitlines() if "icmp" in line and "icmpx" not in line]
    assert icmp and all(ND in line and "ip6 hoplimit 255 accept" in line for line in icmp)
    # Only the resolver's uid may send DNS out, and only to the upstreams.
    assert [line for line in output if "dport 53" in line] == [
        line for line in output if line.startswith(f"meta skuid {RESOLVER_UID} ")
    ]
    assert all("@upstream_v" in line for line in output if "skuid" in line)
    # Addresses learnt from names never open a non-public address.
    named = [line for line in output if "@names" in line]
    assert all("daddr != @nonpublic_v" in line for line in named)
    # All accepts are TCP only (but the fixed ones at the top), before the refusal at the end.
    accepts = [i for i, line in enumerate(output) if line.endswith(" accept")]
    assert all("tcp dport" in output[i] for i in accepts[5:])
    update4 = output.index(
        "meta l4proto { tcp, udp } meta nfproto ipv4"
        " update @blocked4 { ip daddr . meta l4proto . th dport }"
    )
    assert max(accepts) < update4
    assert output[-2:] == [
        "meta l4proto { tcp, udp } reject with icmpx type admin-prohibited",
        "counter",
    ]
    assert "policy drop;" in output[0]


def test_an_empty_allowlist_has_no_name_or_address_sets():
    ruleset = nft_ruleset(_policy(), UPSTREAMS)

    assert "@names" not in ruleset
    assert "@addresses" not in ruleset
    assert "set names" not in ruleset
    assert "set addresses" not in ruleset
    assert "tcp dport" not in ruleset


def test_upstream_sets_split_by_family_and_may_be_empty():
    ruleset = nft_ruleset(_policy(), ("2001:db8::53", "2001:db8::54"))

    assert "  set upstream_v4 { type ipv4_addr; }" in ruleset.splitlines()
    assert (
        "  set upstream_v6 { type ipv6_addr; elements = { 2001:db8::53, 2001:db8::54 }; }"
        in ruleset.splitlines()
    )


def test_many_port_groups_get_one_set_pair_and_one_rule_pair_each():
    hosts = tuple(f"h{port}.example:{port}" for port in range(8000, 8030))
    policy = _policy(hosts=hosts)

    ruleset = nft_ruleset(policy, UPSTREAMS)

    output = _chain(ruleset, "output")
    assert sum(1 for line in ruleset.splitlines() if line.startswith("  set names")) == 60
    for index, port in enumerate(range(8000, 8030)):
        assert (
            f"ip daddr @names{index}_v4 ip daddr != @nonpublic_v4 tcp dport {port} accept"
        ) in output
    assert set(name_sets(policy).values()) == {(f"names{i}_v4", f"names{i}_v6") for i in range(30)}


# ---------------------------------------------------------------------------------------------
# nftables: real syntax check


def _nft_check(ruleset: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if NFT is None:
        pytest.skip("nft is not installed")
    path = tmp_path / "rules.nft"
    path.write_text(ruleset)
    result = subprocess.run(
        [NFT, "-c", "-f", str(path)], capture_output=True, text=True, check=False, timeout=10
    )
    if result.returncode != 0 and (
        "Operation not permitted" in result.stderr or "Permission denied" in result.stderr
    ):
        pytest.skip(f"nft -c needs privileges here: {result.stderr.strip()}")
    return result


SYNTAX_POLICIES = {
    "empty": _policy(),
    "representative": REPRESENTATIVE,
    "ipv6-addresses": _policy(
        addresses=("2001:db8::/32", "[2001:db8:1::5]:22", "[fd00::/8]:443", "::1")
    ),
    "wildcard-and-exact": _policy(hosts=("example.org", "*.example.org", "*.example.org:8080")),
    "many-port-groups": _policy(
        hosts=tuple(f"h{p}.example:{p}" for p in range(1, 40)),
        addresses=tuple(f"198.51.100.{p}:{p}" for p in range(1, 40)),
    ),
    "v6-upstreams-only": _policy(hosts=("a.example",), upstreams=("2001:db8::53",)),
    "no-upstreams": _policy(hosts=("a.example",), upstreams=()),
    "categories": _policy(
        hosts=(
            "github.com",
            "github.com:22",
            "api.github.com",
            "pypi.org",
            "api.anthropic.com",
        )
    ),
}


def test_nft_check_catches_a_broken_ruleset(tmp_path):
    """Control: the syntax check below really checks."""
    broken = nft_ruleset(REPRESENTATIVE, UPSTREAMS).replace("@names0_v4", "@no_such_set", 1)

    result = _nft_check(broken, tmp_path)

    assert result.returncode != 0


@pytest.mark.parametrize("name", sorted(SYNTAX_POLICIES))
def test_nft_accepts_the_ruleset(tmp_path, name):
    policy = SYNTAX_POLICIES[name]

    result = _nft_check(nft_ruleset(policy, policy.dns_servers), tmp_path)

    assert result.returncode == 0, result.stderr


# Regression: overlapping entries with the same ports once made nft reject the ruleset.
def test_nft_accepts_overlapping_address_entries(tmp_path):
    policy = _policy(addresses=("10.0.0.0/8", "10.1.2.3", "2001:db8::/32", "2001:db8::1"))

    result = _nft_check(nft_ruleset(policy, policy.dns_servers), tmp_path)

    assert result.returncode == 0, result.stderr


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
        "port=53",
        f"user={RESOLVER_USER}",
        "group=nogroup",
        "cache-size=1000",
    ]
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
    policy = _policy(hosts=("*.wild.example", "*.both.example", "both.example:22"))

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
    config = dnsmasq_config(_policy(addresses=("203.0.113.0/24",)), UPSTREAMS, "/x")

    assert "203.0.113" not in config
    assert "server=/" not in config
    assert "nftset=" not in config


# ---------------------------------------------------------------------------------------------
# dnsmasq: real syntax check


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
        dnsmasq_config(policy, policy.dns_servers, "/var/log/kapsis/dns.log"), tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# dnsmasq: real semantics (both resolvers on 127.0.0.1, unprivileged)

NOERROR, NXDOMAIN = 0, 3


def dns_query(port: int, name: str, qtype: int = 1, timeout: float = 1.0) -> tuple[int, list[str]]:
    """(response code, A/AAAA answers) of one UDP query to 127.0.0.1:``port``."""
    ident = random.randrange(65536)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0"
    packet += struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", port))
        while True:
            reply = sock.recv(4096)
            if len(reply) >= 12 and struct.unpack(">H", reply[:2])[0] == ident:
                break

    def skip_name(offset: int) -> int:
        while reply[offset] != 0:
            if reply[offset] & 0xC0 == 0xC0:  # a compression pointer ends the name
                return offset + 2
            offset += 1 + reply[offset]
        return offset + 1

    questions, answers = struct.unpack(">HH", reply[4:8])
    offset = 12
    for _ in range(questions):
        offset = skip_name(offset) + 4
    found = []
    for _ in range(answers):
        offset = skip_name(offset)
        rtype, _class, _ttl, length = struct.unpack(">HHIH", reply[offset : offset + 10])
        data = reply[offset + 10 : offset + 10 + length]
        offset += 10 + length
        if rtype in (1, 28):
            family = socket.AF_INET if rtype == 1 else socket.AF_INET6
            found.append(socket.inet_ntop(family, data))
    return reply[3] & 0x0F, found


def _free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq binds both)."""
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


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
    ("allowed.test", 1),
    ("allowed.test", 28),
    ("sub.allowed.test", 1),
    ("x.allowed.test", 1),
    ("x.sub.allowed.test", 1),
    ("unlisted.test", 1),
    ("a.wild.test", 1),
    ("deep.b.wild.test", 1),
    ("wild.test", 1),
    ("api.wild.test", 1),
    ("x.api.wild.test", 1),
    ("rebind.test", 1),
    ("rebind6.test", 28),
    ("metadata.test", 1),
    ("loopback.test", 1),
    ("nodata.test", 28),
    ("missing.test", 1),
    ("ALLOWED.test", 1),
)


def _runnable_gateway_config(policy: NetworkPolicy, port: int, log: Path) -> str:
    """The rendered config without its root-only lines, on ``port`` instead of 53."""
    lines = dnsmasq_config(policy, policy.dns_servers, str(log)).splitlines()
    assert "port=53" in lines
    kept = [line for line in lines if not line.startswith(("user=", "group=", "nftset="))]
    return "\n".join(f"port={port}" if line == "port=53" else line for line in kept) + "\n"


Answers = dict[tuple[str, int], tuple[int, list[str]]]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> Iterator[tuple[Answers, str]]:
    """Answers of the rendered resolver to QUERIES, and its query log."""
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    folder = tmp_path_factory.mktemp("dnsmasq")
    upstream_port, gateway_port = _free_port(), _free_port()
    policy = _policy(hosts=LISTED, upstreams=(f"127.0.0.1#{upstream_port}",))
    config = folder / "gateway.conf"
    log = folder / "dns.log"
    config.write_text(_runnable_gateway_config(policy, gateway_port, log))
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

    assert answers[("allowed.test", 1)] == (NOERROR, ["203.0.113.5"])
    assert answers[("allowed.test", 28)] == (NOERROR, ["2001:db8::5"])
    assert answers[("ALLOWED.test", 1)] == (NOERROR, ["203.0.113.5"])
    assert answers[("sub.allowed.test", 1)] == (NOERROR, ["203.0.113.6"])


def test_an_unlisted_name_is_nxdomain_even_if_upstream_knows_it(resolved):
    answers, _ = resolved

    assert answers[("unlisted.test", 1)] == (NXDOMAIN, [])


def test_a_subdomain_of_an_exact_name_is_nxdomain(resolved):
    answers, _ = resolved

    assert answers[("x.allowed.test", 1)] == (NXDOMAIN, [])
    assert answers[("x.sub.allowed.test", 1)] == (NXDOMAIN, [])


def test_a_wildcard_allows_subdomains_at_any_depth_but_not_the_domain(resolved):
    answers, _ = resolved

    assert answers[("a.wild.test", 1)] == (NOERROR, ["203.0.113.7"])
    assert answers[("deep.b.wild.test", 1)] == (NOERROR, ["203.0.113.7"])
    assert answers[("api.wild.test", 1)] == (NOERROR, ["203.0.113.7"])
    assert answers[("wild.test", 1)] == (NXDOMAIN, [])


def test_an_exact_name_does_not_narrow_a_wildcard_above_it(resolved):
    answers, _ = resolved

    assert answers[("x.api.wild.test", 1)] == (NOERROR, ["203.0.113.7"])


@pytest.mark.parametrize(
    "query",
    [("rebind.test", 1), ("rebind6.test", 28), ("metadata.test", 1), ("loopback.test", 1)],
)
def test_non_public_answers_of_listed_names_become_nxdomain(resolved, query):
    answers, _ = resolved

    assert answers[query] == (NXDOMAIN, [])


def test_upstream_answers_pass_through(resolved):
    answers, _ = resolved

    assert answers[("nodata.test", 28)] == (NOERROR, [])  # NODATA: the name has only an A
    assert answers[("missing.test", 1)] == (NXDOMAIN, [])


def test_the_real_query_log_parses_into_decisions(resolved):
    _, log = resolved

    events = parse_dns_log(log)

    # The readiness probe, then QUERIES in order.
    assert [(e.name, e.qtype) for e in events] == [
        ("kapsis-selftest.invalid", "A"),
        *[(name, "A" if qtype == 1 else "AAAA") for name, qtype in QUERIES],
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


# ---------------------------------------------------------------------------------------------
# which ports an answer opens: dnsmasq's nftset choice (modelled; checked for real below)


def _nftset_for(config: str, name: str) -> str | None:
    """The IPv4 set dnsmasq 2.90 files ``name``'s answers in: the nftset= line whose domain is
    the longest (label-aligned) suffix of the name; the domain is compared literally."""
    best, best_length = None, -1
    for line in config.splitlines():
        if not line.startswith("nftset=/"):
            continue
        _, domain, targets = line.split("/", 2)
        if (name == domain or name.endswith(f".{domain}")) and len(domain) >= best_length:
            best, best_length = targets.split(",")[0].rsplit("#", 1)[1], len(domain)
    return best


def _ports_of_set(ruleset: str, name_set: str) -> set[int]:
    """The TCP ports the output chain accepts for addresses in ``name_set``."""
    for line in _chain(ruleset, "output"):
        if line.startswith(f"ip daddr @{name_set} ") and line.endswith(" accept"):
            ports = line.split(" tcp dport ")[1].removesuffix(" accept").strip("{ }")
            return {int(port) for port in ports.split(",")}
    raise AssertionError(f"no accept rule for {name_set}")


def _policy_ports(policy: NetworkPolicy, name: str) -> set[int]:
    """What the policy promises for ``name``: the ports of every rule that matches it."""
    ports: set[int] = set()
    for rule in policy.names():
        domain = rule.pattern.removeprefix("*.")
        matches = name.endswith(f".{domain}") if rule.kind == "wildcard" else name == domain
        if matches:
            ports.update(rule.ports)
    return ports


@pytest.mark.parametrize(
    ("hosts", "names"),
    [
        (("exact.example",), ["exact.example"]),
        (("*.wild.example:8080",), ["a.wild.example", "b.a.wild.example"]),
        (("both.example:22", "*.both.example"), ["both.example", "sub.both.example"]),
        (("a.example:8443", "b.a.example"), ["a.example", "b.a.example"]),
        (REPRESENTATIVE_HOSTS, ["github.com", "api.github.com", "pypi.org", "registry.example"]),
    ],
)
def test_every_allowed_name_opens_at_least_its_ports(hosts, names):
    policy = _policy(hosts=hosts)
    config = dnsmasq_config(policy, UPSTREAMS, "/x")
    ruleset = nft_ruleset(policy, UPSTREAMS)

    for name in names:
        name_set = _nftset_for(config, name)
        assert name_set is not None, name
        assert _ports_of_set(ruleset, name_set) >= _policy_ports(policy, name), name


def test_an_exact_name_and_its_wildcard_share_their_ports():
    """The price of filing answers by domain: both.example also opens 80/443, its subdomains 22."""
    policy = _policy(hosts=("both.example:22", "*.both.example"))
    config = dnsmasq_config(policy, UPSTREAMS, "/x")
    ruleset = nft_ruleset(policy, UPSTREAMS)

    for name in ("both.example", "sub.both.example"):
        assert _ports_of_set(ruleset, _nftset_for(config, name) or "") == {22, 80, 443}


@pytest.mark.parametrize("name", ["api.wild.example", "x.api.wild.example"])
def test_an_exact_name_below_a_wildcard_keeps_the_wildcards_ports(name):
    policy = _policy(hosts=("*.wild.example:8080", "api.wild.example:9090"))
    config = dnsmasq_config(policy, UPSTREAMS, "/x")
    ruleset = nft_ruleset(policy, UPSTREAMS)

    name_set = _nftset_for(config, name)

    assert name_set is not None
    assert _ports_of_set(ruleset, name_set) >= _policy_ports(policy, name)


# ---------------------------------------------------------------------------------------------
# dnsmasq + nftables for real, as root, in a throwaway network namespace

NETNS_HELPER = f"""
import json, random, socket, struct, subprocess, sys, time
{inspect.getsource(dns_query)}
job = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run([job["nft"], "-f", job["rules"]], check=True)
processes = [subprocess.Popen(job["upstream"]), subprocess.Popen(job["gateway"])]
try:
    deadline = time.monotonic() + 3
    while True:
        try:
            dns_query(53, "kapsis-selftest.invalid", timeout=0.1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    answers = {{name: dns_query(53, name) for name in job["queries"]}}
    answers.update({{f"{{name}}/AAAA": dns_query(53, name, 28) for name in job["queries6"]}})
    for element in job["elements"]:
        subprocess.run([job["nft"], "add", "element", "inet", "kapsis", *element], check=True)
    table = subprocess.run([job["nft"], "-j", "list", "table", "inet", "kapsis"],
                           capture_output=True, text=True, check=True).stdout
finally:
    for process in processes:
        process.terminate()
        process.wait()
print(json.dumps({{"answers": answers, "table": json.loads(table)}}))
"""

NETNS_HOSTS = (
    "exact.test",
    "api.exact.test:8443",
    "*.wild.test:8080",
    "api.wild.test:9090",
    "both.test:22",
    "*.both.test",
)
NETNS_RECORDS = {
    "exact.test": "203.0.113.10",
    "api.exact.test": "203.0.113.11",
    "x.wild.test": "203.0.113.12",
    "api.wild.test": "203.0.113.15",
    "x.api.wild.test": "203.0.113.16",
    "both.test": "203.0.113.13",
    "sub.both.test": "203.0.113.14",
}
NETNS_RECORDS6 = {"exact.test": "2001:db8::10", "x.wild.test": "2001:db8::12"}
NETNS_POLICY = _policy(hosts=NETNS_HOSTS, upstreams=("127.0.0.1#5300",))


@pytest.fixture(scope="module")
def in_netns(tmp_path_factory) -> dict:
    """Answers, filled name sets and the table listing after real queries in a network namespace."""
    tools = {name: shutil.which(name) for name in ("unshare", "ip")}
    if os.geteuid() != 0 or NFT is None or DNSMASQ is None or None in tools.values():
        pytest.skip("needs root, unshare, ip, nft and dnsmasq")
    folder = tmp_path_factory.mktemp("netns")
    policy = NETNS_POLICY
    (folder / "rules.nft").write_text(nft_ruleset(policy, ("127.0.0.1",)))
    config = dnsmasq_config(policy, policy.dns_servers, str(folder / "dns.log")).splitlines()
    config = [line for line in config if not line.startswith(("user=", "group="))]
    (folder / "gateway.conf").write_text("\n".join(config) + "\n")
    common = [DNSMASQ, "--keep-in-foreground", "--pid-file=", "--bind-interfaces"]
    job = {
        "nft": NFT,
        "rules": str(folder / "rules.nft"),
        "gateway": [*common[:3], f"--conf-file={folder / 'gateway.conf'}"],
        "upstream": [
            *common,
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--port=5300",
            f"--log-facility={folder / 'upstream.log'}",
            *[f"--address=/{name}/{address}" for name, address in NETNS_RECORDS.items()],
            *[f"--address=/{name}/{address}" for name, address in NETNS_RECORDS6.items()],
        ],
        "queries": list(NETNS_RECORDS),
        "queries6": list(NETNS_RECORDS6),
        "elements": [
            ["blocked4", "{ 192.0.2.1 . tcp . 9 }"],
            ["blocked6", "{ 2001:db8::99 . udp . 53 }"],
        ],
    }
    (folder / "helper.py").write_text(NETNS_HELPER)
    result = subprocess.run(
        [tools["unshare"], "-n", sys.executable, str(folder / "helper.py"), json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    if result.returncode != 0 and "unshare failed" in result.stderr:
        pytest.skip(f"no network namespace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    elements: dict[str, set[str]] = {}
    for item in outcome["table"]["nftables"]:
        found = item.get("set")
        if found and found["name"].startswith("names"):
            elements[found["name"]] = {str(e) for e in found.get("elem", [])}
    return {"answers": outcome["answers"], "sets": elements, "table": outcome["table"]}


def _sets_holding(in_netns: dict, address: str) -> list[str]:
    return sorted(name for name, members in in_netns["sets"].items() if address in members)


def test_in_netns_the_ruleset_loads_and_listed_names_resolve(in_netns):
    assert in_netns["answers"] == {
        **{name: [NOERROR, [address]] for name, address in NETNS_RECORDS.items()},
        **{f"{name}/AAAA": [NOERROR, [address]] for name, address in NETNS_RECORDS6.items()},
    }


def test_in_netns_ipv6_answers_land_in_the_ipv6_sets(in_netns):
    config = dnsmasq_config(NETNS_POLICY, NETNS_POLICY.dns_servers, "/x")

    for name, address in NETNS_RECORDS6.items():
        v4_set = _nftset_for(config, name)
        assert v4_set is not None
        assert _sets_holding(in_netns, address) == [v4_set.replace("_v4", "_v6")], name


def test_in_netns_dnsmasq_fills_the_sets_the_model_predicts(in_netns):
    """Validates _nftset_for (the longest nftset domain wins, '*.' is literal) on real dnsmasq."""
    config = dnsmasq_config(NETNS_POLICY, NETNS_POLICY.dns_servers, "/x")

    for name, address in NETNS_RECORDS.items():
        expected = _nftset_for(config, name)
        assert _sets_holding(in_netns, address) == ([expected] if expected else []), name


@pytest.mark.parametrize(
    "name", ["exact.test", "api.exact.test", "x.wild.test", "both.test", "sub.both.test"]
)
def test_in_netns_an_answer_opens_the_ports_its_rules_allow(in_netns, name):
    ruleset = nft_ruleset(NETNS_POLICY, ("127.0.0.1",))
    (filled,) = _sets_holding(in_netns, NETNS_RECORDS[name])

    assert _ports_of_set(ruleset, filled) >= _policy_ports(NETNS_POLICY, name)


@pytest.mark.parametrize("name", ["api.wild.test", "x.api.wild.test"])
def test_in_netns_an_exact_name_below_a_wildcard_keeps_the_wildcards_ports(in_netns, name):
    ruleset = nft_ruleset(NETNS_POLICY, ("127.0.0.1",))
    (filled,) = _sets_holding(in_netns, NETNS_RECORDS[name])

    assert _ports_of_set(ruleset, filled) >= _policy_ports(NETNS_POLICY, name)


def test_in_netns_the_live_blocked_sets_parse(in_netns):
    listing = {
        "nftables": [
            item
            for item in in_netns["table"]["nftables"]
            if item.get("set", {}).get("name") in BLOCKED_SETS
        ]
    }

    blocked = parse_blocked_set(listing)

    assert {(b.address, b.protocol, b.port) for b in blocked} == {
        ("192.0.2.1", "tcp", 9),
        ("2001:db8::99", "udp", 53),
    }
