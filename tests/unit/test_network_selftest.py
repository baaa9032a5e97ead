"""The gateway's self-test script (standard-library Python run inside the gateway).

Its resolver is pointed at a UDP socket on 127.0.0.1 that the test controls; its connection
check is pointed at local ports that are closed or listening. Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest

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
def fake_resolver(selftest: ModuleType) -> Iterator[Callable[[Responder], list[bytes]]]:
    """Point the self-test's resolver at a local UDP socket answering with ``responder``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    received: list[bytes] = []
    stop = threading.Event()
    holder: dict[str, Responder] = {}

    def serve() -> None:
        while not stop.is_set():
            try:
                packet, peer = sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            received.append(packet)
            for reply in holder["responder"](packet):
                sock.sendto(reply, peer)

    def install(responder: Responder) -> list[bytes]:
        holder["responder"] = responder
        selftest.RESOLVER = sock.getsockname()
        thread.start()
        return received

    thread = threading.Thread(target=serve, daemon=True)
    yield install
    stop.set()
    if thread.is_alive():
        thread.join(timeout=1)
    sock.close()


def _reply(query: bytes, rcode: int, ident: int | None = None) -> bytes:
    """A response to ``query``: same id (unless given), QR set, the given response code."""
    (query_id,) = struct.unpack(">H", query[:2])
    flags = 0x8180 | rcode
    header = struct.pack(">HHHHHH", query_id if ident is None else ident, flags, 1, 0, 0, 0)
    return header + query[12:]


def _question_name(query: bytes) -> str:
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return ".".join(labels)


def test_query_sends_an_a_query_for_the_name_and_returns_nxdomain(selftest, fake_resolver):
    received = fake_resolver(lambda q: [_reply(q, selftest.NXDOMAIN)])

    assert selftest.query("kapsis-selftest.invalid", 1.0) == 3

    (packet,) = received
    _ident, flags, qdcount, ancount, nscount, arcount = struct.unpack(">HHHHHH", packet[:12])
    assert (flags, qdcount, ancount, nscount, arcount) == (0x0100, 1, 0, 0, 0)  # RD, 1 question
    assert _question_name(packet) == "kapsis-selftest.invalid"
    assert packet[-4:] == b"\0\1\0\1"  # type A, class IN


def test_query_returns_noerror(selftest, fake_resolver):
    fake_resolver(lambda q: [_reply(q, 0)])

    assert selftest.query("listed.example", 1.0) == 0


def test_query_ignores_replies_with_another_id(selftest, fake_resolver):
    def spoof_first(query: bytes) -> list[bytes]:
        (ident,) = struct.unpack(">H", query[:2])
        return [_reply(query, 0, ident=(ident + 1) % 65536), b"\0", _reply(query, 3)]

    fake_resolver(spoof_first)

    assert selftest.query("kapsis-selftest.invalid", 1.0) == 3


def test_query_times_out_when_nothing_answers(selftest, fake_resolver):
    fake_resolver(lambda q: [])

    with pytest.raises(OSError):
        selftest.query("kapsis-selftest.invalid", 0.1)


def test_resolver_answers_asks_again_while_the_resolver_is_starting(
    selftest, fake_resolver, monkeypatch
):
    fake_resolver(lambda q: [_reply(q, 3)])
    attempts: list[float] = []
    real_query = selftest.query

    def starting_up(name: str, timeout: float) -> int:
        attempts.append(timeout)
        if len(attempts) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "not listening yet")
        return real_query(name, timeout)

    monkeypatch.setattr(selftest, "query", starting_up)

    assert selftest.resolver_answers(selftest.time.monotonic() + 2) == 3
    assert attempts == [0.5, 0.5, 0.5]


def test_resolver_answers_gives_up_at_the_deadline(selftest, monkeypatch):
    attempts = []

    def never(name: str, timeout: float) -> int:
        attempts.append(name)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "not listening")

    monkeypatch.setattr(selftest, "query", never)
    start = selftest.time.monotonic()

    assert selftest.resolver_answers(start + 0.15) is None
    assert 0.15 <= selftest.time.monotonic() - start < 1.0
    assert len(attempts) >= 2
    assert set(attempts) == {"kapsis-selftest.invalid"}


def test_resolver_answers_gives_the_response_code(selftest, fake_resolver):
    fake_resolver(lambda q: [_reply(q, 3)])

    assert selftest.resolver_answers(selftest.time.monotonic() + 2) == 3


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
    assert fake.connected == [(socket.AF_INET6, ("2001:db8::1", 9))]


def test_a_timeout_is_not_a_refusal(selftest, monkeypatch):
    # A dropped (not rejected) connection: the firewall is not the one the host expects.
    monkeypatch.setattr(selftest, "socket", _FakeSocketModule(TimeoutError("timed out")))

    outcome = selftest.connection_refused("192.0.2.1")

    assert outcome == "a connection to 192.0.2.1 was not refused (timed out)"


def test_main_passes_with_nxdomain_and_a_refused_connection(
    selftest, fake_resolver, monkeypatch, capsys
):
    fake_resolver(lambda q: [_reply(q, 3)])
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK])

    assert selftest.main() == 0
    assert capsys.readouterr().out == ""


def test_main_fails_when_an_unlisted_name_resolves(selftest, fake_resolver, monkeypatch, capsys):
    fake_resolver(lambda q: [_reply(q, 0)])
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK])

    assert selftest.main() == 1
    assert capsys.readouterr().out == (
        "kapsis-selftest.invalid was not NXDOMAIN (response code 0)\n"
    )


def test_main_reports_every_failed_check(selftest, fake_resolver, monkeypatch, capsys):
    fake_resolver(lambda q: [_reply(q, 0)])
    monkeypatch.setattr(selftest, "connection_refused", lambda address: f"{address} answered")
    monkeypatch.setattr(sys, "argv", ["selftest.py", "192.0.2.1"])

    assert selftest.main() == 1
    assert capsys.readouterr().out.splitlines() == [
        "kapsis-selftest.invalid was not NXDOMAIN (response code 0)",
        "192.0.2.1 answered",
    ]


def test_main_fails_when_the_resolver_never_answers(selftest, monkeypatch, capsys):
    monkeypatch.setattr(selftest, "resolver_answers", lambda deadline: None)
    monkeypatch.setattr(sys, "argv", ["selftest.py", UNUSED_LOOPBACK])

    assert selftest.main() == 1
    assert capsys.readouterr().out == "the gateway's resolver did not answer within 5 s\n"


def test_the_script_uses_the_standard_library_only():
    imports = [
        line.split()[1]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]

    assert imports and all(name in sys.stdlib_module_names for name in imports), imports
