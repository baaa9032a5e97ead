"""The gateway's self-test script (standard-library Python run inside the gateway).

Its DNS front and the resolver behind it are pointed at UDP sockets on 127.0.0.1 that the test
controls, its proxy check at local TCP servers that behave as a proxy would (or would not), its
connection check at local ports that are closed or listening. Nothing leaves 127.0.0.0/8. As
root, the check of the resolver's port runs as an unprivileged uid in a throwaway network
namespace next to a real dnsmasq, with the port the gateway uses and the one it used before.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest

from kapsis.network.gateway_layout import RESOLVER_PORT, UNPRIVILEGED_PORT_START
from kapsis.network.observe import SELFTEST_INTERNAL, SELFTEST_NAME, SELFTEST_PORT

from .netgw import DNS_SOURCE, DNSMASQ, netns

SCRIPT = Path(str(resources.files("kapsis.network") / "gateway" / "selftest.py"))


@pytest.fixture
def selftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kapsis_gateway_selftest", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Responder = Callable[[bytes], list[bytes]]


@pytest.fixture
def udp_server() -> Iterator[Callable[..., tuple[tuple[str, int], list[bytes]]]]:
    """Local UDP servers answering with a responder: (address, packets received); ``reuse``:
    with SO_REUSEADDR."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def start(responder: Responder, reuse: bool = False) -> tuple[tuple[str, int], list[bytes]]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if reuse:  # SO_REUSEADDR, as dnsmasq's sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)
        received: list[bytes] = []

        def serve() -> None:
            while not stop.is_set():
                try:
                    packet, peer = sock.recvfrom(4096)
                except (TimeoutError, OSError):
                    continue
                received.append(packet)
                for reply in responder(packet):
                    sock.sendto(reply, peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        sockets.append(sock)
        return sock.getsockname(), received

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=1)
    for sock in sockets:
        sock.close()


@pytest.fixture
def fake_front(selftest, udp_server, monkeypatch):
    """Point the self-test's DNS front (query's default server) at a local server."""

    def install(responder: Responder) -> list[bytes]:
        address, received = udp_server(responder)
        monkeypatch.setattr(selftest.query, "__defaults__", (address,))
        return received

    return install


