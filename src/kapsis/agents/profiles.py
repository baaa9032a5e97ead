"""Load agent profiles: the built-ins shipped in ``builtin/`` and the user's own YAML files.

A user profile in ``~/.config/kapsis/agents/NAME.yaml`` replaces a built-in of the same name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kapsis import paths
from kapsis.config.models import EnvName, HostPattern, SandboxPath, Section
from kapsis.errors import AgentNotFoundError, ConfigError

BUILTIN_DIR = Path(__file__).parent / "builtin"


class ProfileNetwork(Section):
    hosts: list[HostPattern] = Field(
        default_factory=list, description="API hosts the agent needs (added to the allowlist)."
    )


class AgentProfile(Section):
    """What runs inside the sandbox."""

    name: str = Field(description="Profile name, used with --agent.")
    description: str = Field("", description="One line for `kapsis agents list`.")
    command: str | list[str] = Field(
        description="A string runs with `sh -c`; a list is the argv, `{task}` is the task text."
    )
    workdir: SandboxPath = Field("/workspace", description="Working directory in the sandbox.")
    env: dict[EnvName, str] = Field(default_factory=dict, description="Fixed environment.")
    requires: list[str] = Field(
        default_factory=list, description="Programs the image must provide (checked before start)."
    )
    secrets: list[EnvName] = Field(
        default_factory=list, description="Secrets the agent needs, by variable name."
    )
    network: ProfileNetwork = Field(default_factory=ProfileNetwork)
    source: str = Field("builtin", description="Where the profile was loaded from (set by Kapsis).")


def _load_file(path: Path, source: str) -> AgentProfile:
    from kapsis.config.loader import read_yaml_layer, validate_model

    layer = read_yaml_layer(path)
    declared = layer.data.get("name", path.stem)
    if declared != path.stem:
        # --agent finds profiles by file name; a different inner name would show another agent.
        line = layer.origins.get(("name",))
        raise ConfigError(
            f"{line or path}: name: '{declared}' differs from the file name; "
            f"rename the file to {declared}.yaml or drop the key"
        )
    data = {**layer.data, "name": path.stem, "source": source}
    return validate_model(AgentProfile, data, layer.origins, where=str(path))


def _profile_files() -> dict[str, tuple[Path, str]]:
    files = {p.stem: (p, "builtin") for p in sorted(BUILTIN_DIR.glob("*.yaml"))}
    user_dir = paths.user_agents_dir()
    if user_dir.is_dir():
        files.update({p.stem: (p, str(p)) for p in sorted(user_dir.glob("*.yaml"))})
    return files


def find_profile(name: str) -> AgentProfile:
    files = _profile_files()
    if name not in files:
        known = ", ".join(sorted(files))
        raise AgentNotFoundError(
            f"--agent {name}: no such agent profile; known: {known} "
            f"(or add {paths.user_agents_dir()}/{name}.yaml)"
        )
    path, source = files[name]
    return _load_file(path, source)


def list_profiles() -> list[AgentProfile]:
    return [_load_file(path, source) for path, source in _profile_files().values()]
