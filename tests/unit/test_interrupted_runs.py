"""A run whose supervising host process died ends as ``interrupted`` at the next status read;
an audit chain whose writer died mid-record goes on; cleanup survives a deleted project."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import kapsis.api as api
from kapsis.audit import AuditLog, VerifyResult, rotated_files, verify
from kapsis.audit.keys import signing_key
from kapsis.audit.log import audit_path
from kapsis.errors import ExitCode
from kapsis.sandbox import interrupted
from kapsis.sandbox.launcher import save_plan
from kapsis.status import AgentStatus, StatusStore, liveness
from kapsis.status.liveness import Supervisor
from kapsis.status.store import utc_now


class _Backend:
    name = "podman"

    def __init__(self) -> None:
        self.stopped: list[tuple[str, int]] = []
        self.removed: list[str] = []

    def stop(self, agent_id: str, grace_seconds: int = 5) -> None:
        self.stopped.append((agent_id, grace_seconds))

    def stop_unsupervised(self, agent_id: str) -> None:
        self.stop(agent_id, grace_seconds=0)

    def remove(self, plan: object) -> None:
        self.removed.append(getattr(plan, "agent_id", ""))


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> _Backend:
    fake = _Backend()
    monkeypatch.setattr(interrupted, "get_backend", lambda name=None: fake)
    monkeypatch.setattr(api, "get_backend", lambda name=None: fake)
    return fake


def _dead_process() -> Supervisor:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = liveness.identify(child.pid)
    child.wait()
    return identity


def _record(agent_id: str, supervisor: Supervisor | None, phase: str = "running") -> AgentStatus:
    now = utc_now()
    return AgentStatus(
        agent_id=agent_id,
        project="/p",
        backend="podman",
        agent="shell",
        phase=phase,  # type: ignore[arg-type]
        started_at=now,
        updated_at=now,
        limits_enforced=True,
        network_mode="none",
        security_profile="standard",
        work_location="/somewhere/upper",
        supervisor=supervisor,
    )


def test_this_process_is_alive_and_an_exited_one_is_not() -> None:
    assert liveness.is_alive(liveness.identify(os.getpid()))
    assert not liveness.is_alive(_dead_process())


def test_an_exited_child_not_yet_collected_is_gone() -> None:
    """A killed supervisor whose parent has not reaped it is a zombie: it supervises nothing."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        identity = liveness.identify(child.pid)
        assert liveness.is_alive(identity)  # control
        os.kill(child.pid, 9)
        for _ in range(200):
            if "Z" in Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1][:3]:
                break
            time.sleep(0.01)
        assert not liveness.is_alive(identity)
    finally:
        child.kill()
        child.wait()


def test_a_reused_pid_with_another_start_time_is_not_the_supervisor() -> None:
    me = liveness.identify(os.getpid())
    assert not liveness.is_alive(me.model_copy(update={"start_ticks": me.start_ticks + 1}))


def test_a_supervisor_of_an_earlier_boot_is_gone() -> None:
    me = liveness.identify(os.getpid())
    assert not liveness.is_alive(me.model_copy(update={"boot_id": "an-earlier-boot"}))


def test_a_command_name_with_spaces_and_parentheses_is_read_right() -> None:
    name = b"a b) (c 1 2 3"[:15]
    setter = f"import ctypes, time; ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", setter])
    try:
        comm = Path(f"/proc/{child.pid}/comm")
        for _ in range(200):
            if comm.read_bytes().strip() == name:
                break
            time.sleep(0.01)
        assert comm.read_bytes().strip() == name
        identity = liveness.identify(child.pid)
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert identity.start_ticks == int(stat.rsplit(")", 1)[1].split()[19])
        assert liveness.is_alive(identity)
    finally:
        child.kill()
        child.wait()
    assert not liveness.is_alive(identity)


