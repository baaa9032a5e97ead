"""``kapsis trust``: trust a project's own config files, list and revoke that trust."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from kapsis.cli.common import JsonFlag, fail as _fail
from kapsis.errors import ConfigError, KapsisError


def trust_command(
    project: Annotated[
        Path | None,
        typer.Argument(help="Project whose agent-sandbox.yaml / .kapsis/config.yaml to trust."),
    ] = None,
    list_trusted: Annotated[
        bool, typer.Option("--list", help="List the trusted files and their hashes.")
    ] = False,
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Forget the trust of PROJECT's files (or of a file).")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Trust a project's config files as they are now: keys that run on the host or widen the
    sandbox then apply. A trusted file that changes is untrusted again."""
    from kapsis import api

    try:
        if list_trusted and revoke:
            raise ConfigError("--list and --revoke: use one of them")
        if list_trusted:
            records = api.trusted_files()
            if json_output:
                print(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
                return
            for record in records:
                keys = ", ".join(record.keys) or "no key that needs trust"
                print(f"{record.path}  sha256:{record.sha256[:16]}  {record.trusted_at}  ({keys})")
            if not records:
                print("no trusted project config files")
            return
        target = project or Path.cwd()
        if revoke:
            removed = api.revoke_trust(target)
            for record in removed:
                print(f"no longer trusted: {record.path}")
            if not removed:
                print(f"nothing trusted at {target}")
            return
        reports = api.trust(target)
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(
            json.dumps([{**dataclasses.asdict(r), "path": str(r.path)} for r in reports], indent=2)
        )
        return
    for report in reports:
        state = "already trusted" if report.already else "trusted"
        print(f"{state}: {report.path} (sha256:{report.sha256[:16]})")
        for line in report.needs_trust:
            print(f"  needs trust: {line}")
    if not reports:
        print(f"{target}: no agent-sandbox.yaml or .kapsis/config.yaml to trust")
