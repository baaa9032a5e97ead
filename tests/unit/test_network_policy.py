"""The effective network policy: merging entries, the shipped categories, and the network plan."""

from __future__ import annotations

import ipaddress
import re
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError

from kapsis.config.models import AllowlistSection
from kapsis.errors import ConfigError, ExitCode
from kapsis.host.facts import HostFacts
from kapsis.network.policy import (
    DEFAULT_PORTS,
    NON_PUBLIC_V4,
    NON_PUBLIC_V6,
    AllowRule,
    NetworkPolicy,
    PolicyBuilder,
    category_names,
    load_category,
    parse_address,
    split_port,
)
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

NO_DNS = HostFacts(rootless=False, cgroup_version=1, apparmor=False, dns_servers=())
CATEGORIES_DIR = Path(str(resources.files("kapsis.network") / "categories"))


def _rules(policy: NetworkPolicy) -> dict[str, AllowRule]:
    return {rule.pattern: rule for rule in policy.rules}


def _config_file(tmp_path: Path) -> Path:
    """The --config file make_plan wrote (it names them run-config-N.yaml)."""
    (written,) = tmp_path.glob("run-config-*.yaml")
    return written


# ---------------------------------------------------------------------------------------------
# split_port / parse_address


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("github.com", ("github.com", None)),
        ("github.com:22", ("github.com", 22)),
        ("*.github.com:8443", ("*.github.com", 8443)),
        ("10.0.0.1", ("10.0.0.1", None)),
        ("10.0.0.0/8:5432", ("10.0.0.0/8", 5432)),
        ("2001:db8::1", ("2001:db8::1", None)),  # more than one colon: no port
        ("2001:db8::/32", ("2001:db8::/32", None)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[2001:db8::1]", ("2001:db8::1", None)),
        ("[2001:db8::/48]:22", ("2001:db8::/48", 22)),
    ],
)
def test_split_port(entry, expected):
    assert split_port(entry) == expected


@pytest.mark.parametrize(
    ("entry", "network", "port"),
    [
        ("10.1.2.3", "10.1.2.3/32", None),
        ("10.1.2.3:22", "10.1.2.3/32", 22),
        ("10.1.2.3/8", "10.0.0.0/8", None),  # host bits are dropped, not an error
        ("198.51.100.0/24:5432", "198.51.100.0/24", 5432),
        ("2001:db8::1", "2001:db8::1/128", None),
        ("[2001:db8::1]:8443", "2001:db8::1/128", 8443),
        ("[2001:db8::/32]", "2001:db8::/32", None),
    ],
)
def test_parse_address(entry, network, port):
    parsed, parsed_port = parse_address(entry)

    assert parsed == ipaddress.ip_network(network)
    assert parsed_port == port


@pytest.mark.parametrize("entry", ["github.com", "10.0.0.0/33", "10.0.0.300", "[zz::1]:443"])
def test_parse_address_rejects_what_is_not_an_address(entry):
    with pytest.raises(ValueError):
        parse_address(entry)


# ---------------------------------------------------------------------------------------------
# PolicyBuilder


def test_an_entry_without_a_port_gets_80_and_443():
    builder = PolicyBuilder("filtered")
    builder.add_host("example.org", "here")

    (rule,) = builder.build().rules

    assert DEFAULT_PORTS == (80, 443)
    assert rule == AllowRule(pattern="example.org", kind="name", ports=(80, 443), sources=("here",))


def test_an_entry_with_a_port_gets_only_that_port():
    builder = PolicyBuilder("filtered")
    builder.add_host("example.org:8443", "here")

    assert builder.build().rules[0].ports == (8443,)


def test_repeated_patterns_merge_ports_sorted_and_keep_sources_in_order_once():
    builder = PolicyBuilder("filtered")
    builder.add_host("github.com:22", "first")
    builder.add_host("GitHub.com", "second")  # case does not make another entry
    builder.add_host("github.com:9418", "first")  # a source already listed is not repeated
    builder.add_host("github.com:22", "third")

    (rule,) = builder.build().rules

    assert rule.pattern == "github.com"
    assert rule.ports == (22, 80, 443, 9418)
    assert rule.sources == ("first", "second", "third")


