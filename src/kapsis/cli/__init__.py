"""The ``kapsis`` command: a thin typer layer over :mod:`kapsis.api`."""

from kapsis.cli.app import app, main

__all__ = ["app", "main"]
