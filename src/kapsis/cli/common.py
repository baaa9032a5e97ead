"""What the ``kapsis`` commands share: how they fail and note, and the options they repeat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from kapsis.errors import KapsisError
from kapsis.terminal import shown


def fail(error: KapsisError) -> NoReturn:
    """One line on stderr, then the error's documented exit code."""
    print(f"kapsis: error: {shown(str(error))}", file=sys.stderr)
    raise typer.Exit(int(error.exit_code))


def note(text: str) -> None:
    print(f"kapsis: {shown(text)}", file=sys.stderr, flush=True)


# Options that several commands share, declared once.
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Config file; beats other files, not flags.")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="JSON for scripts.")]
RawFlag = Annotated[
    bool,
    typer.Option("--raw", help="The agent's bytes as they are (control sequences unescaped)."),
]
AgentOption = Annotated[str | None, typer.Option(help="Agent profile (default: shell).")]
AllowOption = Annotated[
    list[str] | None,
    typer.Option("--allow", help="Also allow HOST[:PORT], *.DOMAIN or ADDRESS (filtered mode)."),
]
NetworkModeOption = Annotated[
    str | None, typer.Option("--network-mode", help="none | open | filtered")
]
