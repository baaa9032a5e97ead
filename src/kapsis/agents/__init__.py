"""Agent profiles: what runs inside the sandbox (command, workdir, env, network needs), as data."""

from kapsis.agents.profiles import AgentProfile, find_profile, list_profiles

__all__ = ["AgentProfile", "find_profile", "list_profiles"]
