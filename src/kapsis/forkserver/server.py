"""The start-up server: imports Kapsis once, then forks a child per ``kapsis`` command.

``python -P -m kapsis.forkserver.server BUILD`` (started by the client) holds a lock so that one
server per build runs, imports what commands need, checks that it is the build it was started
for, and listens on a socket closed to others in a 0700 directory, serving only its own user.
Per request it forks; the child takes the client's standard streams, working directory, umask,
environment, ignored signals and argv, and returns from :meth:`Server.serve` so that it runs the
command at the top of the stack and ends through a normal interpreter exit (threads joined,
atexit run, streams flushed). The server reports a child's death by signal, hangs up a child
whose client went away, and leaves when idle, when its socket is taken away, or on a ``stop``
request, turning away what is still queued.
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
import sys
import time

from kapsis.forkserver import client, location, protocol

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
    """The ``kapsis`` command that this process (a fresh fork) is to run for a client."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.exit_code = 1

    def run(self) -> None:
        """Run the CLI; ends the process (the exit status also goes to the client)."""
        atexit.register(self._report)
        from kapsis.cli.app import main

        try:
            main(prog_name=program_name(sys.argv[0]))
            self.exit_code = 0
        except SystemExit as stop:
            self.exit_code = _exit_status(stop.code)
            raise

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
                elif key.data != "child":  # children are reaped below, every round
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
        """Take no more commands: new clients find no socket and run theirs themselves; those
        already queued are told ``refused`` and do the same. The lock goes too, so that the next
        command can start a new server while this one's commands finish."""
        if self.listener.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self.socket_inode:
                os.unlink(self.socket_path)
        self.listener.setblocking(False)
        while True:
            try:
                queued, _address = self.listener.accept()
            except OSError:
                break
            with queued, contextlib.suppress(OSError):
                protocol.reply(queued, "refused", "stopping")
        self.listener.close()
        _release_lock()

    def _accept(self) -> Command | None:
        try:
            connection, _address = self.listener.accept()
        except OSError:
            return None
        self.last_activity = time.monotonic()
        if protocol.peer_uid(connection) != os.getuid():
            connection.close()
            return None
        try:
            request, fds = protocol.receive_request(connection, REQUEST_TIMEOUT_SECONDS)
        except (OSError, protocol.ProtocolError) as error:
            print(f"kapsis server: refused a request: {error}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                protocol.reply(connection, "refused", "bad-request")
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
                self.selector.unregister(self.listener)
                self._leave()
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

    def _status_line(self) -> str:
        return (
            f"pid={os.getpid()} build={self.build} served={self.served} "
            f"commands_running={len(self.children)} started={int(self.started)} "
            f"idle_seconds={int(self.idle_seconds)}"
        )

    def _fork(
        self, request: protocol.Request, connection: socket.socket, fds: list[int]
    ) -> Command | None:
        try:
            pid = os.fork()
        except OSError as error:
            print(f"kapsis server: cannot fork: {error}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                protocol.reply(connection, "refused", "fork-failed")
            connection.close()
            return None
        if pid == 0:
            self._become_child(request, connection, fds)
            return Command(connection)
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
        for ignored in request.ignored_signals:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(ignored, signal.SIG_IGN)
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
            client.signal_command(pid, signal.SIGHUP)

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
    """Redo what an interpreter derives from its environment at start: locale, time zone, temp
    dir, and the standard streams (encoding and error handler as CPython chooses them, line
    buffering on a terminal, none with PYTHONUNBUFFERED)."""
    try:
        ctype = locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        ctype = "C"
    time.tzset()
    if "tempfile" in sys.modules:
        # Its cached choice came from the server's TMPDIR.
        sys.modules["tempfile"].tempdir = None  # type: ignore[attr-defined]
    utf8_setting = os.environ.get("PYTHONUTF8")
    # PEP 540: UTF-8 mode when asked for, or by default under the C or POSIX locale.
    utf8_mode = utf8_setting == "1" or (utf8_setting is None and ctype in ("C", "POSIX"))
    encoding, _, errors = os.environ.get("PYTHONIOENCODING", "").partition(":")
    if not encoding:
        encoding = "utf-8" if utf8_mode else locale.nl_langinfo(locale.CODESET)
    if not errors:
        lenient = utf8_mode or ctype in ("C", "POSIX", "C.UTF-8", "C.utf8", "UTF-8")
        errors = "surrogateescape" if lenient else "strict"
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    # Opened for the rest of the process's life, as the interpreter's own streams are; the
    # originals (sys.__stdout__ & co.) write to the same descriptors since adopt_client.
    sys.stdin = open(0, encoding=encoding, errors=errors, newline="\n", closefd=False)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1,
        "w",
        encoding=encoding,
        errors=errors,
        newline="\n",
        closefd=False,
        buffering=1 if unbuffered or os.isatty(1) else -1,
    )
    sys.stderr = open(  # noqa: SIM115
        2,
        "w",
        encoding=encoding,
        errors="backslashreplace",
        newline="\n",
        closefd=False,
        buffering=1,
    )


def program_name(argv0: str) -> str:
    """What usage messages call the command: as click names it in the client's process."""
    if argv0.endswith(os.path.join("kapsis", "__main__.py")):
        return "python -m kapsis"
    return os.path.basename(argv0) or "kapsis"


def preload() -> None:
    """Import what commands use and build the CLI's command tree once, before any fork."""
    for name in PRELOAD:
        importlib.import_module(name)
    from kapsis.cli.app import click_command

    click_command()
    # Objects that exist now are never collected: their pages stay shared with the children.
    gc.collect()
    gc.freeze()


def _is_build(build: str) -> bool:
    if location.build_id() == build:
        return True
    # A client started with other interpreter flags sees another import path.
    print(f"kapsis server: this is not build {build}; not serving", file=sys.stderr, flush=True)
    return False


def main() -> None:
    build = sys.argv[1] if len(sys.argv) > 1 else ""
    directory = location.private_runtime_dir()
    if directory is None or not build or not _take_lock(directory, build):
        return
    # Checked before the imports (which cost far more), and after them: the code may have
    # changed meanwhile.
    if not _is_build(build):
        return
    preload()
    if not _is_build(build):
        return
    server = Server(build, directory)
    server.listen()
    command = server.serve()
    if command is not None:
        command.run()


if __name__ == "__main__":
    main()
