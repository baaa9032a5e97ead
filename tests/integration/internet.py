"""A fake "internet" for network tests: a network namespace the test itself creates.

Tests may only send traffic to loopback or to hosts they create themselves, so every test that
needs a "remote" host uses this one. :func:`start_internet` (and the session-scoped ``internet``
fixture of conftest.py built on it) creates:

* a network namespace ``kapsis-inet-<pid>`` joined to the host by a veth pair::

      host: kinet-<pid>   198.51.100.1/32   2001:db8:6b73::1/128
      netns: inet0        198.51.100.2/32   2001:db8:6b73::2/128

  and one host route each way for exactly those addresses (``198.51.100.2 dev kinet-<pid>``; in
  the netns ``198.51.100.1 dev inet0``), never a whole /24 or /64: the host routes into the
  namespace only what the namespace serves (:meth:`Internet.serve_address` adds one more), and
  each route is checked to be the one the host really uses (``ip route get``; a routing rule of
  a VPN could take precedence).
  Both ranges are documentation ranges (RFC 5737 TEST-NET-2, RFC 3849) that are never routed on
  the real internet, so a mistake in a test cannot reach anybody else. 198.51.100.0/24 is the
  one of the three IPv4 documentation ranges that the machines Kapsis is tested on leave unused
  (their own network is in 192.0.2.0/24, their package mirror and registry proxy in
  203.0.113.0/24); 2001:db8:6b73::/64 is not the 2001:db8:1::/64 of Docker's IPv6 examples.
  Documentation ranges are still used by real set-ups, so before it adds any route
  :func:`start_internet` checks the host (shadowing.py): when one of the addresses it would
  route lies in a route the host has, is one of the host's addresses, or is an address the host
  needs (a resolver, a gateway, the package mirror, a registry or its proxy), it fails with a
  :class:`~tests.integration.shadowing.ShadowError` naming the collision instead of breaking
  the host's traffic in silence; so do :meth:`Internet.serve_address` and :func:`podman_network`.
  The addresses are added with ``nodad`` so IPv6 is usable at once instead of after ~1-2 s of
  duplicate address detection. The netns has no default route on purpose: it can only answer the
  host and whatever the host masquerades to a host address (see below); it can never send
  traffic anywhere else.

* inside the netns:

  - ``dnsmasq`` on 198.51.100.2:53 and [2001:db8:6b73::2]:53, UDP and TCP, authoritative for the
    names of :data:`DEFAULT_NAMES` (an extendable table, see :meth:`Internet.set_names`) and
    NXDOMAIN for every other name. Each query is logged (:meth:`Internet.dns_queries`).
  - an HTTP server on port 80 (v4 and v6) answering every request with :data:`HTTP_BODY` and
    the same server over TLS on port 443 (a self-signed certificate for every name of the table,
    made with ``openssl`` at start), which also logs the TLS server name the client sent;
    both logging method, path, Host header and client (:meth:`Internet.http_requests`), but
    for ``GET /bulk/N``, which answers N zero bytes unlogged (for throughput benchmarks);
  - plain TCP servers on ports 8080 and 22 that send one banner line (:func:`banner`) and close,
    to test per-port rules; a UDP echo server on port 9999 (v4 and v6). Both log each
    connection or datagram (:meth:`Internet.connections`).
  - the kernel answers ICMP echo on both addresses.

The images the tests need are built before any of this exists: conftest.py's ``internet``
fixture depends on the session's image builds, so no build that fetches from the mirror or a
registry waits for a test internet to go away.

How packets flow
----------------
From the host: the host routes 198.51.100.2 and 2001:db8:6b73::2 to the veth, with source
198.51.100.1 / 2001:db8:6b73::1, so a socket on the host reaches the netns directly.

From a rootful podman container on the default ``podman`` network (10.88.0.0/16, bridge
``podman0``, IPv4 only)::

    container eth0 10.88.0.x --> podman0 (host, 10.88.0.1, the container's default gateway)
      --> host routing (net.ipv4.ip_forward=1; netavark sets it, this module makes sure)
      --> netavark's POSTROUTING rule masquerades every packet from 10.88.0.0/16 that leaves
          the bridge, so the source becomes 198.51.100.1 (the address of the outgoing veth)
      --> kinet-<pid> --> inet0 in the netns (sees the client as 198.51.100.1)
      --> replies to 198.51.100.1, un-NATed by conntrack on the host, forwarded to podman0.

IPv6 from a container needs a dual-stack podman network (the default one has no IPv6):
:func:`podman_network` creates one with a ULA subnet (fd00:6b:7073::/64 by default); netavark
masquerades IPv6 too (NAT66 with ip6tables), so the netns sees 2001:db8:6b73::1, and the host must
forward IPv6 (``net.ipv6.conf.all.forwarding=1``). netavark turns that on by itself when it
starts a container on an IPv6 network and never turns it off; this module sets it before and
puts back the value it found on teardown.

Because of the masquerading the netns never sees a container's own address: the logs tell
*whether* a query or request arrived, not which container sent it.

Host changes (all undone on teardown): the netns, the veth pair and its host routes,
the sysctls ``net.ipv4.ip_forward`` / ``net.ipv6.conf.all.forwarding`` when they were 0, a work
directory for the logs (``/tmp/kapsis-inet-*``) and a state file
(``/run/kapsis-inet/kapsis-inet-<pid>.json``) recording what to undo. When a run is killed, its
servers die with it (PR_SET_PDEATHSIG) and the next run undoes the rest before it starts: stale
namespaces, veths, sysctls and work directories of runs whose process is gone.
Setting ``net.ipv6.conf.all.forwarding=1`` also stops interfaces with ``accept_ra=1`` from
accepting router advertisements while it is on.

Client helpers (stdlib only, so they also run inside containers through :func:`probe_script`):
:func:`resolve` (a raw-socket DNS client), :func:`http_get`, :func:`tcp_banner`,
:func:`udp_echo`, :func:`ping`.

Send to these addresses only while the test internet runs. Without the veth's routes the host's
default route carries them out of the host, and something beyond it may answer (seen here, when
the test internet lived in 203.0.113.0/24: a DNS query to 203.0.113.2 after teardown got a
reply). Check routes, not reachability, after teardown (``ip route get 198.51.100.2``).

Only one test internet can run at a time on a host (the addresses are fixed); the fixture skips
with a clear reason when another pytest process runs one.

The server side of this module runs as a script inside the netns
(``python internet.py serve ...``), so the file must stay importable without side effects.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import inspect
import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- addresses and names ---------------------------------------------------------------------

NETNS_PREFIX = "kapsis-inet-"
VETH_PREFIX = "kinet-"  # host side; + pid stays within the 15-character interface name limit
INNER_IF = "inet0"  # netns side

HOST_V4 = "198.51.100.1"
REMOTE_V4 = "198.51.100.2"
HOST_V6 = "2001:db8:6b73::1"
REMOTE_V6 = "2001:db8:6b73::2"

DNS_PORT = 53
HTTP_PORT = 80
HTTPS_PORT = 443
BANNER_PORTS = (8080, 22)
UDP_ECHO_PORT = 9999

HTTP_BODY = "hello from the test internet\n"

DEFAULT_NAMES: Mapping[str, tuple[str, ...]] = {
    "allowed.test": (REMOTE_V4, REMOTE_V6),
    # Same host as allowed.test under a name a policy will not list.
    "other.test": (REMOTE_V4, REMOTE_V6),
    # Only an A record: the AAAA query answers NOERROR with no addresses (NODATA).
    "sub.allowed.test": (REMOTE_V4,),
    # Answers a filtering resolver must refuse (DNS rebinding to private/loopback/metadata).
    "rebind.test": ("10.0.0.1",),
    "loop.test": ("127.0.0.1",),
    "meta.test": ("169.254.169.254",),
}
"""Name -> addresses (IPv4 and IPv6 mixed) the test DNS server answers. Exact names only: a name
not in the table, including a subdomain of one that is, gets NXDOMAIN."""


def banner(port: int) -> str:
    """The line the TCP server on ``port`` sends right after accepting a connection."""
    return f"kapsis test internet port {port}\n"


# --- client helpers (stdlib only: their source is also run inside containers) ------------------


def resolve(
    name: str,
    server: str = "198.51.100.2",  # REMOTE_V4, spelled out: this source also runs alone
    qtype: str = "A",
    *,
    port: int = 53,
    tcp: bool = False,
    timeout: float = 2.0,
) -> tuple[int, list[str]]:
    """Ask ``server`` for the ``qtype`` ("A", "AAAA", "TXT", ...) records of ``name``, without
    any resolver library. Returns (rcode, addresses): rcode 0 is NOERROR, 3 NXDOMAIN, 5
    REFUSED; addresses are the A/AAAA answers as text. Raises ``OSError`` (``TimeoutError``
    included) when the server does not answer."""
    qtypes = {"A": 1, "AAAA": 28, "CNAME": 5, "MX": 15, "TXT": 16, "SVCB": 64, "HTTPS": 65}
    query_id = random.randrange(1 << 16)
    # Header: id, flags (RD), 1 question, 0 answers / authority / additional records.
    query = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        query += bytes([len(label)]) + label.encode("ascii")
    query += b"\x00" + struct.pack("!HH", qtypes[qtype], 1)

    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        sock.connect((server, port))
        if tcp:
            sock.sendall(struct.pack("!H", len(query)) + query)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("DNS server closed the TCP connection")
                data += chunk
            reply = data[2:]
        else:
            sock.send(query)
            while True:
                reply = sock.recv(4096)
                if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == query_id:
                    break

    def skip_name(offset: int) -> int:
        while True:
            length = reply[offset]
            if length & 0xC0 == 0xC0:  # compression pointer: two bytes, ends the name
                return offset + 2
            if length == 0:
                return offset + 1
            offset += 1 + length

    _id, flags, qdcount, ancount, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    offset = 12
    for _ in range(qdcount):
        offset = skip_name(offset) + 4
    addresses: list[str] = []
    for _ in range(ancount):
        offset = skip_name(offset)
        rtype, _rclass, _ttl, rdlength = struct.unpack("!HHIH", reply[offset : offset + 10])
        offset += 10
        rdata = reply[offset : offset + rdlength]
        offset += rdlength
        if rtype == 1:
            addresses.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28:
            addresses.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return flags & 0x000F, addresses


def http_get(
    host: str,
    path: str = "/",
    *,
    port: int = 80,
    host_header: str | None = None,
    timeout: float = 3.0,
) -> tuple[int, str]:
    """GET ``http://host:port/path`` (``host`` may be an IPv6 literal without brackets) with an
    optional Host header. Returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Host": host_header} if host_header else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def https_get(
    host: str,
    path: str = "/",
    *,
    sni: str | None = None,
    host_header: str | None = None,
    port: int = 443,
    timeout: float = 3.0,
) -> tuple[int, str]:
    """GET ``path`` over TLS from ``host:port`` with the TLS server name ``sni`` (None: no SNI at
    all) and the Host header ``host_header`` (default: ``sni`` or ``host``). The test internet's
    certificate is its own, so it is not verified. Returns (status, body)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, port), timeout=timeout)
    with raw, context.wrap_socket(raw, server_hostname=sni) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: {host_header or sni or host}\r\n"
        sock.sendall((request + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def http_pipelined(
    host: str, hosts: list[str], *, port: int = 80, timeout: float = 3.0
) -> list[int]:
    """Send one GET per Host in ``hosts`` on one connection, all at once (pipelined), and return
    the status of every response that came back before the connection closed."""
    requests = "".join(f"GET /{i} HTTP/1.1\r\nHost: {name}\r\n\r\n" for i, name in enumerate(hosts))
    return http_raw(host, requests, port=port, timeout=timeout)


def http_raw(host: str, request: str, *, port: int = 80, timeout: float = 3.0) -> list[int]:
    """Send ``request`` (raw HTTP/1 text, CRLF line ends) as it is and return the status of every
    response that came back before the connection closed."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def reuse_resolver_flows(upstream: str, name: str, trigger: str) -> dict[str, Any]:
    """The resolver-flow attack: make the gateway's resolver query the upstream (``trigger``,
    an allowlisted name), then send a query for ``name`` straight to the upstream from every
    UDP port this process can bind, one of which is the port the resolver's query came from.
    Returns how many ports were tried, how many sends the local firewall let out (a refused
    packet fails the send at once), and how many replies came back."""
    resolve(trigger, "127.0.0.1")
    query_id = random.randrange(1 << 16)
    query = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode("ascii")
    query += b"\x00" + struct.pack("!HH", 1, 1)
    family = socket.AF_INET6 if ":" in upstream else socket.AF_INET
    tried, sent, replies = 0, 0, 0
    for port in range(1024, 65536):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("", port))
                tried += 1
                sock.sendto(query, (upstream, 53))
                sent += 1
                sock.setblocking(False)
                sock.recv(4096)
                replies += 1
            except OSError:
                continue
    return {"tried": tried, "sent": sent, "replies": replies}


