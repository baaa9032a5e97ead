"""Runs whose supervising host process died: found by whoever reads their status, then ended.

``kapsis run`` (or its detached supervisor) carries a run to its final status. When that process
is killed, runs out of memory or the machine reboots, the record would say ``running`` forever.
Every reader of status (:func:`kapsis.api.status`) passes the records through :func:`settle`:
a run whose supervisor is gone (:mod:`kapsis.status.liveness`) ends ``failed`` with error type
``interrupted``; its sandbox is stopped (nothing records an agent that runs on unsupervised); its
work stays where it is, and the message says where; the audit chain gets its ``session_end`` and
seal. Only one reader makes the change: it is decided under the status store's lock.
"""

from __future__ import annotations

import contextlib

from kapsis.audit import AuditLog
from kapsis.backends import get_backend
from kapsis.errors import ExitCode
from kapsis.sandbox.launcher import load_plan
from kapsis.sandbox.save_work import clear_agent_special_bits
from kapsis.status import AgentStatus, StatusStore
from kapsis.status.liveness import is_alive

INTERRUPTED = "interrupted"


def supervisor_gone(record: AgentStatus) -> bool:
    if record.finished or record.backend == "k8s" or record.supervisor is None:
        return False  # Kubernetes runs are the operator's; old records named no supervisor.
    return not is_alive(record.supervisor)


def settle(records: list[AgentStatus], store: StatusStore | None = None) -> list[AgentStatus]:
    """The records, with every run whose supervisor is gone ended as interrupted."""
    if not any(supervisor_gone(record) for record in records):
        return records
    store = store or StatusStore()
    return [_settle(store, record) if supervisor_gone(record) else record for record in records]


def interrupted_message(record: AgentStatus) -> str:
    assert record.supervisor is not None
    where = (
        f"its uncommitted work is kept in {record.work_location}"
        if record.work_location
        else "it had no workspace yet"
    )
    return (
        f"the host process supervising this run (pid {record.supervisor.pid}) ended during "
        f"{record.phase} (killed, out of memory or a reboot); the agent was stopped; {where}; "
        f"`kapsis cleanup --agent {record.agent_id} --force` removes it"
    )


def _settle(store: StatusStore, record: AgentStatus) -> AgentStatus:
    message = interrupted_message(record)
    settled = store.update_if(
        record.agent_id,
        # Read again under the lock: the supervisor may have finished the run meanwhile, or
        # another reader settled it.
        lambda current: supervisor_gone(current) and current.supervisor == record.supervisor,
        phase="failed",
        exit_code=int(ExitCode.INTERRUPTED),
        error_type=INTERRUPTED,
        message=message,
    )
    if settled is None:
        return store.read(record.agent_id) or record
    # Stopped, not removed: the pod's state (and the mounted workspace) are left for
    # `kapsis cleanup`, which removes everything of a run. Each step on its own: a reader of
    # status must get its answer whatever one of them meets.
    with contextlib.suppress(Exception):
        get_backend(record.backend).stop_unsupervised(record.agent_id)
    try:
        plan = load_plan(record.agent_id)
    except (ValueError, OSError):
        plan = None
    if plan is not None:
        with contextlib.suppress(Exception):
            clear_agent_special_bits(plan)
    audit = AuditLog(record.agent_id, enabled=plan is None or plan.audit_enabled, keep_going=True)
    audit.record(
        "session_end",
        phase="failed",
        exit_code=int(ExitCode.INTERRUPTED),
        error_type=INTERRUPTED,
        message=message,
        interrupted_phase=record.phase,
    )
    audit.close()
    return settled
