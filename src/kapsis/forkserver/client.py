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

# Signals a terminal or a supervisor sends to the command; they go on to it. Those a terminal
# sends (Ctrl-C, Ctrl-\, hang-up) reach the whole foreground group, podman included; a TERM is
# typically a `kill PID`, which reaches only the process named.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
TO_THE_GROUP = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
LOST_EXIT_CODE = 1


def main() -> None:
    """Run ``kapsis`` with this process's arguments; exits with the command's status."""
    if not location.disabled():
        directory = location.private_runtime_dir()
        if directory is not None:
            build = location.build_id()
            status = run_on_server(directory, build)
            if status is not None:
                exit_like(status)
            # `kapsis server stop` (or status) must not start the server it asks about.
            if sys.argv[1:2] != ["server"]:
                start_server(directory, build)
    from kapsis.cli.app import main as run_here

    run_here()


def run_on_server(directory: str, build: str) -> int | None:
    """The command's exit status (negative: killed by that signal), or None if no server took it."""
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(location.socket_path(directory, build))
        # The environment (API keys included) goes only to a server of this very user.
        if protocol.peer_uid(connection) != os.getuid():
            connection.close()
            return None
    except OSError:
        return None
    ignored = [n for n in FORWARDED_SIGNALS if signal.getsignal(n) == signal.SIG_IGN]
    with connection:
        request = protocol.Request(
            protocol.RUN,
            build,
            umask=_current_umask(),
            argv=[os.fsencode(argument) for argument in sys.argv],
            environ=dict(os.environb),
            ignored_signals=[int(number) for number in ignored],
        )
        try:
            # O_PATH: a directory this user may enter but not list is still a working directory.
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            protocol.send_request(connection, request, [0, 1, 2, cwd])
        except OSError:
            # Not delivered whole: the server refuses a partial request, so the command has
            # not run and may run here.
            return None
        finally:
            os.close(cwd)
        forwarder = _Forwarder()
        for number in FORWARDED_SIGNALS:
            if number not in ignored:
                signal.signal(number, forwarder)
        return _follow(connection, forwarder, location.log_path(directory, build))


def _follow(connection: socket.socket, forwarder: _Forwarder, server_log: str) -> int | None:
    """Forward signals to the command's process group until it has ended.

    The child sends its exit status as it begins to exit and the server sends it again once the
    child is gone; reading on to the end of the connection (both have closed it) means this
    process ends after the command's last output, not during its final flush.
    """
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
        print(
            f"kapsis: error: the start-up server went away before the command ended "
            f"(its log: {server_log}); `kapsis status` shows whether an agent still runs",
            file=sys.stderr,
        )
        return LOST_EXIT_CODE
    return status


class _Forwarder:
    """A signal handler that passes each signal on to the command."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def __call__(self, number: int, _frame: object) -> None:
        if self.pid is None:
            # The command may not exist yet: end here, as this signal would end the command.
            # The server hangs up a command whose client is gone.
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        elif number in TO_THE_GROUP:
            signal_command(self.pid, number)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, number)

    def attach(self, pid: int) -> None:
        self.pid = pid


def signal_command(pid: int, number: int) -> None:
    """Signal a command's process group (a fresh child may not have made it yet: then the
    process alone)."""
    try:
        os.killpg(pid, number)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def exit_like(status: int) -> None:
    """End this process the way the command ended: same code, or the same fatal signal."""
    if status < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP keep no handler
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
                [sys.executable, *_interpreter_flags(), "-m", "kapsis.forkserver.server", build],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
    except OSError:
        pass


def _interpreter_flags() -> list[str]:
    """This interpreter's flags that shape the import path, so that the server sees the same
    one (its build id would differ otherwise), and -P: the server must not import from wherever
    this command happened to start."""
    if sys.flags.isolated:
        return ["-I"]
    flags = ["-P"]
    if sys.flags.ignore_environment:
        flags.append("-E")
    if sys.flags.no_user_site:
        flags.append("-s")
    return flags


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
