"""Errors in ``network.allowlist`` and ``network.dns_servers``: one line, FILE:LINE: key.path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kapsis.config.loader import load_config
from kapsis.config.models import AllowlistSection, NetworkSection
from kapsis.errors import ConfigError, ExitCode


def _load_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(None, config)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.exit_code == ExitCode.USAGE == 2
    return message, config


def _loads(tmp_path: Path, text: str) -> NetworkSection:
    config = tmp_path / "good.yaml"
    config.write_text(text)
    return load_config(None, config).config.network


ADDRESS_HELP = "use an IP, a network (10.0.0.0/8), IP:port or [IPv6]:port"


# ---------------------------------------------------------------------------------------------
# hosts


@pytest.mark.parametrize("entry", ["203.0.113.7", "203.0.113.7:443"])
def test_an_ip_in_hosts_says_to_use_addresses(tmp_path, entry):
    message, config = _load_error(
        tmp_path,
        f"network:\n  allowlist:\n    hosts:\n      - github.com\n      - '{entry}'\n",
    )

    assert message == (
        f"{config}:5: network.allowlist.hosts[1]: '{entry}' is an address; "
        "list it under network.allowlist.addresses"
    )


@pytest.mark.parametrize("entry", ["github.com:0", "github.com:65536", "github.com:99999"])
def test_a_host_port_out_of_range(tmp_path, entry):
    message, config = _load_error(tmp_path, f"network:\n  allowlist:\n    hosts: ['{entry}']\n")

    assert message == (
        f"{config}:3: network.allowlist.hosts[0]: '{entry}': the port must be between 1 and 65535"
    )


def test_a_url_in_hosts_is_not_a_host_name(tmp_path):
    message, config = _load_error(
        tmp_path, "network:\n  allowlist:\n    hosts:\n      - https://github.com\n"
    )

    assert message.startswith(f"{config}:4: network.allowlist.hosts[0]: ")
    assert message.endswith("is not a host name; use name, *.domain or name:port")


def test_hosts_as_a_string_instead_of_a_list(tmp_path):
    message, config = _load_error(tmp_path, "network:\n  allowlist:\n    hosts: github.com\n")

    assert message.startswith(f"{config}:3: network.allowlist.hosts: ")
    assert "valid list" in message


@pytest.mark.parametrize(
    ("host", "stored"),
    [("*.GitHub.com:22", "*.github.com:22"), ("a-b.example:65535", "a-b.example:65535")],
)
def test_valid_hosts_are_stored_lower_case(tmp_path, host, stored):
    network = _loads(tmp_path, f"network:\n  allowlist:\n    hosts: ['{host}']\n")

    assert network.allowlist.hosts == [stored]


# ---------------------------------------------------------------------------------------------
# addresses


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.300",  # not an address
        "10.0.0.0/33",  # bad prefix
        "2001:db8::/129",  # bad IPv6 prefix
        "github.com",  # a name
        "2001:db8:1:2:3:4:5:6:443",  # IPv6 with a port but no brackets
        "[2001:db8::zz]:443",
    ],
)
def test_a_bad_address_is_one_line_with_the_forms_allowed(tmp_path, entry):
    message, config = _load_error(
        tmp_path, f"network:\n  allowlist:\n    addresses:\n      - '{entry}'\n"
    )

    assert message == (
        f"{config}:4: network.allowlist.addresses[0]: '{entry}' is not an address; {ADDRESS_HELP}"
    )


@pytest.mark.parametrize(
    "entry", ["10.0.0.1:0", "10.0.0.1:65536", "[2001:db8::1]:0", "[2001:db8::1]:http"]
)
def test_an_address_port_out_of_range(tmp_path, entry):
    message, config = _load_error(
        tmp_path, f"network:\n  allowlist:\n    addresses: [198.51.100.1, '{entry}']\n"
    )

    assert message == (
        f"{config}:3: network.allowlist.addresses[1]: '{entry}': "
        "the port must be a number between 1 and 65535"
    )


def test_garbage_after_the_ipv6_brackets_is_an_error(tmp_path):
    message, config = _load_error(
        tmp_path, "network:\n  allowlist:\n    addresses: ['[2001:db8::1]443']\n"
    )

    assert message.startswith(f"{config}:3: network.allowlist.addresses[0]: ")


@pytest.mark.parametrize(
    ("entry", "stored"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.7:22", "203.0.113.7/32:22"),
        (" 10.1.2.3/8 ", "10.0.0.0/8"),
        ("2001:DB8::1", "2001:db8::1/128"),
        ("[2001:db8::1]:8443", "[2001:db8::1/128]:8443"),
        ("[2001:db8::]", "2001:db8::/128"),
    ],
)
def test_valid_addresses_are_normalised(tmp_path, entry, stored):
    network = _loads(tmp_path, f"network:\n  allowlist:\n    addresses: ['{entry}']\n")

    assert network.allowlist.addresses == [stored]


# ---------------------------------------------------------------------------------------------
# categories, dns_servers


def test_an_unknown_category_lists_the_known_ones(tmp_path):
    message, config = _load_error(
        tmp_path,
        "network:\n  allowlist:\n    categories:\n      - git-hosts\n      - social-media\n",
    )

    assert message == (
        f"{config}:5: network.allowlist.categories[1]: 'social-media' is not a category; "
        "use one of ai-apis, git-hosts, package-registries"
    )


@pytest.mark.parametrize("entry", ["dns.google", "192.0.2.53:53", "192.0.2.300", "[2001:db8::1]"])
def test_a_bad_dns_server(tmp_path, entry):
    message, config = _load_error(
        tmp_path, f"network:\n  dns_servers:\n    - 192.0.2.53\n    - '{entry}'\n"
    )

    assert message.startswith(f"{config}:4: network.dns_servers[1]: ")
    assert f"'{entry}'" in message
    assert "IPv4 or IPv6 address" in message


def test_dns_servers_are_normalised(tmp_path):
    network = _loads(tmp_path, "network:\n  dns_servers: ['2001:DB8:0::53', 192.0.2.53]\n")

    assert network.dns_servers == ["2001:db8::53", "192.0.2.53"]


def test_an_unknown_key_in_the_allowlist_lists_the_allowed_keys(tmp_path):
    message, config = _load_error(tmp_path, "network:\n  allowlist:\n    domains: [x.org]\n")

    assert message == (
        f"{config}:3: network.allowlist.domains: unknown key 'domains'; "
        "allowed here: addresses, categories, hosts"
    )


def test_the_allowlist_model_validates_without_a_file():
    with pytest.raises(ValidationError, match=r"list it under network\.allowlist\.addresses"):
        AllowlistSection(hosts=["192.0.2.1"])
    with pytest.raises(ValidationError, match="is not a category"):
        AllowlistSection(categories=["nope"])
    assert AllowlistSection(categories=["git-hosts"]).categories == ["git-hosts"]
