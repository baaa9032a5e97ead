"""The status record of each agent and the store that writes it.

Files live in ``~/.kapsis/status/AGENT_ID.json``, a directory never mounted into a sandbox, so
only the host can write them. Each write goes to a temporary file then ``os.replace``, so a reader
never sees a half-written record, and each read-modify-write holds a lock on the directory, so
two writers (the run, ``kapsis stop``, the thread that records the agent's reports) never undo
each other's changes. ``agent_reported`` alone holds what the agent said about itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from kapsis import paths
from kapsis.status.activity import AgentActivity
from kapsis.status.liveness import Supervisor

Phase = Literal[
    "initializing", "preparing", "starting", "running", "post_processing", "complete", "failed"
]
FINAL_PHASES: frozenset[str] = frozenset({"complete", "failed"})
PHASE_PROGRESS: dict[str, int] = {
    "initializing": 0,
    "preparing": 10,
    "starting": 20,
    "running": 30,
    "post_processing": 90,
    "complete": 100,
}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(stamp: str) -> float:
    """Epoch seconds of a timestamp written by :func:`utc_now`."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


FAULT_STOP_VARIABLE = "KAPSIS_TEST_STOP_AT_PHASE"


def _fault_stop(phase: str) -> None:
    """Fault injection for the tests: the process stops itself (SIGSTOP) once it has written
    the phase named in KAPSIS_TEST_STOP_AT_PHASE, so a test can kill -9 it there."""
    if os.environ.get(FAULT_STOP_VARIABLE) == phase:
        os.kill(os.getpid(), signal.SIGSTOP)


class AgentStatus(BaseModel):
    agent_id: str
    project: str
    branch: str | None = None
    backend: str
    agent: str
    phase: Phase = "initializing"
    progress: int = 0
    message: str = ""
    started_at: str
    updated_at: str
    exit_code: int | None = None
    agent_exit_code: int | None = None
    error_type: str | None = None
    limits_enforced: bool
    # resources.disk, and whether the workspace's share of it is enforced (a disk of its own).
    disk: str | None = None
    disk_enforced: bool = False
    network_mode: str
    security_profile: str
    task: str = ""
    stop_requested: bool = False
    # No output and no report for resources.idle_timeout (kapsis.sandbox.idle).
    stalled: bool = False
    workspace_mode: str = "overlay"
    base: str | None = None
    start_commit: str | None = None
    # The user's uncommitted state at launch, carried onto the branch (filesystem.uncommitted).
    carried_commit: str | None = None
    commit_sha: str | None = None
    agent_commits: int = 0
    excluded_paths: list[str] = []
    push_status: str = "not_requested"
    push_message: str | None = None
    push_command: str | None = None
    pr_url: str | None = None
    work_location: str | None = None
    blocked_requests: int = 0
    notes: list[str] = []
    alerts: list[str] = []
    agent_reported: AgentActivity | None = None
    # Backend "k8s": where the AgentRequest (named after the agent id) lives.
    namespace: str | None = None
    kube_context: str | None = None
    # The host process that carries the run to its end (see kapsis.status.liveness).
    supervisor: Supervisor | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINAL_PHASES


class StatusStore:
    """Reads and atomically writes status records."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or paths.status_dir()

    def path(self, agent_id: str) -> Path:
        return self.directory / f"{agent_id}.json"

    def write(self, status: AgentStatus) -> None:
        paths.private_dir(self.directory)
        text = status.model_dump_json(indent=2)
        try:
            descriptor, temporary = tempfile.mkstemp(
                dir=self.directory, prefix=".tmp-", suffix=".json"
            )
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            self._rewrite_in_place(status.agent_id, text, error)
            return
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path(status.agent_id))
        except OSError as error:
            Path(temporary).unlink(missing_ok=True)
            if error.errno != errno.ENOSPC:
                raise
            self._rewrite_in_place(status.agent_id, text, error)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _rewrite_in_place(self, agent_id: str, text: str, full: OSError) -> None:
        """A full disk: the record is rewritten over its own blocks, compact (a final status
        must land). Only when it fits in what the file already has, so the write takes no new
        block and cannot fail half-way; the file is cut to its length only after it."""
        target = self.path(agent_id)
        compact = AgentStatus.model_validate_json(text).model_dump_json().encode("utf-8")
        try:
            descriptor = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            raise full from None
        try:
            if len(compact) > os.fstat(descriptor).st_size:
                raise full
            os.pwrite(descriptor, compact, 0)
            os.ftruncate(descriptor, len(compact))
        finally:
            os.close(descriptor)

    def update(self, agent_id: str, **changes: Any) -> AgentStatus:
        with self._locked():
            return self._update(agent_id, changes)

    def update_if(
        self, agent_id: str, condition: Callable[[AgentStatus], bool], **changes: Any
    ) -> AgentStatus | None:
        """Apply ``changes`` only if the record, read under the lock, meets ``condition``;
        returns the new record, or None when nothing changed."""
        with self._locked():
            current = self.read(agent_id)
            if current is None or not condition(current):
                return None
            return self._update(agent_id, changes)

    def add_notes(
        self, agent_id: str, notes: list[str], *, while_in: str, message: str
    ) -> AgentStatus | None:
        """Append ``notes`` and set ``message``, read and written under the lock, only while
        the record is in phase ``while_in``; returns the new record, or None."""
        with self._locked():
            current = self.read(agent_id)
            if current is None or current.phase != while_in:
                return None
            return self._update(agent_id, {"notes": [*current.notes, *notes], "message": message})

    def _update(self, agent_id: str, changes: dict[str, Any]) -> AgentStatus:
        current = self.read(agent_id)
        if current is None:
            raise KeyError(agent_id)
        if "phase" in changes and "progress" not in changes:
            changes["progress"] = PHASE_PROGRESS.get(changes["phase"], current.progress)
        updated = current.model_copy(update={**changes, "updated_at": utc_now()})
        self.write(updated)
        if "phase" in changes:
            _fault_stop(updated.phase)
        return updated

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        paths.private_dir(self.directory)
        descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def read(self, agent_id: str) -> AgentStatus | None:
        try:
            return AgentStatus.model_validate_json(self.path(agent_id).read_text(encoding="utf-8"))
        except (OSError, ValidationError):
            return None

    def all(self) -> list[AgentStatus]:
        if not self.directory.is_dir():
            return []
        records = (self.read(p.stem) for p in sorted(self.directory.glob("*.json")))
        return sorted((r for r in records if r is not None), key=lambda r: r.started_at)

    def delete(self, agent_id: str) -> None:
        self.path(agent_id).unlink(missing_ok=True)
