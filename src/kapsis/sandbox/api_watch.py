"""While a filtered run is young: say at once that its model API cannot be reached.

An agent whose model API the gateway refuses (or whose name does not resolve) retries for
minutes before it gives up, and until then the run only looks slow. The watcher reads the
gateway's logs (files on the host, the first :data:`READ_LIMIT` bytes of each) every
:data:`INTERVAL` seconds during the run's first :data:`WINDOW` seconds; the first time a model
API host had no answer, its note ("no answer from api.openai.com: the gateway refused its name
(not on the allowlist)") goes into the run's status (message and notes) and the audit
(``model_api_unreachable``), so ``kapsis status`` says it while the agent still retries.
"""

from __future__ import annotations

import threading

from kapsis.audit import AuditLog
from kapsis.sandbox.plan import SandboxPlan
from kapsis.status import StatusStore

INTERVAL = 3.0
WINDOW = 600.0
# The first minutes of a run's gateway logs are small; a log that grew past this is read in part.
READ_LIMIT = 1 << 20


class ApiWatcher:
    """A thread that notes, once per host, a model API the gateway could not serve."""

    def __init__(self, plan: SandboxPlan, audit: AuditLog, store: StatusStore) -> None:
        self.plan, self.audit, self.store = plan, audit, store
        self.said: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kapsis-api-watch", daemon=True)

    @classmethod
    def start_for(cls, plan: SandboxPlan, audit: AuditLog) -> ApiWatcher | None:
        if plan.network.gateway is None:
            return None
        watcher = cls(plan, audit, StatusStore())
        watcher._thread.start()
        return watcher

    def finish(self) -> None:
        self._done.set()
        self._thread.join(5)

    def _watch(self) -> None:
        waited = 0.0
        while waited < WINDOW and not self._done.wait(INTERVAL):
            waited += INTERVAL
            try:
                self.check()
            except Exception:  # a log being rotated, a status it cannot write: next time
                continue

    def check(self) -> None:
        from kapsis.sandbox.network_record import model_api_notes_so_far

        new = [n for n in model_api_notes_so_far(self.plan, READ_LIMIT) if n not in self.said]
        if not new:
            return
        message = f"agent {self.plan.agent} is running; {new[0]} (it may retry for a while)"
        if self.store.add_notes(self.plan.agent_id, new, while_in="running", message=message):
            for note in new:
                self.audit.record("model_api_unreachable", note=note)
            self.said += new
