"""What a test network must not shadow: the host's routes and the addresses the host needs.

The test internet (internet.py) and its podman networks add routes to the host. A route to an
address the host relies on sends the host's own traffic into a test namespace instead: on the
machines Kapsis is tested on, the package mirror and the registries' proxy live in a documentation
range, and routing that whole range into the namespace broke every image build ("No route to
host"). So before a test network adds a route, :func:`check` compares what it will route with
what the host has, and refuses, naming each collision, when the new route would take over:

* part of a route the host already has (a connected subnet, a VPN, another bridge), or one of the
  host's own addresses;
* an address the host needs: its resolvers, its gateways, the package sources that image builds
  fetch from (the apt sources and the Debian mirror Kapsis builds from, the npm registry, PyPI)
  and the proxies in front of them.

Default routes do not count, nor routes wider than a /16 (IPv4) or a /32 (IPv6), which VPNs
install in place of a default route (0.0.0.0/1, 192.0.0.0/3, 2000::/4): a test route is meant
to be more specific than those, and what matters behind them is the needed addresses above.
Devices of the test internet itself (``own_devices``: ``kinet-<pid>``) do not count either: a
crashed run's are removed before a new one starts, and a live one is refused as "another test
internet is running".

A name that does not resolve within :data:`RESOLVE_SECONDS` fails the check too: whether the
test network would shadow it cannot be told. The check looks at the host once, before the
routes are added; a VPN or DHCP change later in the session is not seen.

:func:`read_host_network` reads the host (``ip -j route``/``ip -j addr``, resolv.conf, the apt
sources, the environment) and resolves the names; :func:`collisions` is pure, for the unit tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kapsis.host.facts import host_dns_servers
from kapsis.host.image import debian_mirror, parse_deb822_sources, parse_one_line_sources
from kapsis.host.npm_fetch import DEFAULT_REGISTRY

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

APT_DIR = Path("/etc/apt")
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)
# Where the agent image builds fetch from, whatever the host's own npm or pip settings say (the
# build container does not inherit them); a host setting is checked as well.
NPM_REGISTRY = DEFAULT_REGISTRY
PYTHON_INDEXES = ("https://pypi.org/simple", "https://files.pythonhosted.org/")
REGISTRY_VARIABLES = ("npm_config_registry", "NPM_CONFIG_REGISTRY", "PIP_INDEX_URL")
RESOLVE_SECONDS = 10.0  # for all names together, looked up in parallel
WIDEST_ROUTE = {4: 16, 6: 32}  # prefix lengths: a wider route counts as a default route


class ShadowError(RuntimeError):
    """A test network would route an address the host needs into a test namespace."""


@dataclass(frozen=True)
class Route:
    network: IPNetwork
    device: str


@dataclass(frozen=True)
class HostNetwork:
    """What the host routes and needs, as :func:`read_host_network` found it."""

    routes: tuple[Route, ...] = ()  # unicast routes of every table, default routes excluded
    addresses: tuple[tuple[IPAddress, str], ...] = ()  # the host's own addresses, by device
    needed: tuple[tuple[IPAddress, str], ...] = ()  # (address, what needs it)


def collisions(
    served: Iterable[IPNetwork], host: HostNetwork, *, own_devices: str | None = None
) -> list[str]:
    """One line per way that routing ``served`` into a test namespace would shadow ``host``;
    routes and addresses on devices whose name starts with ``own_devices`` are left out."""

    def ours(device: str) -> bool:
        return own_devices is not None and device.startswith(own_devices)

    found: list[str] = []
    for network in served:
        for route in host.routes:
            if not ours(route.device) and _shadows(network, route.network):
                found.append(
                    f"{network} overlaps the host's route {route.network} dev {route.device}"
                )
        for address, device in host.addresses:
            if not ours(device) and address in network:
                found.append(f"{network} holds {address}, an address of the host ({device})")
        for address, what in host.needed:
            if address in network:
                found.append(f"{network} holds {address}, {what}")
    return found


def check(
    served: Sequence[IPNetwork], host: HostNetwork | None = None, *, own_devices: str | None = None
) -> None:
    """Raise :class:`ShadowError` naming every collision of ``served`` with ``host`` (read now
    when not given); return when there is none."""
    found = collisions(
        served, read_host_network() if host is None else host, own_devices=own_devices
    )
    if found:
        raise ShadowError(
            "the test network would shadow what this host needs: "
            + "; ".join(found)
            + ". Pick other addresses in tests/integration/internet.py (or change the host)."
        )


def _shadows(network: IPNetwork, route: IPNetwork) -> bool:
    """Would a route to ``network`` take over part of ``route`` (a default-like one aside)?"""
    if route.version != network.version or route.prefixlen < WIDEST_ROUTE[route.version]:
        return False
    return route.network_address in network or network.network_address in route


# --- reading the host --------------------------------------------------------------------------


def read_host_network() -> HostNetwork:
    routes, gateways = _routes()
    needed = [(gateway, f"a gateway of the host ({device})") for gateway, device in gateways]
    needed += [
        (ipaddress.ip_address(server), "a resolver of the host (resolv.conf)")
        for server in host_dns_servers()
    ]
    needed += _resolve_all(package_sources())
    return HostNetwork(tuple(routes), tuple(_local_addresses()), tuple(needed))


def package_sources() -> list[tuple[str, str]]:
    """(host name or address, what it is) of everything image builds fetch from."""
    urls: list[tuple[str, str]] = [(debian_mirror(), "the Debian mirror of the image builds")]
    list_files = [APT_DIR / "sources.list", *sorted(APT_DIR.glob("sources.list.d/*.list"))]
    for path in [*list_files, *sorted(APT_DIR.glob("sources.list.d/*.sources"))]:
        parse = parse_deb822_sources if path.suffix == ".sources" else parse_one_line_sources
        with contextlib.suppress(OSError):
            urls += [(uri, f"an apt source ({path})") for uri, _ in parse(path.read_text())]
    urls.append((NPM_REGISTRY, "the npm registry of the agent image builds"))
    urls += [
        (index, "the Python package index of the agent image builds") for index in PYTHON_INDEXES
    ]
    for name in (*REGISTRY_VARIABLES, *PROXY_VARIABLES):
        if os.environ.get(name):
            urls.append((os.environ[name], f"${name}"))
    urls += [(url, f"apt's proxy ({key})") for key, url in _apt_proxies()]
    hosts: list[tuple[str, str]] = []
    for url, what in urls:
        host = urlsplit(url if "//" in url else f"//{url}").hostname
        if host and (host, what) not in hosts:
            hosts.append((host, what))
    return hosts


def _routes() -> tuple[list[Route], list[tuple[IPAddress, str]]]:
    routes: list[Route] = []
    gateways: list[tuple[IPAddress, str]] = []
    for family in ("-4", "-6"):
        for entry in _ip_json(family, "route", "show", "table", "all"):
            device = str(entry.get("dev", ""))
            for hop in [entry, *entry.get("nexthops", [])]:
                if hop.get("gateway"):
                    gateways.append((ipaddress.ip_address(hop["gateway"]), device or "multipath"))
            if entry.get("type", "unicast") != "unicast" or entry.get("dst") == "default":
                continue
            with contextlib.suppress(ValueError):
                routes.append(Route(ipaddress.ip_network(entry["dst"], strict=False), device))
    return routes, gateways


def _local_addresses() -> list[tuple[IPAddress, str]]:
    found = []
    for link in _ip_json("addr", "show"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                found.append((ipaddress.ip_address(info["local"]), str(link["ifname"])))
    return found


def _apt_proxies() -> list[tuple[str, str]]:
    try:
        dump = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_apt_proxies(dump)


def parse_apt_proxies(dump: str) -> list[tuple[str, str]]:
    """(key, URL) of the proxies in ``apt-config dump``'s output: ``Acquire::http::Proxy "URL";``
    and per host ``Acquire::http::Proxy::HOST "URL";`` ("DIRECT" is no proxy)."""
    proxies = []
    for line in dump.splitlines():
        key, _, value = line.partition(" ")
        if key.lower().startswith("acquire::") and "::proxy" in key.lower():
            value = value.strip().rstrip(";").strip('"')
            if value and value.upper() != "DIRECT":
                proxies.append((key, value))
    return proxies


def _resolve_all(hosts: Sequence[tuple[str, str]]) -> list[tuple[IPAddress, str]]:
    """The addresses of every name, looked up in parallel. A name the resolver says does not
    exist has none; one it does not answer for within :data:`RESOLVE_SECONDS` is a
    :class:`ShadowError`, since nobody can tell what it would collide with."""

    def lookup(host: str) -> set[str]:
        try:
            return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except socket.gaierror as error:
            if error.errno == socket.EAI_AGAIN:  # the resolver did not answer: unknown
                raise
            return set()  # no such name (now): nothing can use an address of it

    names = sorted({host for host, _what in hosts})
    # Daemon threads, not a pool: a lookup stuck in the C library must not hold up the exit.
    results: dict[str, set[str] | BaseException] = {}

    def run(host: str) -> None:
        try:
            results[host] = lookup(host)
        except Exception as error:
            results[host] = error

    threads = [threading.Thread(target=run, args=(host,), daemon=True) for host in names]
    deadline = time.monotonic() + RESOLVE_SECONDS
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    unknown = [host for host in names if not isinstance(results.get(host), set)]
    if unknown:
        raise ShadowError(
            f"cannot tell whether the test network would shadow {', '.join(unknown)}: "
            f"no answer from the host's resolver within {RESOLVE_SECONDS:.0f} s"
        )
    needed: list[tuple[IPAddress, str]] = []
    for host, what in hosts:
        answer = results[host]
        assert isinstance(answer, set)
        for text in sorted(answer):
            with contextlib.suppress(ValueError):
                needed.append((ipaddress.ip_address(text.split("%")[0]), f"{what}: {host}"))
    return needed


def _ip_json(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["ip", "-j", *args], capture_output=True, text=True, timeout=10, check=False
    )
    if result.returncode != 0:
        raise ShadowError(f"cannot read the host's network (ip {' '.join(args)}): {result.stderr}")
    return list(json.loads(result.stdout or "[]"))