def test_kinds_name_wildcard_and_address_are_separate_rules():
    builder = PolicyBuilder("filtered")
    builder.add_host("example.org", "a")
    builder.add_host("*.example.org", "b")
    builder.add_address("203.0.113.7", "c")

    rules = _rules(builder.build())

    assert {p: r.kind for p, r in rules.items()} == {
        "example.org": "name",
        "*.example.org": "wildcard",
        "203.0.113.7/32": "address",
    }
    assert rules["*.example.org"].sources == ("b",)  # a wildcard does not merge with its domain


def test_addresses_are_normalised_so_spellings_of_one_network_merge():
    builder = PolicyBuilder("filtered")
    builder.add_address("203.0.113.7", "a")
    builder.add_address("203.0.113.7/32:8080", "b")
    builder.add_address("10.9.8.7/8", "c")
    builder.add_address("10.0.0.0/8:22", "d")

    rules = _rules(builder.build())

    assert set(rules) == {"203.0.113.7/32", "10.0.0.0/8"}
    assert rules["203.0.113.7/32"].ports == (80, 443, 8080)
    assert rules["203.0.113.7/32"].sources == ("a", "b")
    assert rules["10.0.0.0/8"].ports == (22, 80, 443)


def test_ipv6_address_entries_with_and_without_brackets():
    builder = PolicyBuilder("filtered")
    builder.add_address("[2001:db8::1]:8443", "a")
    builder.add_address("2001:DB8:0::1", "b")  # the same address, spelled out differently
    builder.add_address("[2001:db8:ffff::/48]", "c")

    rules = _rules(builder.build())

    assert set(rules) == {"2001:db8::1/128", "2001:db8:ffff::/48"}
    assert rules["2001:db8::1/128"].ports == (80, 443, 8443)
    assert rules["2001:db8::1/128"].sources == ("a", "b")
    assert rules["2001:db8:ffff::/48"].kind == "address"
    assert rules["2001:db8:ffff::/48"].ports == (80, 443)


def test_names_and_addresses_split_the_rules():
    builder = PolicyBuilder("filtered")
    builder.add_hosts(["b.example", "*.a.example"], "list")
    builder.add_address("192.0.2.0/24", "x")

    policy = builder.build(["192.0.2.53"])

    assert [r.pattern for r in policy.names()] == ["*.a.example", "b.example"]
    assert [r.pattern for r in policy.addresses()] == ["192.0.2.0/24"]
    assert policy.dns_servers == ("192.0.2.53",)
    assert policy.mode == "filtered"


def test_rules_are_sorted_by_pattern():
    builder = PolicyBuilder("filtered")
    for host in ["zeta.example", "alpha.example", "*.mid.example"]:
        builder.add_host(host, "s")

    assert [r.pattern for r in builder.build().rules] == [
        "*.mid.example",
        "alpha.example",
        "zeta.example",
    ]


def test_the_policy_is_immutable():
    policy = PolicyBuilder("filtered").build()

    with pytest.raises(ValidationError, match="frozen"):
        policy.mode = "open"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# blocked summary


def test_blocked_summary_of_none():
    assert PolicyBuilder("none").build().blocked_summary() == [
        "everything but loopback: the sandbox has no network interface"
    ]


def test_blocked_summary_of_open_says_open():
    (line,) = PolicyBuilder("open").build().blocked_summary()

    assert "OPEN" in line
    assert line.startswith("nothing")


def test_blocked_summary_of_filtered_names_every_kind_of_refusal():
    summary = PolicyBuilder("filtered").build().blocked_summary()

    assert len(summary) == 7
    text = "\n".join(summary)
    for expected in (
        "NXDOMAIN", "80 and 443", "loopback, private", "UDP", "ICMP", "resolver",
        "TLS server name or HTTP Host", "without SNI",
        "query types but A, AAAA, CNAME, HTTPS, SVCB",
        "longer than 40 characters", "more than 50 queries a second",
    ):  # fmt: skip
        assert expected in text


# ---------------------------------------------------------------------------------------------
# categories


def test_category_names_are_exactly_the_shipped_files():
    shipped = sorted(p.stem for p in CATEGORIES_DIR.glob("*.yaml"))

    assert category_names() == shipped
    assert shipped == ["ai-apis", "git-hosts", "package-registries"]


def test_the_config_reference_names_every_category():
    description = AllowlistSection.model_fields["categories"].description or ""

    for name in category_names():
        assert name in description


