"""``kapsis server status|stop``: the start-up server that keeps Kapsis imported."""

from __future__ import annotations

import json

import typer

from kapsis.cli.common import JsonFlag

server_app = typer.Typer(
    help="The start-up server that makes each kapsis command start fast.", no_args_is_help=True
)


@server_app.command("status")
def server_status(json_output: JsonFlag = False) -> None:
    """Whether a start-up server of this Kapsis is running; exit 1 if none is."""
    from kapsis.forkserver import control, location

    facts = control.status()
    if json_output:
        print(json.dumps({"running": facts is not None, **(facts or {})}, indent=2))
    elif facts is None:
        reason = (
            f"disabled by {location.DISABLE_VARIABLE}"
            if location.disabled()
            else "the next kapsis command starts one"
        )
        print(f"no start-up server is running ({reason})")
    else:
        print(
            f"start-up server pid {facts['pid']} on {facts['socket']}: "
            f"{facts['served']} commands served, {facts['commands_running']} running"
        )
    if facts is None:
        raise typer.Exit(1)


@server_app.command("stop")
def server_stop() -> None:
    """Stop this user's start-up servers (the commands they are running finish normally)."""
    from kapsis.forkserver import control

    stopped = control.stop_all()
    print(f"{stopped} start-up server(s) stopping" if stopped else "no start-up server was running")
