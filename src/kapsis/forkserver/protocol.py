"""The wire format between the ``kapsis`` client and the start-up server (standard library only).

A request is one frame: ``KPS1``, a 4-byte big-endian length, then NUL-separated byte fields
(operation, build id, umask, the signals the client ignores (comma-separated numbers), argument
count, the arguments, then ``NAME=value`` environment entries). A ``run`` request carries four
file descriptors in the same message: the client's stdin, stdout, stderr and working directory.
Replies are short ASCII lines: ``pid N`` when the command's process exists, ``exit N`` when it
has ended (a negative N: killed by signal -N), one ``status ...`` line for a status request,
and ``refused`` when nothing was started (the client then runs the command itself).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

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
        ignored_signals: list[int] | None = None,
    ) -> None:
        self.operation = operation
        self.build = build
        self.umask = umask
        self.argv = argv or []
        self.environ = environ or {}
        # What the client inherited as SIG_IGN (nohup, a background job): so must the command.
        self.ignored_signals = ignored_signals or []


def encode(request: Request) -> bytes:
    fields = [
        request.operation.encode(),
        request.build.encode(),
        str(request.umask).encode(),
        ",".join(str(number) for number in request.ignored_signals).encode(),
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
        operation, build, umask, ignored, count = (item.decode() for item in fields[:5])
        argc = int(count)
        argv = fields[5 : 5 + argc]
        environ_entries = fields[5 + argc :]
        if len(argv) != argc:
            raise ValueError("fewer arguments than announced")
        environ = {}
        for entry in environ_entries:
            name, separator, value = entry.partition(b"=")
            if not separator:
                raise ValueError("an environment entry without '='")
            environ[name] = value
        ignored_signals = [int(number) for number in ignored.split(",") if number]
        return Request(operation, build, int(umask), argv, environ, ignored_signals)
    except ValueError as error:
        raise ProtocolError(f"bad request: {error}") from None


def send_request(connection: socket.socket, request: Request, fds: list[int]) -> None:
    data = encode(request)
    # The descriptors ride on the first chunk; the rest follows as plain stream data.
    sent = socket.send_fds(connection, [data[:65536]], fds) if fds else 0
    if sent < len(data):
        # Never an empty send: sendall(b"") still calls send(), which fails with EPIPE once a
        # quick server has answered and closed; the client would then take a request that was
        # delivered whole for one that was not, and run the command a second time.
        connection.sendall(data[sent:])


def receive_request(
    connection: socket.socket, timeout: float, max_fds: int = 4
) -> tuple[Request, list[int]]:
    """Read one request frame and the descriptors that came with it (the caller owns them).
    ``timeout`` bounds the whole request, so a slow sender cannot hold the reader longer."""
    deadline = time.monotonic() + timeout
    _time_left(connection, deadline)
    data, fds, _flags, _address = socket.recv_fds(connection, 65536, max_fds)
    try:
        while len(data) < 8:
            data += _more(connection, deadline)
        if data[:4] != MAGIC:
            raise ProtocolError("not a Kapsis start-up request")
        length = int.from_bytes(data[4:8], "big")
        if length > MAX_REQUEST:
            raise ProtocolError(f"request of {length} bytes; the limit is {MAX_REQUEST}")
        while len(data) < 8 + length:
            data += _more(connection, deadline)
        return decode(data[8 : 8 + length]), fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


def _time_left(connection: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request was not sent in time")
    connection.settimeout(left)


def _more(connection: socket.socket, deadline: float) -> bytes:
    _time_left(connection, deadline)
    chunk = connection.recv(65536)
    if not chunk:
        raise ProtocolError("the request ended early")
    return chunk


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def reply(connection: socket.socket, word: str, value: object) -> None:
    connection.sendall(f"{word} {value}\n".encode())


def parse_reply(line: bytes) -> tuple[str, str]:
    word, _, value = line.decode("ascii", "replace").strip().partition(" ")
    return word, value