@pytest.mark.parametrize("name", category_names())
def test_each_category_loads_with_a_description_and_valid_unique_hosts(name):
    category = load_category(name)

    assert category.name == name
    assert isinstance(category.description, str)
    assert category.description.strip()
    assert category.hosts
    assert len(set(category.hosts)) == len(category.hosts)
    # Every entry passes the config's own host validation, unchanged (already lower case).
    section = AllowlistSection.model_validate({"hosts": list(category.hosts)})
    assert tuple(section.hosts) == category.hosts


def test_git_hosts_are_https_only_on_the_big_three():
    """Names are reached through the gateway's proxy, which needs a TLS server name or an HTTP
    Host: SSH to a name could never pass it, so the category does not pretend to allow it (and
    the agent holds no git credentials: the host pushes)."""
    hosts = load_category("git-hosts").hosts

    for name in ("github.com", "gitlab.com", "bitbucket.org"):
        assert name in hosts
        assert f"{name}:22" not in hosts


def test_an_unknown_category_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        load_category("social-media")

    message = str(caught.value)
    assert message.startswith("network.allowlist.categories: no category 'social-media'")
    assert message.endswith("known: ai-apis, git-hosts, package-registries")


def test_non_public_ranges_are_valid_networks():
    for network in (*NON_PUBLIC_V4, *NON_PUBLIC_V6):
        ipaddress.ip_network(network)  # strict: no host bits set
    covered = [ipaddress.ip_network(n) for n in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)]
    for address in ("127.0.0.1", "10.1.2.3", "172.31.0.1", "192.168.1.1", "169.254.169.254"):
        assert any(ipaddress.ip_address(address) in n for n in covered), address
    for address in ("::1", "fd00::1", "fe80::1", "::ffff:10.0.0.1"):
        assert any(ipaddress.ip_address(address) in n for n in covered), address
    for address in ("203.0.113.5", "8.8.8.8", "2001:4860:4860::8888"):
        assert not any(ipaddress.ip_address(address) in n for n in covered), address


@pytest.mark.parametrize(
    "address",
    [
        "168.63.129.16",  # Azure's host endpoint (WireServer)
        "192.0.0.8",  # IETF protocol assignments
        "198.18.0.1",  # benchmarking
        "198.19.255.254",
        "::10.0.0.1",  # IPv4-compatible
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
        "100::1",  # discard-only
        "2001::a00:1",  # Teredo
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "fec0::1",  # site-local
    ],
)
def test_non_public_ranges_cover_the_ways_back_into_ipv4_and_cloud_endpoints(address):
    covered = [ipaddress.ip_network(n) for n in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)]

    assert any(ipaddress.ip_address(address) in network for network in covered)


@pytest.mark.parametrize(
    "address", ["168.63.129.15", "168.63.129.17", "198.17.255.255", "198.20.0.1", "2001:db8::1"]
)
def test_non_public_ranges_stop_at_their_edges(address):
    covered = [ipaddress.ip_network(n) for n in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)]

    assert not any(ipaddress.ip_address(address) in network for network in covered)


# ---------------------------------------------------------------------------------------------
# plan_network


FULL_CONFIG = (
    "agent:\n"  # 1
    "  name: claude\n"  # 2
    "network:\n"  # 3
    "  dns_servers: [198.51.100.53, '2001:db8::53']\n"  # 4
    "  allowlist:\n"  # 5
    "    hosts:\n"  # 6
    "      - pypi.org\n"  # 7
    "      - api.anthropic.com:8443\n"  # 8
    "      - '*.Example.COM'\n"  # 9
    "    categories:\n"  # 10
    "      - ai-apis\n"  # 11
    "    addresses:\n"  # 12
    "      - 198.51.100.0/24:5432\n"  # 13
    "      - '[2001:db8::7]:22'\n"  # 14
)


