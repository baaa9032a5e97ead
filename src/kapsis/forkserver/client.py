"""The ``kapsis`` command's entry point: hand the command to a warm start-up server, or run it here.

Only the standard library is imported before a server takes the command: this module's import
time is the floor of every ``kapsis`` start. Once a request is sent the command runs there and
never here as well; a request that could not be sent runs here, so a missing, stale or broken
server costs a fallback, never the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from kapsis.forkserver import location, protocol

# Signals a terminal or a supervisor sends to the command; they go on to the command's process
# group, as they would reach it if it ran here.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
LOST_EXIT_CODE = 1


def main() -> None:
    """Run ``kapsis`` with this process's arguments; exits with the command's status."""
    if not location.disabled():
        directory = location.private_runtime_dir()
        if directory is not None:
            build = location.build_id()
            status = run_on_server(location.socket_path(directory, build), build)
            if status is not None:
                exit_like(status)
            # `kapsis server stop` (or status) must not start the server it asks about.
            if sys.argv[1:2] != ["server"]:
                start_server(directory, build)
    from kapsis.cli.app import main as run_here

    run_here()


def run_on_server(path: str, build: str) -> int | None:
    """The command's exit status (negative: killed by that signal), or None if no server took it."""
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(path)
    except OSError:
        return None
    with connection:
        request = protocol.Request(
            protocol.RUN,
            build,
            umask=_current_umask(),
            argv=[os.fsencode(argument) for argument in sys.argv],
            environ=dict(os.environb),
        )
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            protocol.send_request(connection, request, [0, 1, 2, cwd])
        except OSError:
            # Not delivered whole: the server's child refuses a partial request, so the
            # command has not run and may run here.
            return None
        finally:
            os.close(cwd)
        return _follow(connection, path)


def _follow(connection: socket.socket, path: str) -> int | None:
    """Forward signals to the command's process group until it has ended.

    The child sends its exit status as it begins to exit and the server sends it again once the
    child is gone; reading on to the end of the connection (both have closed it) means this
    process ends after the command's last output, not during its final flush.
    """
    forwarder = _Forwarder()
    for number in FORWARDED_SIGNALS:
        signal.signal(number, forwarder)
    buffer = b""
    status: int | None = None
    while True:
        try:
            chunk = connection.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            word, value = protocol.parse_reply(line)
            if word == "pid":
                forwarder.attach(int(value))
            elif word == "exit":
                status = int(value)
            elif word == "refused":
                return None  # nothing was forked: the command may run here
    if status is None:
        log = path.removesuffix(".sock") + ".log"
        print(
            f"kapsis: error: the start-up server went away before the command ended "
            f"(its log: {log}); `kapsis status` shows whether an agent still runs",
            file=sys.stderr,
        )
        return LOST_EXIT_CODE
    return status


class _Forwarder:
    """A signal handler that passes each signal to the command, or holds it until the command's
    process is known."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []

    def __call__(self, number: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(number)
        else:
            _signal_group(self.pid, number)

    def attach(self, pid: int) -> None:
        self.pid = pid
        for number in self.pending:
            _signal_group(pid, number)
        self.pending.clear()


def _signal_group(pid: int, number: int) -> None:
    try:
        os.killpg(pid, number)
    except ProcessLookupError:
        # The child has not made its own process group yet (or has just ended).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def exit_like(status: int) -> None:
    """End this process the way the command ended: same code, or the same fatal signal."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    sys.exit(status)


def start_server(directory: str, build: str) -> None:
    """Start a server in the background for the commands that follow; never fails the command."""
    import subprocess

    log = location.log_path(directory, build)
    try:
        with open(log, "ab") as output:
            subprocess.Popen(
                # -P: the server must not import from wherever this command happened to start.
                [sys.executable, "-P", "-m", "kapsis.forkserver.server", build],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
    except OSError:
        pass


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
