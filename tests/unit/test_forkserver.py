"""The start-up server: commands through it behave as commands run here, and only its user's."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kapsis.forkserver import control, location, protocol
from kapsis.forkserver.server import adopt_client


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An environment whose commands use a start-up server of this test alone."""
    # Under /tmp, not tmp_path: another user must be able to reach it once it is opened up.
    directory = Path(tempfile.mkdtemp(prefix="kapsis-test-run-")) / "run"
    monkeypatch.setenv("KAPSIS_RUNTIME_DIR", str(directory))
    env = {
        **os.environ,
        "KAPSIS_RUNTIME_DIR": str(directory),
        "KAPSIS_HOME": str(tmp_path / "home"),
        "KAPSIS_CONFIG_DIR": str(tmp_path / "config"),
        "COLUMNS": "100",
    }
    env.pop("KAPSIS_NO_SERVER", None)
    yield env
    _kill_commands_of_servers(directory)
    kapsis("server", "stop", env=env)
    shutil.rmtree(directory.parent, ignore_errors=True)


def _kill_commands_of_servers(directory: Path) -> None:
    """A failed test may leave a never-ending command behind: end them with their servers."""
    for socket_file in directory.glob("*.sock"):
        answer = control.ask(str(socket_file), protocol.STATUS)
        if answer is None:
            continue
        server_pid = int(answer[1].split("pid=")[1].split()[0])
        for child in _children(server_pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def kapsis(
    *args: str, env: dict[str, str], cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kapsis", *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def server_facts(env: dict[str, str]) -> dict[str, object]:
    """The running server's status, starting one (by running a command) if there is none."""
    kapsis("status", "--json", env=env)  # any command but `server ...` starts one
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = kapsis("server", "status", "--json", env=env)
        if result.returncode == 0:
            return dict(json.loads(result.stdout))
        time.sleep(0.1)
    raise AssertionError("no start-up server came up")


def test_commands_through_the_server_match_the_same_commands_run_here(
    runtime: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "agent-sandbox.yaml").write_text("resources:\n  memory: 3g\n")
    commands = [
        ("config", "show", "--json"),  # reads ./agent-sandbox.yaml: the cwd came along
        ("config", "show", "--config", "missing.yaml"),  # exit 2 and one line on stderr
        ("status", "--json"),  # KAPSIS_HOME from the environment
        ("run", str(project), "--task", "true", "--memory", "lots", "--dry-run"),
        ("config", "show", "--bogus"),  # the usage message names the program
    ]
    # What the server derived from its own start-up environment must not leak into them: a
    # table of box-drawing characters under the C locale (UTF-8 mode, as CPython would).
    extra = {("config", "show"): {"LC_ALL": "C"}}
    served_before = int(str(server_facts(runtime)["served"]))
    commands.append(("config", "show"))

    def run(command: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return kapsis(*command, env={**env, **extra.get(command, {})}, cwd=project)

    through_server = [run(command, runtime) for command in commands]
    here = {**runtime, "KAPSIS_NO_SERVER": "1"}
    run_here = [run(command, here) for command in commands]
    for command, served, local in zip(commands, through_server, run_here, strict=True):
        assert (served.returncode, served.stdout, served.stderr) == (
            local.returncode,
            local.stdout,
            local.stderr,
        ), command
    assert json.loads(through_server[0].stdout)["config"]["resources"]["memory"] == "3g"
    assert through_server[1].returncode == 2
    assert "missing.yaml" in through_server[1].stderr
    assert through_server[3].returncode == 2
    assert "Usage: python -m kapsis config show" in through_server[4].stderr
    assert through_server[5].returncode == 0 and "┃" in through_server[5].stdout
    # They went through the server (plus server_facts' own two commands).
    served_after = int(str(server_facts(runtime)["served"]))
    assert served_after - served_before == len(commands) + 2


def test_the_child_takes_the_clients_streams_directory_umask_environment_and_argv(
    tmp_path: Path,
) -> None:
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    cwd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    request = protocol.Request(
        protocol.RUN,
        "build",
        umask=0o027,
        argv=[b"kapsis", b"caf\xc3\xa9", b"\xff-not-utf8"],
        environ={b"ONLY_IN_CLIENT": b"yes", b"PYTHONIOENCODING": b"utf-8"},
    )
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its new stdout
        try:
            for fd in (stdin_write, stdout_read, stderr_read):  # the parent's ends
                os.close(fd)
            adopt_client(request, [stdin_read, stdout_write, stderr_write, cwd])
            report = {
                "cwd": os.getcwd(),
                "umask": os.umask(0),
                "env": dict(os.environ),
                "argv": sys.argv,
                "stdin": sys.stdin.read(),
            }
            print(json.dumps(report))
            print("to stderr", file=sys.stderr)
            sys.stdout.flush()
        finally:
            os._exit(0)
    for fd in (stdin_read, stdout_write, stderr_write, cwd):
        os.close(fd)
    os.write(stdin_write, b"from the client's stdin")
    os.close(stdin_write)
    os.waitpid(pid, 0)
    with os.fdopen(stdout_read) as stdout, os.fdopen(stderr_read) as stderr:
        report = json.loads(stdout.read())
        assert stderr.read() == "to stderr\n"
    assert report["cwd"] == str(tmp_path)
    assert report["umask"] == 0o027
    assert report["env"] == {"ONLY_IN_CLIENT": "yes", "PYTHONIOENCODING": "utf-8"}
    assert report["argv"] == ["kapsis", "café", os.fsdecode(b"\xff-not-utf8")]
    assert report["stdin"] == "from the client's stdin"


def _wait_for(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _watch(
    env: dict[str, str], preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[str]:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kapsis", "status", "--watch"],
        env=env,
        preexec_fn=preexec_fn,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # until it watches (it never ends by itself)
    assert watcher.poll() is None
    return watcher


def _running(env: dict[str, str]) -> int:
    return int(str(server_facts(env)["commands_running"])) - 1  # minus the status request


def test_ctrl_c_reaches_the_command_and_ends_it_as_it_would_here(runtime: dict[str, str]) -> None:
    server_facts(runtime)
    here = _watch({**runtime, "KAPSIS_NO_SERVER": "1"})
    here.send_signal(signal.SIGINT)
    here_code = here.wait(timeout=15)

    served = _watch(runtime)
    assert _running(runtime) == 1
    served.send_signal(signal.SIGINT)
    assert served.wait(timeout=15) == here_code
    assert _wait_for(lambda: _running(runtime) == 0)


def test_a_command_whose_client_was_killed_is_hung_up(runtime: dict[str, str]) -> None:
    server_facts(runtime)
    watcher = _watch(runtime)
    assert _running(runtime) == 1  # control: it runs while its client does
    watcher.kill()
    watcher.wait()
    assert _wait_for(lambda: _running(runtime) == 0)


def _raw_request(build: str, as_user: int | None) -> str:
    """Connect and send a run request as ``as_user``; what the server answered."""
    frame = protocol.encode(
        protocol.Request(protocol.RUN, build, argv=[b"kapsis", b"config", b"schema"])
    )
    path = location.socket_path(os.environ["KAPSIS_RUNTIME_DIR"], build)
    script = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({path!r})\n"
        "cwd = os.open('/', os.O_RDONLY)\n"
        "null = os.open('/dev/null', os.O_RDWR)\n"
        "answer = b''\n"
        "try:\n"
        f"    socket.send_fds(s, [bytes.fromhex({frame.hex()!r})], [null, null, null, cwd])\n"
        "    while chunk := s.recv(4096):\n"
        "        answer += chunk\n"
        "except ConnectionError:\n"  # a refusal may arrive as a reset
        "    pass\n"
        "print(answer.decode())\n"
    )
    # The system's interpreter: another user may not be able to enter this one's directory.
    result = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", script],
        user=as_user,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to act as another user) and the system's python3",
)
def test_another_user_gets_nothing_from_the_server_even_through_loose_permissions(
    runtime: dict[str, str],
) -> None:
    facts = server_facts(runtime)
    build = str(facts["build"])
    # A careless chmod: the directory and the socket open to everyone.
    os.chmod(Path(os.environ["KAPSIS_RUNTIME_DIR"]).parent, 0o711)
    os.chmod(os.environ["KAPSIS_RUNTIME_DIR"], 0o711)
    os.chmod(str(facts["socket"]), 0o666)
    assert "pid" not in _raw_request(build, as_user=65534)
    # Control: the same request from the server's own user is served.
    answer = _raw_request(build, as_user=None)
    assert "pid " in answer and "exit 0" in answer


def test_stop_and_idle_end_the_server(runtime: dict[str, str]) -> None:
    facts = server_facts(runtime)
    socket_file = Path(str(facts["socket"]))
    assert socket_file.exists()
    result = kapsis("server", "stop", env={**runtime, "KAPSIS_NO_SERVER": "1"})
    assert result.returncode == 0 and "stopping" in result.stdout
    assert _wait_for(lambda: not socket_file.exists())
    # Asking about a server that is not running does not start one.
    for command in (("server", "stop"), ("server", "status")):
        assert kapsis(*command, env=runtime).returncode in (0, 1)
    time.sleep(1.5)
    assert not socket_file.exists()

    idle = {**runtime, "KAPSIS_SERVER_IDLE_SECONDS": "1"}
    facts = server_facts(idle)
    socket_file = Path(str(facts["socket"]))
    assert _wait_for(lambda: not socket_file.exists(), timeout=20)


def test_no_server_with_kapsis_no_server(runtime: dict[str, str]) -> None:
    off = {**runtime, "KAPSIS_NO_SERVER": "1"}
    for _ in range(2):
        assert kapsis("status", "--json", env=off).returncode == 0
    time.sleep(1)
    directory = Path(runtime["KAPSIS_RUNTIME_DIR"])
    assert not directory.exists() or not list(directory.glob("*.sock"))
    status = kapsis("server", "status", env=off)
    assert status.returncode == 1 and "KAPSIS_NO_SERVER" in status.stdout


def test_the_runtime_directory_must_be_this_users_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "run"
    monkeypatch.setenv("KAPSIS_RUNTIME_DIR", str(directory))
    assert location.private_runtime_dir() == str(directory)
    assert directory.stat().st_mode & 0o777 == 0o700
    directory.chmod(0o755)
    assert location.private_runtime_dir() is None
    directory.chmod(0o700)
    assert location.private_runtime_dir() == str(directory)
    if os.geteuid() == 0:
        os.chown(directory, 65534, 65534)
        assert location.private_runtime_dir() is None


def test_the_build_id_follows_the_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = location.build_id()
    assert location.build_id() == first
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "path", [sys.path[-1], *sys.path])  # keep sys.path[0] aside
    with_entry = location.build_id()
    assert with_entry != first
    os.utime(tmp_path, ns=(1, 1))  # a package installed or removed there changes its mtime
    assert location.build_id() != with_entry


def test_a_request_is_delivered_even_when_the_server_answers_and_hangs_up_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that fits the first chunk is whole once that chunk is sent: a server quick to
    answer and close must not make the client think otherwise (it would run the command a
    second time, here)."""
    client_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    real_send_fds = socket.send_fds
    received: list[protocol.Request] = []

    def send_then_server_finishes(sock: socket.socket, *args: object) -> int:
        sent = real_send_fds(sock, *args)  # type: ignore[arg-type]
        request, fds = protocol.receive_request(server_end, timeout=5)
        received.append(request)
        for fd in fds:
            os.close(fd)
        server_end.close()  # answered and gone before the client's next call
        return sent

    monkeypatch.setattr(socket, "send_fds", send_then_server_finishes)
    request = protocol.Request(protocol.RUN, "build", argv=[b"kapsis", b"status"])
    with client_end:
        protocol.send_request(client_end, request, [0])
    assert [r.argv for r in received] == [[b"kapsis", b"status"]]


def test_requests_survive_the_wire_and_bad_frames_are_refused() -> None:
    request = protocol.Request(
        protocol.RUN,
        "abc",
        umask=0o077,
        argv=[b"kapsis", b"--task", b"a=b \xff"],
        environ={b"A": b"1=2", b"EMPTY": b""},
        ignored_signals=[1, 15],
    )
    left, right = socket.socketpair()
    with left, right:
        read_end, write_end = os.pipe()
        protocol.send_request(left, request, [read_end])
        received, fds = protocol.receive_request(right, timeout=5)
        assert len(fds) == 1
        os.write(write_end, b"x")
        assert os.read(fds[0], 1) == b"x"
        for fd in (read_end, write_end, *fds):
            os.close(fd)
    assert (received.operation, received.build, received.umask) == ("run", "abc", 0o077)
    assert received.argv == request.argv and received.environ == request.environ
    assert received.ignored_signals == [1, 15]
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.Request(protocol.RUN, "abc", argv=[b"a\0b"]))
    for bad in (
        b"run\0abc\0" + b"18\0" + b"\0" + b"3\0only-one",  # fewer arguments than announced
        b"run\0abc\x0018\0\x000\0NOEQUALS",  # an environment entry without '='
    ):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(bad)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"HTTP/1.1 GET /\r\n\r\n")
        with pytest.raises(protocol.ProtocolError):
            protocol.receive_request(right, timeout=5)


def _command_pid(env: dict[str, str]) -> int:
    """The pid of the one command the server is running (a long one the test started)."""
    server_pid = int(str(server_facts(env)["pid"]))
    assert _wait_for(lambda: len(_children(server_pid)) == 1)
    return _children(server_pid)[0]


def test_a_command_killed_by_sigkill_ends_its_client_the_same_way(
    runtime: dict[str, str],
) -> None:
    server_facts(runtime)
    watcher = _watch(runtime)
    os.kill(_command_pid(runtime), signal.SIGKILL)  # as the OOM killer would
    assert watcher.wait(timeout=15) == -signal.SIGKILL
    assert "Traceback" not in watcher.stderr.read()  # type: ignore[union-attr]


def test_a_signal_the_client_ignores_is_ignored_by_the_command(runtime: dict[str, str]) -> None:
    def ignore_hangup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    server_facts(runtime)
    nohup = _watch(runtime, preexec_fn=ignore_hangup)
    command = _command_pid(runtime)
    nohup.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert nohup.poll() is None and _running(runtime) == 1
    os.killpg(command, signal.SIGKILL)  # it would outlive even its client now, as under nohup
    assert nohup.wait(timeout=15) == -signal.SIGKILL
    assert _wait_for(lambda: _running(runtime) == 0)
    # Control: without nohup, the same hang-up ends the command.
    plain = _watch(runtime)
    plain.send_signal(signal.SIGHUP)
    assert plain.wait(timeout=15) == -signal.SIGHUP


def test_after_stop_a_new_server_starts_while_the_old_ones_commands_finish(
    runtime: dict[str, str],
) -> None:
    old = server_facts(runtime)
    watcher = _watch(runtime)  # keeps the old server alive
    assert kapsis("server", "stop", env=runtime).returncode == 0
    new = server_facts(runtime)
    assert new["pid"] != old["pid"] and watcher.poll() is None
    watcher.kill()
    watcher.wait()


def test_commands_queued_when_the_server_stops_run_here(runtime: dict[str, str]) -> None:
    server_pid = int(str(server_facts(runtime)["pid"]))
    os.kill(server_pid, signal.SIGSTOP)
    try:
        here = {**runtime, "KAPSIS_NO_SERVER": "1"}
        stop = subprocess.Popen(
            [sys.executable, "-m", "kapsis", "server", "stop"], env=here, stdout=subprocess.PIPE
        )
        time.sleep(1)  # the stop request is queued first
        queued = subprocess.Popen(
            [sys.executable, "-m", "kapsis", "status", "--json"],
            env=runtime,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1)
    finally:
        os.kill(server_pid, signal.SIGCONT)
    out, err = queued.communicate(timeout=60)
    assert stop.wait(timeout=30) == 0
    assert queued.returncode == 0, err
    assert json.loads(out) == []


def test_a_refusing_server_leaves_the_command_to_the_client(runtime: dict[str, str]) -> None:
    facts = server_facts(runtime)
    socket_file = str(facts["socket"])
    kapsis("server", "stop", env=runtime)
    assert _wait_for(lambda: not os.path.exists(socket_file))
    # Holding the build's lock keeps the client's fallback from starting a real server there.
    lock = os.open(
        location.lock_path(runtime["KAPSIS_RUNTIME_DIR"], str(facts["build"])), os.O_RDWR
    )
    fcntl.flock(lock, fcntl.LOCK_EX)

    def impostor(answer: bytes) -> subprocess.CompletedProcess[str]:
        """A listener on the build's socket that reads a request and gives ``answer``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(socket_file)
            listener.listen(1)
            with ThreadPoolExecutor(1) as pool:
                client = pool.submit(kapsis, "status", "--json", env=runtime)
                connection, _ = listener.accept()
                with connection:
                    _request, fds = protocol.receive_request(connection, timeout=10)
                    for fd in fds:
                        os.close(fd)
                    connection.sendall(answer)
                result = client.result(timeout=60)
        os.unlink(socket_file)
        return result

    refused = impostor(b"refused stopping\n")
    assert refused.returncode == 0 and json.loads(refused.stdout) == []  # it ran here
    # Control: a server that says the command ended with 7 is believed.
    assert impostor(b"pid 1\nexit 7\n").returncode == 7
    os.close(lock)


def test_the_socket_is_the_users_alone(runtime: dict[str, str]) -> None:
    socket_file = str(server_facts(runtime)["socket"])
    assert os.stat(socket_file).st_mode & 0o077 == 0


def test_a_symlink_is_not_a_runtime_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(target)
    monkeypatch.setenv("KAPSIS_RUNTIME_DIR", str(link))
    assert location.private_runtime_dir() is None
    # Control: the directory it points to is acceptable in itself.
    monkeypatch.setenv("KAPSIS_RUNTIME_DIR", str(target))
    assert location.private_runtime_dir() == str(target)
