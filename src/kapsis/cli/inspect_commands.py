"""``kapsis agents``, ``kapsis config`` and ``kapsis policy``: what a run would use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kapsis.cli.common import (
    AgentOption,
    AllowOption,
    ConfigOption,
    JsonFlag,
    NetworkModeOption,
    fail as _fail,
)
from kapsis.errors import KapsisError

config_app = typer.Typer(
    help="Show the effective configuration or its JSON Schema.", no_args_is_help=True
)
agents_app = typer.Typer(help="Agent profiles.", no_args_is_help=True)
policy_app = typer.Typer(help="The network policy of a run.", no_args_is_help=True)


@agents_app.command("list")
def agents_list(
    json_output: JsonFlag = False,
) -> None:
    """List agent profiles (built-in and ~/.config/kapsis/agents/*.yaml) and their images."""
    from kapsis.agents import list_profiles
    from kapsis.cli import render
    from kapsis.config.models import DEFAULT_IMAGE
    from kapsis.host.agent_images import profile_images

    try:
        profiles = list_profiles()
        images = profile_images(profiles, DEFAULT_IMAGE)
    except KapsisError as error:
        _fail(error)
    wanted = {p.name: images[p.name].name for p in profiles}
    if json_output:
        listing = [
            {
                **p.model_dump(mode="json"),
                "runs_in": wanted[p.name],
                "image_present": images[p.name].present,
                "cli_version": images[p.name].version,
            }
            for p in profiles
        ]
        print(json.dumps(listing, indent=2))
        return
    render.print_profiles(profiles, images)


@config_app.command("show")
def config_show(
    project: Annotated[
        Path | None, typer.Argument(help="Project whose config files apply.")
    ] = None,
    config: ConfigOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Show the effective merged config and where each value came from."""
    from kapsis import api
    from kapsis.cli import render

    try:
        loaded, problems = api.config_with_trust(project, config)
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(json.dumps(render.config_with_origins(loaded, problems), indent=2))
        return
    render.print_config(loaded, problems)


@policy_app.command("show")
def policy_show(
    project: Annotated[
        Path | None, typer.Argument(help="Project whose config files apply (default: .).")
    ] = None,
    agent: AgentOption = None,
    network_mode: NetworkModeOption = None,
    allow: AllowOption = None,
    config: ConfigOption = None,
    json_output: JsonFlag = False,
) -> None:
    """Show the effective network policy of a run: every allowed host, where it came from."""
    from kapsis import api
    from kapsis.cli import render

    try:
        policy = api.network_policy(
            project or Path.cwd(),
            agent=agent,
            network_mode=network_mode,
            allow=tuple(allow or ()),
            config_file=config,
        )
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(json.dumps(render.policy_as_json(policy), indent=2))
        return
    render.print_policy(policy)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of agent-sandbox.yaml (for editor completion)."""
    from kapsis.config.models import KapsisConfig

    schema = KapsisConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "agent-sandbox.yaml"
    print(json.dumps(schema, indent=2))