def test_a_run_whose_supervisor_died_ends_interrupted_with_its_audit_sealed(
    kapsis_home: Path, backend: _Backend
) -> None:
    store = StatusStore()
    AuditLog("gone1").record("session_start", project="/p")
    store.write(_record("gone1", _dead_process()))

    (record,) = api.status("gone1")

    assert record.phase == "failed" and record.error_type == "interrupted"
    assert record.exit_code == ExitCode.INTERRUPTED
    assert "/somewhere/upper" in record.message and "running" in record.message
    assert backend.stopped == [("gone1", 0)]  # nothing runs on unrecorded
    result = verify_chain(audit_path("gone1"))
    assert result.ok, result.damage
    events = [e["event_type"] for e in _events("gone1")]
    assert events[-2:] == ["session_end", "seal"]
    # Read again: settled once, not twice.
    api.status("gone1")
    assert backend.stopped == [("gone1", 0)]
    assert [e["event_type"] for e in _events("gone1")].count("session_end") == 1


def test_a_run_whose_supervisor_lives_is_left_running(kapsis_home: Path, backend: _Backend) -> None:
    store = StatusStore()
    store.write(_record("alive1", liveness.identify(os.getpid())))

    (record,) = api.status("alive1")

    assert record.phase == "running" and backend.stopped == []


def test_finished_runs_and_runs_with_no_supervisor_recorded_are_left_alone(
    kapsis_home: Path, backend: _Backend
) -> None:
    store = StatusStore()
    store.write(_record("done1", _dead_process(), phase="complete"))
    store.write(_record("old1", None))

    records = {r.agent_id: r for r in api.status()}

    assert records["done1"].phase == "complete" and records["old1"].phase == "running"
    assert backend.stopped == []


def test_a_supervisor_that_finished_the_run_meanwhile_is_not_overruled(
    kapsis_home: Path, backend: _Backend
) -> None:
    """The reader's view is stale (running), the record on disk is final: nothing changes."""
    store = StatusStore()
    stale = _record("raced1", _dead_process())
    store.write(stale.model_copy(update={"phase": "complete", "exit_code": 0}))

    (record,) = interrupted.settle([stale], store)

    assert record.phase == "complete" and backend.stopped == []


def verify_chain(path: Path) -> VerifyResult:
    return verify(rotated_files(path), signing_key().public_key())


def _events(agent_id: str) -> list[dict]:
    import json

    return [json.loads(line) for line in audit_path(agent_id).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# an audit writer that died mid-record


def test_a_partial_last_line_is_cut_and_said_and_the_chain_verifies(kapsis_home: Path) -> None:
    log = AuditLog("torn1")
    log.record("session_start", project="/p")
    log.record("note", text="x")
    log.close()
    path = audit_path("torn1")
    with path.open("ab") as handle:
        handle.write(b'{"seq":3,"ts":"2026-01-01T00:00:00Z","detail":{"te')  # a killed writer
    assert not verify_chain(path).ok  # control: as left, the log does not verify

    AuditLog("torn1").record("session_end", phase="failed")

    result = verify_chain(path)
    assert result.ok, result.damage
    cut = next(e for e in _events("torn1") if e["event_type"] == "log_cut")
    assert cut["detail"]["dropped_bytes"] == 50 and "partial" in cut["detail"]["reason"]


def test_a_torn_tail_longer_than_one_read_is_cut_whole(kapsis_home: Path) -> None:
    log = AuditLog("torn2")
    log.record("session_start", project="/p")
    log.close()
    path = audit_path("torn2")
    with path.open("ab") as handle:
        handle.write(b"x" * 200_000)

    AuditLog("torn2").record("session_end", phase="failed")

    assert verify_chain(path).ok
    cut = next(e for e in _events("torn2") if e["event_type"] == "log_cut")
    assert cut["detail"]["dropped_bytes"] == 200_000


# ---------------------------------------------------------------------------------------------
# cleanup when the project is gone


def test_cleanup_of_a_run_whose_project_was_deleted_removes_the_rest(
    make_plan, project: Path, kapsis_home: Path, backend: _Backend
) -> None:
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    for key, value in (("user.name", "A"), ("user.email", "a@b.test")):
        subprocess.run(["git", "-C", str(project), "config", key, value], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(project),
            "-c",
            "user.name=A",
            "-c",
            "user.email=a@b.test",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "one",
        ],
        check=True,
    )
    plan = make_plan(agent_id="lost1")
    save_plan(plan)
    store = StatusStore()
    store.write(
        _record("lost1", None, phase="failed").model_copy(
            update={"error_type": "agent_failed", "commit_sha": "0" * 40}
        )
    )
    subprocess.run(["rm", "-rf", str(project)], check=True)

    items = api.cleanup(everything=True, force=True, branches=True)

    (item,) = [i for i in items if i.agent_id == "lost1"]
    assert item.problems == ()
    assert backend.removed == ["lost1"]
    assert store.read("lost1") is None
    assert not (kapsis_home / "sandboxes" / "lost1").exists()


