"""agent.endpoint, agent.model and agent.args as the agent profile's CLI takes them.

Said once in the config whatever the agent; each profile says how its CLI reads them
(:class:`kapsis.agents.profiles.ProfileSetting`: a variable, arguments). Both backends run the
command and environment the plan holds, so both get the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kapsis.agents import AgentProfile
from kapsis.config.models import AgentSection
from kapsis.errors import ConfigError


@dataclass(frozen=True)
class AgentOptions:
    """Arguments after the profile's command, and variables for its environment."""

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def agent_options(
    agent: AgentSection,
    profile: AgentProfile,
    origin_of: Callable[[tuple[str, ...]], object],
) -> AgentOptions:
    """``origin_of(key)`` says where a value was set (a config file:line, a request's key)."""
    args: list[str] = []
    env: dict[str, str] = {}
    for key, value, setting in (
        ("endpoint", agent.endpoint, profile.endpoint),
        ("model", agent.model, profile.model),
    ):
        if value is None:
            continue
        if setting is None or (setting.env is None and not setting.args):
            raise ConfigError(
                f"{origin_of(('agent', key))}: agent.{key}: the agent profile {profile.name} "
                f"does not say how its CLI takes its {key}; pass it with agent.args or "
                "environment.set as the CLI expects, or add `"
                f"{key}: {{env: NAME}}` to the profile"
            )
        if setting.env is not None:
            env[setting.env] = value
        args += [part.replace("{value}", value) for part in setting.args]
    return AgentOptions((*args, *agent.args), env)
