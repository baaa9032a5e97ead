"""The gateway's self-test, run inside the sandbox's network namespace before the agent starts.

Run as an unprivileged user (not the resolver's) with ``python3 selftest.py PROBE_ADDRESS``.
Checks that the resolver answers, that a name not on the allowlist is NXDOMAIN, and that a
direct TCP connection to an address not on the allowlist is refused by the firewall. Prints one
line per failed check and exits 1 if any failed. Standard library only: it runs in the image.
"""

import errno
import random
import socket
import struct
import sys
import time

RESOLVER = ("127.0.0.1", 53)
NOT_LISTED = "kapsis-selftest.invalid"
NXDOMAIN = 3
REFUSED_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,
    errno.EPERM,
}


def query(name: str, timeout: float) -> int:
    """The response code of an A query for ``name``."""
    ident = random.randrange(65536)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + b"\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, RESOLVER)
        while True:
            reply = sock.recv(4096)
            if len(reply) >= 4 and struct.unpack(">H", reply[:2])[0] == ident:
                return reply[3] & 0x0F


def resolver_answers(deadline: float) -> int | None:
    while time.monotonic() < deadline:
        try:
            return query(NOT_LISTED, 0.5)
        except OSError:
            time.sleep(0.05)  # dnsmasq is still starting
    return None


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
    rcode = resolver_answers(time.monotonic() + 5)
    if rcode is None:
        failures.append("the gateway's resolver did not answer within 5 s")
    elif rcode != NXDOMAIN:
        failures.append(f"{NOT_LISTED} was not NXDOMAIN (response code {rcode})")
    outcome = connection_refused(sys.argv[1])
    if outcome is not None:
        failures.append(outcome)
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