def test_cleanup_says_what_it_could_not_remove_and_goes_on(
    make_plan, kapsis_home: Path, backend: _Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for agent_id in ("stuck1", "fine1"):
        save_plan(make_plan(agent_id=agent_id))
        StatusStore().write(_record(agent_id, None, phase="complete"))

    def remove(plan: object) -> None:
        if getattr(plan, "agent_id", "") == "stuck1":
            raise OSError("device or resource busy")
        backend.removed.append(getattr(plan, "agent_id", ""))

    monkeypatch.setattr(backend, "remove", remove)

    items = {i.agent_id: i for i in api.cleanup(everything=True)}

    assert any("device or resource busy" in p for p in items["stuck1"].problems)
    assert StatusStore().read("stuck1") is not None  # kept, so a later cleanup retries
    assert items["fine1"].problems == () and StatusStore().read("fine1") is None


# ---------------------------------------------------------------------------------------------
# a full disk at the end of a run


def test_a_full_disk_under_the_status_still_takes_the_final_record(
    kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StatusStore()
    store.write(_record("full1", None))

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    store.update("full1", phase="failed", message="the end")

    record = store.read("full1")
    assert record is not None and record.phase == "failed" and record.message == "the end"


def test_a_full_disk_under_the_status_of_a_new_record_is_said(
    kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: with nothing to write over, the error is not hidden."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    with pytest.raises(OSError, match="No space"):
        StatusStore().write(_record("new1", None))


def test_an_audit_trail_that_cannot_be_written_does_not_stop_the_run_from_ending(
    make_plan, kapsis_home: Path, backend: _Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kapsis.audit import log as audit_log
    from kapsis.backends import ExitInfo
    from kapsis.sandbox.launcher import finish, initial_status
    from kapsis.secrets.redact import Redactor

    plan = make_plan(agent_id="fin1", network_mode="none")
    save_plan(plan)
    StatusStore().write(initial_status(plan, backend).model_copy(update={"phase": "running"}))

    def no_space(self: object, *args: object, **kwargs: object) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_log.AuditLog, "_record", no_space)

    result = finish(plan, backend, ExitInfo(exit_code=0), Redactor(()))  # type: ignore[arg-type]

    record = StatusStore().read("fin1")
    assert record is not None and record.phase == "complete" and result.exit_code == 0
    assert any("audit record(s) could not be written" in note for note in record.notes)
    assert backend.removed == ["fin1"]  # and the sandbox still went


# ---------------------------------------------------------------------------------------------
# a podman that never answers


@pytest.fixture
def hung_podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kapsis.backends import podman

    script = tmp_path / "podman"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    monkeypatch.setattr(podman, "PODMAN", str(script))
    monkeypatch.setattr(podman, "TEARDOWN_TIMEOUT", 0.5)


def test_a_stop_that_hangs_is_given_up_and_said(hung_podman: None) -> None:
    from kapsis.backends.podman import PodmanBackend
    from kapsis.errors import SandboxError

    started = time.monotonic()
    with pytest.raises(SandboxError, match="did not finish"):
        PodmanBackend().stop("hung1", grace_seconds=0)
    assert time.monotonic() - started < 10


def test_a_status_read_is_answered_even_when_podman_hangs(
    kapsis_home: Path, hung_podman: None
) -> None:
    StatusStore().write(_record("hung2", _dead_process()))

    started = time.monotonic()
    (record,) = api.status("hung2")

    assert record.phase == "failed" and record.error_type == "interrupted"
    assert time.monotonic() - started < 10