def _closed_udp_port() -> tuple[str, int]:
    """A port nothing listens on: free to bind, too."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


@pytest.fixture
def held_udp_port() -> Iterator[Callable[..., tuple[str, int]]]:
    """Ports on 127.0.0.1 held by a UDP socket of this process, with SO_REUSEADDR (as dnsmasq's
    sockets) or without. ``answers=False``: the socket is connected elsewhere, so a query to the
    port finds no socket and is refused at once (as a resolver the firewall rejects)."""
    sockets: list[socket.socket] = []

    def hold(*, reuse: bool, answers: bool = False) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(sock)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        if not answers:
            sock.connect(_closed_udp_port())
        return sock.getsockname()

    yield hold
    for sock in sockets:
        sock.close()


def _reply(query: bytes, rcode: int, ident: int | None = None) -> bytes:
    """A response to ``query``: same id (unless given), QR set, the given response code."""
    (query_id,) = struct.unpack(">H", query[:2])
    flags = 0x8180 | rcode
    header = struct.pack(">HHHHHH", query_id if ident is None else ident, flags, 1, 0, 0, 0)
    return header + query[12:]


def _qtype(query: bytes) -> int:
    return int(struct.unpack(">H", query[-4:-2])[0])


def _front(selftest, nxdomain: bool = True, null_refused: bool = True) -> Responder:
    """A DNS front: an unlisted A query is NXDOMAIN, a NULL query REFUSED (or not)."""

    def respond(query: bytes) -> list[bytes]:
        if _qtype(query) == selftest.NULL:
            return [_reply(query, selftest.REFUSED if null_refused else 0)]
        return [_reply(query, selftest.NXDOMAIN if nxdomain else 0)]

    return respond


def _question_name(query: bytes) -> str:
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return ".".join(labels)


@pytest.mark.parametrize(("qtype", "wire"), [(1, b"\0\1\0\1"), (10, b"\0\x0a\0\1")])
def test_query_sends_a_query_of_the_type_for_the_name(selftest, fake_front, qtype, wire):
    received = fake_front(lambda q: [_reply(q, selftest.NXDOMAIN)])

    assert selftest.query("kapsis-selftest.invalid", qtype, 1.0) == 3

    (packet,) = received
    _ident, flags, qdcount, ancount, nscount, arcount = struct.unpack(">HHHHHH", packet[:12])
    assert (flags, qdcount, ancount, nscount, arcount) == (0x0100, 1, 0, 0, 0)  # RD, 1 question
    assert _question_name(packet) == "kapsis-selftest.invalid"
    assert packet[-4:] == wire  # the type, class IN


def test_query_asks_the_dns_front_unless_told_otherwise(selftest):
    assert selftest.RESOLVER == ("127.0.0.1", 53)
    assert selftest.query.__defaults__ == (selftest.RESOLVER,)


def test_query_asks_the_server_it_is_given(selftest, fake_front, udp_server):
    front = fake_front(lambda q: [_reply(q, 0)])
    other, received = udp_server(lambda q: [_reply(q, selftest.REFUSED)])

    assert selftest.query("a.example", selftest.A, 1.0, other) == selftest.REFUSED
    assert len(received) == 1 and front == []


def test_query_returns_noerror(selftest, fake_front):
    fake_front(lambda q: [_reply(q, 0)])

    assert selftest.query("listed.example", selftest.A, 1.0) == 0


def test_query_ignores_replies_with_another_id(selftest, fake_front):
    def spoof_first(query: bytes) -> list[bytes]:
        (ident,) = struct.unpack(">H", query[:2])
        return [_reply(query, 0, ident=(ident + 1) % 65536), b"\0", _reply(query, 3)]

    fake_front(spoof_first)

    assert selftest.query("kapsis-selftest.invalid", selftest.A, 1.0) == 3


def test_query_times_out_when_nothing_answers(selftest, fake_front):
    fake_front(lambda q: [])

    with pytest.raises(OSError):
        selftest.query("kapsis-selftest.invalid", selftest.A, 0.1)


def test_resolver_answers_asks_again_while_the_front_is_starting(selftest, fake_front, monkeypatch):
    fake_front(lambda q: [_reply(q, 3)])
    attempts: list[tuple[str, int, float]] = []
    real_query = selftest.query

    def starting_up(name: str, qtype: int, timeout: float) -> int:
        attempts.append((name, qtype, timeout))
        if len(attempts) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "not listening yet")
        return int(real_query(name, qtype, timeout))

    monkeypatch.setattr(selftest, "query", starting_up)

    assert selftest.resolver_answers(selftest.time.monotonic() + 2) == 3
    assert attempts == [("kapsis-selftest.invalid", selftest.A, 0.5)] * 3


def test_resolver_answers_gives_up_at_the_deadline(selftest, monkeypatch):
    attempts = []

    def never(name: str, qtype: int, timeout: float) -> int:
        attempts.append(name)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "not listening")

    monkeypatch.setattr(selftest, "query", never)
    start = selftest.time.monotonic()

    assert selftest.resolver_answers(start + 0.15) is None
    assert 0.15 <= selftest.time.monotonic() - start < 1.0
    assert len(attempts) >= 2
    assert set(attempts) == {"kapsis-selftest.invalid"}


def test_resolver_answers_gives_the_response_code(selftest, fake_front):
    fake_front(lambda q: [_reply(q, 3)])

    assert selftest.resolver_answers(selftest.time.monotonic() + 2) == 3


# ---------------------------------------------------------------------------------------------
# the resolver behind the front


def test_the_internal_resolver_is_the_gateways(selftest):
    assert selftest.INTERNAL_RESOLVER == ("127.0.0.1", RESOLVER_PORT) == ("127.0.0.1", 54)
    assert SELFTEST_INTERNAL == ("127.0.0.1", "udp", RESOLVER_PORT)  # discounted by the host
    assert selftest.NOT_LISTED == SELFTEST_NAME


def test_a_closed_internal_resolver_passes(selftest, monkeypatch):
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", _closed_udp_port())

    assert selftest.internal_resolver_closed() is None


def test_an_internal_resolver_that_drops_the_query_passes(selftest, udp_server, monkeypatch):
    address, received = udp_server(lambda q: [])
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", address)

    assert selftest.internal_resolver_closed() is None
    assert [_question_name(packet) for packet in received] == ["kapsis-selftest.invalid"]


def test_an_internal_resolver_that_answers_fails(selftest, udp_server, monkeypatch):
    address, _ = udp_server(lambda q: [_reply(q, selftest.NXDOMAIN)])
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", address)

    assert selftest.internal_resolver_closed() == (
        "the resolver behind the DNS front answered another uid (response code 3)"
    )


PORT_TAKEN = "another uid could bind the resolver's port (and answer for it)"


def test_a_resolver_port_this_uid_cannot_bind_passes(selftest, held_udp_port, monkeypatch):
    # Held without SO_REUSEADDR: the bind is refused (EADDRINUSE), as EACCES is in the gateway.
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", held_udp_port(reuse=False))

    assert selftest.resolver_port_taken() is None


def test_a_resolver_port_shared_with_so_reuseaddr_fails(selftest, held_udp_port, monkeypatch):
    """The attack: the resolver's sockets set SO_REUSEADDR, so any uid that may bind the port at
    all may bind it beside them (and take its queries); the check shares the port the same way."""
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", held_udp_port(reuse=True))

    assert selftest.resolver_port_taken() == PORT_TAKEN


def test_a_free_resolver_port_fails_and_is_left_free(selftest, monkeypatch):
    address = _closed_udp_port()
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", address)

    assert selftest.resolver_port_taken() == PORT_TAKEN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(address)  # the check's socket is closed again


def test_a_refused_bind_passes_whatever_the_error(selftest, monkeypatch):
    """EACCES, what the kernel says to an unprivileged uid below ip_unprivileged_port_start."""
    attempts: list[tuple[str, int]] = []

    class Refusing(socket.socket):
        def bind(self, address: object) -> None:
            attempts.append(address)  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(selftest.socket, "socket", Refusing)

    assert selftest.resolver_port_taken() is None
    assert attempts == [("127.0.0.1", RESOLVER_PORT)]


# As an unprivileged uid without capabilities, in the namespace: the self-test's own check and
# a bind of its own (SO_REUSEADDR, as the check) on each port of argv[2:]; when the bind works,
# whether a query sent to the port then reaches this socket instead of the resolver's.
ATTACKER = f"""
{DNS_SOURCE}
import importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("selftest", sys.argv[1])
selftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(selftest)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out = {{"uid": os.getuid(), "caps": [int(status[key], 16) for key in ("CapPrm", "CapEff",
        "CapAmb")], "ports": {{}}}}
