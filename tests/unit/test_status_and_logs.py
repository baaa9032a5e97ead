"""Host-side records: status store, exit classification, transcript reading, audit log."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kapsis.audit import AuditLog
from kapsis.backends import ExitInfo
from kapsis.backends.transcript import follow_transcript, parse_records, read_transcript
from kapsis.errors import (
    AgentFailedError,
    AgentKilledError,
    AgentTimeoutError,
    ExitCode,
)
from kapsis.sandbox.launcher import classify
from kapsis.status import AgentStatus, StatusStore

TS = "2024-05-01T10:00:00.000000000+00:00"

# ---------------------------------------------------------------------------------------------
# status store


@pytest.fixture
def status_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "status"
    directory.mkdir()
    return directory


def _status(agent_id: str = "a1", started_at: str = "2024-05-01T10:00:00.000000Z") -> AgentStatus:
    return AgentStatus(
        agent_id=agent_id,
        project="/p",
        backend="podman",
        agent="shell",
        started_at=started_at,
        updated_at=started_at,
        limits_enforced=True,
        network_mode="none",
        security_profile="standard",
    )


def test_store_defaults_to_kapsis_home_status(kapsis_home):
    assert StatusStore().path("a1") == kapsis_home / "status" / "a1.json"


def test_write_then_read_round_trips(status_dir):
    store = StatusStore(status_dir)
    record = _status().model_copy(update={"task": "make test", "branch": "fix"})

    store.write(record)

    assert store.read("a1") == record


def test_read_of_unknown_agent_is_none(status_dir):
    assert StatusStore(status_dir).read("nobody") is None


def test_read_of_corrupt_record_is_none(status_dir):
    store = StatusStore(status_dir)
    store.path("bad").write_text("{not json")

    assert store.read("bad") is None


@pytest.mark.parametrize(
    ("phase", "progress"),
    [
        ("preparing", 10),
        ("starting", 20),
        ("running", 30),
        ("post_processing", 90),
        ("complete", 100),
    ],
)
def test_update_phase_sets_progress(status_dir, phase, progress):
    store = StatusStore(status_dir)
    store.write(_status())

    updated = store.update("a1", phase=phase)

    assert updated.progress == progress
    assert store.read("a1").phase == phase
    assert store.read("a1").progress == progress


def test_update_to_failed_keeps_the_last_progress(status_dir):
    store = StatusStore(status_dir)
    store.write(_status())
    store.update("a1", phase="running")

    failed = store.update("a1", phase="failed", exit_code=1)

    assert failed.progress == 30
    assert failed.finished is True
    assert failed.exit_code == 1


def test_explicit_progress_wins_over_phase(status_dir):
    store = StatusStore(status_dir)
    store.write(_status())

    assert store.update("a1", phase="running", progress=55).progress == 55


def test_update_refreshes_updated_at_and_keeps_other_fields(status_dir):
    store = StatusStore(status_dir)
    store.write(_status())

    updated = store.update("a1", message="hello")

    assert updated.updated_at != _status().updated_at
    assert updated.message == "hello"
    assert updated.started_at == _status().started_at
    assert updated.agent == "shell"


def test_update_of_unknown_agent_raises_key_error(status_dir):
    with pytest.raises(KeyError):
        StatusStore(status_dir).update("ghost", phase="running")


def test_write_is_atomic_and_leaves_no_temp_files(status_dir):
    store = StatusStore(status_dir)

    for index in range(5):
        store.write(_status().model_copy(update={"message": f"m{index}"}))

    assert sorted(p.name for p in status_dir.iterdir()) == ["a1.json"]
    assert store.read("a1").message == "m4"


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_record(status_dir, monkeypatch):
    store = StatusStore(status_dir)
    store.write(_status())

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("kapsis.status.store.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write(_status().model_copy(update={"message": "new"}))

    assert sorted(p.name for p in status_dir.iterdir()) == ["a1.json"]
    assert store.read("a1").message == ""


def test_all_is_ordered_by_start_time_not_name(status_dir):
    store = StatusStore(status_dir)
    store.write(_status("zzz", "2024-05-01T09:00:00.000000Z"))
    store.write(_status("aaa", "2024-05-01T11:00:00.000000Z"))
    store.write(_status("mmm", "2024-05-01T10:00:00.000000Z"))

    assert [r.agent_id for r in store.all()] == ["zzz", "mmm", "aaa"]


def test_all_skips_corrupt_records_and_missing_directory(status_dir):
    assert StatusStore(status_dir / "missing").all() == []
    store = StatusStore(status_dir)
    store.write(_status("good"))
    store.path("bad").write_text("garbage")

    assert [r.agent_id for r in store.all()] == ["good"]


def test_delete_removes_the_record(status_dir):
    store = StatusStore(status_dir)
    store.write(_status())

    store.delete("a1")
    store.delete("a1")  # a second delete is harmless

    assert store.read("a1") is None


# ---------------------------------------------------------------------------------------------
# classify


def test_exit_zero_is_success(make_plan):
    assert classify(make_plan(), ExitInfo(exit_code=0), stop_requested=False) is None


def test_nonzero_exit_is_agent_failed(make_plan):
    error = classify(make_plan(), ExitInfo(exit_code=3), stop_requested=False)

    assert isinstance(error, AgentFailedError)
    assert error.exit_code == ExitCode.AGENT_FAILED == 1
    assert error.agent_exit_code == 3
    assert error.error_type == "agent_failed"


def test_oom_is_killed_with_reason_oom(make_plan):
    plan = make_plan(memory="256m")

    error = classify(plan, ExitInfo(exit_code=137, oom_killed=True), stop_requested=False)

    assert isinstance(error, AgentKilledError)
    assert error.exit_code == ExitCode.KILLED == 5
    assert error.reason == error.error_type == "oom"
    assert "256m" in str(error)


def test_timeout_is_agent_timeout(make_plan):
    plan = make_plan(timeout="90s")

    error = classify(plan, ExitInfo(exit_code=137, timed_out=True), stop_requested=False)

    assert isinstance(error, AgentTimeoutError)
    assert error.exit_code == ExitCode.TIMEOUT == 6
    assert "90s" in str(error)


def test_stop_requested_is_killed_with_reason_stopped(make_plan):
    error = classify(make_plan(), ExitInfo(exit_code=143), stop_requested=True)

    assert isinstance(error, AgentKilledError)
    assert error.exit_code == ExitCode.KILLED
    assert error.error_type == "stopped"


def test_stop_requested_wins_even_after_a_clean_exit(make_plan):
    error = classify(make_plan(), ExitInfo(exit_code=0), stop_requested=True)

    assert isinstance(error, AgentKilledError)
    assert error.error_type == "stopped"


@pytest.mark.parametrize(("code", "signal_number"), [(137, 9), (143, 15)])
def test_signal_exit_without_oom_is_killed(make_plan, code, signal_number):
    error = classify(make_plan(), ExitInfo(exit_code=code), stop_requested=False)

    assert isinstance(error, AgentKilledError)
    assert error.exit_code == ExitCode.KILLED
    assert error.error_type == "killed"
    assert f"signal {signal_number}" in str(error)


def test_oom_wins_over_timeout(make_plan):
    error = classify(
        make_plan(timeout="1m"),
        ExitInfo(exit_code=137, oom_killed=True, timed_out=True),
        stop_requested=False,
    )

    assert isinstance(error, AgentKilledError)
    assert error.error_type == "oom"


# ---------------------------------------------------------------------------------------------
# transcript


def _line(text: str, tag: str = "F", stream: str = "stdout") -> str:
    return f"{TS} {stream} {tag} {text}\n"


def test_full_records_keep_their_spaces():
    lines = [_line("hello  world "), _line("oops", stream="stderr")]

    assert list(parse_records(iter(lines))) == ["hello  world ", "oops"]


def test_partial_records_are_joined_with_the_following_full_one():
    lines = [_line("first ", "P"), _line("second ", "P"), _line("end"), _line("next")]

    assert list(parse_records(iter(lines))) == ["first second end", "next"]


def test_empty_full_record_is_an_empty_line():
    assert list(parse_records(iter([f"{TS} stdout F\n", _line("x")]))) == ["", "x"]


def test_trailing_partial_record_is_not_lost():
    assert list(parse_records(iter([_line("a"), _line("half", "P")]))) == ["a", "half"]


def test_malformed_lines_are_skipped():
    assert list(parse_records(iter(["garbage\n", _line("ok")]))) == ["ok"]


def test_read_transcript_of_missing_file_is_empty(tmp_path):
    assert list(read_transcript(tmp_path / "none.log")) == []


def test_read_transcript_parses_the_file(tmp_path):
    path = tmp_path / "a.log"
    path.write_text(_line("one") + _line("tw", "P") + _line("o"))

    assert list(read_transcript(path)) == ["one", "two"]


def _writer(path: Path, chunks: list[str], done: threading.Event) -> threading.Thread:
    def write() -> None:
        try:
            with path.open("a", encoding="utf-8") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    handle.flush()
                    time.sleep(0.005)
        finally:
            done.set()

    return threading.Thread(target=write, daemon=True)


def test_follow_transcript_yields_lines_written_while_reading(tmp_path):
    path = tmp_path / "agent.log"
    path.write_text(_line("already there"))
    chunks = [_line(f"line {i}") for i in range(20)]
    chunks[5:5] = [_line("split ", "P")]
    chunks.append(f"{TS} stdout F last without")  # no newline yet...
    chunks.append(" a newline at all")
    done = threading.Event()
    writer = _writer(path, chunks, done)

    lines = follow_transcript(path, still_running=lambda: not done.is_set(), poll_seconds=0.002)
    writer.start()
    received = list(lines)
    writer.join(timeout=5)

    expected = ["already there"] + [f"line {i}" for i in range(20)]
    expected[6] = "split line 5"
    assert received == [*expected, "last without a newline at all"]


def test_follow_transcript_waits_for_the_file_to_appear(tmp_path):
    path = tmp_path / "later.log"
    done = threading.Event()
    writer = _writer(path, [_line("hello"), _line("bye")], done)

    lines = follow_transcript(path, still_running=lambda: not done.is_set(), poll_seconds=0.002)
    writer.start()
    received = list(lines)
    writer.join(timeout=5)

    assert received == ["hello", "bye"]


def test_follow_transcript_ends_when_agent_never_wrote(tmp_path):
    assert list(follow_transcript(tmp_path / "none.log", still_running=lambda: False)) == []


def test_follow_transcript_drains_a_file_that_appeared_as_the_agent_ended(tmp_path):
    path = tmp_path / "fast.log"

    def agent_wrote_and_exited_meanwhile() -> bool:
        path.write_text(_line("quick output"))
        return False

    lines = follow_transcript(path, still_running=agent_wrote_and_exited_meanwhile, poll_seconds=0)

    assert list(lines) == ["quick output"]


# ---------------------------------------------------------------------------------------------
# audit log


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_log_appends_seq_numbered_json_lines(kapsis_home):
    log = AuditLog("a1")

    log.record("session_start", project="/p")
    log.record("sandbox_exited", exit_code=0)

    path = kapsis_home / "audit" / "a1.jsonl"
    entries = _entries(path)
    assert [e["seq"] for e in entries] == [1, 2]
    assert [e["event_type"] for e in entries] == ["session_start", "sandbox_exited"]
    assert entries[0]["detail"] == {"project": "/p"}
    assert entries[1]["detail"] == {"exit_code": 0}
    assert {e["agent_id"] for e in entries} == {"a1"}
    assert {e["source"] for e in entries} == {"host"}
    assert all(e["ts"].endswith("Z") for e in entries)


def test_audit_log_continues_numbering_across_instances(tmp_path):
    AuditLog("a1", directory=tmp_path).record("one")
    AuditLog("a1", directory=tmp_path).record("two")

    assert [e["seq"] for e in _entries(tmp_path / "a1.jsonl")] == [1, 2]


def test_disabled_audit_log_writes_nothing(tmp_path):
    AuditLog("a1", enabled=False, directory=tmp_path).record("session_start")

    assert not (tmp_path / "a1.jsonl").exists()


def test_exit_128_is_a_failure_not_signal_0(make_plan):
    error = classify(make_plan(), ExitInfo(exit_code=128), stop_requested=False)

    assert isinstance(error, AgentFailedError)
    assert "code 128" in str(error) and "signal" not in str(error)
