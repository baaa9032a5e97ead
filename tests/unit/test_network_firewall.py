"""The gateway's nftables ruleset: its structure, the kernel's syntax check, and its behaviour.

Structure: the rules as rendered, and the invariants every ruleset keeps (every new flow an
owner, owners checked before connection-tracking state, names only through the proxy). Syntax:
``nft -c`` for many policies. Behaviour, as root: the ruleset loaded into a throwaway network
namespace wired to a second one playing the upstream, with packets sent as the uids the gateway
tells apart (the agent's traffic never leaves the two namespaces).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kapsis.network.firewall import name_sets, nft_ruleset
from kapsis.network.gateway_layout import (
    BLOCKED_SETS,
    DNS_FRONT_UID,
    GATEWAY_UIDS,
    MARK_AGENT,
    MARK_OWNER_BASE,
    MARK_PROXY,
    MARK_RESOLVER,
    PROXY_PORT_BASE,
    PROXY_UID,
    RESOLVER_PORT,
    RESOLVER_UID,
    TABLE,
    UNPRIVILEGED_PORT_START,
)
from kapsis.network.observe import BlockedConnection, parse_blocked_set
from kapsis.network.policy import NON_PUBLIC_V4, NON_PUBLIC_V6, NetworkPolicy
from kapsis.network.proxy import proxy_ports

from .netgw import (
    NFT,
    REPRESENTATIVE,
    TCP_SEND,
    UPSTREAMS,
    NetNs,
    chain,
    make_policy,
    netns,
    nft_check,
)

ND = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert }"
ESTABLISHED = "ct state established,related accept"


def test_the_layout_the_rules_are_written_for():
    # The image's users (Containerfile.gateway) and the self-test's hard-coded port.
    assert (RESOLVER_UID, PROXY_UID, DNS_FRONT_UID) == (990, 991, 992)
    assert GATEWAY_UIDS == (990, 991, 992)
    assert RESOLVER_PORT == 54
    # A privileged port where the gateway pins the line: no uid without CAP_NET_BIND_SERVICE
    # may bind it, not even next to the resolver's own sockets (SO_REUSEADDR).
    assert UNPRIVILEGED_PORT_START == 1024
    assert RESOLVER_PORT < UNPRIVILEGED_PORT_START
    assert len({MARK_RESOLVER, MARK_PROXY, MARK_AGENT}) == 3
    assert max(MARK_RESOLVER, MARK_PROXY, MARK_AGENT) < MARK_OWNER_BASE


# ---------------------------------------------------------------------------------------------
# structure


def test_sets_of_the_representative_policy():
    ruleset = nft_ruleset(REPRESENTATIVE, UPSTREAMS)

    sets = [line.strip() for line in ruleset.splitlines() if line.startswith("  set ")]
    assert sets == [
        "set upstream_v4 { type ipv4_addr; elements = { 192.0.2.53 }; }",
        "set upstream_v6 { type ipv6_addr; elements = { 2001:db8::53 }; }",
        "set nonpublic_v4 { type ipv4_addr; flags interval; elements = { "
        + ", ".join(sorted(NON_PUBLIC_V4))
        + " }; }",
        # nft's elements in the renderer's order (sorted as text), every range once.
        "set nonpublic_v6 { type ipv6_addr; flags interval; elements = { "
        + ", ".join(sorted(NON_PUBLIC_V6))
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
    assert ruleset.startswith(f"table inet {TABLE} {{\n")


def test_name_sets_follow_the_port_groups():
    # dnsmasq files answers by domain: github.com and *.github.com share one set (and ports).
    assert name_sets(REPRESENTATIVE) == {
        "github.com": ("names0_v4", "names0_v6"),
        "pypi.org": ("names1_v4", "names1_v6"),
        "registry.example": ("names2_v4", "names2_v6"),
    }


def test_to_proxy_chain_of_the_representative_policy():
    """The agent's TCP to a resolved name goes to the proxy's port for that destination port;
    address rules and the gateway's own uids are left alone."""
    to_proxy = _to_proxy(nft_ruleset(REPRESENTATIVE, UPSTREAMS))

    names = "{v} daddr @names{i}_{s} {v} daddr != @nonpublic_{s} tcp dport {p} redirect to :{to}"
    assert to_proxy == [
        "type nat hook output priority -100; policy accept;",
        "meta skuid { 990, 991, 992 } return",
        "ip daddr @addresses0_v4 tcp dport { 80, 443 } return",
        "ip6 daddr @addresses0_v6 tcp dport { 80, 443 } return",
        "ip daddr @addresses1_v4 tcp dport 5432 return",
        "ip6 daddr @addresses1_v6 tcp dport 5432 return",
        "ip daddr @addresses2_v4 tcp dport 8443 return",
        "ip6 daddr @addresses2_v6 tcp dport 8443 return",
        *[
            names.format(v=v, i=index, s=s, p=port, to=to)
            for index, port, to in [
                (0, 22, 15100),
                (0, 80, 15101),
                (0, 443, 15102),
                (1, 80, 15101),
                (1, 443, 15102),
                (2, 8443, 15103),
            ]
            for v, s in (("ip", "v4"), ("ip6", "v6"))
        ],
    ]
    assert proxy_ports(REPRESENTATIVE) == {22: 15100, 80: 15101, 443: 15102, 8443: 15103}


