"""What the agent reports about itself: a Unix socket in the sandbox, read by the host.

The host listens on ``SANDBOX_DIR/audit.sock``, mounted into the sandbox at
``/run/kapsis/audit.sock``. Each line an agent writes becomes one audit record with source
``agent`` (the agent cannot choose the source or the sequence of a record: it only fills
``detail``). A line that is a JSON object is kept as reported: a tool hook's payload (Claude
Code's PreToolUse / PostToolUse, sent by the agent images' ``report-hook.py``) becomes a
``tool_use`` record, any other object an ``agent_report``. Any other line is a shell command (the
``shell`` agent's xtrace), an ``agent_command``. Values of the run's secrets are redacted before
anything is written, lines are capped in length and number, and the host keeps listening only
while the agent runs. Each record is also handed to ``on_record`` (the status's agent-reported
activity, see :mod:`kapsis.status.activity`).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kapsis.audit.alerts import Alert, AlertEngine, alerts_path, append_alerts
from kapsis.audit.log import AuditLog
from kapsis.config.base import BASH_ENV_TARGET as BASH_ENV_TARGET
from kapsis.secrets.redact import Redactor

AUDIT_SOCKET = "audit.sock"  # in the sandbox dir
SHELL_REPORTER = "report-shell.py"  # in the sandbox dir
SOCKET_TARGET = "/run/kapsis/audit.sock"
REPORTER_TARGET = "/run/kapsis/report-shell.py"
# Every agent's bash: BASH_ENV names a script that traces its commands into a pipe the host
# reads (audit/bash_env.sh), for agents whose CLI reports nothing of its own.
TRACE_FIFO = "trace.fifo"  # in the sandbox dir
TRACE_TARGET = "/run/kapsis/trace.fifo"
BASH_ENV_FILE = "bash-env.sh"  # in the sandbox dir
MAX_LINE = 16 * 1024
MAX_RECORDS = 100_000
# A report's detail as JSON: past this it is kept as the start of its text (bad bytes become
# U+FFFD, six characters once escaped: a 16 KiB line could otherwise take ~100 KB).
MAX_DETAIL = 16 * 1024
KEPT_TEXT = 2048
# What the agent's reports may take of the audit trail in one run (the host's disk is not the
# agent's): past it, reports are dropped and counted.
MAX_REPORT_BYTES = 128 * 1024 * 1024
MAX_TOOL_NAME = 200
# A report nested deeper than this is not taken apart (every later step would have to recurse
# on it): it is kept as text.
MAX_DEPTH = 32
# Dropped reports recorded one by one (with the reason); past this, counted only.
MAX_DROPS_RECORDED = 100
# Hook events about one tool call; their payloads name the tool and its input.
TOOL_HOOKS = frozenset(
    {"PreToolUse", "PostToolUse", "PostToolUseFailure", "BeforeTool", "AfterTool"}
)


def install_shell_reporter(path: Path) -> None:
    """Copy the shell agent's reporter (see :mod:`.shell_reporter`) to ``path``, read-only."""
    source = importlib.resources.files("kapsis.audit").joinpath("shell_reporter.py")
    path.write_text(source.read_text())
    path.chmod(0o644)


def install_bash_trace(root: Path) -> None:
    """The script every agent's bash sources, and the pipe it traces into, in ``root``."""
    source = importlib.resources.files("kapsis.audit").joinpath("bash_env.sh")
    script = root / BASH_ENV_FILE
    script.write_text(source.read_text())
    script.chmod(0o644)
    fifo = root / TRACE_FIFO
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo)
    # Any uid of the agent's may open it (read and write: an open for writing alone would wait
    # for a reader). It is mounted into the agent's container only, and the sandbox dir around
    # it is the user's alone. An agent that reads its own lines away hides only its own reports.
    fifo.chmod(0o666)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _nesting(text: str) -> int:
    """How deep ``text``'s brackets go, strings skipped; linear, no parser involved."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _parsed(text: str) -> dict[str, Any] | None:
    """A reported JSON object, or None: not one, numbers JSON does not have (NaN, Infinity),
    or nested past MAX_DEPTH (checked before parsing)."""
    if _nesting(text) > MAX_DEPTH:
        return None
    try:
        reported = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None
    if not isinstance(reported, dict):
        return None
    try:
        # A lone surrogate (an escape such as \udc80) is no text: it could be neither
        # written to the status nor read back from the audit trail as UTF-8.
        json.dumps(reported, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return None
    return reported


def _bounded(event_type: str, detail: dict[str, Any], text: str) -> tuple[str, dict[str, Any]]:
    """``detail``, or the start of the report's text when its JSON would be too large."""
    size = len(json.dumps(detail))
    if size <= MAX_DETAIL:
        return event_type, detail
    return "agent_report", {"text": text[:KEPT_TEXT], "unparsed": True, "cut_from": size}


