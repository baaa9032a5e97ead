"""Self-test of the fake internet (tests/integration/internet.py), from the host and from rootful
podman containers: DNS (UDP and TCP, v4 and v6), HTTP, the banner ports, UDP echo, ICMP, the logs,
teardown and the removal of a crashed run's leftovers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import internet as inet, shadowing
from .internet import Internet

pytestmark = pytest.mark.integration


def _netns_exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


# Runs first, before the session fixture starts its own instance (only one can run at a time).
def test_teardown_after_a_failure_removes_everything() -> None:
    reason = inet.skip_reason()
    if reason:
        pytest.skip(reason)
    forwarding = Path("/proc/sys/net/ipv6/conf/all/forwarding")
    before = forwarding.read_text()
    with pytest.raises(RuntimeError, match="test failed"), inet.start_internet() as running:
        netns, host_if, workdir = running.netns, running.host_if, running.workdir
        assert _netns_exists(netns)
        assert forwarding.read_text().strip() == "1"
        print(f"\nsetup: {running.setup_seconds * 1000:.0f} ms")
        started = time.monotonic()
        raise RuntimeError("test failed")
    print(f"teardown: {(time.monotonic() - started) * 1000:.0f} ms")
    assert not _netns_exists(netns)
    assert not _link_exists(host_if)
    assert not workdir.exists()
    assert forwarding.read_text() == before
    # No traffic here: with the veth gone the host's default route would carry it out of the host.
    route = subprocess.run(["ip", "-j", "route", "get", inet.REMOTE_V4], capture_output=True)
    assert all(entry.get("dev") != host_if for entry in json.loads(route.stdout or b"[]"))


def test_stale_namespace_and_veth_are_removed() -> None:
    reason = inet.skip_reason()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs, as after a crashed pytest
    netns, veth = f"{inet.NETNS_PREFIX}{dead.pid}", f"{inet.VETH_PREFIX}{dead.pid}"
    workdir = Path(tempfile.mkdtemp(prefix="kapsis-inet-"))
    state_file = inet.STATE_DIR / f"{netns}.json"
    ip_forward = Path("/proc/sys/net/ipv4/ip_forward")
    before = ip_forward.read_text().strip()
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "x", "netns", netns],
            check=True,
        )
        # The sysctl "restored" is its current value, so the host does not change.
        state = {"sysctls": {"net.ipv4.ip_forward": before}, "workdir": str(workdir)}
        inet.STATE_DIR.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))
        removed = inet.cleanup_stale()
        assert netns in removed  # its veth goes with it
        assert not _netns_exists(netns)
        assert not _link_exists(veth)
        assert not workdir.exists()
        assert not state_file.exists()
        assert ip_forward.read_text().strip() == before
    finally:
        state_file.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


def test_fixture_shape(internet: Internet) -> None:
    assert internet.netns == f"kapsis-inet-{os.getpid()}"
    assert (internet.v4, internet.v6) == ("198.51.100.2", "2001:db8:6b73::2")
    assert internet.dns_server == "198.51.100.2"
    assert internet.names["allowed.test"] == ("198.51.100.2", "2001:db8:6b73::2")
    assert internet.url("/x", v6=True) == "http://[2001:db8:6b73::2]:80/x"
    assert internet.exec("ip", "-br", "addr").stdout.count("198.51.100.2/32") == 1
    print(f"\nsession internet setup: {internet.setup_seconds * 1000:.0f} ms")


def _route_device(address: str) -> str:
    """The device the host sends ``address``'s packets to ("" when it has no route at all)."""
    result = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True)
    return str(json.loads(result.stdout or b"[{}]")[0].get("dev", ""))