def test_refuse_chain_counts_then_rejects():
    assert chain(nft_ruleset(REPRESENTATIVE, UPSTREAMS), "refuse") == [
        "meta nfproto ipv4 update @blocked4 { ip daddr . meta l4proto . th dport }",
        "meta nfproto ipv6 update @blocked6 { ip6 daddr . meta l4proto . th dport }",
        "reject with icmpx type admin-prohibited",
    ]


def test_output_chain_of_the_representative_policy():
    output = chain(nft_ruleset(REPRESENTATIVE, UPSTREAMS), "output")

    assert output == [
        "type filter hook output priority filter; policy drop;",
        'oif "lo" meta l4proto { tcp, udp } th dport 54 meta skuid != 992 jump refuse',
        'oif "lo" accept',
        "ip daddr 127.0.0.1 tcp dport { 15100, 15101, 15102, 15103 } ct status dnat accept",
        "ip6 daddr ::1 tcp dport { 15100, 15101, 15102, 15103 } ct status dnat accept",
        "ct mark 1 meta skuid != 990 drop",
        "ct mark 2 meta skuid != 991 drop",
        "ct mark 3 meta skuid { 990, 991, 992 } drop",
        ESTABLISHED,
        f"{ND} ip6 hoplimit 255 accept",
        "meta skuid 990 ip daddr @upstream_v4 meta l4proto { tcp, udp } th dport 53"
        " ct mark set 1 accept",
        "meta skuid 990 ip6 daddr @upstream_v6 meta l4proto { tcp, udp } th dport 53"
        " ct mark set 1 accept",
        "meta skuid 991 ip daddr != @nonpublic_v4 tcp dport { 22, 80, 443, 8443 }"
        " ct mark set 2 accept",
        "meta skuid 991 ip6 daddr != @nonpublic_v6 tcp dport { 22, 80, 443, 8443 }"
        " ct mark set 2 accept",
        "ip daddr @addresses0_v4 tcp dport { 80, 443 } ct mark set 3 accept",
        "ip6 daddr @addresses0_v6 tcp dport { 80, 443 } ct mark set 3 accept",
        "ip daddr @addresses1_v4 tcp dport 5432 ct mark set 3 accept",
        "ip6 daddr @addresses1_v6 tcp dport 5432 ct mark set 3 accept",
        "ip daddr @addresses2_v4 tcp dport 8443 ct mark set 3 accept",
        "ip6 daddr @addresses2_v6 tcp dport 8443 ct mark set 3 accept",
        "meta l4proto { tcp, udp } jump refuse",
        "counter",
    ]


def test_input_and_forward_chains_drop_by_default():
    ruleset = nft_ruleset(REPRESENTATIVE, UPSTREAMS)

    assert chain(ruleset, "input") == [
        "type filter hook input priority filter; policy drop;",
        'iif "lo" accept',
        ESTABLISHED,
        f"{ND} ip6 hoplimit 255 accept",
    ]
    assert chain(ruleset, "forward") == ["type filter hook forward priority filter; policy drop;"]


