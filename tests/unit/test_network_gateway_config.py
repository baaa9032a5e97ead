"""All of a gateway's configuration together: the files, and how firewall, resolver and proxy
agree on which name reaches which port.

Each part has its own tests (test_network_firewall.py, test_network_resolver.py,
test_network_proxy.py); these check the parts against each other. As root, the rendered
resolver fills the rendered firewall's sets for real in a throwaway network namespace.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kapsis.network.firewall import nft_ruleset
from kapsis.network.gateway_config import PROBE_CANDIDATES, gateway_config_files, probe_address
from kapsis.network.gateway_layout import (
    BLOCKED_SETS,
    CONFIG_TARGET,
    DNS_FRONT_UID,
    DNS_LOG,
    DNS_REFUSED_COUNTS,
    DNS_REFUSED_LOG,
    LOG_TARGET,
    RESOLVER_PORT,
    TABLE,
    UNPRIVILEGED_PORT_START,
)
from kapsis.network.observe import parse_blocked_set
from kapsis.network.policy import NetworkPolicy
from kapsis.network.proxy import allowed_names, name_list_files, proxy_config
from kapsis.network.resolver import dns_front_config, dnsmasq_config

from .netgw import (
    AAAA,
    DNS_SOURCE,
    DNSMASQ,
    DNSMASQ_COMMON,
    NFT,
    NOERROR,
    REPRESENTATIVE,
    REPRESENTATIVE_HOSTS,
    UPSTREAMS,
    chain,
    make_policy,
    netns,
    upstream_dnsmasq,
)

# ---------------------------------------------------------------------------------------------
# the files


def test_the_files_of_a_policy_with_names():
    files = gateway_config_files(REPRESENTATIVE, UPSTREAMS)

    assert files == {
        "rules.nft": nft_ruleset(REPRESENTATIVE, UPSTREAMS),
        "dnsmasq.conf": dnsmasq_config(REPRESENTATIVE, UPSTREAMS, f"{LOG_TARGET}/{DNS_LOG}"),
        "dnsdist.conf": dns_front_config(
            REPRESENTATIVE,
            f"{LOG_TARGET}/{DNS_REFUSED_LOG}",
            f"{LOG_TARGET}/{DNS_REFUSED_COUNTS}",
        ),
        "probe-address": "192.0.2.1\n",
        "proxy-ports": "15100\n15101\n15102\n15103\n",
        "haproxy.cfg": proxy_config(REPRESENTATIVE, CONFIG_TARGET),
        **name_list_files(REPRESENTATIVE),
    }
    assert (LOG_TARGET, CONFIG_TARGET) == ("/var/log/kapsis", "/etc/kapsis-gateway")


def test_without_names_there_is_no_proxy():
    policy = make_policy(addresses=("192.0.2.0/24",))

    files = gateway_config_files(policy, UPSTREAMS)

    assert sorted(files) == [
        "dnsdist.conf",
        "dnsmasq.conf",
        "probe-address",
        "proxy-ports",
        "rules.nft",
    ]
    assert files["proxy-ports"] == ""
    assert files["probe-address"] == "198.51.100.1\n"  # 192.0.2.1 is allowlisted


def test_owner_ports_and_resolve_only_names_reach_their_renderers():
    files = gateway_config_files(
        REPRESENTATIVE,
        UPSTREAMS,
        owner_ports={993: (443,)},
        resolve_only=("git.corp.example",),
    )

    assert files["rules.nft"] == nft_ruleset(REPRESENTATIVE, UPSTREAMS, {993: (443,)})
    assert files["dnsmasq.conf"] == dnsmasq_config(
        REPRESENTATIVE, UPSTREAMS, f"{LOG_TARGET}/{DNS_LOG}", resolve_only=("git.corp.example",)
    )


def test_the_proxys_files_agree_with_each_other_and_with_the_firewall():
    files = gateway_config_files(REPRESENTATIVE, UPSTREAMS)
    listen = [int(port) for port in files["proxy-ports"].split()]

    # Every list the proxy reads is among the files (mounted at CONFIG_TARGET).
    read = re.findall(rf" -f {CONFIG_TARGET}/(\S+)$", files["haproxy.cfg"], re.MULTILINE)
    assert read and set(read) <= set(files)
    # The self-test checks the ports the proxy binds, which are those the firewall redirects to.
    bound = re.findall(r"bind 127\.0\.0\.1:(\d+) ", files["haproxy.cfg"])
    assert [int(port) for port in bound] == listen
    redirected = re.findall(r"redirect to :(\d+)$", files["rules.nft"], re.MULTILINE)
    assert {int(port) for port in redirected} == set(listen)
    dnat = [line for line in chain(files["rules.nft"], "output") if "ct status dnat" in line]
    assert all("{ " + ", ".join(map(str, listen)) + " }" in line for line in dnat)


# ---------------------------------------------------------------------------------------------
# the self-test's probe address


def _policy_with_addresses(*addresses: str) -> NetworkPolicy:
    return make_policy(hosts=("192-0-2-1.example",), addresses=addresses)  # names do not count


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


# ---------------------------------------------------------------------------------------------
# which ports a name reaches: dnsmasq files its answers in a set (modelled here, checked for
# real below), the firewall sends the set's addresses to the proxy on some ports, and the proxy
# lets the connection through if the name it carries is listed for the port


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


def _redirected_ports(ruleset: str, name_set: str) -> set[int]:
    """The TCP ports on which the agent's connections to ``name_set`` go to the proxy."""
    ports = set()
    for line in chain(ruleset, "to_proxy"):
        if line.startswith(f"ip daddr @{name_set} ") and " redirect to :" in line:
            ports.add(int(re.search(r" tcp dport (\d+) ", line)[1]))  # type: ignore[index]
    return ports