for port in map(int, sys.argv[2:]):
    selftest.INTERNAL_RESOLVER = ("127.0.0.1", port)
    seen = out["ports"][port] = {{"check": selftest.resolver_port_taken()}}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as error:
        seen["bind"] = error.errno
        continue
    seen["bind"] = "bound"
    sock.settimeout(2)
    _, packet = dns_packet("x.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(packet, ("127.0.0.1", port))
        try:
            seen["took_query"] = sock.recv(512) == packet
        except OSError:
            seen["took_query"] = False
print(json.dumps(out))
"""

# Inside the namespace: waits until dnsmasq answers on each port of argv[1:].
ANSWERING = f"""
{DNS_SOURCE}
import sys, time
for port in map(int, sys.argv[1:]):
    deadline = time.monotonic() + 5
    while True:
        try:
            dns_query(port, "x.test", timeout=0.2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
"""
OLD_RESOLVER_PORT = 15053  # the unprivileged port the resolver listened on before


@pytest.mark.parametrize("port_start", [UNPRIVILEGED_PORT_START, 0], ids=["pinned", "lowered"])
def test_in_a_namespace_no_other_uid_can_bind_the_resolvers_port_beside_dnsmasq(port_start):
    """The hijack the privileged port closes: dnsmasq (started as root, as in the gateway) holds
    the port with SO_REUSEADDR; an unprivileged uid without capabilities binds the same port the
    same way and the next query is its to answer. With the gateway's sysctl it cannot on port
    54, and the self-test says so; on the old port 15053 it can (and takes the query), and so it
    can on 54 where the runtime lowered ip_unprivileged_port_start (containerd 2: 0)."""
    sysctl = shutil.which("sysctl") or shutil.which("/usr/sbin/sysctl")
    if sysctl is None:
        pytest.skip("sysctl is not installed")
    setting = "net.ipv4.ip_unprivileged_port_start"
    with netns(DNSMASQ) as namespace:
        namespace.run([sysctl, "-w", f"{setting}={port_start}"])
        assert namespace.run([sysctl, "-n", setting]).strip() == str(port_start)
        for port in (RESOLVER_PORT, OLD_RESOLVER_PORT):
            namespace.start(
                [str(DNSMASQ), "--keep-in-foreground", "--pid-file=", "--conf-file=/dev/null",
                 "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                 f"--port={port}", "--address=/x.test/203.0.113.1", "--log-facility=-"],
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        ready = namespace.python(ANSWERING, str(RESOLVER_PORT), str(OLD_RESOLVER_PORT))
        assert ready.returncode == 0, ready.stderr

        result = namespace.python(
            ATTACKER, str(SCRIPT), str(RESOLVER_PORT), str(OLD_RESOLVER_PORT), uid=1000
        )

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 1000 and seen["caps"] == [0, 0, 0]
    taken = {"check": PORT_TAKEN, "bind": "bound", "took_query": True}
    assert seen["ports"][str(OLD_RESOLVER_PORT)] == taken  # the attack, on an unprivileged port
    if port_start == UNPRIVILEGED_PORT_START:
        assert seen["ports"][str(RESOLVER_PORT)] == {"check": None, "bind": errno.EACCES}
    else:
        assert seen["ports"][str(RESOLVER_PORT)] == taken


# ---------------------------------------------------------------------------------------------
# the proxy


@pytest.fixture
def tcp_server() -> Iterator[Callable[..., tuple[int, list[bytes]]]]:
    """Local TCP servers: ``handle(conn)`` per connection, optionally listening late."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(
        handle: Callable[[socket.socket], None], delay: float = 0.0
    ) -> tuple[int, list[bytes]]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        received: list[bytes] = []

        def serve() -> None:
            if stop.wait(delay):
                return
            with socket.create_server(("127.0.0.1", port)) as server:
                server.settimeout(0.05)
                while not stop.is_set():
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        continue
                    with conn:
                        conn.settimeout(5)
                        received.append(conn.recv(65536))
                        handle(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return port, received

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=5)


def _close(conn: socket.socket) -> None:
    """The proxy's refusal: the ClientHello read, the connection closed unanswered."""


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _hold(conn: socket.socket) -> None:
    time.sleep(3)


def test_a_proxy_that_closes_on_an_unlisted_name_passes(selftest, tcp_server):
    port, received = tcp_server(_close)

    assert selftest.proxy_refuses(port, time.monotonic() + 2) is None
    (hello,) = received
    assert hello[:1] == b"\x16"  # a TLS handshake record: the ClientHello
    assert b"kapsis-selftest.invalid" in hello  # with the unlisted name as its server name


def test_a_proxy_that_resets_passes(selftest, tcp_server):
    port, _ = tcp_server(_reset)

    assert selftest.proxy_refuses(port, time.monotonic() + 2) is None


def test_a_proxy_that_starts_late_is_waited_for(selftest, tcp_server):
    port, received = tcp_server(_close, delay=0.3)

    assert selftest.proxy_refuses(port, time.monotonic() + 3) is None
    assert len(received) == 1


def test_a_proxy_that_never_listens_fails_at_the_deadline(selftest):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()

    outcome = selftest.proxy_refuses(port, start + 0.3)

    assert outcome is not None
    assert outcome.startswith(f"the proxy does not listen on port {port} (")
    assert 0.3 <= time.monotonic() - start < 2


def test_a_proxy_that_holds_the_connection_open_fails(selftest, tcp_server):
    port, _ = tcp_server(_hold)

    outcome = selftest.proxy_refuses(port, time.monotonic() + 2)

    assert outcome is not None
    assert outcome.startswith(f"the proxy on port {port} did not refuse a name not on the list (")


def test_a_proxy_that_completes_the_handshake_fails(selftest, tmp_path):
    """The name is not on the list, yet a TLS server answered: the proxy let it through."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=upstream.test", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with context.wrap_socket(conn, server_side=True):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        outcome = selftest.proxy_refuses(port, time.monotonic() + 2)
    finally:
        thread.join(timeout=5)
        server.close()

    assert outcome == (
        f"the proxy on port {port} let a TLS connection to kapsis-selftest.invalid through"
    )


# On Linux all of 127.0.0.0/8 is local: an address nothing else here will be listening on.
UNUSED_LOOPBACK = "127.83.115.116"


def test_connection_refused_counts_a_closed_port_as_refused(selftest):
    # Nothing listens on port 9 of this loopback address: ECONNREFUSED, as the firewall's reject.
    assert selftest.connection_refused(UNUSED_LOOPBACK) is None


def test_connection_refused_reports_a_listening_port(selftest):
    address = UNUSED_LOOPBACK
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((address, 9))
        except PermissionError:
            pytest.skip("binding port 9 needs privileges here")
        server.listen(1)

        outcome = selftest.connection_refused(address)

    assert outcome == f"a connection to {address} succeeded"


def test_connection_refused_over_ipv6(selftest):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    assert selftest.connection_refused("::1") is None  # nothing on [::1]:9


class _FakeSocketModule:
    """Stands in for the socket module: connect() fails with ``error``."""

    AF_INET, AF_INET6, SOCK_STREAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM

    def __init__(self, error: OSError) -> None:
        self.error = error
        self.connected: list[tuple[int, tuple[str, int]]] = []

    def socket(self, family: int, kind: int) -> _FakeSocketModule._Socket:
        return self._Socket(self, family)

    class _Socket:
        def __init__(self, module: _FakeSocketModule, family: int) -> None:
            self.module, self.family = module, family

        def __enter__(self) -> _FakeSocketModule._Socket:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def settimeout(self, timeout: float) -> None:
            pass

        def connect(self, target: tuple[str, int]) -> None:
            self.module.connected.append((self.family, target))
            raise self.module.error


@pytest.mark.parametrize(
    "code", [errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM]
)
def test_every_kind_of_refusal_counts(selftest, monkeypatch, code):
    fake = _FakeSocketModule(OSError(code, "refused"))
    monkeypatch.setattr(selftest, "socket", fake)

    assert selftest.connection_refused("2001:db8::1") is None
    assert fake.connected == [(socket.AF_INET6, ("2001:db8::1", SELFTEST_PORT))]  # discounted


def test_a_timeout_is_not_a_refusal(selftest, monkeypatch):
    # A dropped (not rejected) connection: the firewall is not the one the host expects.
    monkeypatch.setattr(selftest, "socket", _FakeSocketModule(TimeoutError("timed out")))

    outcome = selftest.connection_refused("192.0.2.1")

    assert outcome == "a connection to 192.0.2.1 was not refused (timed out)"


@pytest.fixture
def gateway(selftest, fake_front, tcp_server, held_udp_port, monkeypatch):
    """A gateway that passes every check; a test then breaks one part. The resolver behind the
    front: a port that refuses this uid's query and that this uid cannot bind."""
    received = fake_front(_front(selftest))
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", held_udp_port(reuse=False))
    port, _ = tcp_server(_close)
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK, str(port)])
    return received


