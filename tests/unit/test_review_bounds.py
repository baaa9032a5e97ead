# ruff: noqa: F811  (the commit tests' fixtures, imported, are the tests' arguments)
"""The host's end of a run against what an attacker's review found: partial audit writes,
records longer than a read, a status on a full disk, unreadable plans, hidden characters,
sparse files, a transcript past its cap, readers in other pid namespaces."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kapsis.api as api
from kapsis.audit import AuditLog, log as audit_log, rotated_files, verify
from kapsis.audit.keys import signing_key
from kapsis.audit.log import audit_path
from kapsis.git import commit as commit_module
from kapsis.git.changes import from_upper
from kapsis.git.commit import commit_workspace
from kapsis.git.runner import Repo
from kapsis.sandbox.launcher import save_plan
from kapsis.status import AgentStatus, StatusStore, liveness
from kapsis.status.store import utc_now
from kapsis.terminal import shown

from .test_git_commit import (  # noqa: F401  (the commit tests' fixtures)
    _git_home,
    project,
    repo,
    request,
    start,
)


def _verifies(agent_id: str) -> bool:
    return verify(rotated_files(audit_path(agent_id)), signing_key().public_key()).ok


def _record(agent_id: str, phase: str = "complete") -> AgentStatus:
    now = utc_now()
    return AgentStatus(
        agent_id=agent_id, project="/p", backend="podman", agent="shell", phase=phase,  # type: ignore[arg-type]
        started_at=now, updated_at=now, limits_enforced=True, network_mode="none",
        security_profile="standard",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the audit writer


def test_a_write_that_fails_half_way_leaves_nothing_to_come_back_later(
    kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog("half1", keep_going=True)
    log.record("session_start", project="/p")
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(descriptor: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_log.os, "write", half_then_full)
    log.record("lost", n=1)
    monkeypatch.setattr(audit_log.os, "write", real_write)
    log.record("after", n=2)
    log.record("session_end", phase="complete")

    assert log.failures == 1
    events = [
        json.loads(line)["event_type"] for line in audit_path("half1").read_text().splitlines()
    ]
    assert "lost" not in events and events[-3:] == ["after", "session_end", "seal"]
    assert _verifies("half1")


def test_a_record_longer_than_one_read_is_still_found_as_the_head(kapsis_home: Path) -> None:
    log = AuditLog("long1")
    log.record("session_start", project="/p")
    log.record("big", text="x" * 200_000)
    log.close()

    AuditLog("long1").record("session_end", phase="complete")

    seqs = [json.loads(line)["seq"] for line in audit_path("long1").read_text().splitlines()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert _verifies("long1")


# ---------------------------------------------------------------------------------------------
# the status on a full disk


def test_a_final_status_that_fits_is_written_over_its_own_blocks(
    kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StatusStore()
    store.write(_record("fit1", "running").model_copy(update={"message": "m" * 2000}))
    monkeypatch.setattr(
        "tempfile.mkstemp", lambda **kwargs: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )

    store.update("fit1", phase="failed", message="short")

    assert store.read("fit1").phase == "failed"  # type: ignore[union-attr]


def test_a_final_status_that_would_grow_the_file_is_refused_and_the_old_one_kept(
    kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StatusStore()
    store.write(_record("grow1", "running"))
    monkeypatch.setattr(
        "tempfile.mkstemp", lambda **kwargs: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )

    with pytest.raises(OSError):
        store.update("grow1", phase="failed", message="n" * 20_000)

    assert store.read("grow1").phase == "running"  # type: ignore[union-attr]  # whole


# ---------------------------------------------------------------------------------------------
# cleanup


def test_cleanup_goes_on_past_an_unreadable_plan(make_plan, kapsis_home: Path) -> None:
    save_plan(make_plan(agent_id="bad1"))
    (kapsis_home / "sandboxes" / "bad1" / "plan.json").write_text("{not json")
    StatusStore().write(_record("bad1"))

    items = api.cleanup(dry_run=True)

    assert [item.agent_id for item in items if item.agent_id == "bad1"] == ["bad1"]


def test_an_orphan_sandbox_holding_work_is_kept_unless_forced(kapsis_home: Path) -> None:
    orphan = kapsis_home / "sandboxes" / "orph1" / "upper"
    orphan.mkdir(parents=True)
    (orphan / "work.txt").write_text("the agent's\n")
    empty = kapsis_home / "sandboxes" / "orph2"
    empty.mkdir(parents=True)

    items = {item.agent_id: item for item in api.cleanup(dry_run=True)}

    assert items["orph1"].kept and "--force" in items["orph1"].kept
    assert not items["orph2"].kept  # control: nothing in it, it goes
    forced = {item.agent_id: item for item in api.cleanup(dry_run=True, force=True)}
    assert not forced["orph1"].kept


# ---------------------------------------------------------------------------------------------
# the terminal


@pytest.mark.parametrize(
    "hidden", ["\u200b", "\u200d", "\ufeff", "\u00ad", "\U000e0041", "\udc80", "\u2066"]
)
def test_format_and_surrogate_characters_are_shown_escaped(hidden: str) -> None:
    text = shown(f"a{hidden}b")
    assert hidden not in text and text.startswith("a\\") and text.endswith("b")


def test_letters_of_any_script_and_symbols_pass() -> None:
    text = "déjà vu — 東京 ✓ 🙂 Ελλάδα"
    assert shown(text) == text


# ---------------------------------------------------------------------------------------------
# liveness


def test_a_supervisor_of_another_pid_namespace_is_not_judged() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = liveness.identify(child.pid)
    child.wait()
    assert not liveness.is_alive(gone)  # control: same namespace, gone
    elsewhere = gone.model_copy(update={"pid_ns": "pid:[1]"})
    assert liveness.is_alive(elsewhere)


def test_a_supervisor_given_nothing_ends_at_once(kapsis_home: Path, make_plan) -> None:
    save_plan(make_plan(agent_id="sup1"))
    done = subprocess.run(
        [sys.executable, "-m", "kapsis.sandbox.supervise", "sup1"],
        input=b"",
        capture_output=True,
        env={**os.environ, "KAPSIS_HOME": str(kapsis_home)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and b"nothing was handed over" in done.stderr


# ---------------------------------------------------------------------------------------------
# sparse files and the size of a commit


def test_a_sparse_file_under_the_size_limit_is_left_out_unread(
    repo: Repo, project: Path, start: str, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    with (upper / "holes.bin").open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    (upper / "dense.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # control

    outcome = commit_workspace(request(repo, start, max_file_size=None), from_upper(upper))

    assert outcome.sparse == [("holes.bin", 50 * 1024 * 1024)]
    assert outcome.commit_sha is not None


def test_a_commit_reads_at_most_its_total(
    repo: Repo, project: Path, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit_module, "MAX_COMMIT_BYTES", 3000)
    upper = tmp_path / "upper"
    upper.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (upper / name).write_bytes(os.urandom(1200))

    outcome = commit_workspace(request(repo, start), from_upper(upper))

    assert outcome.over_total == [("c.txt", 1200)]