def _proxy_allows(policy: NetworkPolicy, name: str, port: int) -> bool:
    """HAProxy's two ACLs: ``-m str`` against the exact names, ``-m end`` against the suffixes."""
    exact, suffixes = allowed_names(policy, port)
    return name in exact or any(name.endswith(suffix) for suffix in suffixes)


def _policy_ports(policy: NetworkPolicy, name: str) -> set[int]:
    """What the policy promises for ``name``: the ports of every rule that matches it."""
    ports: set[int] = set()
    for rule in policy.names():
        domain = rule.pattern.removeprefix("*.")
        matches = name.endswith(f".{domain}") if rule.kind == "wildcard" else name == domain
        if matches:
            ports.update(rule.ports)
    return ports


def _reachable_ports(policy: NetworkPolicy, name: str) -> set[int]:
    """The ports on which a connection carrying ``name`` gets through the gateway."""
    config = dnsmasq_config(policy, UPSTREAMS, "/x")
    name_set = _nftset_for(config, name)
    if name_set is None:
        return set()
    ruleset = nft_ruleset(policy, UPSTREAMS)
    return {p for p in _redirected_ports(ruleset, name_set) if _proxy_allows(policy, name, p)}


@pytest.mark.parametrize(
    ("hosts", "names"),
    [
        (("exact.example",), ["exact.example"]),
        (("*.wild.example:8080",), ["a.wild.example", "b.a.wild.example"]),
        (("both.example:22", "*.both.example"), ["both.example", "sub.both.example"]),
        (("a.example:8443", "b.a.example"), ["a.example", "b.a.example"]),
        (
            ("*.wild.example:8080", "api.wild.example:9090"),
            ["api.wild.example", "x.api.wild.example"],
        ),
        (REPRESENTATIVE_HOSTS, ["github.com", "api.github.com", "pypi.org", "registry.example"]),
    ],
)
def test_every_allowed_name_reaches_exactly_its_ports(hosts, names):
    policy = make_policy(hosts=hosts)

    for name in names:
        assert _reachable_ports(policy, name) == _policy_ports(policy, name), name


def test_an_exact_name_and_its_wildcard_no_longer_lend_each_other_ports():
    """The firewall files both.example and its subdomains in one set (redirected on 22, 80 and
    443), but the proxy holds each name to its own ports."""
    policy = make_policy(hosts=("both.example:22", "*.both.example"))
    config = dnsmasq_config(policy, UPSTREAMS, "/x")
    ruleset = nft_ruleset(policy, UPSTREAMS)

    for name in ("both.example", "sub.both.example"):
        assert _redirected_ports(ruleset, _nftset_for(config, name) or "") == {22, 80, 443}
    assert _reachable_ports(policy, "both.example") == {22}
    assert _reachable_ports(policy, "sub.both.example") == {80, 443}


@pytest.mark.parametrize("name", ["unlisted.example", "wild.example", "x.exact.example"])
def test_an_unlisted_name_reaches_no_port(name):
    policy = make_policy(hosts=("exact.example", "*.wild.example"))

    assert _reachable_ports(policy, name) == set()


# ---------------------------------------------------------------------------------------------
# dnsmasq + nftables for real, as root, in a throwaway network namespace