def test_main_passes_when_every_check_does(selftest, gateway, capsys):
    assert selftest.main() == 0
    assert capsys.readouterr().out == ""
    # An unlisted name, then a query of a type never allowed.
    assert [(_question_name(q), _qtype(q)) for q in gateway] == [
        ("kapsis-selftest.invalid", selftest.A),
        ("kapsis-selftest.invalid", selftest.NULL),
    ]


def test_main_fails_when_an_unlisted_name_resolves(selftest, gateway, fake_front, capsys):
    received = fake_front(_front(selftest, nxdomain=False))

    assert selftest.main() == 1
    assert capsys.readouterr().out == (
        "kapsis-selftest.invalid was not NXDOMAIN (response code 0)\n"
    )
    assert [_qtype(q) for q in received] == [selftest.A]


def test_main_fails_when_a_null_query_is_answered(selftest, gateway, fake_front, capsys):
    fake_front(_front(selftest, null_refused=False))

    assert selftest.main() == 1
    assert capsys.readouterr().out == "a NULL query was not refused (response code 0)\n"


def test_main_fails_when_the_resolvers_port_can_be_bound(selftest, gateway, monkeypatch, capsys):
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", _closed_udp_port())  # closed, but free

    assert selftest.main() == 1
    assert capsys.readouterr().out == f"{PORT_TAKEN}\n"


