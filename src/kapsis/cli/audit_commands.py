"""``kapsis audit``: verify, show and export the tamper-evident audit trail."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from kapsis.cli.common import JsonFlag, RawFlag, fail as _fail
from kapsis.errors import AuditDamagedError, KapsisError

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    target: Annotated[str, typer.Argument(help="AGENT_ID, or an audit .jsonl file.")],
    key: Annotated[
        Path | None, typer.Option("--key", help="Public key (PEM) to verify with.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Check every hash, link and seal; name the first damaged record (exit 9)."""
    from kapsis import api

    try:
        result = api.audit_verify(target, key)
    except KapsisError as error:
        _fail(error)
    first = result.first
    if json_output:
        payload = dataclasses.asdict(result)
        payload["ok"] = result.ok
        payload["first_damage"] = dataclasses.asdict(first) if first else None
        print(json.dumps(payload, indent=2))
    elif first is None:
        print(
            f"ok: {result.records} records, {result.seals} seals, {result.sessions} session(s) "
            f"in {len(result.files)} file(s); every hash, link and seal verifies"
        )
    else:
        print(f"DAMAGED: {first.kind} at seq {first.seq}: {first.detail}")
    if first is not None:
        raise typer.Exit(int(AuditDamagedError.exit_code))


@audit_app.command("show")
def audit_show(
    agent_id: Annotated[str, typer.Argument(help="The agent.")],
    event_type: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    json_output: JsonFlag = False,
    raw: RawFlag = False,
) -> None:
    """The agent's audit trail as a readable timeline (control characters escaped visibly;
    --raw: one tab-separated line per record, as recorded)."""
    from kapsis import api
    from kapsis.cli import render

    try:
        events = api.audit_events(agent_id, event_type)
        if json_output:
            render.print_json_array(events)
        elif raw:
            render.print_audit_raw(events)
        else:
            render.print_audit(events)
    except KapsisError as error:
        _fail(error)


@audit_app.command("alerts")
def audit_alerts(
    agent_id: Annotated[str, typer.Argument(help="The agent.")],
    json_output: JsonFlag = False,
) -> None:
    """The alerts the host raised on the agent's audit stream."""
    from kapsis import api
    from kapsis.cli import render

    try:
        alerts = api.audit_alerts(agent_id)
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(json.dumps(alerts, indent=2))
        return
    render.print_alerts(alerts)


@audit_app.command("export-key")
def audit_export_key() -> None:
    """Print the host's audit public key (PEM), for `kapsis audit verify --key` elsewhere."""
    from kapsis import api

    print(api.audit_public_key(), end="")
