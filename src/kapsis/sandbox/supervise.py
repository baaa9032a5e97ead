"""Detached supervisor: waits for a ``--detach`` run's agent, then finishes it like the foreground.

Started by :func:`kapsis.sandbox.launcher.launch` in its own session, so it outlives the CLI.
"""

from __future__ import annotations

import socket
import sys

from kapsis.audit import AuditLog
from kapsis.backends import get_backend
from kapsis.sandbox.launcher import finish, load_plan, open_agent_reports
from kapsis.status import StatusStore
from kapsis.status.store import parse_utc


def main(agent_id: str, audit_fd: int | None = None) -> int:
    plan = load_plan(agent_id)
    if plan is None:
        print(f"no plan for agent {agent_id}", file=sys.stderr)
        return 2
    record = StatusStore().read(agent_id)
    backend = get_backend(record.backend if record else "podman")
    started_at = parse_utc(record.started_at) if record else None
    reports = None
    if audit_fd is not None:
        # The launcher bound the sandbox's audit socket and handed it over.
        listener = socket.socket(fileno=audit_fd)
        reports = open_agent_reports(plan, AuditLog(agent_id), listener)
        if reports is not None:
            reports.start()
    try:
        exit_info = backend.attach_to(plan, started_at).wait()
    finally:
        if reports is not None:
            reports.stop()
    return finish(plan, backend, exit_info).exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
