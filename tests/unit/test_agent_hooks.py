"""The agent images' hook reporter, the host's tool_use records and the agent-reported status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.audit.agent_reports import MAX_LINE, AgentReportServer, Redactor, report_detail
from kapsis.audit.alerts import AlertEngine
from kapsis.audit.log import AuditLog
from kapsis.host import report_hook
from kapsis.status import StatusStore
from kapsis.status.activity import ActivityRecorder, fold
from kapsis.status.store import AgentStatus, utc_now

HOOK = Path(report_hook.__file__)
SETTINGS = HOOK.with_name("claude-managed-settings.json")


def run_hook(payload: str, socket_path: Path | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KAPSIS_AUDIT_SOCKET": str(socket_path or "/nonexistent/audit.sock")}
    return subprocess.run(
        [sys.executable, str(HOOK)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


class Listener:
    """A socket like the host's, collecting what arrives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.data = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.sock.accept()
        while chunk := connection.recv(65536):
            self.data += chunk
        connection.close()

    def lines(self) -> list[bytes]:
        self.thread.join(timeout=10)
        return self.data.splitlines()


# ---------------------------------------------------------------------------------------------
# the hook script (it runs inside the image: standard library, never in the agent's way)


def test_the_hook_sends_the_payload_as_one_line_and_prints_nothing(tmp_path: Path) -> None:
    listener = Listener(tmp_path / "a.sock")
    payload = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"x": "é"}}
    result = run_hook(json.dumps(payload), tmp_path / "a.sock")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert [json.loads(line) for line in listener.lines()] == [payload]


def test_without_a_socket_or_with_garbage_the_hook_exits_0_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    for payload, path in [('{"hook_event_name": "Stop"}', None), ("not json", tmp_path / "x")]:
        result = run_hook(payload, path)
        assert (result.returncode, result.stdout) == (0, "")
    assert time.monotonic() - started < 10


def test_long_payloads_are_shortened_to_fit_the_hosts_line_limit() -> None:
    payload = {
        "hook_event_name": "PostToolUse",
        "tool_name": "Write",
        "tool_input": {"file_path": "/workspace/big", "content": "x" * 100_000},
        "tool_response": ["y" * 50_000] * 5,
    }
    line = report_hook.encode(payload)
    assert line.endswith(b"\n") and len(line) <= report_hook.MAX_BYTES < MAX_LINE
    shortened = json.loads(line)
    assert shortened["tool_input"]["file_path"] == "/workspace/big"
    assert "more characters]" in shortened["tool_input"]["content"]
    # Small payloads pass untouched.
    assert json.loads(report_hook.encode({"a": "b" * 100})) == {"a": "b" * 100}


def test_the_managed_settings_call_the_hook_for_every_tool() -> None:
    settings = json.loads(SETTINGS.read_text())
    hooks = settings["hooks"]
    for event in ("PreToolUse", "PostToolUse", "UserPromptSubmit", "Stop", "SessionEnd"):
        (entry,) = hooks[event]
        (hook,) = entry["hooks"]
        assert hook["command"] == "python3 /usr/local/lib/kapsis/report-hook.py"
    assert hooks["PreToolUse"][0]["matcher"] == hooks["PostToolUse"][0]["matcher"] == "*"
    assert "disableAllHooks" not in settings and "allowManagedHooksOnly" not in settings


# ---------------------------------------------------------------------------------------------
# the host: tool hooks become tool_use records


def test_tool_hook_payloads_are_tool_use_records_and_others_agent_reports() -> None:
    redactor = Redactor(["s3cr3t-value"])
    pre = {
        "hook_event_name": "PreToolUse",
        "tool_name": "Bash",
        "tool_input": {"c": "s3cr3t-value"},
    }
    kind, detail = report_detail(json.dumps(pre).encode(), redactor)
    assert kind == "tool_use"
    assert detail["hook"] == "PreToolUse" and detail["tool"] == "Bash"
    assert detail["reported"]["tool_input"] == {"c": "[REDACTED]"}
    assert report_detail(b'{"hook_event_name": "Stop"}', redactor)[0] == "agent_report"
    # A tool hook without a tool name is not a tool use.
    assert report_detail(b'{"hook_event_name": "PreToolUse"}', redactor)[0] == "agent_report"


def test_alert_rules_see_the_input_of_a_reported_tool_use() -> None:
    engine = AlertEngine(frozenset())
    record = {
        "seq": 7,
        "event_type": "tool_use",
        "detail": {"reported": {"tool_input": {"command": "cat ~/.ssh/id_ed25519"}}},
    }
    assert [alert.rule for alert in engine.observe(record)] == ["sensitive_path"]


# ---------------------------------------------------------------------------------------------
# the status: agent-reported activity


def hook_record(event: str, tool: str | None = None, source: str = "agent") -> dict[str, Any]:
    reported: dict[str, Any] = {"hook_event_name": event}
    if tool:
        reported["tool_name"] = tool
    return {"source": source, "ts": "2026-01-01T00:00:00.000000Z", "detail": {"reported": reported}}