def report_detail(line: bytes, redactor: Redactor) -> tuple[str, dict[str, Any]]:
    """(event_type, detail) of one reported line, as the audit trail keeps it."""
    event_type, detail, _ = parse_report(line, redactor)
    return event_type, detail


def parse_report(line: bytes, redactor: Redactor) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(event_type, detail kept, detail judged) of one reported line. The alert rules judge a
    command whole (redacted): the trail may keep only the start of a long one, and padding
    must not push a command past what the rules read."""
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    if text.startswith("{"):
        reported = _parsed(text)
        if reported is None:
            # Kept as the text it is: a report, not a command (it starts like an object).
            detail: dict[str, Any] = {"text": redactor.text(text), "unparsed": True}
            return (*_bounded("agent_report", detail, redactor.text(text)), detail)
        hook = reported.get("hook_event_name")
        if hook in TOOL_HOOKS and isinstance(reported.get("tool_name"), str):
            # hook and tool repeated outside the payload, for `kapsis audit show`.
            detail = {
                "hook": hook,
                "tool": redactor.text(reported["tool_name"][:MAX_TOOL_NAME]),
                "reported": redactor.value(reported),
            }
            return (*_bounded("tool_use", detail, redactor.text(text)), detail)
        detail = {"reported": redactor.value(reported)}
        return (*_bounded("agent_report", detail, redactor.text(text)), detail)
    depth = len(text) - len(text.lstrip("+"))
    traced = text[depth:].lstrip(" ")
    # The shell reporter's trace: the command as typed (quoted), a tab, the command as run.
    typed, tab, expanded = traced.partition("\t")
    if not tab:
        typed, expanded = "", traced
    command = redactor.text(expanded.strip())
    detail = {"command": command, "depth": depth}
    if typed:
        detail["typed"] = redactor.text(typed)
    judged = detail
    if len(json.dumps(detail)) > MAX_DETAIL:
        detail = {"command": command[:KEPT_TEXT], "depth": depth, "cut_from": len(command)}
        if typed:
            detail["typed"] = redactor.text(typed)[:KEPT_TEXT]
    return "agent_command", detail, judged


class AgentReportServer:
    """Listens on the sandbox's audit socket and records each reported line, in a thread."""

    def __init__(
        self,
        log: AuditLog,
        path: Path,
        redactor: Redactor,
        listener: socket.socket | None = None,
        alerts: AlertEngine | None = None,
        on_alert: Callable[[list[Alert]], None] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        trace: Path | None = None,
    ) -> None:
        self.log = log
        self.trace = trace
        self.alerts = alerts
        self.on_alert = on_alert
        self.on_record = on_record
        self.on_stop = on_stop
        self.path = path
        self.redactor = redactor
        self.listener = listener or self._bind(path)
        self._stop = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        self._thread: threading.Thread | None = None
        self.records = 0
        self.recorded_bytes = 0
        self.dropped = 0

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A socket path may have at most 107 bytes; a deep KAPSIS_HOME is longer. Binding
        # through an open descriptor of the directory keeps the path short whatever it is.
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            listener.bind(f"/proc/self/fd/{directory}/{path.name}")
        finally:
            os.close(directory)
        # The agent runs as an unprivileged uid of its own range; it may connect, nothing more.
        os.chmod(path, 0o666)
        listener.listen(16)
        return listener

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="kapsis-audit-socket", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_write, b"x")  # ends the server's wait at once
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.listener.close()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.dropped > MAX_DROPS_RECORDED:
            with contextlib.suppress(Exception):
                self.log.record("agent_report_dropped", reason="total", dropped=self.dropped)
        if self.on_stop is not None:
            # The last status write of what the agent reported; whatever it meets, the run
            # must go on to its end.
            with contextlib.suppress(Exception):
                self.on_stop()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, None)
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        buffers: dict[socket.socket | int, bytes] = {}
        trace = self._open_trace()
        if trace is not None:
            selector.register(trace, selectors.EVENT_READ, None)
            buffers[trace] = b""
        while True:
            stopping = self._stop.is_set()
            # Once stopping, drain: take every pending connection and line, then end.
            events = selector.select(timeout=0 if stopping else 1.0)
            if not events and stopping:
                break
            for key, _ in events:
                if key.fileobj == self._wake_read:
                    os.read(self._wake_read, 64)
                    continue
                if key.fileobj is self.listener:
                    with contextlib.suppress(OSError):
                        connection, _address = self.listener.accept()
                        connection.setblocking(False)
                        selector.register(connection, selectors.EVENT_READ, None)
                        buffers[connection] = b""
                    continue
                source: socket.socket | int = key.fileobj  # type: ignore[assignment]
                chunk = self._read(source)
                if chunk is None:
                    continue
                data = buffers.get(source, b"") + chunk
                *lines, rest = data.split(b"\n")
                for line in lines:
                    self._record(line[:MAX_LINE])
                if not chunk:
                    if rest:
                        self._record(rest[:MAX_LINE])
                    selector.unregister(source)
                    self._close(source)
                    buffers.pop(source, None)
                else:
                    # The head: what a long line says first (the command) is what it is about.
                    buffers[source] = rest[:MAX_LINE]
        for source in list(buffers):
            with contextlib.suppress(Exception):
                selector.unregister(source)
            self._close(source)
        selector.close()

    @staticmethod
    def _read(source: socket.socket | int) -> bytes | None:
        """What came on a connection or the trace pipe (b"": it ended; None: nothing yet)."""
        try:
            if isinstance(source, int):
                return os.read(source, 65536)
            return source.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    @staticmethod
    def _close(source: socket.socket | int) -> None:
        if isinstance(source, int):
            os.close(source)
        else:
            source.close()

    def _open_trace(self) -> int | None:
        """The trace pipe, opened for reading and writing: with the host as a writer too, it
        never reads as ended when the agent's shells close it, and no writer waits for a
        reader. Not a pipe (or none): no trace."""
        if self.trace is None:
            return None
        try:
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
            descriptor = os.open(self.trace, flags)
        except OSError:
            return None
        if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            return None
        return descriptor

    def _record(self, line: bytes) -> None:
        """Record one line; a line that cannot be recorded is dropped and said, and the
        recording goes on (one bad report never ends it)."""
        if not line.strip():
            return
        if self.records >= MAX_RECORDS:
            self._drop(f"more than {MAX_RECORDS} reports")
            return
        if self.recorded_bytes >= MAX_REPORT_BYTES:
            self._drop(f"the agent's reports took {MAX_REPORT_BYTES >> 20} MiB of the audit trail")
            return
        try:
            self._record_line(line)
        except Exception as error:  # the agent chose the bytes: whatever they do, go on
            self._drop(f"{type(error).__name__} while recording a report")

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self.dropped <= MAX_DROPS_RECORDED:
            with contextlib.suppress(Exception):
                self.log.record("agent_report_dropped", reason=reason, dropped=self.dropped)

    def _record_line(self, line: bytes) -> None:
        event_type, detail, judged = parse_report(line, self.redactor)
        self.records += 1
        self.recorded_bytes += len(json.dumps(detail)) + 256  # the record's own fields
        record = self.log.record(event_type, source="agent", **detail)
        if record and self.on_record is not None:
            # A status that cannot be written must not stop the recording of the audit trail.
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.on_record(record)
        if self.alerts is None or not record:
            return
        raised = self.alerts.observe({**record, "detail": judged})
        if not raised:
            return
        append_alerts(alerts_path(self.log.path), raised)
        for alert in raised:
            self.log.record(
                "alert",
                rule=alert.rule,
                severity=alert.severity,
                about_seq=alert.seq,
                message=alert.message,
            )
        if self.on_alert is not None:
            self.on_alert(raised)
