"""Asking the start-up server of this build how it is, or to stop (``kapsis server ...``)."""

from __future__ import annotations

import os
import socket

from kapsis.forkserver import location, protocol


def current_socket() -> str | None:
    """This build's socket path, or None where no server can be used (disabled, unsafe dir)."""
    if location.disabled():
        return None
    directory = location.private_runtime_dir()
    if directory is None:
        return None
    return location.socket_path(directory, location.build_id())


def ask(path: str, operation: str) -> tuple[str, str] | None:
    """Send a request without a command; the server's one-line answer, or None if none listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(path)
            protocol.send_request(connection, protocol.Request(operation, ""), [])
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = connection.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    return protocol.parse_reply(answer) if answer else None


def status() -> dict[str, str | int] | None:
    """The running server's facts (pid, build, served, commands_running, ...), or None."""
    path = current_socket()
    answer = ask(path, protocol.STATUS) if path else None
    if path is None or answer is None or answer[0] != "status":
        return None
    facts: dict[str, str | int] = {"socket": path}
    for item in answer[1].split():
        name, _, value = item.partition("=")
        facts[name] = int(value) if value.isdigit() else value
    return facts


def stop_all() -> int:
    """Ask every start-up server of this user (any build) to stop; how many were running."""
    directory = location.private_runtime_dir()
    if directory is None:
        return 0
    stopped = 0
    for name in sorted(os.listdir(directory)):
        if name.startswith("server-") and name.endswith(".sock"):
            answer = ask(os.path.join(directory, name), protocol.STOP)
            stopped += answer is not None and answer[0] == "stopping"
    return stopped