def test_plan_network_merges_config_categories_addresses_profile_and_flags(make_plan, tmp_path):
    plan = make_plan(
        config=FULL_CONFIG,
        environ={"ANTHROPIC_API_KEY": "sk-unit"},
        allow=("pypi.org:8080", "203.0.113.9", "[2001:db8::7]:23", "NEW.example.org"),
    )

    config = _config_file(tmp_path)
    network = plan.network
    assert network.mode == "filtered"
    assert network.policy.dns_servers == ("198.51.100.53", "2001:db8::53")
    rules = _rules(network.policy)
    # A host from the config, then a flag: both sources, in that order; ports merged.
    assert rules["pypi.org"].sources == (f"{config}:7", "flag --allow")
    assert rules["pypi.org"].ports == (80, 443, 8080)
    # The config, the category and the agent profile all name api.anthropic.com.
    assert rules["api.anthropic.com"].sources == (
        f"{config}:8",
        f"category ai-apis ({config}:11)",
        "agent profile claude",
    )
    assert rules["api.anthropic.com"].ports == (80, 443, 8443)
    assert rules["api.openai.com"].sources == (f"category ai-apis ({config}:11)",)
    assert rules["*.example.com"].kind == "wildcard"
    assert rules["*.example.com"].sources == (f"{config}:9",)
    assert rules["198.51.100.0/24"] == AllowRule(
        pattern="198.51.100.0/24", kind="address", ports=(5432,), sources=(f"{config}:13",)
    )
    assert rules["2001:db8::7/128"].ports == (22, 23)
    assert rules["2001:db8::7/128"].sources == (f"{config}:14", "flag --allow")
    assert rules["203.0.113.9/32"].sources == ("flag --allow",)
    assert rules["new.example.org"].kind == "name"
    # Nothing else: the category's hosts, the config's and the flags'.
    category = set(load_category("ai-apis").hosts)
    expected = category | {"pypi.org", "*.example.com", "new.example.org"}
    expected |= {"198.51.100.0/24", "2001:db8::7/128", "203.0.113.9/32"}
    assert set(rules) == expected


def test_plan_network_gateway_uses_the_config_dns_servers_over_the_hosts(make_plan):
    plan = make_plan(config="network:\n  dns_servers: [198.51.100.53]\n")

    gateway = plan.network.gateway
    assert gateway is not None
    assert gateway.upstreams == ("198.51.100.53",)
    assert gateway.container_name == "kapsis-unit1-gateway"
    assert gateway.image == DEFAULT_GATEWAY_IMAGE


def test_plan_network_without_config_servers_uses_the_hosts(make_plan):
    host = HostFacts(False, 2, False, dns_servers=("192.0.2.1", "2001:db8::35"))

    plan = make_plan(host=host)

    assert plan.network.policy.dns_servers == ("192.0.2.1", "2001:db8::35")
    assert plan.network.gateway is not None
    assert plan.network.gateway.upstreams == ("192.0.2.1", "2001:db8::35")


def test_filtered_without_any_dns_server_names_the_mode_line_and_dns_servers(make_plan, tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_plan(host=NO_DNS, config="# mine\nnetwork:\n  mode: filtered\n")

    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.exit_code == ExitCode.USAGE
    assert message.startswith(f"{_config_file(tmp_path)}:3: network.mode 'filtered' needs")
    assert message.endswith("set network.dns_servers")


@pytest.mark.parametrize("mode", ["none", "open"])
def test_none_and_open_need_no_dns_server_and_have_no_gateway(make_plan, mode):
    plan = make_plan(host=NO_DNS, network_mode=mode, allow=("example.org",))

    assert plan.network.mode == mode
    assert plan.network.gateway is None
    assert plan.network.policy.mode == mode
    assert plan.network.policy.dns_servers == ()


@pytest.mark.parametrize("mode", ["none", "open"])
def test_none_and_open_still_reject_a_bad_allow_flag(make_plan, mode):
    with pytest.raises(ConfigError, match=r"^flag --allow: "):
        make_plan(network_mode=mode, allow=("not a host",))


def test_podman_network_is_carried_into_the_plan(make_plan):
    plan = make_plan(config="network:\n  podman_network: dualstack\n")

    assert plan.network.podman_network == "dualstack"


def test_kapsis_gateway_image_env_overrides_the_gateway_image(make_plan, monkeypatch):
    monkeypatch.setenv("KAPSIS_GATEWAY_IMAGE", "localhost/my-gateway:test")

    plan = make_plan()

    assert plan.network.gateway is not None
    assert plan.network.gateway.image == "localhost/my-gateway:test"


def test_an_empty_kapsis_gateway_image_means_the_default(make_plan, monkeypatch):
    monkeypatch.setenv("KAPSIS_GATEWAY_IMAGE", "")

    plan = make_plan()

    assert plan.network.gateway is not None
    assert plan.network.gateway.image == DEFAULT_GATEWAY_IMAGE


@pytest.mark.parametrize(
    ("flag", "pattern", "kind", "ports"),
    [
        ("example.org", "example.org", "name", (80, 443)),
        ("Example.org:8443", "example.org", "name", (8443,)),
        ("*.example.org", "*.example.org", "wildcard", (80, 443)),
        ("203.0.113.9", "203.0.113.9/32", "address", (80, 443)),
        ("203.0.113.9:22", "203.0.113.9/32", "address", (22,)),
        ("10.0.0.0/8", "10.0.0.0/8", "address", (80, 443)),
        ("10.0.0.0/8:5432", "10.0.0.0/8", "address", (5432,)),
        ("2001:db8::1", "2001:db8::1/128", "address", (80, 443)),
        ("[2001:db8::1]:443", "2001:db8::1/128", "address", (443,)),
        ("fe80::/10", "fe80::/10", "address", (80, 443)),
        ("cafe.example:8080", "cafe.example", "name", (8080,)),  # hex letters, still a name
    ],
)
def test_allow_flags_are_names_or_addresses(make_plan, flag, pattern, kind, ports):
    plan = make_plan(allow=(flag,))

    rule = _rules(plan.network.policy)[pattern]
    assert (rule.kind, rule.ports, rule.sources) == (kind, ports, ("flag --allow",))


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("bad host", "'bad host' is not a host name"),
        ("10.0.0.300", "'10.0.0.300' is not an address"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an address"),
        ("10.0.0.1:0", "the port must be a number between 1 and 65535"),
        ("[2001:db8::1]:99999", "the port must be a number between 1 and 65535"),
        ("example.org:70000", "the port must be between 1 and 65535"),
        ("https://example.org", "is not a host name"),
    ],
)
def test_a_bad_allow_flag_is_one_line_naming_the_flag(make_plan, flag, expected):
    with pytest.raises(ConfigError) as caught:
        make_plan(allow=(flag,))

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("flag --allow: ")
    assert expected in message
    assert "Value error" not in message