def test_extra_owners_get_a_mark_of_their_own_in_uid_order():
    """Kubernetes: the finishing step's uid may reach its ports anywhere, directly, and only its
    own sockets may send in its flows."""
    ruleset = nft_ruleset(REPRESENTATIVE, UPSTREAMS, owner_ports={2000: (443,), 1500: (22, 443)})
    output = chain(ruleset, "output")

    assert _to_proxy(ruleset)[1] == "meta skuid { 990, 991, 992, 1500, 2000 } return"
    drops = output[output.index("ct mark 1 meta skuid != 990 drop") : output.index(ESTABLISHED)]
    assert drops == [
        "ct mark 1 meta skuid != 990 drop",
        "ct mark 2 meta skuid != 991 drop",
        "ct mark 16 meta skuid != 1500 drop",
        "ct mark 17 meta skuid != 2000 drop",
        "ct mark 3 meta skuid { 990, 991, 992, 1500, 2000 } drop",
    ]
    owners = [line for line in output if re.match(r"meta skuid (1500|2000) ", line)]
    assert owners == [
        "meta skuid 1500 tcp dport { 22, 443 } ct mark set 16 accept",
        "meta skuid 2000 tcp dport 443 ct mark set 17 accept",
    ]
    # After the gateway's own rules, before the agent's address rules.
    assert output.index(owners[0]) > max(i for i, line in enumerate(output) if "skuid 991" in line)
    assert output.index(owners[-1]) < output.index(
        "ip daddr @addresses0_v4 tcp dport { 80, 443 } ct mark set 3 accept"
    )


def test_an_owner_without_ports_is_no_owner():
    assert nft_ruleset(REPRESENTATIVE, UPSTREAMS, owner_ports={1500: ()}) == nft_ruleset(
        REPRESENTATIVE, UPSTREAMS
    )


@pytest.mark.parametrize("uid", GATEWAY_UIDS)
def test_an_owner_may_not_take_a_gateway_uid(uid):
    """An owner with the proxy's uid would share its mark and its rules: refused outright."""
    with pytest.raises(ValueError, match=f"uid {uid} is one of the gateway's own"):
        nft_ruleset(REPRESENTATIVE, UPSTREAMS, owner_ports={uid: (443,)})


def _to_proxy(ruleset: str) -> list[str]:
    return chain(ruleset, "to_proxy")


INVARIANT_POLICIES = {
    "empty": make_policy(),
    "representative": REPRESENTATIVE,
    "v6-upstream": make_policy(hosts=("a.example",), upstreams=("2001:db8::53",)),
    "everything-by-address": make_policy(addresses=("0.0.0.0/0", "::/0")),
    "names-only": make_policy(hosts=("a.example:8443", "*.b.example")),
}
OWNERS = {"no-owner": None, "finisher": {1500: (22, 443)}}


@pytest.fixture(
    params=[(policy, owners) for policy in INVARIANT_POLICIES for owners in OWNERS],
    ids=lambda param: "-".join(param),
)
def rendered(request) -> tuple[NetworkPolicy, str, dict[int, tuple[int, ...]]]:
    policy_name, owners_name = request.param
    policy, owners = INVARIANT_POLICIES[policy_name], OWNERS[owners_name] or {}
    return policy, nft_ruleset(policy, policy.dns_servers, owners), owners


def test_invariant_the_frame(rendered):
    _, ruleset, _ = rendered
    output = chain(ruleset, "output")

    assert ruleset.startswith("table inet kapsis {\n")
    assert ruleset.endswith("}\n")
    assert output[0] == "type filter hook output priority filter; policy drop;"
    assert output[-2:] == ["meta l4proto { tcp, udp } jump refuse", "counter"]
    # ICMPv6 is only ever neighbour discovery, and only on-link (hop limit 255).
    icmp = [line for line in ruleset.splitlines() if "icmp" in line and "icmpx" not in line]
    assert icmp and all(ND in line and "ip6 hoplimit 255 accept" in line for line in icmp)


def test_invariant_owners_are_checked_before_the_connection_tracking_state(rendered):
    """A packet of a marked flow from another uid is dropped, whatever its state says: the
    drops come before the one rule that accepts by state, and only loopback comes earlier."""
    _, ruleset, _ = rendered
    output = chain(ruleset, "output")
    established = output.index(ESTABLISHED)

    drops = [i for i, line in enumerate(output) if line.startswith("ct mark ")]
    assert drops and max(drops) < established
    before = output[1:established]
    assert all(
        line.startswith("ct mark ")
        or line.startswith('oif "lo" ')
        or line.endswith(" ct status dnat accept")
        for line in before
    ), before
    assert [line for line in output if "ct state" in line] == [ESTABLISHED]


