"""While the run goes on, the status says at once that the agent's model API had no answer
(:mod:`kapsis.sandbox.api_watch`), from the gateway's logs on the host."""

from __future__ import annotations

import json
from pathlib import Path

from kapsis.audit import AuditLog
from kapsis.backends import get_backend
from kapsis.network.gateway_files import gateway_dirs
from kapsis.network.gateway_layout import DNS_FRONT_SOURCE
from kapsis.sandbox.api_watch import ApiWatcher
from kapsis.sandbox.launcher import initial_status
from kapsis.status import StatusStore

PREFIX = "Dec  8 10:00:00 dnsmasq[7]:"
FRONT = DNS_FRONT_SOURCE


def dns_lines(serial: int, name: str, answer: str) -> str:
    where = f"{PREFIX} {serial} {FRONT}/4100{serial}"
    return (
        f"{where} query[A] {name} from {FRONT}\n"
        f"{where} forwarded {name} to 192.0.2.53\n"
        f"{where} reply {name} is {answer}\n"
    )


def test_an_api_name_that_does_not_resolve_is_said_in_the_status_while_running(
    make_plan, tmp_path: Path
) -> None:
    plan = make_plan(agent="codex", environ={"OPENAI_API_KEY": "k"})
    store = StatusStore()
    store.write(initial_status(plan, get_backend("podman")).model_copy(update={"phase": "running"}))
    audit = AuditLog(plan.agent_id)
    watcher = ApiWatcher(plan, audit, store)
    log = gateway_dirs(Path(plan.workspace.root)).dns_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(dns_lines(1, "pypi.org", "NXDOMAIN"))

    watcher.check()  # control: a name that is not the model API's says nothing
    assert store.read(plan.agent_id).notes == []

    with log.open("a") as more:
        more.write(dns_lines(2, "api.openai.com", "NXDOMAIN"))
    watcher.check()
    watcher.check()  # said once

    status = store.read(plan.agent_id)
    note = "no answer from api.openai.com: it could not be resolved"
    assert status.notes == [note]
    assert status.message.startswith(f"agent codex is running; {note}")
    trail = [json.loads(line) for line in audit.path.read_text().splitlines()]
    recorded = [r for r in trail if r["event_type"] == "model_api_unreachable"]
    assert [r["detail"]["note"] for r in recorded] == [note]
