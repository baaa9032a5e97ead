"""Private uid ranges: parallel launches never share one, stale claims are reclaimed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.backends import _uidslots


@pytest.fixture(autouse=True)
def slots_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "uidslots"
    monkeypatch.setenv("KAPSIS_UIDSLOTS_DIR", str(directory))
    return directory


def no_pods(agent_id: str) -> bool:
    return False


def test_an_agent_still_launching_keeps_its_range_before_its_pod_exists() -> None:
    # Both claims come from this (live) process while neither agent has a pod yet.
    first = _uidslots.claim("agent-a", is_live=no_pods)
    second = _uidslots.claim("agent-b", is_live=no_pods)
    assert first != second
    assert abs(first - second) >= _uidslots.SLOT_SIZE


def test_claiming_again_returns_the_same_range() -> None:
    assert _uidslots.claim("agent-a", is_live=no_pods) == _uidslots.claim(
        "agent-a", is_live=no_pods
    )


def test_a_stale_claim_is_reclaimed_but_a_live_pod_keeps_its_range(slots_dir: Path) -> None:
    slots_dir.mkdir()
    dead_pid = 2**22 + 12345  # above pid_max on common systems: no such process
    (slots_dir / "0").write_text(f"gone {dead_pid}")
    (slots_dir / "1").write_text(f"running {dead_pid}")
    taken = _uidslots.claim("agent-new", is_live=lambda agent: agent == "running")
    assert taken == _uidslots.BASE  # slot 0: its agent has neither a process nor a pod
    assert (slots_dir / "1").read_text().startswith("running ")


def test_release_frees_the_range() -> None:
    first = _uidslots.claim("agent-a", is_live=no_pods)
    _uidslots.release("agent-a")
    assert _uidslots.claim("agent-b", is_live=no_pods) == first
