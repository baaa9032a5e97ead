"""The idle watcher reads the agent's activity from what the host writes: quiet past the limit is
flagged (and with idle_action: stop, stopped, even when the status cannot be written)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kapsis import paths
from kapsis.audit import AuditLog
from kapsis.sandbox.idle import IdleWatcher
from kapsis.sandbox.launcher import initial_status
from kapsis.status import StatusStore


class _Backend:
    name = "podman"


def _watcher(make_plan, action: str) -> tuple[IdleWatcher, list[int]]:
    plan = make_plan(config=f"resources:\n  idle_timeout: 1s\n  idle_action: {action}\n")
    StatusStore().write(initial_status(plan, _Backend()))  # type: ignore[arg-type]
    stops: list[int] = []
    watcher = IdleWatcher.start_for(plan, AuditLog(plan.agent_id), lambda: stops.append(1))
    assert watcher is not None
    return watcher, stops


def _wait(condition, seconds: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_quiet_past_the_limit_is_flagged_and_talk_clears_it(make_plan, kapsis_home: Path) -> None:
    watcher, stops = _watcher(make_plan, "flag")
    store = StatusStore()
    try:
        assert _wait(lambda: store.read("unit1").stalled)  # type: ignore[union-attr]
        transcript = paths.transcript_path("unit1")
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.write_text("T stdout F back\n")  # the agent speaks again
        assert _wait(lambda: not store.read("unit1").stalled)  # type: ignore[union-attr]
    finally:
        watcher.finish()
    assert stops == []  # flag only
    events = AuditLog("unit1").path.read_text()
    assert "agent_stalled" in events and "agent_active" in events


def test_its_own_records_are_no_sign_of_the_agent(make_plan, kapsis_home: Path) -> None:
    """Flagging writes to the audit trail: that must not read as the agent speaking again."""
    watcher, _ = _watcher(make_plan, "flag")
    store = StatusStore()
    try:
        assert _wait(lambda: store.read("unit1").stalled)  # type: ignore[union-attr]
        time.sleep(1.0)
        assert store.read("unit1").stalled  # type: ignore[union-attr]
    finally:
        watcher.finish()
    assert "agent_active" not in AuditLog("unit1").path.read_text()


def test_stop_happens_even_when_the_status_cannot_be_written(
    make_plan, kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher, stops = _watcher(make_plan, "stop")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StatusStore, "update", full)
    try:
        assert _wait(lambda: bool(stops))
    finally:
        watcher.finish()
