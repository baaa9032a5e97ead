"""``kapsis operator run``: the Kubernetes operator in the foreground (as ``python -m
kapsis.operator`` does in its Deployment). kopf and the kubernetes client load only here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kapsis.errors import KapsisError

operator_app = typer.Typer(
    help="The Kubernetes operator for AgentRequest resources.", no_args_is_help=True
)


@operator_app.command("run")
def operator_run(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Watch this namespace (repeatable). Default: all."),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option("--kubeconfig", help="Kubeconfig (default: in-cluster, else $KUBECONFIG)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the operator until interrupted; settings come from KAPSIS_OPERATOR_* variables."""
    import logging

    from kapsis.k8s.settings import OperatorSettings
    from kapsis.operator.runner import run

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run(OperatorSettings.from_env(), kubeconfig=kubeconfig, namespaces=tuple(namespace or ()))
    except KapsisError as error:
        print(f"kapsis: error: {error}", file=sys.stderr)
        raise typer.Exit(int(error.exit_code)) from None
