"""An agent that has gone quiet: no output and no report for ``resources.idle_timeout``.

The host process that waits for the agent (``kapsis run`` or the detached supervisor) runs an
:class:`IdleWatcher` beside it. The agent's activity is read from what only the host writes: the
transcript (each line of output) and the audit chain (each report). Past the limit the run is
flagged ``stalled`` in its status and the audit (``agent_stalled``); with ``idle_action: stop`` it
is also stopped, and ends ``failed`` with error type ``stalled``. Output or a report clears the
flag (``agent_active``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from kapsis import paths
from kapsis.audit import AuditLog
from kapsis.sandbox.plan import SandboxPlan
from kapsis.status import StatusStore

STALLED = "stalled"


def stalled_message(seconds: int) -> str:
    return f"the agent produced no output and no report for {seconds} s (resources.idle_timeout)"


class IdleWatcher:
    """Flags (and with ``idle_action: stop``, stops) an agent that went quiet; a thread."""

    def __init__(
        self, plan: SandboxPlan, audit: AuditLog, stop: Callable[[], None], store: StatusStore
    ) -> None:
        assert plan.resources.idle_timeout_seconds is not None
        self.limit = plan.resources.idle_timeout_seconds
        self.stops = plan.resources.idle_action == "stop"
        self.agent_id = plan.agent_id
        self.audit, self.store, self._stop = audit, store, stop
        self._transcript = paths.transcript_path(plan.agent_id)
        self._started = time.time()
        # The watcher's own audit records are no sign of the agent: audit writes up to here
        # are not counted.
        self._own_write = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kapsis-idle", daemon=True)
        self.stalled = False

    @classmethod
    def start_for(
        cls, plan: SandboxPlan, audit: AuditLog, stop: Callable[[], None]
    ) -> IdleWatcher | None:
        if plan.resources.idle_timeout_seconds is None:
            return None
        watcher = cls(plan, audit, stop, StatusStore())
        watcher._thread.start()
        return watcher

    def finish(self) -> None:
        self._done.set()
        self._thread.join(5)

    def last_activity(self) -> float:
        latest = self._started
        for source, counted_after in ((self._transcript, 0.0), (self.audit.path, self._own_write)):
            try:
                changed = source.stat().st_mtime
            except OSError:
                continue
            if changed > counted_after:
                latest = max(latest, changed)
        return latest

    def _record(self, event_type: str, **detail: Any) -> None:
        self.audit.record(event_type, **detail)
        with contextlib.suppress(OSError):
            self._own_write = self.audit.path.stat().st_mtime

    def _watch(self) -> None:
        interval = max(0.2, min(5.0, self.limit / 4))
        while not self._done.wait(interval):
            try:
                self._check()
            except Exception:  # a full disk, a status it cannot write: try again next time
                continue

    def _check(self) -> None:
        quiet = time.time() - self.last_activity()
        if quiet >= self.limit and not self.stalled:
            self._flag()
        elif quiet < self.limit and self.stalled and not self.stops:
            self.store.update(self.agent_id, stalled=False)
            self.stalled = False
            self._record("agent_active", quiet_seconds=round(quiet, 1))

    def _flag(self) -> None:
        message = stalled_message(self.limit)
        changes: dict[str, object] = {"stalled": True, "message": f"{STALLED}: {message}"}
        if self.stops:
            changes["stop_requested"] = True
        try:
            self.store.update(self.agent_id, **changes)
        finally:
            # Stopped even when the status cannot be written (the watcher tries the record
            # again next time); flagged here only once the status says so.
            if self.stops:
                self._stop()
        self.stalled = True
        self._record(
            "agent_stalled", idle_timeout=self.limit, action="stop" if self.stops else "flag"
        )
