"""The start-up server: imports Kapsis once, then forks a child per ``kapsis`` command.

``python -P -m kapsis.forkserver.server BUILD`` (started by the client) holds a lock so that one
server per build runs, imports what commands need, checks that it is the build it was started
for, and listens on a 0600 socket in a 0700 directory, serving only its own user. Per request it
forks; the child takes the client's standard streams, working directory, umask, environment and
argv, and returns from :meth:`Server.serve` so that it runs the command at the top of the stack
and ends through a normal interpreter exit (threads joined, atexit run, streams flushed). The
server reports a child's death by signal, hangs up a child whose client went away, and leaves
when idle, when its socket is taken away, or on a ``stop`` request.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import importlib
import locale
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

from kapsis.forkserver import location, protocol

IDLE_SECONDS_VARIABLE = "KAPSIS_SERVER_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 900.0
REQUEST_TIMEOUT_SECONDS = 5.0
# How often an idle server checks that the installed code is still the code it runs; a server
# of an older build is never asked again and need not wait out its idle time.
BUILD_CHECK_SECONDS = 30.0

# What commands import on their way, loaded before the first fork so that no child pays for it.
# The Kubernetes and operator modules stay out: they pull in the kubernetes client, which a
# local command never needs.
PRELOAD = (
    "kapsis.cli.app",
    "kapsis.cli.render",
    "kapsis.api",
    "kapsis.backends.podman",
    "kapsis.backends.podman_gateway",
    "kapsis.sandbox.launcher",
    "kapsis.sandbox.save_work",
    "kapsis.audit.keys",
    "kapsis.workspace.prepare",
    "kapsis.secrets.resolve",
    "kapsis.status.store",
    "kapsis.ssh.hosts",
    "kapsis.ssh.providers",
    "importlib.resources.readers",
    # typer turns each parameter into a pydantic TypeAdapter when a command runs.
    "typer._adapters",
    "typer._click.decorators",
    "pydantic.type_adapter",
)


class Command:
    """A request this process (a fresh fork) is to run as the ``kapsis`` command."""

    def __init__(self, request: protocol.Request, connection: socket.socket) -> None:
        self.request = request
        self.connection = connection
        self.exit_code = 1

    def run(self) -> None:
        """Run the CLI; ends the process (the exit status also goes to the client)."""
        atexit.register(self._report)
        from kapsis.cli.app import main

        try:
            main()
            self.exit_code = 0
        except SystemExit as stop:
            self.exit_code = _exit_status(stop.code)
            raise
        except KeyboardInterrupt:
            # As an interpreter interrupted here would: die of SIGINT.
            self.exit_code = -signal.SIGINT
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    def _report(self) -> None:
        # Registered first, so it runs last. Should the server be gone, this line is the only
        # report; the connection stays open until the process has fully ended.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):
            protocol.reply(self.connection, "exit", self.exit_code)


class Server:
    def __init__(self, build: str, directory: str) -> None:
        self.build = build
        self.directory = directory
        self.socket_path = location.socket_path(directory, build)
        self.idle_seconds = _idle_seconds()
        self.children: dict[int, socket.socket] = {}
        self.served = 0
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket_inode = 0
        self.next_build_check = time.monotonic() + BUILD_CHECK_SECONDS

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        old_mask = os.umask(0o077)
        try:
            self.listener.bind(self.socket_path)
        finally:
            os.umask(old_mask)
        self.listener.listen(64)
        self.socket_inode = os.stat(self.socket_path).st_ino
        signal.signal(signal.SIGCHLD, lambda _number, _frame: None)
        signal.set_wakeup_fd(self.wakeup_write)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "child")

    def serve(self) -> Command | None:
        """Serve until it is time to leave (None), or return the command a fresh child must run."""
        while not self._time_to_leave():
            for key, _events in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    command = self._accept()
                    if command is not None:
                        return command
                elif key.data == "child":
                    self._reap()
                else:
                    self._client_event(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()
        self._leave()
        return None

    def _time_to_leave(self) -> bool:
        if self.children:
            return False
        if self.stopping:
            return True
        now = time.monotonic()
        if now - self.last_activity > self.idle_seconds:
            return True
        if now > self.next_build_check:
            self.next_build_check = now + BUILD_CHECK_SECONDS
            if location.build_id() != self.build:
                return True
        try:
            return os.stat(self.socket_path).st_ino != self.socket_inode
        except OSError:
            return True

    def _leave(self) -> None:
        try:
            if os.stat(self.socket_path).st_ino == self.socket_inode:
                os.unlink(self.socket_path)
        except OSError:
            pass
        self.listener.close()

    def _accept(self) -> Command | None:
        try:
            connection, _address = self.listener.accept()
        except OSError:
            return None
        self.last_activity = time.monotonic()
        if _peer_uid(connection) != os.getuid():
            connection.close()
            return None
        connection.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            request, fds = protocol.receive_request(connection)
        except (OSError, protocol.ProtocolError) as error:
            print(f"kapsis server: refused a request: {error}", file=sys.stderr, flush=True)
            connection.close()
            return None
        connection.settimeout(None)
        if request.operation == protocol.RUN and request.build == self.build and len(fds) == 4:
            command = self._fork(request, connection, fds)
            if command is None:
                for fd in fds:
                    os.close(fd)
            return command
        try:
            if request.operation == protocol.STATUS:
                protocol.reply(connection, "status", self._status_line())
            elif request.operation == protocol.STOP:
                self.stopping = True
                self._leave_socket()
                protocol.reply(connection, "stopping", os.getpid())
            else:
                protocol.reply(connection, "refused", request.operation or "-")
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)
        connection.close()
        return None

    def _leave_socket(self) -> None:
        """Stop taking commands now; the running ones still get their exit status reported."""
        self.selector.unregister(self.listener)
        self._leave()

    def _status_line(self) -> str:
        return (
            f"pid={os.getpid()} build={self.build} served={self.served} "
            f"commands_running={len(self.children)} started={int(self.started)} "
            f"idle_seconds={int(self.idle_seconds)}"
        )

    def _fork(
        self, request: protocol.Request, connection: socket.socket, fds: list[int]
    ) -> Command | None:
        pid = os.fork()
        if pid == 0:
            self._become_child(request, connection, fds)
            return Command(request, connection)
        self.served += 1
        self.children[pid] = connection
        self.selector.register(connection, selectors.EVENT_READ, pid)
        with contextlib.suppress(OSError):
            protocol.reply(connection, "pid", pid)
        return None

    def _become_child(
        self, request: protocol.Request, connection: socket.socket, fds: list[int]
    ) -> None:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Nothing of the server may outlive it in a child: not the listening socket (a client
        # would queue on it forever), not the lock (no new server could start), not another
        # command's connection (its client would miss its end).
        self.selector.close()
        self.listener.close()
        for other in self.children.values():
            other.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
        _release_lock()
        adopt_client(request, fds)

    def _client_event(self, connection: socket.socket, pid: int) -> None:
        try:
            data = connection.recv(1)
        except OSError:
            data = b""
        if not data:
            # The client is gone (killed, or its terminal closed): hang up the command as a
            # terminal would, instead of letting it run on unseen.
            self.selector.unregister(connection)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGHUP)

    def _reap(self) -> None:
        try:
            while os.read(self.wakeup_read, 512):
                pass
        except (BlockingIOError, OSError):
            pass
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self.children.pop(pid, None)
            if connection is None:
                continue
            self.last_activity = time.monotonic()
            # The child reports its own exit; this covers a death it could not report.
            with contextlib.suppress(OSError):
                protocol.reply(connection, "exit", os.waitstatus_to_exitcode(status))
            if connection.fileno() >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(connection)
            connection.close()


_lock_fd: int | None = None


def _take_lock(directory: str, build: str) -> bool:
    global _lock_fd
    fd = os.open(location.lock_path(directory, build), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _lock_fd = fd
    return True


def _release_lock() -> None:
    global _lock_fd
    if _lock_fd is not None:
        os.close(_lock_fd)
        _lock_fd = None


def _peer_uid(connection: socket.socket) -> int:
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def _idle_seconds() -> float:
    try:
        return float(os.environ.get(IDLE_SECONDS_VARIABLE) or DEFAULT_IDLE_SECONDS)
    except ValueError:
        return DEFAULT_IDLE_SECONDS


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def adopt_client(request: protocol.Request, fds: list[int]) -> None:
    """Become the client's process in all it passed: standard streams, working directory,
    umask, environment and argv (``fds``: its stdin, stdout, stderr and working directory)."""
    stdin, stdout, stderr, cwd = fds
    for target, fd in enumerate((stdin, stdout, stderr)):
        os.dup2(fd, target)
    os.fchdir(cwd)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.umask(request.umask)
    os.environb.clear()
    os.environb.update(request.environ)
    sys.argv = [os.fsdecode(argument) for argument in request.argv] or ["kapsis"]
    _adopt_environment()


def _adopt_environment() -> None:
    """Redo what an interpreter derives from its environment at start: locale, temp dir, and
    the standard streams (their encoding, and line buffering on a terminal)."""
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")
    if "tempfile" in sys.modules:
        # Its cached choice came from the server's TMPDIR.
        sys.modules["tempfile"].tempdir = None  # type: ignore[attr-defined]
    encoding, _, errors = os.environ.get("PYTHONIOENCODING", "").partition(":")
    if not encoding:
        encoding = "utf-8" if sys.flags.utf8_mode else locale.getpreferredencoding(False)
    # Opened for the rest of the process's life, as the interpreter's own streams are.
    sys.stdin = open(0, encoding=encoding, errors=errors or "strict", closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1,
        "w",
        encoding=encoding,
        errors=errors or "strict",
        closefd=False,
        buffering=1 if os.isatty(1) else -1,
    )
    sys.stderr = open(  # noqa: SIM115
        2, "w", encoding=encoding, errors="backslashreplace", closefd=False, buffering=1
    )
    # The originals (sys.__stdout__ & co.) still point at the server's log; rich and the
    # interpreter's last-resort printing use sys.stdout and sys.stderr.


def preload() -> None:
    """Import what commands use and build the CLI's command tree once, before any fork."""
    for name in PRELOAD:
        importlib.import_module(name)
    import typer.main

    from kapsis.cli.app import app

    # typer rebuilds the click command tree from the function signatures on every call (~50 ms);
    # the tree depends only on the code, so the server builds it once for all its children.
    built = typer.main.get_command(app)
    build_command = typer.main.get_command

    def prebuilt(instance: typer.Typer) -> Any:
        return built if instance is app else build_command(instance)

    typer.main.get_command = prebuilt  # type: ignore[assignment]
    # Objects that exist now are never collected: their pages stay shared with the children.
    gc.collect()
    gc.freeze()


def main() -> None:
    build = sys.argv[1] if len(sys.argv) > 1 else ""
    directory = location.private_runtime_dir()
    if directory is None or not build or not _take_lock(directory, build):
        return
    preload()
    if location.build_id() != build:
        print("kapsis server: the code changed while it started; not serving", file=sys.stderr)
        return
    server = Server(build, directory)
    server.listen()
    command = server.serve()
    if command is not None:
        command.run()


if __name__ == "__main__":
    main()
