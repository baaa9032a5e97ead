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

Default routes do not count (nor the two halves, /1, that VPNs install in their place): a test
route is meant to be more specific than a default route, and what matters behind one is the
needed addresses above. Devices of the test internet itself
(``kinet-<pid>``) do not count either: a crashed run's are removed before the new one starts, and
a live one is refused earlier as "another test internet is running".

:func:`read_host_network` reads the host (``ip -j route``/``ip -j addr``, resolv.conf, the apt
sources, the environment) and resolves the names; :func:`collisions` is pure, for the unit tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
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

TEST_DEVICE_PREFIX = "kinet-"  # the test internet's host-side veths (internet.VETH_PREFIX)
APT_DIR = Path("/etc/apt")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy")
RESOLVE_SECONDS = 5.0  # for all names together: a dead resolver must not hang the session


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


def collisions(served: Iterable[IPNetwork], host: HostNetwork) -> list[str]:
    """One line per way that routing ``served`` into a test namespace would shadow ``host``."""
    found: list[str] = []
    for network in served:
        for route in host.routes:
            if route.device.startswith(TEST_DEVICE_PREFIX):
                continue
            if route.network.version == network.version and _overlap(route.network, network):
                found.append(
                    f"{network} overlaps the host's route {route.network} dev {route.device}"
                )
        for address, device in host.addresses:
            if not device.startswith(TEST_DEVICE_PREFIX) and address in network:
                found.append(f"{network} holds {address}, an address of the host ({device})")
        for address, what in host.needed:
            if address in network:
                found.append(f"{network} holds {address}, {what}")
    return found


def check(served: Sequence[IPNetwork], host: HostNetwork | None = None) -> None:
    """Raise :class:`ShadowError` naming every collision of ``served`` with ``host`` (read now
    when not given); return when there is none."""
    found = collisions(served, read_host_network() if host is None else host)
    if found:
        raise ShadowError(
            "the test network would shadow what this host needs: "
            + "; ".join(found)
            + ". Pick other addresses in tests/integration/internet.py (or change the host)."
        )


def _overlap(route: IPNetwork, network: IPNetwork) -> bool:
    if route.prefixlen <= 1:  # 0.0.0.0/1 + 128.0.0.0/1: a VPN's default route in two halves
        return False
    return route.network_address in network or network.network_address in route


def addresses(*texts: str) -> list[IPNetwork]:
    """Host networks (/32, /128) of addresses given as text."""
    return [ipaddress.ip_network(text) for text in texts]


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
    registry = os.environ.get("npm_config_registry") or DEFAULT_REGISTRY  # noqa: SIM112
    urls.append((registry, "the npm registry of the agent image builds"))
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    urls.append((index, "the Python package index"))
    urls.append(("https://files.pythonhosted.org/", "the Python package index's files"))
    urls += [(os.environ[name], f"${name}") for name in PROXY_VARIABLES if os.environ.get(name)]
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
    proxies = []
    for line in dump.splitlines():  # Acquire::http::Proxy "http://proxy:3128/";
        key, _, value = line.partition(" ")
        if key.lower().endswith("::proxy") and key.lower().startswith("acquire::"):
            value = value.strip().rstrip(";").strip('"')
            if value and value.upper() != "DIRECT":
                proxies.append((key, value))
    return proxies


def _resolve_all(hosts: Sequence[tuple[str, str]]) -> list[tuple[IPAddress, str]]:
    """The addresses of every name, looked up in parallel within :data:`RESOLVE_SECONDS`; a name
    that does not resolve in time is left out (there is nothing it could collide with)."""

    def lookup(host: str) -> set[str]:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    futures = {pool.submit(lookup, host): (host, what) for host, what in hosts}
    done, _ = concurrent.futures.wait(futures, timeout=RESOLVE_SECONDS)
    pool.shutdown(wait=False, cancel_futures=True)
    needed: list[tuple[IPAddress, str]] = []
    for future in done:
        host, what = futures[future]
        if future.exception() is None:
            for text in sorted(future.result()):
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