def test_fold_follows_the_hook_events() -> None:
    activity = None
    states = []
    for event, tool in [
        ("SessionStart", None),
        ("UserPromptSubmit", None),
        ("PreToolUse", "Read"),
        ("PostToolUse", "Read"),
        ("PreToolUse", "Write"),
        ("PostToolUse", "Write"),
        ("Stop", None),
        ("SessionEnd", None),
    ]:
        activity = fold(activity, hook_record(event, tool)) or activity
        assert activity is not None
        states.append(activity.state)
    assert states == [
        "started", "working", "using_tool", "working", "using_tool", "working", "idle", "ended",
    ]  # fmt: skip
    assert activity is not None
    assert (activity.last_tool, activity.tool_uses, activity.last_event) == (
        "Write",
        2,
        "SessionEnd",
    )
    assert fold(activity, hook_record("Stop", source="host")) is None
    assert fold(activity, {"source": "agent", "detail": {"command": "ls"}}) is None


def new_status(store: StatusStore, agent_id: str, phase: str = "running") -> None:
    now = utc_now()
    store.write(
        AgentStatus(
            agent_id=agent_id, project="/p", backend="podman", agent="claude", phase=phase,
            started_at=now, updated_at=now, limits_enforced=True, network_mode="filtered",
            security_profile="standard",
        )  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_recorder_writes_the_status_sparingly_and_flushes_the_rest(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "status")
    new_status(store, "a1")
    writes: list[Any] = []
    original = store.write
    store.write = lambda status: (writes.append(status), original(status))  # type: ignore[method-assign]
    recorder = ActivityRecorder(store, "a1")
    for _ in range(50):
        recorder.observe(hook_record("PreToolUse", "Bash"))
        recorder.observe(hook_record("PostToolUse", "Bash"))
    assert len(writes) <= 3  # throttled: 100 reports within a moment
    recorder.flush()
    status = store.read("a1")
    assert status is not None and status.agent_reported is not None
    assert (status.agent_reported.tool_uses, status.agent_reported.state) == (50, "working")


def test_the_recorder_never_touches_a_finished_run(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "status")
    new_status(store, "a2", phase="complete")
    recorder = ActivityRecorder(store, "a2")
    recorder.observe(hook_record("SessionEnd"))
    recorder.flush()
    status = store.read("a2")
    assert status is not None and status.agent_reported is None


def test_concurrent_status_updates_keep_each_others_changes(tmp_path: Path) -> None:
    """The report thread and `kapsis stop` both update the status: neither undoes the other."""
    store = StatusStore(tmp_path / "status")
    new_status(store, "a3")

    def hammer(field: str) -> None:
        for index in range(100):
            store.update("a3", **{field: [f"{field}{index}"]})

    threads = [threading.Thread(target=hammer, args=(name,)) for name in ("notes", "alerts")]
    for thread in threads:
        thread.start()
    store.update("a3", stop_requested=True)
    for thread in threads:
        thread.join()
    status = store.read("a3")
    assert status is not None and status.stop_requested
    assert (status.notes, status.alerts) == (["notes99"], ["alerts99"])


def test_the_report_server_feeds_the_status_end_to_end(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "status")
    new_status(store, "a4")
    recorder = ActivityRecorder(store, "a4")
    log = AuditLog("a4", directory=tmp_path / "audit")
    path = tmp_path / "s" / "audit.sock"
    path.parent.mkdir()
    server = AgentReportServer(
        log, path, Redactor([]), on_record=recorder.observe, on_stop=recorder.flush
    )
    server.start()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        for event, tool in [("PreToolUse", "Edit"), ("PostToolUse", "Edit")]:
            client.sendall(json.dumps({"hook_event_name": event, "tool_name": tool}).encode())
            client.sendall(b"\n")
    server.stop()
    status = store.read("a4")
    assert status is not None and status.agent_reported is not None
    assert (status.agent_reported.last_tool, status.agent_reported.state) == ("Edit", "working")


@pytest.mark.parametrize("name", ["npm_fetch.py", "report_hook.py"])
def test_the_in_image_scripts_need_nothing_but_the_standard_library(name: str) -> None:
    source = HOOK.with_name(name).read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from ")) and "__future__" not in line
    }
    assert imports <= set(sys.stdlib_module_names), imports - set(sys.stdlib_module_names)


def test_the_status_table_shows_what_the_agent_says(tmp_path: Path) -> None:
    from rich.console import Console

    from kapsis.cli.render import status_table

    store = StatusStore(tmp_path / "status")
    new_status(store, "a5")
    recorder = ActivityRecorder(store, "a5")
    for tool in ("Read", "Edit", "Write"):
        recorder.observe(hook_record("PreToolUse", tool))
    recorder.flush()
    status = store.read("a5")
    assert status is not None
    console = Console(width=300, record=True)
    console.print(status_table([status]))
    text = console.export_text()
    assert "AGENT SAYS" in text and "using_tool Write (3 tools)" in text


def test_a_status_that_cannot_be_written_does_not_stop_the_audit(tmp_path: Path) -> None:
    log = AuditLog("a6", directory=tmp_path / "audit")
    path = tmp_path / "s" / "audit.sock"
    path.parent.mkdir()

    def broken(record: dict[str, Any]) -> None:
        raise KeyError("a6")  # e.g. the status file was removed meanwhile

    server = AgentReportServer(log, path, Redactor([]), on_record=broken)
    server.start()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b'{"hook_event_name": "Stop"}\nls -l\n')
    server.stop()
    assert server.records == 2
