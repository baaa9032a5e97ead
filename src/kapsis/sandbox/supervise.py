"""Detached supervisor: waits for a ``--detach`` run's agent, then finishes it like the foreground.

Started by :func:`kapsis.sandbox.launcher.launch` in its own session, so it outlives the CLI. What
it takes over arrives as JSON on its stdin (a pipe): the audit socket's and the transcript pipe's
file descriptors, and the secret values it must redact.
"""

from __future__ import annotations

import json
import socket
import sys

from kapsis.audit import AuditLog
from kapsis.backends import get_backend
from kapsis.sandbox.api_watch import ApiWatcher
from kapsis.sandbox.idle import IdleWatcher
from kapsis.sandbox.launcher import finish, load_plan, open_agent_reports
from kapsis.secrets.redact import Redactor
from kapsis.status import StatusStore
from kapsis.status.store import parse_utc


def main(agent_id: str) -> int:
    given = sys.stdin.read()
    if not given:
        # The launcher died before it handed over: no transcript pipe, no values to redact.
        # This process ends; the run reads as interrupted at the next status read.
        print(f"agent {agent_id}: nothing was handed over", file=sys.stderr)
        return 2
    handover = json.loads(given)
    plan = load_plan(agent_id)
    if plan is None:
        print(f"no plan for agent {agent_id}", file=sys.stderr)
        return 2
    redactor = Redactor(handover.get("secrets", []))
    record = StatusStore().read(agent_id)
    backend = get_backend(record.backend if record else "podman")
    started_at = parse_utc(record.started_at) if record else None
    reports = None
    audit = AuditLog(agent_id, enabled=plan.audit_enabled, redactor=redactor)
    audit_fd = handover.get("audit_fd")
    if audit_fd is not None:
        # The launcher bound the sandbox's audit socket and handed it over.
        listener = socket.socket(fileno=int(audit_fd))
        reports = open_agent_reports(plan, audit, redactor, listener)
        if reports is not None:
            reports.start()
    sandbox = backend.attach_to(
        plan, started_at, handover=tuple(handover.get("sandbox_fds", ())), redactor=redactor
    )
    idle = IdleWatcher.start_for(plan, audit, lambda: backend.stop(agent_id, grace_seconds=2))
    api_watch = ApiWatcher.start_for(plan, audit)
    try:
        exit_info = sandbox.wait()
    finally:
        if idle is not None:
            idle.finish()
        if api_watch is not None:
            api_watch.finish()
        if reports is not None:
            reports.stop()
    return finish(plan, backend, exit_info, redactor).exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
