"""``python -m kapsis.operator`` (what the Deployment runs): ``kapsis operator run``."""

from __future__ import annotations

import typer

from kapsis.cli.operator_commands import operator_run

if __name__ == "__main__":
    typer.run(operator_run)
