"""The gateway's self-test, run inside the sandbox's network namespace before the agent starts.

Run as an unprivileged user (none of the gateway's daemons' uids) with
``python3 selftest.py PROBE_ADDRESS [PROXY_PORT ...]``. Checks that the DNS front answers, that
a name not on the allowlist is NXDOMAIN and a query type not allowed is REFUSED, that the
resolver behind the front does not answer this user and that this user cannot bind its port,
that the proxy listens on each of its ports and refuses a TLS connection to a name not on the
list, and that a direct TCP connection to an
address not on the allowlist is refused by the firewall. Prints one line per failed check and
exits 1 if any failed. Standard library only: it runs in the image.
"""

import errno
import random
import socket
import ssl
import struct
import sys
import time

RESOLVER = ("127.0.0.1", 53)
INTERNAL_RESOLVER = ("127.0.0.1", 54)  # kapsis.network.gateway_layout.RESOLVER_PORT
NOT_LISTED = "kapsis-selftest.invalid"
A, NULL = 1, 10  # NULL: never allowed (a classic DNS tunnel type)
NXDOMAIN, REFUSED = 3, 5
REFUSED_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,
    errno.EPERM,
}


def query(name: str, qtype: int, timeout: float, server: tuple[str, int] = RESOLVER) -> int:
    """The response code of a ``qtype`` query for ``name``."""
    ident = random.randrange(65536)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0"
    packet += struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(server)
        sock.send(packet)
        while True:
            reply = sock.recv(4096)
            if len(reply) >= 4 and struct.unpack(">H", reply[:2])[0] == ident:
                return reply[3] & 0x0F


def resolver_answers(deadline: float) -> int | None:
    while time.monotonic() < deadline:
        try:
            return query(NOT_LISTED, A, 0.5)
        except OSError:
            time.sleep(0.05)  # the front or the resolver is still starting
    return None


def internal_resolver_closed() -> str | None:
    try:
        rcode = query(NOT_LISTED, A, 1.0, INTERNAL_RESOLVER)
    except OSError:
        return None
    return f"the resolver behind the DNS front answered another uid (response code {rcode})"


def resolver_port_taken() -> str | None:
    """None when this uid cannot bind the resolver's port, even sharing it (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(INTERNAL_RESOLVER)
        except OSError:
            return None
    return "another uid could bind the resolver's port (and answer for it)"


def proxy_refuses(port: int, deadline: float) -> str | None:
    """None when the proxy takes a TLS connection to an unlisted name and closes it unanswered."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            break
        except OSError as error:
            if time.monotonic() > deadline:
                return f"the proxy does not listen on port {port} ({error})"
            time.sleep(0.05)  # the proxy is still starting
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=NOT_LISTED):
                return f"the proxy on port {port} let a TLS connection to {NOT_LISTED} through"
        except (ssl.SSLError, ConnectionError):
            return None
        except OSError as error:
            return f"the proxy on port {port} did not refuse a name not on the list ({error})"


def connection_refused(address: str) -> str | None:
    """None when the firewall refuses the connection, else what happened instead."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((address, 9))  # the host discounts this attempt (observe.py)
        except OSError as error:
            if error.errno in REFUSED_ERRNOS:
                return None
            return f"a connection to {address} was not refused ({error})"
        return f"a connection to {address} succeeded"


def main() -> int:
    failures = []
    started = time.monotonic()
    rcode = resolver_answers(started + 5)
    if rcode is None:
        failures.append("the gateway's DNS front did not answer within 5 s")
    elif rcode != NXDOMAIN:
        failures.append(f"{NOT_LISTED} was not NXDOMAIN (response code {rcode})")
    else:
        rcode = query(NOT_LISTED, NULL, 2.0)
        if rcode != REFUSED:
            failures.append(f"a NULL query was not refused (response code {rcode})")
    for outcome in (
        internal_resolver_closed(),
        resolver_port_taken(),
        *(proxy_refuses(int(port), started + 5) for port in sys.argv[2:]),
        connection_refused(sys.argv[1]),
    ):
        if outcome is not None:
            failures.append(outcome)
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