def test_invariant_every_new_flow_gets_an_owner_and_each_owner_its_drop(rendered):
    _, ruleset, owners = rendered
    output = chain(ruleset, "output")
    new_flows = output[output.index(ESTABLISHED) + 1 :]

    accepts = [line for line in new_flows if line.endswith(" accept") and ND not in line]
    assert accepts
    marks = {}
    for line in accepts:
        found = re.search(r" ct mark set (\d+) accept$", line)
        assert found, f"a new flow without an owner: {line}"
        uid = re.match(r"meta skuid (\d+) ", line)
        marks.setdefault(int(found[1]), set()).add(int(uid[1]) if uid else None)
    trusted = "{ " + ", ".join(map(str, (*GATEWAY_UIDS, *sorted(owners)))) + " }"
    for mark, uids in marks.items():
        if uids == {None}:  # the agent's: any uid but the gateway's and the owners'
            assert mark == MARK_AGENT
            assert f"ct mark {mark} meta skuid {trusted} drop" in output
        else:
            (uid,) = uids
            assert f"ct mark {mark} meta skuid != {uid} drop" in output
    expected = {MARK_RESOLVER, *(MARK_OWNER_BASE + i for i in range(len(owners)))}
    assert expected <= set(marks)


def test_invariant_only_the_resolver_sends_dns_out_and_only_to_the_upstreams(rendered):
    _, ruleset, _ = rendered
    output = chain(ruleset, "output")

    dns = [line for line in output if "dport 53 " in line]
    assert dns == [line for line in output if line.startswith(f"meta skuid {RESOLVER_UID} ")]
    assert len(dns) == 2 and all("daddr @upstream_v" in line for line in dns)


def test_invariant_names_reach_the_network_only_through_the_proxy(rendered):
    """The agent has no path of its own to a resolved name: its connections are redirected
    (never to a non-public address), and only the proxy's uid connects out on the names'
    ports, never to a non-public address."""
    policy, ruleset, _ = rendered
    output = chain(ruleset, "output")
    listen = proxy_ports(policy)

    assert not any("@names" in line for line in output)
    redirects = [line for line in _to_proxy(ruleset) if "redirect" in line]
    assert all("@names" in line and " daddr != @nonpublic_v" in line for line in redirects)
    assert {int(line.rsplit(":", 1)[1]) for line in redirects} == set(listen.values())
    proxy = [line for line in output if line.startswith(f"meta skuid {PROXY_UID} ")]
    if not listen:
        assert proxy == [] and not any("ct status dnat" in line for line in output)
        return
    ports = ", ".join(map(str, listen))
    ports = f"{{ {ports} }}" if len(listen) > 1 else ports
    assert proxy == [
        f"meta skuid {PROXY_UID} ip daddr != @nonpublic_v4 tcp dport {ports} ct mark set 2 accept",
        f"meta skuid {PROXY_UID} ip6 daddr != @nonpublic_v6 tcp dport {ports} ct mark set 2 accept",
    ]
    # Every other accept of a new flow to those ports is an address rule or an owner's.
    for line in output[output.index(ESTABLISHED) + 1 :]:
        if line.endswith(" accept") and ND not in line and "skuid" not in line:
            assert "@addresses" in line, line


def test_invariant_the_resolver_behind_the_front_is_closed_to_other_uids(rendered):
    _, ruleset, _ = rendered
    output = chain(ruleset, "output")

    # The DNS front's uid alone: the proxy asks through the front like the agent.
    guard = (
        f'oif "lo" meta l4proto {{ tcp, udp }} th dport {RESOLVER_PORT}'
        f" meta skuid != {DNS_FRONT_UID} jump refuse"
    )
    assert output[1] == guard
    assert output[2] == 'oif "lo" accept'


def test_redirected_connections_are_accepted_to_the_proxy_ports_only():
    output = chain(nft_ruleset(make_policy(hosts=("a.example:8443",)), UPSTREAMS), "output")

    dnat = [line for line in output if "ct status dnat" in line]
    assert dnat == [
        f"ip daddr 127.0.0.1 tcp dport {PROXY_PORT_BASE} ct status dnat accept",
        f"ip6 daddr ::1 tcp dport {PROXY_PORT_BASE} ct status dnat accept",
    ]


def test_an_empty_allowlist_has_no_name_address_or_proxy_rules():
    ruleset = nft_ruleset(make_policy(), UPSTREAMS)

    for absent in ("@names", "@addresses", "set names", "set addresses", "redirect", "tcp dport"):
        assert absent not in ruleset
    assert _to_proxy(ruleset) == [
        "type nat hook output priority -100; policy accept;",
        "meta skuid { 990, 991, 992 } return",
    ]


