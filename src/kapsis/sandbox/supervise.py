"""Detached supervisor: waits for a ``--detach`` run's agent, then finishes it like the foreground.

Started by :func:`kapsis.sandbox.launcher.launch` in its own session, so it outlives the CLI.
"""

from __future__ import annotations

import sys

from kapsis.backends import get_backend
from kapsis.sandbox.launcher import finish, load_plan
from kapsis.status import StatusStore
from kapsis.status.store import parse_utc


def main(agent_id: str) -> int:
    plan = load_plan(agent_id)
    if plan is None:
        print(f"no plan for agent {agent_id}", file=sys.stderr)
        return 2
    record = StatusStore().read(agent_id)
    backend = get_backend(record.backend if record else "podman")
    started_at = parse_utc(record.started_at) if record else None
    exit_info = backend.attach_to(plan, started_at).wait()
    return finish(plan, backend, exit_info).exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