QUERY_AS_FRONT = f"""
{DNS_SOURCE}
import json, sys, time
port = int(sys.argv[2])
deadline = time.monotonic() + 5
while True:  # the resolver is starting
    try:
        dns_query(port, "kapsis-selftest.invalid", timeout=0.2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print(json.dumps([dns_query(port, name, qtype) for name, qtype in json.loads(sys.argv[1])]))
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
NETNS_POLICY = make_policy(hosts=NETNS_HOSTS, upstreams=("127.0.0.1#5300",))


@pytest.fixture(scope="module")
def in_netns(tmp_path_factory) -> dict[str, Any]:
    """Answers, filled name sets and the table listing after real queries in a namespace."""
    folder = tmp_path_factory.mktemp("netns")
    policy = NETNS_POLICY
    (folder / "rules.nft").write_text(nft_ruleset(policy, ("127.0.0.1",)))
    config = dnsmasq_config(policy, policy.dns_servers, str(folder / "dns.log")).splitlines()
    config = [line for line in config if not line.startswith(("user=", "group="))]
    (folder / "resolver.conf").write_text("\n".join(config) + "\n")
    records = [*NETNS_RECORDS.items(), *NETNS_RECORDS6.items()]
    with netns(NFT, DNSMASQ) as namespace:
        namespace.run([str(NFT), "-f", str(folder / "rules.nft")])
        namespace.start(
            upstream_dnsmasq(
                5300,
                folder / "upstream.log",
                [f"--address=/{name}/{address}" for name, address in records],
            )
        )
        namespace.start([*DNSMASQ_COMMON, f"--conf-file={folder / 'resolver.conf'}"])
        queries = [(name, 1) for name in NETNS_RECORDS]
        queries += [(name, AAAA) for name in NETNS_RECORDS6]
        # As the DNS front: the firewall lets no other uid reach the resolver's port.
        result = namespace.python(
            QUERY_AS_FRONT, json.dumps(queries), str(RESOLVER_PORT), uid=DNS_FRONT_UID
        )
        assert result.returncode == 0, result.stderr
        answers = dict(zip(queries, json.loads(result.stdout), strict=True))
        namespace.run([str(NFT), "add", "element", "inet", TABLE, "blocked4",
                       "{ 192.0.2.1 . tcp . 9 }"])  # fmt: skip
        namespace.run([str(NFT), "add", "element", "inet", TABLE, "blocked6",
                       "{ 2001:db8::99 . udp . 53 }"])  # fmt: skip
        table = json.loads(namespace.run([str(NFT), "-j", "list", "table", "inet", TABLE]))
    elements: dict[str, set[str]] = {}
    for item in table["nftables"]:
        found = item.get("set")
        if found and found["name"].startswith("names"):
            elements[found["name"]] = {str(e) for e in found.get("elem", [])}
    return {"answers": answers, "sets": elements, "table": table}


def _sets_holding(in_netns: dict[str, Any], address: str) -> list[str]:
    return sorted(name for name, members in in_netns["sets"].items() if address in members)


def test_in_netns_the_ruleset_loads_and_listed_names_resolve(in_netns):
    assert in_netns["answers"] == {
        **{(name, 1): [NOERROR, [address]] for name, address in NETNS_RECORDS.items()},
        **{(name, AAAA): [NOERROR, [address]] for name, address in NETNS_RECORDS6.items()},
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


@pytest.mark.parametrize("name", list(NETNS_RECORDS))
def test_in_netns_an_answer_is_redirected_to_the_proxy_on_its_ports(in_netns, name):
    ruleset = nft_ruleset(NETNS_POLICY, ("127.0.0.1",))
    (filled,) = _sets_holding(in_netns, NETNS_RECORDS[name])

    assert _redirected_ports(ruleset, filled) >= _policy_ports(NETNS_POLICY, name)


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


# ---------------------------------------------------------------------------------------------
# the namespace's privileged ports, on both backends


def test_both_backends_keep_the_resolvers_port_privileged_in_the_gateways_namespace(make_plan):
    """The resolver's port is below ip_unprivileged_port_start only if the namespace says so:
    podman's gateway (whose namespace the agent joins) and the Kubernetes Pod pin it at 1024
    (containerd 2 would lower it to 0, and any uid could share the port)."""
    from kapsis.backends.podman_gateway import gateway_run_args
    from kapsis.k8s.render import render_request
    from kapsis.k8s.resource import AgentRequestSpec
    from kapsis.k8s.settings import OperatorSettings

    setting = f"net.ipv4.ip_unprivileged_port_start={UNPRIVILEGED_PORT_START}"
    assert RESOLVER_PORT < UNPRIVILEGED_PORT_START == 1024

    args = gateway_run_args(make_plan(), uid_base=100000)
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--sysctl"] == [setting]
    assert args.index("--sysctl") < args.index("--cap-drop")  # a run option, before the image

    def pod(mode: str) -> dict[str, Any]:
        spec = AgentRequestSpec.model_validate(
            {
                "agent": {"profile": "shell"},
                "task": {"inline": "add a README"},
                "workspace": {
                    "git": {"url": "https://git.example.com/t/r.git", "credentialsSecret": "c"}
                },
                "network": {"mode": mode, "allowlist": {"hosts": ["pypi.org"]}},
            }
        )
        settings = OperatorSettings(dns_servers=("10.96.0.10",))
        return render_request("r", "team", "0000-1111", spec, settings).pod["spec"]

    for mode in ("filtered", "none"):  # every Pod with a gateway
        assert pod(mode)["securityContext"]["sysctls"] == [
            {"name": "net.ipv4.ip_unprivileged_port_start", "value": "1024"}
        ]
    assert "sysctls" not in pod("open")["securityContext"]