def test_upstream_sets_split_by_family_and_may_be_empty():
    ruleset = nft_ruleset(make_policy(), ("2001:db8::53", "2001:db8::54"))

    assert "  set upstream_v4 { type ipv4_addr; }" in ruleset.splitlines()
    assert (
        "  set upstream_v6 { type ipv6_addr; elements = { 2001:db8::53, 2001:db8::54 }; }"
        in ruleset.splitlines()
    )


def test_many_port_groups_get_one_set_pair_and_one_proxy_port_each():
    hosts = tuple(f"h{port}.example:{port}" for port in range(8000, 8030))
    policy = make_policy(hosts=hosts)

    ruleset = nft_ruleset(policy, UPSTREAMS)

    to_proxy = _to_proxy(ruleset)
    assert sum(1 for line in ruleset.splitlines() if line.startswith("  set names")) == 60
    for index, port in enumerate(range(8000, 8030)):
        assert (
            f"ip daddr @names{index}_v4 ip daddr != @nonpublic_v4 tcp dport {port}"
            f" redirect to :{PROXY_PORT_BASE + index}"
        ) in to_proxy
    assert set(name_sets(policy).values()) == {(f"names{i}_v4", f"names{i}_v6") for i in range(30)}


# ---------------------------------------------------------------------------------------------
# the kernel's syntax check

SYNTAX_POLICIES = {
    "empty": make_policy(),
    "representative": REPRESENTATIVE,
    "ipv6-addresses": make_policy(
        addresses=("2001:db8::/32", "[2001:db8:1::5]:22", "[fd00::/8]:443", "::1")
    ),
    "wildcard-and-exact": make_policy(hosts=("example.org", "*.example.org", "*.example.org:8080")),
    "many-port-groups": make_policy(
        hosts=tuple(f"h{p}.example:{p}" for p in range(1, 40)),
        addresses=tuple(f"198.51.100.{p}:{p}" for p in range(1, 40)),
    ),
    "v6-upstreams-only": make_policy(hosts=("a.example",), upstreams=("2001:db8::53",)),
    "no-upstreams": make_policy(hosts=("a.example",), upstreams=()),
    "categories": make_policy(
        hosts=("github.com", "github.com:22", "api.github.com", "pypi.org", "api.anthropic.com")
    ),
}


def test_nft_check_catches_a_broken_ruleset(tmp_path):
    """Control: the syntax check below really checks."""
    broken = nft_ruleset(REPRESENTATIVE, UPSTREAMS).replace("@names0_v4", "@no_such_set", 1)

    result = nft_check(broken, tmp_path)

    assert result.returncode != 0


@pytest.mark.parametrize("owners", [None, {1500: (22, 443), 1600: (443,)}], ids=["", "owners"])
@pytest.mark.parametrize("name", sorted(SYNTAX_POLICIES))
def test_nft_accepts_the_ruleset(tmp_path, name, owners):
    policy = SYNTAX_POLICIES[name]

    result = nft_check(nft_ruleset(policy, policy.dns_servers, owners), tmp_path)

    assert result.returncode == 0, result.stderr


# Regression: overlapping entries with the same ports once made nft reject the ruleset.
def test_nft_accepts_overlapping_address_entries(tmp_path):
    policy = make_policy(addresses=("10.0.0.0/8", "10.1.2.3", "2001:db8::/32", "2001:db8::1"))

    result = nft_check(nft_ruleset(policy, policy.dns_servers), tmp_path)

    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# behaviour: the ruleset in a real kernel
#
# Two namespaces joined by a veth pair: "gw" (the sandbox's, with the ruleset) at 192.0.2.1 and
# 10.0.0.1, "up" (the upstream) at 192.0.2.53 and 10.0.0.53, serving UDP 53 and TCP 443 and
# 8080. In gw, the proxy's port for 443 and the resolver's port are served by root.

UPSTREAM, PRIVATE_UPSTREAM = "192.0.2.53", "10.0.0.53"
AGENT_UID, OWNER_UID = 1000, 1500
BEHAVIOUR_POLICY = make_policy(hosts=("allowed.test",), upstreams=(UPSTREAM,))
PROXY_443 = proxy_ports(BEHAVIOUR_POLICY)[443]

