"""The wire format between the ``kapsis`` client and the start-up server (standard library only).

A request is one frame: ``KPS1``, a 4-byte big-endian length, then NUL-separated byte fields
(operation, build id, umask, argument count, the arguments, then ``NAME=value`` environment
entries). A ``run`` request carries four file descriptors in the same message: the client's
stdin, stdout, stderr and working directory. Replies are short ASCII lines: ``pid N`` when the
command's process exists, ``exit N`` when it has ended (a negative N: killed by signal -N), and
one ``status ...`` line for a status request.
"""

from __future__ import annotations

import contextlib
import os
import socket

MAGIC = b"KPS1"
MAX_REQUEST = 4 * 1024 * 1024
RUN, STATUS, STOP = "run", "status", "stop"


class ProtocolError(Exception):
    """A malformed or truncated frame."""


class Request:
    """What a client asks for. A plain class: dataclasses would import inspect on every start."""

    def __init__(
        self,
        operation: str,
        build: str,
        umask: int = 0o022,
        argv: list[bytes] | None = None,
        environ: dict[bytes, bytes] | None = None,
    ) -> None:
        self.operation = operation
        self.build = build
        self.umask = umask
        self.argv = argv or []
        self.environ = environ or {}


def encode(request: Request) -> bytes:
    fields = [
        request.operation.encode(),
        request.build.encode(),
        str(request.umask).encode(),
        str(len(request.argv)).encode(),
        *request.argv,
        *(name + b"=" + value for name, value in request.environ.items()),
    ]
    if any(b"\0" in item for item in fields):
        raise ProtocolError("a NUL byte in an argument or environment entry")
    payload = b"\0".join(fields)
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def decode(frame: bytes) -> Request:
    fields = frame.split(b"\0")
    try:
        operation, build, umask, count = (item.decode() for item in fields[:4])
        argc = int(count)
        argv = fields[4 : 4 + argc]
        environ_entries = fields[4 + argc :]
        if len(argv) != argc:
            raise ValueError("fewer arguments than announced")
        environ = {}
        for entry in environ_entries:
            name, separator, value = entry.partition(b"=")
            if not separator:
                raise ValueError("an environment entry without '='")
            environ[name] = value
        return Request(operation, build, int(umask), argv, environ)
    except ValueError as error:
        raise ProtocolError(f"bad request: {error}") from None


def send_request(connection: socket.socket, request: Request, fds: list[int]) -> None:
    data = encode(request)
    # The descriptors ride on the first chunk; the rest follows as plain stream data.
    sent = socket.send_fds(connection, [data[:65536]], fds) if fds else 0
    connection.sendall(data[sent:])


def receive_request(connection: socket.socket, max_fds: int = 4) -> tuple[Request, list[int]]:
    """Read one request frame and the descriptors that came with it (the caller owns them)."""
    data, fds, _flags, _address = socket.recv_fds(connection, 65536, max_fds)
    try:
        while len(data) < 8:
            data += _more(connection)
        if data[:4] != MAGIC:
            raise ProtocolError("not a Kapsis start-up request")
        length = int.from_bytes(data[4:8], "big")
        if length > MAX_REQUEST:
            raise ProtocolError(f"request of {length} bytes; the limit is {MAX_REQUEST}")
        while len(data) < 8 + length:
            data += _more(connection)
        return decode(data[8 : 8 + length]), fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


def _more(connection: socket.socket) -> bytes:
    chunk = connection.recv(65536)
    if not chunk:
        raise ProtocolError("the request ended early")
    return chunk


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def reply(connection: socket.socket, word: str, value: object) -> None:
    connection.sendall(f"{word} {value}\n".encode())


def parse_reply(line: bytes) -> tuple[str, str]:
    word, _, value = line.decode("ascii", "replace").strip().partition(" ")
    return word, value