def test_main_fails_when_the_front_never_answers(selftest, gateway, monkeypatch, capsys):
    monkeypatch.setattr(selftest, "resolver_answers", lambda deadline: None)

    assert selftest.main() == 1
    assert capsys.readouterr().out == "the gateway's DNS front did not answer within 5 s\n"


def test_main_checks_every_proxy_port_it_is_given(selftest, gateway, monkeypatch, capsys):
    checked: list[int] = []

    def refuses(port: int, deadline: float) -> str | None:
        checked.append(port)
        return None if port == 15100 else f"port {port} let it through"

    monkeypatch.setattr(selftest, "proxy_refuses", refuses)
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK, "15100", "15101", "15102"])

    assert selftest.main() == 1
    assert checked == [15100, 15101, 15102]
    assert capsys.readouterr().out.splitlines() == [
        "port 15101 let it through",
        "port 15102 let it through",
    ]


def test_main_without_names_checks_no_proxy(selftest, gateway, monkeypatch, capsys):
    def no_proxy(port: int, deadline: float) -> str | None:
        raise AssertionError("no proxy runs without names")

    monkeypatch.setattr(selftest, "proxy_refuses", no_proxy)
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK])

    assert selftest.main() == 0
    assert capsys.readouterr().out == ""


def test_main_reports_every_failed_check_in_order(
    selftest, gateway, fake_front, udp_server, monkeypatch, capsys
):
    fake_front(_front(selftest, nxdomain=False))
    internal, _ = udp_server(lambda q: [_reply(q, 3)], reuse=True)  # answers, and shares
    monkeypatch.setattr(selftest, "INTERNAL_RESOLVER", internal)
    monkeypatch.setattr(selftest, "proxy_refuses", lambda port, deadline: f"proxy {port} open")
    monkeypatch.setattr(selftest, "connection_refused", lambda address: f"{address} answered")
    monkeypatch.setattr(sys, "argv", ["selftest.py", "192.0.2.1", "15100"])

    assert selftest.main() == 1
    assert capsys.readouterr().out.splitlines() == [
        "kapsis-selftest.invalid was not NXDOMAIN (response code 0)",
        "the resolver behind the DNS front answered another uid (response code 3)",
        PORT_TAKEN,
        "proxy 15100 open",
        "192.0.2.1 answered",
    ]


def test_the_script_uses_the_standard_library_only():
    imports = [
        line.split()[1]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]

    assert imports and all(name in sys.stdlib_module_names for name in imports), imports