UPSTREAM_SERVER = """
import json, socket, sys, threading
lock = threading.Lock()
def say(**fields):
    with lock:
        print(json.dumps(fields), flush=True)
def udp(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    return sock
def serve_udp(sock):
    while True:
        data, peer = sock.recvfrom(512)
        say(proto="udp", to=sock.getsockname()[0], port=53, data=data.decode(), peer=peer[1])
        sock.sendto(b"up:" + data, peer)
def serve_tcp(sock):
    while True:
        conn, peer = sock.accept()
        conn.settimeout(2)
        with conn:
            try:
                data = conn.recv(512)
            except OSError:
                continue
            address, port = sock.getsockname()
            say(proto="tcp", to=address, port=port, data=data.decode(), peer=peer[1])
            conn.sendall(b"up:" + data)
sockets = []
for address in sys.argv[1:]:
    sockets.append((serve_udp, udp(address)))
    for port in (443, 8080):
        tcp = socket.create_server((address, port))
        sockets.append((serve_tcp, tcp))
for serve, sock in sockets:
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
say(ready=True)
threading.Event().wait()
"""

# In gw, as root: what the proxy and the resolver would be on their loopback ports.
LOCAL_SERVER = """
import json, socket, struct, sys, threading
lock = threading.Lock()
def say(**fields):
    with lock:
        print(json.dumps(fields), flush=True)
def serve_proxy(sock):
    while True:
        conn, peer = sock.accept()
        conn.settimeout(2)
        with conn:
            original = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, = struct.unpack(">H", original[2:4])
            try:
                data = conn.recv(512)
            except OSError:
                continue
            say(proto="tcp", to="proxy", port=port, data=data.decode(),
                original=socket.inet_ntoa(original[4:8]))
            conn.sendall(b"proxy:" + data)
def serve_resolver(sock):
    while True:
        data, peer = sock.recvfrom(512)
        say(proto="udp", to="resolver", data=data.decode())
        sock.sendto(b"resolver:" + data, peer)
proxy = socket.create_server(("127.0.0.1", int(sys.argv[1])))
resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
resolver.bind(("127.0.0.1", int(sys.argv[2])))
threading.Thread(target=serve_proxy, args=(proxy,), daemon=True).start()
threading.Thread(target=serve_resolver, args=(resolver,), daemon=True).start()
say(ready=True)
threading.Event().wait()
"""

UDP_SEND = """
import json, socket, sys
address, port, source, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", source))
out = {"source": sock.getsockname()[1], "error": None, "reply": None}
try:
    sock.sendto(data.encode(), (address, port))
    sock.settimeout(1)
    out["reply"] = sock.recv(512).decode()
except OSError as error:
    out["error"] = error.errno or str(error)
print(json.dumps(out))
"""


