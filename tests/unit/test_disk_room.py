"""The agent's disk never promises more than the filesystem of ~/.kapsis has free.

The disk is a sparse file there: without this bound an agent with a quota larger than the free
space could fill the filesystem that holds the audit trail and the status.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kapsis.errors import ExitCode, SandboxError
from kapsis.sandbox import workspace_plan
from kapsis.sandbox.workspace_plan import HOST_RESERVE

GIB = 1024**3


@pytest.fixture
def free_space(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The free space statvfs reports, settable by the test."""
    state = SimpleNamespace(free=100 * GIB)
    real = os.statvfs

    def statvfs(path: str | Path) -> object:
        facts = real(path)
        return SimpleNamespace(f_bavail=state.free // facts.f_frsize, f_frsize=facts.f_frsize)

    monkeypatch.setattr(workspace_plan.os, "statvfs", statvfs)
    return state


def test_with_room_the_quota_is_as_asked(make_plan, free_space) -> None:
    plan = make_plan()
    assert plan.workspace.disk_bytes == 10 * GIB and plan.resources.disk == "10g"


def test_the_quota_is_lowered_to_the_free_space_less_the_reserve(
    make_plan, free_space, kapsis_home: Path
) -> None:
    free_space.free = 2 * GIB
    plan = make_plan()
    assert plan.workspace.disk_bytes == 2 * GIB - HOST_RESERVE
    assert plan.resources.disk_bytes == 2 * GIB - HOST_RESERVE
    assert "lowered from 10g" in str(plan.resources.disk)
    assert all(f"size={2 * GIB - HOST_RESERVE}" in t.options for t in plan.tmpfs)


def test_no_room_is_refused_and_no_limit_is_the_users_choice(make_plan, free_space) -> None:
    free_space.free = 200 * 1024**2
    with pytest.raises(SandboxError) as refused:
        make_plan()
    assert refused.value.exit_code == ExitCode.SANDBOX_FAILED
    assert "no room for the agent's disk" in str(refused.value)
    assert "resources.disk: null" in str(refused.value)
    assert make_plan(config="resources:\n  disk: null\n").workspace.disk_bytes is None
