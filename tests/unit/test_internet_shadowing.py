"""The test internet never shadows what the host needs (tests/integration/shadowing.py).

Before the test internet or its podman network adds a route, the host's routes, addresses,
resolvers, gateways and package sources are compared with what would be routed; a collision
stops the fixture with a message naming it, before the host is changed. Pure here: the host is
given, and no command that changes the host runs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration import internet as inet, shadowing
from tests.integration.shadowing import HostNetwork, Route, ShadowError, collisions

ip = ipaddress.ip_address
net = ipaddress.ip_network
SERVED = [net(address) for address in (inet.HOST_V4, inet.REMOTE_V4, inet.HOST_V6, inet.REMOTE_V6)]

# A host like the ones Kapsis is tested on: its own network in 192.0.2.0/24, a 10.x resolver,
# the package mirror and the registries' proxy at an address of 203.0.113.0/24.
HOST = HostNetwork(
    routes=(
        Route(net("192.0.2.0/24"), "eth0"),
        Route(net("fd00::/64"), "eth0"),
        Route(net("10.88.0.0/16"), "podman0"),
    ),
    addresses=((ip("192.0.2.2"), "eth0"), (ip("127.0.0.1"), "lo")),
    needed=(
        (ip("192.0.2.1"), "a gateway of the host (eth0)"),
        (ip("10.255.255.53"), "a resolver of the host (resolv.conf)"),
        (ip("203.0.113.80"), "the Debian mirror of the image builds: deb.debian.org"),
        (ip("203.0.113.80"), "the npm registry of the agent image builds: registry.npmjs.org"),
    ),
)


def with_(host: HostNetwork = HOST, **changes: Any) -> HostNetwork:
    fields = {"routes": host.routes, "addresses": host.addresses, "needed": host.needed}
    for name, extra in changes.items():
        fields[name] = (*fields[name], *extra)
    return HostNetwork(**fields)


def test_the_test_internet_collides_with_nothing_on_such_a_host() -> None:
    assert collisions(SERVED, HOST) == []
    shadowing.check(SERVED, HOST)  # returns


def test_the_old_range_would_have_taken_the_mirror() -> None:
    """The test internet used to route 203.0.113.0/24 into its namespace: the mirror with it."""
    [found, registry] = collisions([net("203.0.113.0/24")], HOST)
    assert found == (
        "203.0.113.0/24 holds 203.0.113.80, the Debian mirror of the image builds: deb.debian.org"
    )
    assert "registry.npmjs.org" in registry
    # A host route next to the mirror is fine; one onto it is not.
    assert collisions([net("203.0.113.2/32")], HOST) == []
    assert len(collisions([net("203.0.113.80/32")], HOST)) == 2


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"needed": [(ip(inet.REMOTE_V4), "the Debian mirror of the image builds: m.test")]},
         f"{inet.REMOTE_V4}/32 holds {inet.REMOTE_V4}, the Debian mirror of the image builds"),
        ({"needed": [(ip(inet.HOST_V4), "a resolver of the host (resolv.conf)")]},
         f"holds {inet.HOST_V4}, a resolver of the host"),
        ({"needed": [(ip(inet.REMOTE_V6), "$https_proxy: proxy.test")]},
         f"holds {inet.REMOTE_V6}, $https_proxy: proxy.test"),
        ({"routes": [Route(net("198.51.100.0/24"), "wg0")]},
         f"{inet.HOST_V4}/32 overlaps the host's route 198.51.100.0/24 dev wg0"),
        ({"routes": [Route(net("198.51.0.0/16"), "eth1")]},
         "overlaps the host's route 198.51.0.0/16 dev eth1"),
        ({"routes": [Route(net("198.51.100.2/32"), "tun0")]},
         f"{inet.REMOTE_V4}/32 overlaps the host's route 198.51.100.2/32 dev tun0"),
        ({"routes": [Route(net("2001:db8::/32"), "eth1")]},
         f"{inet.REMOTE_V6}/128 overlaps the host's route 2001:db8::/32 dev eth1"),
        ({"addresses": [(ip(inet.REMOTE_V4), "eth1")]},
         f"holds {inet.REMOTE_V4}, an address of the host (eth1)"),
    ],
)  # fmt: skip
def test_a_collision_is_named(change: dict[str, Any], named: str) -> None:
    found = collisions(SERVED, with_(**change))
    assert any(named in line for line in found), found  # a route may hold two served addresses
    assert collisions(SERVED, HOST) == []  # the change alone makes the collision
    with pytest.raises(ShadowError) as raised:
        shadowing.check(SERVED, with_(**change))
    message = str(raised.value)
    assert message.startswith("the test network would shadow what this host needs: ")
    assert named in message and "tests/integration/internet.py" in message


def test_default_like_routes_do_not_count() -> None:
    """Routes wider than a /16 or a /32, as VPNs install in place of the default route: a test
    route is meant to be more specific; what matters behind them is the needed addresses."""
    wide = ["0.0.0.0/1", "128.0.0.0/1", "192.0.0.0/3", "198.0.0.0/8", "::/1", "2000::/4"]
    host = with_(routes=[Route(net(route), "tun0") for route in wide])
    assert collisions(SERVED, host) == []


def test_the_test_internets_own_devices_count_only_when_not_ours() -> None:
    leftovers = with_(
        routes=[Route(net(f"{inet.REMOTE_V4}/32"), f"{inet.VETH_PREFIX}4242")],  # a crashed run's
        addresses=[(ip(inet.HOST_V4), f"{inet.VETH_PREFIX}4242")],
    )
    assert collisions(SERVED, leftovers, own_devices=inet.VETH_PREFIX) == []
    assert len(collisions(SERVED, leftovers)) == 2  # control: any other device is the host's


def test_podman_test_subnets_are_checked_too() -> None:
    subnets = [net("10.89.64.0/24"), net("fd00:6b:7073::/64")]
    assert collisions(subnets, HOST) == []
    [found] = collisions(subnets, with_(needed=[(ip("10.89.64.53"), "a resolver of the host")]))
    assert found == "10.89.64.0/24 holds 10.89.64.53, a resolver of the host"
    [found] = collisions(subnets, with_(routes=[Route(net("fd00:6b::/32"), "eth0")]))
    assert found == "fd00:6b:7073::/64 overlaps the host's route fd00:6b::/32 dev eth0"
    # A route narrower than the subnet is taken over as well.
    [found] = collisions(subnets, with_(routes=[Route(net("10.89.64.128/25"), "br1")]))
    assert found == "10.89.64.0/24 overlaps the host's route 10.89.64.128/25 dev br1"


# --- the fixture's gate: refuse before any change, proceed otherwise ---------------------------


class Proceeded(Exception):
    """Raised by the fake ``ip`` at the first command that would change the host."""


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, ...]]:
    """Every command start_internet (or podman_network) runs, through a fake that reads an empty
    host and stops the run (Proceeded) at the first command that would add something to it."""
    ran: list[tuple[str, ...]] = []

    def fake_run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        if "add" in command or "create" in command:
            raise Proceeded(" ".join(command))
        stdout = "[]" if "-j" in command else ""
        return subprocess.CompletedProcess(command, 0, stdout, "")

    monkeypatch.setattr(inet, "_run", fake_run)
    monkeypatch.setattr(inet, "STATE_DIR", tmp_path / "state")
    # The session's real test internet may be running in this very process: other names.
    monkeypatch.setattr(inet, "_ACTIVE", None)
    monkeypatch.setattr(inet, "NETNS_PREFIX", "kapsis-unit-")
    monkeypatch.setattr(inet, "VETH_PREFIX", "kunit-")
    return ran


def test_the_fixture_refuses_before_it_changes_the_host(
    commands: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = (ip(inet.REMOTE_V4), "the Debian mirror of the image builds: deb.debian.org")
    monkeypatch.setattr(shadowing, "read_host_network", lambda: with_(needed=[mirror]))
    refused = pytest.raises(ShadowError, match=re.escape(f"holds {inet.REMOTE_V4}, the Debian"))
    with refused, inet.start_internet():
        pytest.fail("the test internet started")
    assert commands, "the stale-run cleanup reads the host first"
    assert not [c for c in commands if "add" in c or "del" in c], commands


def test_the_fixture_proceeds_when_nothing_collides(
    commands: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shadowing, "read_host_network", lambda: HOST)
    with pytest.raises(Proceeded, match="ip netns add kapsis-unit-"), inet.start_internet():
        pytest.fail("the fake ip cannot start anything")


def test_serving_one_more_address_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inet, "_run", lambda *command, check=True: pytest.fail(str(command)))
    resolver = (ip("198.51.100.53"), "a resolver of the host (resolv.conf)")
    monkeypatch.setattr(shadowing, "read_host_network", lambda: with_(needed=[resolver]))
    running = inet.Internet(
        netns="kapsis-inet-1", host_if="kinet-1", v4=inet.REMOTE_V4, v6=inet.REMOTE_V6,
        host_v4=inet.HOST_V4, host_v6=inet.HOST_V6, dns_server=inet.REMOTE_V4,
        dns_server_v6=inet.REMOTE_V6, names={}, workdir=Path("/nonexistent"),
        dns_log=Path("/nonexistent"), http_log=Path("/nonexistent"),
        conn_log=Path("/nonexistent"), hosts_file=Path("/nonexistent"),
    )  # fmt: skip
    refused = pytest.raises(ShadowError, match=re.escape("198.51.100.53/32 holds 198.51.100.53"))
    with refused, running.serve_address("198.51.100.53"):
        pytest.fail("served")


def test_the_podman_test_network_refuses_before_it_is_created(
    commands: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = (ip("10.89.64.53"), "a resolver of the host (resolv.conf)")
    monkeypatch.setattr(shadowing, "read_host_network", lambda: with_(needed=[resolver]))
    refused = pytest.raises(ShadowError, match=re.escape("10.89.64.0/24 holds 10.89.64.53"))
    with refused, inet.podman_network("kapsis-unit-net"):
        pytest.fail("the network was made")
    assert [c for c in commands if "create" in c] == []
    monkeypatch.setattr(shadowing, "read_host_network", lambda: HOST)  # control
    with pytest.raises(Proceeded), inet.podman_network("kapsis-unit-net"):
        pytest.fail("the fake cannot make it")
    assert [c[:3] for c in commands if "create" in c] == [("podman", "network", "create")]


def test_a_routing_rule_that_takes_the_route_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """After adding its route the test internet asks the kernel where the address goes: a rule
    ahead of the main table (a VPN's) would send test traffic elsewhere."""
    answer = {"dev": "tailscale0"}

    def fake_run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        stdout = json.dumps([answer]) if command[:4] == ("ip", "-j", "route", "get") else ""
        return subprocess.CompletedProcess(command, 0, stdout, "")

    monkeypatch.setattr(inet, "_run", fake_run)
    taken = re.escape("routes 198.51.100.3 through tailscale0, not")
    with pytest.raises(RuntimeError, match=taken):
        inet._check_routed("198.51.100.3", "kinet-1")
    answer["dev"] = "kinet-1"  # control
    inet._check_routed("198.51.100.3", "kinet-1")


# --- reading the host ---------------------------------------------------------------------------

ROUTES_V4 = [
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
    {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel", "prefsrc": "192.0.2.2"},
    {"dst": "10.8.0.0/16", "nexthops": [{"gateway": "192.0.2.7", "dev": "eth0"}]},
    {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local"},
    {"type": "blackhole", "dst": "198.18.0.0/15"},
]
ROUTES_V6 = [{"dst": "default", "gateway": "fd00::1", "dev": "eth0"}]
ADDRESSES = [{"ifname": "eth0", "addr_info": [{"local": "192.0.2.2"}, {"local": "fd00::2"}]}]


def test_read_host_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_ip(*args: str) -> list[dict[str, Any]]:
        if args[0] == "addr":
            return ADDRESSES
        assert args[1:] == ("route", "show", "table", "all")  # policy routing's tables too
        return ROUTES_V4 if args[0] == "-4" else ROUTES_V6

    def fake_getaddrinfo(host: str, port: object) -> list[tuple[Any, ...]]:
        if host == "mirror.test":
            return [(socket.AF_INET, 0, 0, "", ("203.0.113.80", 0))]
        raise socket.gaierror("no such name")

    monkeypatch.setattr(shadowing, "_ip_json", fake_ip)
    monkeypatch.setattr(shadowing, "host_dns_servers", lambda: ["10.255.255.53"])
    monkeypatch.setattr(
        shadowing, "package_sources", lambda: [("mirror.test", "an apt source"), ("x.test", "")]
    )
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    host = shadowing.read_host_network()
    assert host.routes == (
        Route(net("192.0.2.0/24"), "eth0"),
        Route(net("10.8.0.0/16"), ""),
    )
    assert host.addresses == ((ip("192.0.2.2"), "eth0"), (ip("fd00::2"), "eth0"))
    assert set(host.needed) == {
        (ip("192.0.2.1"), "a gateway of the host (eth0)"),
        (ip("192.0.2.7"), "a gateway of the host (multipath)"),
        (ip("fd00::1"), "a gateway of the host (eth0)"),
        (ip("10.255.255.53"), "a resolver of the host (resolv.conf)"),
        (ip("203.0.113.80"), "an apt source: mirror.test"),
    }


def test_package_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb [trusted=yes] http://one.test/debian bookworm\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://two.test/debian\nSuites: bookworm\nComponents: main\n"
    )
    monkeypatch.setattr(shadowing, "APT_DIR", tmp_path)
    monkeypatch.setattr(
        shadowing, "_apt_proxies", lambda: [("Acquire::http::Proxy", "http://aptproxy.test:3142/")]
    )
    monkeypatch.setenv("KAPSIS_DEBIAN_MIRROR", "http://mirror.test:8080/debian")
    monkeypatch.setenv("npm_config_registry", "https://npm.test/")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pip.test/simple")
    monkeypatch.setenv("https_proxy", "proxy.test:3128")
    hosts = dict(shadowing.package_sources())
    for name in (
        "mirror.test",
        "one.test",
        "two.test",
        "npm.test",
        "pip.test",
        "proxy.test",
        "aptproxy.test",
        "registry.npmjs.org",
        "pypi.org",
        "files.pythonhosted.org",
    ):
        assert name in hosts, (name, hosts)  # the builds' own registries, whatever the host says
    assert hosts["proxy.test"] == "$https_proxy"


def test_parse_apt_proxies() -> None:
    dump = (
        'Acquire::http::Proxy "http://proxy.test:3142/";\n'
        'Acquire::https::Proxy "DIRECT";\n'
        'Acquire::http::Proxy::deb.example "http://other.test/";\n'
        'Acquire::Retries "3";\n'
    )
    assert shadowing.parse_apt_proxies(dump) == [
        ("Acquire::http::Proxy", "http://proxy.test:3142/"),
        ("Acquire::http::Proxy::deb.example", "http://other.test/"),
    ]


def test_a_name_the_resolver_does_not_answer_for_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whether the mirror would be shadowed cannot be told without its address: refuse."""
    release = threading.Event()

    def fake_getaddrinfo(host: str, port: object) -> list[tuple[Any, ...]]:
        if host == "slow.test":
            release.wait(5)
        if host == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, 0, 0, "", ("203.0.113.80", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(shadowing, "RESOLVE_SECONDS", 0.2)
    try:
        with pytest.raises(ShadowError, match=re.escape("would shadow slow.test: no answer")):
            shadowing._resolve_all([("slow.test", "the mirror"), ("fast.test", "the registry")])
    finally:
        release.set()
    found = shadowing._resolve_all([("gone.test", "a source"), ("fast.test", "the registry")])
    assert found == [(ip("203.0.113.80"), "the registry: fast.test")]  # no such name: no address