class Pair:
    """The sandbox's namespace with a ruleset loaded, and the upstream's, both serving."""

    def __init__(self, gw: NetNs, up: NetNs, ruleset: str, folder: Path) -> None:
        self.gw, self.up = gw, up
        gw.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", up.name)
        for namespace, device, host in ((gw, "veth0", "1"), (up, "veth1", "53")):
            namespace.ip("addr", "add", f"192.0.2.{host}/24", "dev", device)
            namespace.ip("addr", "add", f"10.0.0.{host}/24", "dev", device)
            namespace.ip("link", "set", device, "up")
        (folder / "rules.nft").write_text(ruleset)
        self.nft("-f", str(folder / "rules.nft"))
        self._upstream = up.serve(UPSTREAM_SERVER, UPSTREAM, PRIVATE_UPSTREAM)
        self._local = gw.serve(LOCAL_SERVER, str(PROXY_443), str(RESOLVER_PORT))

    def nft(self, *args: str) -> str:
        return self.gw.run([str(NFT), *args])

    def udp(self, uid: int, address: str, port: int, data: str, source: int = 0) -> Any:
        result = self.gw.python(UDP_SEND, address, str(port), str(source), data, uid=uid)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def tcp(self, uid: int, address: str, port: int, data: str) -> Any:
        result = self.gw.python(TCP_SEND, address, str(port), data, uid=uid)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def resolved(self, address: str) -> None:
        """What the resolver does for allowed.test's answer: file it in its name set."""
        (name_set, _) = name_sets(BEHAVIOUR_POLICY)["allowed.test"]
        self.nft("add", "element", "inet", TABLE, name_set, f"{{ {address} }}")

    def blocked(self) -> list[BlockedConnection]:
        return parse_blocked_set(
            json.loads(self.nft("-j", "list", "set", "inet", TABLE, "blocked4"))
        )

    @staticmethod
    def _seen(seen: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
        time.sleep(0.2)  # the servers' output is read by threads
        return [item for item in seen if all(item.get(k) == v for k, v in match.items())]

    def upstream_got(self, **match: Any) -> list[str]:
        return [item["data"] for item in self._seen(self._upstream, **match)]

    def local_got(self, **match: Any) -> list[dict[str, Any]]:
        return self._seen(self._local, **match)


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[Callable[[str], Pair]]:
    with contextlib.ExitStack() as stack:

        def make(ruleset: str) -> Pair:
            gw = stack.enter_context(netns(NFT))
            up = stack.enter_context(netns(NFT))
            return Pair(gw, up, ruleset, tmp_path)

        yield make


def _changed(ruleset: str, rule: str, into: str = "") -> str:
    """The ruleset with one of its rules changed or gone (a control: what it is there for)."""
    assert f"    {rule}\n" in ruleset
    return ruleset.replace(f"    {rule}\n", f"    {into}\n" if into else "", 1)


RESOLVER_OWNS_ITS_FLOWS = f"ct mark {MARK_RESOLVER} meta skuid != {RESOLVER_UID} drop"


@pytest.mark.parametrize("rendered_as", ["rendered", "without-the-resolvers-owner-rule"])
def test_in_a_kernel_the_agent_cannot_send_on_the_resolvers_upstream_flow(make_pair, rendered_as):
    """The resolver-flow escape: UDP has no owner in connection tracking, so a packet from the
    port of the resolver's flow to the upstream was "established". The owner rule drops it; the
    control without that rule shows the packet would otherwise reach the upstream."""
    ruleset = nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,))
    if rendered_as != "rendered":
        ruleset = _changed(ruleset, RESOLVER_OWNS_ITS_FLOWS)
    pair = make_pair(ruleset)

    first = pair.udp(RESOLVER_UID, UPSTREAM, 53, "resolver-1")
    agent = pair.udp(AGENT_UID, UPSTREAM, 53, "agent", source=first["source"])
    again = pair.udp(RESOLVER_UID, UPSTREAM, 53, "resolver-2", source=first["source"])

    assert first["reply"] == "up:resolver-1"
    assert again["reply"] == "up:resolver-2"  # the flow lives on, for its owner
    if rendered_as == "rendered":
        assert agent["reply"] is None and agent["error"] == errno.EPERM
        assert pair.upstream_got(proto="udp") == ["resolver-1", "resolver-2"]
    else:
        assert agent["reply"] == "up:agent"
        assert pair.upstream_got(proto="udp") == ["resolver-1", "agent", "resolver-2"]


def test_in_a_kernel_a_new_flow_of_the_agent_to_the_upstream_is_refused_and_counted(make_pair):
    pair = make_pair(nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,)))

    agent = pair.udp(AGENT_UID, UPSTREAM, 53, "agent")
    proxy = pair.udp(PROXY_UID, UPSTREAM, 53, "proxy")  # no gateway uid but the resolver's

    assert agent["reply"] is None and proxy["reply"] is None
    assert pair.upstream_got() == []
    assert pair.blocked() == [BlockedConnection(UPSTREAM, "udp", 53, 2)]


def test_in_a_kernel_the_agents_tcp_to_a_resolved_name_goes_to_the_proxy(make_pair):
    pair = make_pair(nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,)))

    before = pair.tcp(AGENT_UID, UPSTREAM, 443, "before")  # not resolved: no path at all
    pair.resolved(UPSTREAM)
    agent = pair.tcp(AGENT_UID, UPSTREAM, 443, "agent")
    other_port = pair.tcp(AGENT_UID, UPSTREAM, 8080, "other-port")
    proxy = pair.tcp(PROXY_UID, UPSTREAM, 443, "proxy")
    # Had the resolver filed a non-public answer, it would still lead nowhere.
    pair.resolved(PRIVATE_UPSTREAM)
    private = pair.tcp(AGENT_UID, PRIVATE_UPSTREAM, 443, "private")

    assert before["error"] is not None and before["reply"] is None
    assert agent == {"error": None, "reply": "proxy:agent"}
    assert pair.local_got(to="proxy") == [
        {"proto": "tcp", "to": "proxy", "port": 443, "data": "agent", "original": UPSTREAM}
    ]
    assert other_port["error"] is not None  # 8080 is no port of the name's
    assert proxy == {"error": None, "reply": "up:proxy"}  # the proxy itself goes out directly
    assert private["error"] is not None and private["reply"] is None
    assert pair.upstream_got(proto="tcp") == ["proxy"]
    assert {(b.address, b.port) for b in pair.blocked()} == {
        (UPSTREAM, 443),
        (UPSTREAM, 8080),
        (PRIVATE_UPSTREAM, 443),
    }