def test_only_the_served_addresses_are_routed_into_the_netns(internet: Internet) -> None:
    """Host routes, not ranges: the address next door, and every address the host needs (its
    resolvers, gateways, package mirror and registries), keep the host's own routes."""
    for served in (inet.REMOTE_V4, inet.REMOTE_V6):
        assert _route_device(served) == internet.host_if
    for neighbour in ("198.51.100.3", "198.51.100.80", "198.51.100.254", "2001:db8:6b73::3"):
        assert _route_device(neighbour) != internet.host_if, neighbour
    needed = shadowing.read_host_network().needed
    assert needed, "a host always needs something: at least its resolvers and the mirror"
    for address, what in needed:
        if not address.is_link_local:  # a link-local gateway is its device's alone
            assert _route_device(str(address)) != internet.host_if, what
    with internet.serve_address("198.51.100.3"):
        assert _route_device("198.51.100.3") == internet.host_if
        assert inet.ping("198.51.100.3")
    assert _route_device("198.51.100.3") != internet.host_if


@pytest.mark.parametrize("server", ["198.51.100.2", "2001:db8:6b73::2"])
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_from_the_host(internet: Internet, server: str, tcp: bool) -> None:
    internet.reset_logs()
    assert inet.resolve("allowed.test", server, "A", tcp=tcp) == (0, ["198.51.100.2"])
    assert inet.resolve("allowed.test", server, "AAAA", tcp=tcp) == (0, ["2001:db8:6b73::2"])
    assert inet.resolve("other.test", server, "A", tcp=tcp) == (0, ["198.51.100.2"])
    assert inet.resolve("sub.allowed.test", server, "A", tcp=tcp) == (0, ["198.51.100.2"])
    assert inet.resolve("sub.allowed.test", server, "AAAA", tcp=tcp) == (0, [])  # NODATA
    assert inet.resolve("rebind.test", server, "A", tcp=tcp) == (0, ["10.0.0.1"])
    assert inet.resolve("loop.test", server, "A", tcp=tcp) == (0, ["127.0.0.1"])
    assert inet.resolve("meta.test", server, "A", tcp=tcp) == (0, ["169.254.169.254"])
    assert inet.resolve("unknown.test", server, "A", tcp=tcp) == (3, [])  # NXDOMAIN
    assert inet.resolve("x.allowed.test", server, "A", tcp=tcp) == (3, [])  # exact names only
    queries = internet.dns_queries()
    client = internet.host_v6 if ":" in server else internet.host_v4
    assert queries[0] == inet.DnsQuery("A", "allowed.test", client)
    assert inet.DnsQuery("A", "unknown.test", client) in queries
    assert len(queries) == 10


def test_set_names_extends_the_table(internet: Internet) -> None:
    assert inet.resolve("new.test")[0] == 3
    internet.set_names({**inet.DEFAULT_NAMES, "new.test": ("198.51.100.2",)})
    try:
        assert inet.resolve("new.test") == (0, ["198.51.100.2"])
    finally:
        internet.set_names(inet.DEFAULT_NAMES)
    assert inet.resolve("new.test")[0] == 3


@pytest.mark.parametrize("host", ["198.51.100.2", "2001:db8:6b73::2"])
def test_http_banners_udp_and_ping_from_the_host(internet: Internet, host: str) -> None:
    internet.reset_logs()
    assert inet.http_get(host, "/path?q=1", host_header="allowed.test") == (200, inet.HTTP_BODY)
    assert inet.tcp_banner(host, 8080) == inet.banner(8080)
    assert inet.tcp_banner(host, 22) == inet.banner(22)
    assert inet.udp_echo(host, b"echo me") == b"echo me"
    assert inet.ping(host)
    with pytest.raises(ConnectionRefusedError):  # nothing else listens
        inet.tcp_banner(host, 444)
    assert inet.https_get(host, "/tls", sni="allowed.test") == (200, inet.HTTP_BODY)
    assert inet.https_get(host, "/no-sni", sni=None) == (200, inet.HTTP_BODY)
    client = internet.host_v6 if ":" in host else internet.host_v4
    request, tls, no_sni = internet.http_requests()
    assert (request.method, request.path, request.host) == ("GET", "/path?q=1", "allowed.test")
    assert (request.client, request.port, request.sni) == (client, 80, None)
    assert (tls.path, tls.port, tls.sni, tls.host) == ("/tls", 443, "allowed.test", "allowed.test")
    assert (no_sni.path, no_sni.sni) == ("/no-sni", None)
    assert internet.connections() == [
        inet.Connection("tcp", 8080, client),
        inet.Connection("tcp", 22, client),
        inet.Connection("udp", 9999, client),
    ]
    internet.reset_logs()
    assert internet.http_requests() == []
    assert internet.connections() == []