def tcp_banner(host: str, port: int, *, timeout: float = 3.0) -> str:
    """Connect to ``host:port`` and return the first line the server sends."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace")


def udp_echo(host: str, payload: bytes, port: int = 9999, *, timeout: float = 2.0) -> bytes:
    """Send ``payload`` to the UDP echo server and return its reply (``TimeoutError`` when none
    arrives: UDP gives no other sign of being dropped)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(payload)
        return sock.recv(65535)


def ping(host: str, *, timeout: float = 2.0) -> bool:
    """Send one ICMP echo request to ``host``; True when the reply arrives in time.

    Uses a "ping socket" (SOCK_DGRAM: the kernel fills in id and checksum; allowed when the gid is
    in net.ipv4.ping_group_range, which podman sets to "0 0" in containers) and falls back to a
    raw socket (needs CAP_NET_RAW) where that is not allowed."""
    v6 = ":" in host
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    echo_request, echo_reply = (128, 129) if v6 else (8, 0)
    ident, payload = random.randrange(1 << 16), b"kapsis-ping"

    def checksum(data: bytes) -> int:
        data += b"\x00" * (len(data) % 2)
        total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    except PermissionError:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    with sock:
        sock.settimeout(timeout)
        header = struct.pack("!BBHHH", echo_request, 0, 0, ident, 1)
        # The kernel computes the ICMPv6 checksum (it needs the pseudo-header) and, for ping
        # sockets, the ICMP one too; only a raw IPv4 socket needs it from us.
        if not v6 and sock.type == socket.SOCK_RAW:
            header = struct.pack("!BBHHH", echo_request, 0, checksum(header + payload), ident, 1)
        sock.sendto(header + payload, (host, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = sock.recv(2048)
            except TimeoutError:
                return False
            if not v6 and sock.type == socket.SOCK_RAW:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
            if data[:1] == bytes([echo_reply]) and data.endswith(payload):
                return True
    return False


def run_probes(checks: list[list[Any]]) -> list[dict[str, Any]]:
    """Run client checks and report each outcome as JSON-able data instead of raising, so one
    container run can try many things. Each check is ``[kind, *args]``:

    ``["resolve", name, server, qtype]`` (+ ``"tcp"``) -> ``{"rcode": int, "addresses": [...]}``;
    ``["http", host, path, port, host_header_or_None]`` -> ``{"status": int, "body": str}``;
    ``["tcp", host, port]`` -> ``{"banner": str}``; ``["bind_udp", address, port]`` ->
    ``{"bound": True}`` (with SO_REUSEADDR, as a port is shared);
    ``["udp", host, port, text]`` -> ``{"reply": str}``; ``["ping", host]`` -> ``{"reply": bool}``.
    A failure gives ``{"error": ExceptionClassName, "detail": str}`` (e.g. "TimeoutError",
    "ConnectionRefusedError", "OSError" for an unreachable network).
    """
    results: list[dict[str, Any]] = []
    for check in checks:
        kind, args = check[0], check[1:]
        try:
            if kind == "resolve":
                rcode, addresses = resolve(
                    args[0], args[1], args[2], tcp=len(args) > 3 and args[3] == "tcp"
                )
                results.append({"rcode": rcode, "addresses": addresses})
            elif kind == "http":
                host, path = args[0], args[1] if len(args) > 1 else "/"
                port = args[2] if len(args) > 2 else 80
                host_header = args[3] if len(args) > 3 else None
                status, body = http_get(host, path, port=port, host_header=host_header)
                results.append({"status": status, "body": body})
            elif kind == "https":
                host, path = args[0], args[1] if len(args) > 1 else "/"
                sni = args[2] if len(args) > 2 else host
                host_header = args[3] if len(args) > 3 else None
                status, body = https_get(host, path, sni=sni, host_header=host_header)
                results.append({"status": status, "body": body})
            elif kind == "http_pipelined":
                results.append({"statuses": http_pipelined(args[0], args[1])})
            elif kind == "bind_udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((args[0], args[1]))
                results.append({"bound": True})
            elif kind == "http_raw":
                results.append({"statuses": http_raw(args[0], args[1])})
            elif kind == "reuse_resolver_flows":
                results.append(reuse_resolver_flows(args[0], args[1], args[2]))
            elif kind == "tcp":
                results.append({"banner": tcp_banner(args[0], args[1])})
            elif kind == "udp":
                reply = udp_echo(args[0], args[2].encode(), args[1])
                results.append({"reply": reply.decode("utf-8", "replace")})
            elif kind == "ping":
                results.append({"reply": ping(args[0])})
            else:
                results.append({"error": "ValueError", "detail": f"unknown check {kind!r}"})
        except Exception as error:
            results.append({"error": type(error).__name__, "detail": str(error)})
    return results


# What the client helpers need when their source runs on its own (see probe_script).
_PROBE_HEADER = """from __future__ import annotations
import http.client, json, random, socket, struct, sys, time
from typing import Any
"""


def probe_script() -> str:
    """Python source (stdlib only) that runs :func:`run_probes` on the JSON list in ``argv[1]``
    and prints the JSON list of results, for ``python3 -c SCRIPT CHECKS`` inside a container::

        podman run --rm IMAGE python3 -c "$(probe_script())" '[["http", "198.51.100.2"]]'
    """
    helpers = (
        resolve,
        http_get,
        https_get,
        http_pipelined,
        http_raw,
        reuse_resolver_flows,
        tcp_banner,
        udp_echo,
        ping,
        run_probes,
    )
    parts = [inspect.getsource(helper) for helper in helpers]
    return "\n\n".join(
        [
            _PROBE_HEADER,
            *parts,
            "print(json.dumps(run_probes(json.loads(sys.argv[1]))))",
        ]
    )


# --- the fixture's view of a running internet ------------------------------------------------


@dataclass(frozen=True)
class DnsQuery:
    """One query dnsmasq logged: ``qtype`` like "A"/"AAAA", the ``name``, the client address."""

    qtype: str
    name: str
    client: str


@dataclass(frozen=True)
class HttpRequest:
    """One request the HTTP server answered."""

    method: str
    path: str
    host: str | None  # the Host header, None when the request had none
    client: str  # client address as the netns sees it (198.51.100.1 for masqueraded traffic)
    port: int  # the server port
    headers: dict[str, str]
    sni: str | None = None  # the TLS server name (port 443 only; None: no SNI or plain HTTP)


@dataclass(frozen=True)
class Connection:
    """One TCP connection to a banner port or one UDP datagram to the echo server."""

    proto: str  # "tcp" or "udp"
    port: int
    client: str


@dataclass
class Internet:
    """A running test internet (see the module docstring). Logs are read from the last
    :meth:`reset_logs` on, so a session-scoped instance can be shared by many tests."""

    netns: str
    host_if: str
    v4: str  # the remote host's addresses (DNS, HTTP, banners, UDP echo all live there)
    v6: str
    host_v4: str  # the host's side of the veth: the client address the netns sees
    host_v6: str
    dns_server: str  # = v4
    dns_server_v6: str  # = v6
    names: dict[str, tuple[str, ...]]
    workdir: Path
    dns_log: Path
    http_log: Path
    conn_log: Path
    hosts_file: Path
    setup_seconds: float = 0.0
    _dnsmasq: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _marks: dict[Path, int] = field(default_factory=dict, repr=False)

    # logs

    def reset_logs(self) -> None:
        """Forget everything logged so far (the files are kept; reading starts after this)."""
        for log in (self.dns_log, self.http_log, self.conn_log):
            self._marks[log] = log.stat().st_size if log.exists() else 0

    def _lines(self, log: Path) -> list[str]:
        if not log.exists():
            return []
        with log.open("rb") as handle:
            handle.seek(self._marks.get(log, 0))
            return handle.read().decode("utf-8", "replace").splitlines()

    def dns_queries(self) -> list[DnsQuery]:
        """Queries that reached the DNS server since the last :meth:`reset_logs`."""
        queries = []
        for line in self._lines(self.dns_log):
            # "... dnsmasq[12]: 3 198.51.100.1/40000 query[A] allowed.test from 198.51.100.1"
            match = re.search(r"query\[(\w+)\] (\S+) from (\S+)", line)
            if match:
                queries.append(DnsQuery(match[1], match[2], match[3]))
        return queries

    def http_requests(self) -> list[HttpRequest]:
        """Requests the HTTP server answered since the last :meth:`reset_logs`."""
        return [
            HttpRequest(
                method=entry["method"],
                path=entry["path"],
                host=entry["host"],
                client=entry["client"],
                port=entry["port"],
                headers=entry["headers"],
                sni=entry.get("sni"),
            )
            for entry in map(json.loads, self._lines(self.http_log))
        ]

    def connections(self) -> list[Connection]:
        """Banner-port connections and UDP echo datagrams since the last :meth:`reset_logs`."""
        return [
            Connection(entry["proto"], entry["port"], entry["client"])
            for entry in map(json.loads, self._lines(self.conn_log))
        ]

    # names

    def set_names(self, names: Mapping[str, Sequence[str]]) -> None:
        """Replace the DNS table (name -> addresses) of the running server; takes effect before
        this returns. Tests that extend the table should restore it afterwards, e.g.
        ``internet.set_names({**DEFAULT_NAMES, "new.test": ("198.51.100.2",)})`` then
        ``internet.set_names(DEFAULT_NAMES)``."""
        before = self._hosts_reloads()
        self.names = {name: tuple(addresses) for name, addresses in names.items()}
        _write_hosts_file(self.hosts_file, self.names)
        assert self._dnsmasq is not None
        self._dnsmasq.send_signal(signal.SIGHUP)  # dnsmasq re-reads --addn-hosts files
        deadline = time.monotonic() + 5
        while self._hosts_reloads() == before:
            if time.monotonic() > deadline:
                raise RuntimeError("dnsmasq did not reload its hosts file within 5 s")
            time.sleep(0.01)

    def _hosts_reloads(self) -> int:
        # dnsmasq logs "read <file> - N names" each time it (re)reads the hosts file.
        if not self.dns_log.exists():
            return 0
        return self.dns_log.read_text(errors="replace").count(f"read {self.hosts_file} ")

    # addresses

    @contextlib.contextmanager
    def serve_address(self, address: str) -> Iterator[str]:
        """One more address of the netns (for a server of a test's own to bind to), routed from
        the host as the others are, after the same shadowing check; removed on exit."""
        _check_not_shadowing(address)
        _add_address(("ip", "-n", self.netns), INNER_IF, address)
        try:
            self._route(address)
            yield address
        finally:
            _run("ip", "route", "del", _single(address), "dev", self.host_if, check=False)
            ns_ip = ("ip", "-n", self.netns)
            _run(*ns_ip, "addr", "del", _single(address), "dev", INNER_IF, check=False)

    def _route(self, address: str) -> None:
        source = self.host_v6 if ":" in address else self.host_v4
        _run("ip", "route", "add", _single(address), "dev", self.host_if, "src", source)
        _check_routed(address, self.host_if)

    # conveniences

    def url(self, path: str = "/", *, v6: bool = False, port: int = HTTP_PORT) -> str:
        host = f"[{self.v6}]" if v6 else self.v4
        return f"http://{host}:{port}{path}"

    def exec(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside the netns (e.g. ``internet.exec("ss", "-lntu")``)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# --- setup and teardown ----------------------------------------------------------------------

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_SBIN_PATH)


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
    return result


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when pytest dies, so a killed test run does not leave
    servers behind (the netns itself is removed by the next run's stale cleanup)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pid_of(name: str, prefix: str) -> int | None:
    suffix = name[len(prefix) :]
    return int(suffix) if name.startswith(prefix) and suffix.isdigit() else None


def _owner_alive(pid: int) -> bool:
    """Is the process that created a namespace/veth still running (a concurrent pytest)?"""
    if pid == os.getpid():
        return _ACTIVE is not None  # ours: live while running, else leftovers of an earlier start
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in cmdline or b"pytest" in cmdline  # a reused pid is some other program


def _list_netns() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _list_links() -> list[str]:
    out = _run("ip", "-j", "link", "show", check=False).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def _delete_netns(netns: str) -> None:
    # Kill what still runs in it first: a namespace with live processes outlives `ip netns del`.
    pids = _run("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", netns, check=False)


# What a running instance must undo (sysctls it changed, its work directory), kept outside the
# process so that the next run can undo it when this one is killed. /run is emptied on reboot,
# as are the sysctls.
STATE_DIR = Path("/run/kapsis-inet") if Path("/run").is_dir() else Path(tempfile.gettempdir())


def _state_file(pid: int) -> Path:
    return STATE_DIR / f"{NETNS_PREFIX}{pid}.json"


def _undo(state: Mapping[str, Any]) -> None:
    """Put back the sysctls an instance changed and remove its work directory."""
    for key, value in state.get("sysctls", {}).items():
        _sysctl_path(key).write_text(f"{value}\n")
    if state.get("workdir"):
        shutil.rmtree(state["workdir"], ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Undo what earlier runs whose process is gone left behind: namespaces, veths, sysctls and
    work directories. Returns the names of the namespaces and veths removed."""
    removed = []
    for state_file in sorted(STATE_DIR.glob(f"{NETNS_PREFIX}*.json")):
        pid = _pid_of(state_file.stem, NETNS_PREFIX)
        if pid is not None and not _owner_alive(pid):
            with contextlib.suppress(OSError, ValueError):
                _undo(json.loads(state_file.read_text()))
            state_file.unlink(missing_ok=True)
    for netns in _list_netns():
        pid = _pid_of(netns, NETNS_PREFIX)
        if pid is not None and not _owner_alive(pid):
            _delete_netns(netns)
            removed.append(netns)
    for link in _list_links():  # a veth survives its netns only if the netns step failed
        link_name = link.split("@")[0]
        pid = _pid_of(link_name, VETH_PREFIX)
        if pid is not None and not _owner_alive(pid):
            _run("ip", "link", "del", link_name, check=False)
            removed.append(link_name)
    return removed


def _in_use_by_other() -> str | None:
    """Why another test internet blocks ours (its addresses are ours), or None. Our addresses on
    any other device are the shadowing check's to report."""
    for netns in _list_netns():
        pid = _pid_of(netns, NETNS_PREFIX)
        if pid is not None and _owner_alive(pid):
            owner = "this process" if pid == os.getpid() else f"live process {pid}"
            return f"namespace {netns} of {owner}"
    return None


def _check_not_shadowing(*served: str) -> None:
    """Refuse (ShadowError) to route ``served`` addresses or networks when that would shadow
    something the host needs (see shadowing.py)."""
    # Imported here: this file also runs as a script in the netns, where it has no package.
    from .shadowing import check

    check([ipaddress.ip_network(text) for text in served], own_devices=VETH_PREFIX)


def _check_routed(address: str, device: str) -> None:
    """Make sure the host now sends ``address`` to ``device``: a policy-routing rule ahead of the
    main table (a VPN's, say) would send test traffic elsewhere, maybe out of the host."""
    out = _run("ip", "-j", "route", "get", address, check=False).stdout
    got = (json.loads(out or "[{}]") or [{}])[0].get("dev")
    if got != device:
        raise RuntimeError(
            f"the host routes {address} through {got or 'nothing'}, not the test internet's "
            f"{device}: a routing rule of the host (ip rule) takes precedence over its route"
        )


def _single(address: str) -> str:
    """``address`` as a network of its own: /32 or /128."""
    return f"{address}/{128 if ':' in address else 32}"


def _add_address(ip: Sequence[str], device: str, address: str) -> None:
    """Add ``address`` alone (no connected route) to ``device``; ``ip``: ``ip`` or ``ip -n NS``."""
    nodad = ("nodad",) if ":" in address else ()
    _run(*ip, "addr", "add", _single(address), "dev", device, *nodad)


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def _write_hosts_file(path: Path, names: Mapping[str, Sequence[str]]) -> None:
    lines = [f"{address} {name}" for name, addresses in names.items() for address in addresses]
    path.write_text("\n".join(lines) + "\n")


def _dnsmasq_command(dnsmasq: str, internet: Internet) -> list[str]:
    return [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",  # ignore /etc/dnsmasq.conf and /etc/dnsmasq.d
        "--no-resolv",  # no upstream servers: this is the whole internet
        "--no-hosts",  # not the host's /etc/hosts ...
        f"--addn-hosts={internet.hosts_file}",  # ... but our table, re-read on SIGHUP
        "--address=/#/",  # every name not in the table: NXDOMAIN (instead of REFUSED)
        f"--listen-address={internet.v4}",
        f"--listen-address={internet.v6}",
        "--bind-interfaces",
        "--port=53",
        "--cache-size=0",  # every query is answered (and logged) by the table itself
        "--local-ttl=0",
        "--user=root",  # stays root: it can write its log file; it only lives in the test netns
        "--group=root",
        "--pid-file=",  # none
        "--log-queries=extra",
        f"--log-facility={internet.dns_log}",
    ]


def _make_certificate(workdir: Path, names: Mapping[str, Sequence[str]]) -> None:
    """A self-signed certificate for every name of the table (nobody verifies it: the tests
    look at the server name a client sent, and the gateway never intercepts TLS)."""
    alt_names = ",".join(f"DNS:{name}" for name in names)
    _run(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=kapsis test internet", "-addext", f"subjectAltName={alt_names}",
        "-keyout", str(workdir / "key.pem"), "-out", str(workdir / "cert.pem"),
    )  # fmt: skip


def _wait_ready(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout} s")
        time.sleep(0.02)


# The netns of the test internet this process runs, if any (one at a time: fixed addresses).
_ACTIVE: str | None = None


@contextlib.contextmanager
def start_internet(
    names: Mapping[str, Sequence[str]] = DEFAULT_NAMES,
    *,
    forwarding: bool = True,
) -> Iterator[Internet]:
    """Create the test internet, yield it, tear it down (also when the body raises).

    ``names`` is the DNS table (name -> addresses). ``forwarding`` makes sure the host forwards
    IPv4 and IPv6, which containers need to reach the netns (restored on exit if it was off).
    Raises ``RuntimeError`` when a step fails; call :func:`skip_reason` first to skip instead when
    the host cannot run it at all.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError(f"a test internet is already running in this process ({_ACTIVE})")
    started = time.monotonic()
    cleanup_stale()
    other = _in_use_by_other()
    if other:
        raise RuntimeError(f"another test internet is running on this host ({other})")
    _check_not_shadowing(HOST_V4, REMOTE_V4, HOST_V6, REMOTE_V6)  # before any change to the host
    pid = os.getpid()
    workdir = Path(tempfile.mkdtemp(prefix="kapsis-inet-"))
    internet = Internet(
        netns=f"{NETNS_PREFIX}{pid}",
        host_if=f"{VETH_PREFIX}{pid}",
        v4=REMOTE_V4,
        v6=REMOTE_V6,
        host_v4=HOST_V4,
        host_v6=HOST_V6,
        dns_server=REMOTE_V4,
        dns_server_v6=REMOTE_V6,
        names={name: tuple(addresses) for name, addresses in names.items()},
        workdir=workdir,
        dns_log=workdir / "dns.log",
        http_log=workdir / "http.log",
        conn_log=workdir / "connections.log",
        hosts_file=workdir / "hosts",
    )
    processes: list[subprocess.Popen[bytes]] = []
    state: dict[str, Any] = {"sysctls": {}, "workdir": str(workdir)}
    state_file = _state_file(pid)

    def save_state() -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state))

    try:
        save_state()
        ns, host_if = internet.netns, internet.host_if
        _run("ip", "netns", "add", ns)
        # The peer is created directly inside the netns, so its name cannot clash with the host's.
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", INNER_IF, "netns", ns)
        nsip = ("ip", "-n", ns)
        # Single addresses (/32, /128) and one route for each served address: nothing but what
        # the netns serves is routed into it (a connected /24 would take the whole range).
        for host_address, remote_address in ((HOST_V4, REMOTE_V4), (HOST_V6, REMOTE_V6)):
            _add_address(("ip",), host_if, host_address)
            _add_address(nsip, INNER_IF, remote_address)
        _run("ip", "link", "set", host_if, "up")
        _run(*nsip, "link", "set", "lo", "up")
        _run(*nsip, "link", "set", INNER_IF, "up")
        for host_address, remote_address in ((HOST_V4, REMOTE_V4), (HOST_V6, REMOTE_V6)):
            internet._route(remote_address)
            _run(*nsip, "route", "add", _single(host_address), "dev", INNER_IF)

        if forwarding:
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                path = _sysctl_path(key)
                if path.read_text().strip() != "1":
                    state["sysctls"][key] = path.read_text().strip()
                    save_state()  # before the change: a crash right after still gets it undone
                    path.write_text("1\n")

        # The servers: the module itself, run as a script inside the netns.
        for log in (internet.http_log, internet.conn_log, internet.dns_log):
            log.touch()
        serve = [sys.executable, str(Path(__file__).resolve()), "serve"]
        serve += ["--http-log", str(internet.http_log), "--conn-log", str(internet.conn_log)]
        serve += ["--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")]
        _make_certificate(workdir, internet.names)
        servers = subprocess.Popen(
            ["ip", "netns", "exec", ns, *serve],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        processes.append(servers)
        _write_hosts_file(internet.hosts_file, internet.names)
        dnsmasq = _which("dnsmasq") or "dnsmasq"
        internet._dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", ns, *_dnsmasq_command(dnsmasq, internet)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        processes.append(internet._dnsmasq)

        # Ready when the server script says so (all sockets bound) and dnsmasq answers.
        assert servers.stdout is not None
        if not select.select([servers.stdout], [], [], 10)[0]:
            raise RuntimeError("test internet servers did not start within 10 s")
        if servers.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"test internet servers failed to start (exit {servers.poll()})")

        def dns_answers() -> bool:
            if internet._dnsmasq is not None and internet._dnsmasq.poll() is not None:
                stderr = internet._dnsmasq.stderr.read() if internet._dnsmasq.stderr else b""
                raise RuntimeError(f"dnsmasq exited: {stderr.decode(errors='replace')}")
            return resolve("ready.invalid", REMOTE_V4, timeout=0.2)[0] == 3

        _wait_ready(dns_answers, "dnsmasq")
        internet.reset_logs()
        internet.setup_seconds = time.monotonic() - started
        _ACTIVE = internet.netns
        yield internet
    finally:
        _ACTIVE = None
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _delete_netns(internet.netns)  # also destroys the veth pair and its routes
        _run("ip", "link", "del", internet.host_if, check=False)  # in case the netns step failed
        _undo(state)  # sysctls, work directory
        state_file.unlink(missing_ok=True)
        if STATE_DIR.name == "kapsis-inet":  # our own directory (never the tempdir fallback)
            with contextlib.suppress(OSError):  # still holds another run's state
                STATE_DIR.rmdir()


def skip_reason() -> str | None:
    """Why the test internet cannot run on this host (None if it can)."""
    if os.geteuid() != 0:
        return "the test internet needs root (network namespaces, veth, sysctls)"
    for tool in ("ip", "dnsmasq"):
        if _which(tool) is None:
            return f"the test internet needs {tool!r} (apt-get install iproute2 dnsmasq-base)"
    cleanup_stale()
    other = _in_use_by_other()
    if other:
        return f"another test internet is running on this host ({other})"
    return None


# --- podman networks for container tests -----------------------------------------------------


@contextlib.contextmanager
def podman_network(
    name: str = "kapsis-test-v6",
    subnets: Sequence[str] = ("10.89.64.0/24", "fd00:6b:7073::/64"),
) -> Iterator[str]:
    """A rootful podman bridge network (dual-stack by default: IPv4 + a ULA IPv6 subnet, which
    netavark masquerades), removed on exit together with any container still attached. A network
    of the same name left over by a crashed run is removed first, and the subnets are checked as
    the test internet's addresses are (see shadowing.py). Yields the network name.

    A container on it reaches the test internet's IPv6 address only while the host forwards IPv6
    (``start_internet(forwarding=True)``, the default); netavark also turns it on itself."""
    _run("podman", "network", "rm", "--force", name, check=False)
    _check_not_shadowing(*subnets)
    command = ["podman", "network", "create", "--disable-dns"]  # no aardvark-dns: not needed
    if any(":" in subnet for subnet in subnets):
        command.append("--ipv6")
    for subnet in subnets:
        command += ["--subnet", subnet]
    _run(*command, name)
    try:
        yield name
    finally:
        _run("podman", "network", "rm", "--force", name, check=False)


# --- the servers (run inside the netns: python internet.py serve ...) -------------------------


def _serve(http_log: Path, conn_log: Path, cert: Path, key: Path) -> None:
    """Bind every server socket, print "ready", serve until killed."""
    import http.server
    import socketserver
    import ssl
    import threading

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    def remember_sni(sock: Any, server_name: str | None, _context: Any) -> None:
        sock.kapsis_sni = server_name

    tls.sni_callback = remember_sni

    lock = threading.Lock()

    def _port(server: socketserver.BaseServer) -> int:
        address: Any = server.server_address  # (host, port) or (host, port, flow, scope)
        return int(address[1])

    def record(log: Path, entry: dict[str, Any]) -> None:
        with lock, log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "kapsis-test-internet"

        def _bulk(self, size: int) -> None:
            """``GET /bulk/N``: N zero bytes (benchmarks of throughput), not logged."""
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = bytes(1 << 20)
            while size > 0:
                self.wfile.write(block[: min(size, len(block))])
                size -= len(block)

        def _answer(self, body: bool) -> None:
            if self.path.startswith("/bulk/") and self.path[6:].isdigit():
                return self._bulk(min(int(self.path[6:]), 1 << 32))
            record(
                http_log,
                {
                    "method": self.command,
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "client": self.client_address[0],
                    "port": _port(self.server),
                    "headers": dict(self.headers.items()),
                    "sni": getattr(self.connection, "kapsis_sni", None),
                },
            )
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            data = HTTP_BODY.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        do_POST = do_PUT = do_DELETE = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass  # our own log is the JSON one

    class TlsHandler(Handler):
        def setup(self) -> None:
            self.request = tls.wrap_socket(self.request, server_side=True)
            super().setup()

    class BannerHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            port = _port(self.server)
            record(conn_log, {"proto": "tcp", "port": port, "client": self.client_address[0]})
            self.request.sendall(banner(port).encode())

    class EchoHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            port = _port(self.server)
            record(conn_log, {"proto": "udp", "port": port, "client": self.client_address[0]})
            sock.sendto(data, self.client_address)

    def server_class(base: type[Any], family: socket.AddressFamily) -> type[Any]:
        return type(
            f"{base.__name__}{family.name}",
            (socketserver.ThreadingMixIn, base),
            {
                "address_family": family,
                "allow_reuse_address": True,
                "daemon_threads": True,
                "handle_error": lambda self, request, client: None,  # a refused handshake
            },
        )

    servers: list[socketserver.BaseServer] = []
    for address, family in ((REMOTE_V4, socket.AF_INET), (REMOTE_V6, socket.AF_INET6)):
        servers.append(server_class(http.server.HTTPServer, family)((address, HTTP_PORT), Handler))
        servers.append(
            server_class(http.server.HTTPServer, family)((address, HTTPS_PORT), TlsHandler)
        )
        for port in BANNER_PORTS:
            servers.append(
                server_class(socketserver.TCPServer, family)((address, port), BannerHandler)
            )
        servers.append(
            server_class(socketserver.UDPServer, family)((address, UDP_ECHO_PORT), EchoHandler)
        )
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        args = dict(zip(sys.argv[2::2], sys.argv[3::2], strict=True))
        _serve(
            Path(args["--http-log"]), Path(args["--conn-log"]), Path(args["--cert"]),
            Path(args["--key"]),
        )  # fmt: skip