ALL_PROBES_CONFIG = "network:\n  allowlist:\n    addresses:\n      - 0.0.0.0/0\n"


def test_allowlisting_every_probe_address_is_a_one_line_config_error(make_plan, tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_plan(config=ALL_PROBES_CONFIG)

    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"^{re.escape(str(_config_file(tmp_path)))}:\d+: ", message), message
    assert "covers every address the gateway's self-test could check" in message


@pytest.mark.parametrize(
    "addresses", [("0.0.0.0/1", "128.0.0.0/1"), ("192.0.2.0/24", "198.51.0.0/16", "203.0.0.0/8")]
)
def test_covering_every_probe_address_piecewise_is_refused_too(make_plan, addresses):
    config = "network:\n  allowlist:\n    addresses: [" + ", ".join(addresses) + "]\n"

    with pytest.raises(ConfigError, match="self-test"):
        make_plan(config=config)


def test_allowing_everything_on_ipv6_leaves_the_ipv4_probe(make_plan):
    plan = make_plan(allow=("::/0",))

    assert plan.network.gateway is not None


def test_allowlisting_every_address_is_fine_without_a_gateway(make_plan):
    plan = make_plan(config=ALL_PROBES_CONFIG, network_mode="open")

    assert plan.network.gateway is None


def test_a_flag_covering_every_probe_address_is_blamed_on_the_flag(make_plan):
    with pytest.raises(ConfigError) as caught:
        make_plan(allow=("0.0.0.0/0",))

    message = str(caught.value)
    assert not message.startswith("default")
    assert "--allow" in message


def test_the_rule_blamed_for_covering_the_probes_is_one_that_holds_them(make_plan, tmp_path):
    # ::/0 is the widest rule but holds no IPv4 probe: the IPv4 rule of the config is to blame.
    with pytest.raises(ConfigError) as caught:
        make_plan(config=ALL_PROBES_CONFIG, allow=("::/0",))
    message = str(caught.value)
    assert "0.0.0.0/0 covers every address" in message and "::/0" not in message
    # Covered piecewise: each network that holds a probe is named, none said to cover all.
    config = "network:\n  allowlist:\n    addresses: [192.0.2.0/24, 198.51.0.0/16, 203.0.0.0/8]\n"
    with pytest.raises(ConfigError) as caught:
        make_plan(config=config)
    message = str(caught.value)
    assert "together cover every address" in message
    for network in ("192.0.2.0/24", "198.51.0.0/16", "203.0.0.0/8"):
        assert network in message