PROXY_PUBLIC_ONLY = (
    f"meta skuid {PROXY_UID} ip daddr != @nonpublic_v4 tcp dport {{ 80, 443 }}"
    f" ct mark set {MARK_PROXY} accept"
)


@pytest.mark.parametrize("rendered_as", ["rendered", "proxy-rule-without-the-public-guard"])
def test_in_a_kernel_the_proxy_never_reaches_a_non_public_address(make_pair, rendered_as):
    ruleset = nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,))
    if rendered_as != "rendered":
        unguarded = PROXY_PUBLIC_ONLY.replace(" ip daddr != @nonpublic_v4", "")
        ruleset = _changed(ruleset, PROXY_PUBLIC_ONLY, unguarded)
    pair = make_pair(ruleset)

    proxy = pair.tcp(PROXY_UID, PRIVATE_UPSTREAM, 443, "proxy")

    if rendered_as == "rendered":
        assert proxy["reply"] is None and proxy["error"] is not None
        assert pair.upstream_got() == []
    else:
        assert proxy == {"error": None, "reply": "up:proxy"}


RESOLVER_GUARD = (
    f'oif "lo" meta l4proto {{ tcp, udp }} th dport {RESOLVER_PORT}'
    f" meta skuid != {DNS_FRONT_UID} jump refuse"
)
NOBODY = 65534


@pytest.mark.parametrize("rendered_as", ["rendered", "without-the-loopback-guard"])
def test_in_a_kernel_only_the_front_reaches_the_resolvers_port(make_pair, rendered_as):
    """The proxy's uid no more than the agent's or root's: the proxy asks through the front.
    The control without the guard shows the resolver's port is otherwise open to every uid."""
    ruleset = nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,))
    if rendered_as != "rendered":
        ruleset = _changed(ruleset, RESOLVER_GUARD)
    pair = make_pair(ruleset)
    uids = (AGENT_UID, NOBODY, 0, RESOLVER_UID, PROXY_UID, DNS_FRONT_UID)

    replies = {uid: pair.udp(uid, "127.0.0.1", RESOLVER_PORT, f"uid-{uid}") for uid in uids}

    if rendered_as == "rendered":
        assert {uid: reply["reply"] for uid, reply in replies.items()} == {
            **dict.fromkeys(uids, None),
            DNS_FRONT_UID: f"resolver:uid-{DNS_FRONT_UID}",
        }
        # Refused outright (rejected, not left to time out) and counted like any refusal.
        assert {replies[uid]["error"] for uid in uids if uid != DNS_FRONT_UID} == {errno.EPERM}
        assert pair.local_got(to="resolver") == [
            {"proto": "udp", "to": "resolver", "data": f"uid-{DNS_FRONT_UID}"}
        ]
        assert pair.blocked() == [BlockedConnection("127.0.0.1", "udp", RESOLVER_PORT, 5)]
    else:
        assert {uid: reply["reply"] for uid, reply in replies.items()} == {
            uid: f"resolver:uid-{uid}" for uid in uids
        }


def test_in_a_kernel_an_extra_owner_goes_out_directly_on_its_ports_only(make_pair):
    ruleset = nft_ruleset(BEHAVIOUR_POLICY, (UPSTREAM,), owner_ports={OWNER_UID: (443,)})
    pair = make_pair(ruleset)
    pair.resolved(UPSTREAM)

    owner = pair.tcp(OWNER_UID, UPSTREAM, 443, "owner")
    owner_other_port = pair.tcp(OWNER_UID, UPSTREAM, 8080, "owner-8080")
    agent = pair.tcp(AGENT_UID, UPSTREAM, 443, "agent")

    assert owner == {"error": None, "reply": "up:owner"}  # not redirected to the proxy
    assert owner_other_port["error"] is not None
    assert agent == {"error": None, "reply": "proxy:agent"}
    assert pair.upstream_got(proto="tcp") == ["owner"]