def _probe_in_container(
    image: str, network: str, checks: list[list[object]]
) -> list[dict[str, object]]:
    command = ["podman", "run", "--rm", "--network", network, image]
    result = subprocess.run(
        [*command, "python3", "-c", inet.probe_script(), json.dumps(checks)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


V4_CHECKS: list[list[object]] = [
    ["resolve", "allowed.test", "198.51.100.2", "A"],
    ["resolve", "allowed.test", "198.51.100.2", "AAAA", "tcp"],
    ["resolve", "unknown.test", "198.51.100.2", "A"],
    ["resolve", "rebind.test", "198.51.100.2", "A"],
    ["http", "198.51.100.2", "/from-container", 80, "allowed.test"],
    ["tcp", "198.51.100.2", 22],
    ["udp", "198.51.100.2", 9999, "ping"],
    ["ping", "198.51.100.2"],
]
V4_EXPECTED: list[dict[str, object]] = [
    {"rcode": 0, "addresses": ["198.51.100.2"]},
    {"rcode": 0, "addresses": ["2001:db8:6b73::2"]},
    {"rcode": 3, "addresses": []},
    {"rcode": 0, "addresses": ["10.0.0.1"]},
    {"status": 200, "body": inet.HTTP_BODY},
    {"banner": inet.banner(22)},
    {"reply": "ping"},
    {"reply": True},
]


def test_container_on_the_default_bridge(internet: Internet, base_image: str) -> None:
    """The default network (10.88.0.0/16) is IPv4 only: v4 works, masqueraded to 198.51.100.1."""
    internet.reset_logs()
    checks: list[list[object]] = [*V4_CHECKS, ["http", "2001:db8:6b73::2", "/v6"]]
    results = _probe_in_container(base_image, "podman", checks)
    assert results[:-1] == V4_EXPECTED
    assert results[-1]["error"] == "OSError"  # [Errno 101] Network is unreachable
    [request] = internet.http_requests()
    assert (request.path, request.client) == ("/from-container", "198.51.100.1")
    assert {q.client for q in internet.dns_queries()} == {"198.51.100.1"}


def test_container_on_a_dual_stack_network(
    internet: Internet, base_image: str, podman_v6_network: str
) -> None:
    """A --ipv6 network with a ULA subnet: netavark masquerades IPv6 to 2001:db8:6b73::1."""
    internet.reset_logs()
    checks: list[list[object]] = [
        *V4_CHECKS,
        ["resolve", "allowed.test", "2001:db8:6b73::2", "AAAA"],
        ["http", "2001:db8:6b73::2", "/v6"],
        ["tcp", "2001:db8:6b73::2", 8080],
        ["udp", "2001:db8:6b73::2", 9999, "ping6"],
        ["ping", "2001:db8:6b73::2"],
    ]
    results = _probe_in_container(base_image, podman_v6_network, checks)
    assert results == [
        *V4_EXPECTED,
        {"rcode": 0, "addresses": ["2001:db8:6b73::2"]},
        {"status": 200, "body": inet.HTTP_BODY},
        {"banner": inet.banner(8080)},
        {"reply": "ping6"},
        {"reply": True},
    ]
    clients = {(r.path, r.client) for r in internet.http_requests()}
    assert clients == {("/from-container", "198.51.100.1"), ("/v6", "2001:db8:6b73::1")}
