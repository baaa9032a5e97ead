"""Load agent profiles: the built-ins shipped in ``builtin/`` and the user's own YAML files.

A user profile in ``~/.config/kapsis/agents/NAME.yaml`` replaces a built-in of the same name.

The built-ins are also shipped pre-parsed in ``builtin/parsed.json`` (written by
``scripts/gen_builtin_profiles.py``), so that a run with no YAML file of its own never imports
the YAML parser. The pre-parsed entry is used only while it holds the exact text of the YAML file
beside it; otherwise the file is parsed as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from kapsis import paths
from kapsis.config.models import EnvName, HostPattern, SandboxPath, SecretFilePath, Section
from kapsis.errors import AgentNotFoundError, ConfigError

if TYPE_CHECKING:
    from kapsis.config.loader import ConfigLayer

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PARSED = BUILTIN_DIR / "parsed.json"


class ProfileNetwork(Section):
    hosts: list[HostPattern] = Field(
        default_factory=list, description="API hosts the agent needs (added to the allowlist)."
    )


class ProfileSetting(Section):
    """How a profile hands one of the agent section's values (agent.endpoint, agent.model) to
    its CLI: a variable, arguments, or both."""

    env: EnvName | None = Field(None, description="The variable its CLI reads the value from.")
    args: list[str] = Field(
        default_factory=list,
        description="Arguments added to the command; `{value}` stands for the value.",
    )


class FailureSign(Section):
    """Output by which a CLI shows it failed, and why: it explains a non-zero exit, and for a
    CLI whose exit code can lie (``exit_0_too``) it turns an exit 0 into a failure."""

    output: str = Field(
        min_length=4,
        max_length=200,
        description="Text in the agent's output (matched as it is, not as a pattern).",
    )
    reason: str = Field(
        min_length=1,
        max_length=200,
        description="What it means, for the run's message, e.g. 'could not reach its model'.",
    )
    exit_0_too: bool = Field(
        False,
        description="Also when the CLI exited 0 (it gives up on its model and says it "
        "succeeded). Off: the sign only explains a non-zero exit, so a successful run whose "
        "output happens to hold the text stays successful.",
    )


class ActivityLine(Section):
    """A line of the CLI's output that says what it did, for a CLI with no hook that reports
    it (Aider prints "Applied edit to hello.txt"): recorded in the audit trail as the agent's
    own report (``tool_use``, hook ``output``), read from the transcript after the run."""

    starts_with: str = Field(
        min_length=4, max_length=100, description="How the line starts (plain text)."
    )
    tool: str = Field(
        min_length=1, max_length=40, description="What the audit calls it, e.g. Edit, Commit."
    )


class LoginFile(Section):
    """A subscription login the CLI reads from a file (Claude Code's credentials, Codex's
    ``auth.json``), handed over like any secret: from the keychain or the host environment,
    by the secret's name, into a file on the sandbox's tmpfs (never on the host's disk nor in
    the workspace). Given, it stands in for the API key secrets it ``replaces``."""

    secret: EnvName = Field(
        description="The secret's name, as environment.keychain or the host environment "
        "gives it, e.g. CLAUDE_CREDENTIALS."
    )
    file: SecretFilePath = Field(description="Where the CLI reads it in the sandbox.")
    replaces: list[EnvName] = Field(
        default_factory=list, description="Secrets of `secrets` not needed when it is given."
    )
    hosts: list[HostPattern] = Field(
        default_factory=list,
        description="More hosts the CLI reaches when logged in this way (added to the "
        "allowlist only then).",
    )


class AgentProfile(Section):
    """What runs inside the sandbox."""

    name: str = Field(description="Profile name, used with --agent.")
    description: str = Field("", description="One line for `kapsis agents list`.")
    command: str | list[str] = Field(
        description="A string runs with `sh -c`; a list is the argv, `{task}` is the task text."
    )
    image: str | None = Field(
        None,
        description="Image the agent runs in, unless --image or image.name is set; "
        "`kapsis setup --agents NAME` builds the built-ins' (default: the base image).",
    )
    workdir: SandboxPath = Field("/workspace", description="Working directory in the sandbox.")
    env: dict[EnvName, str] = Field(default_factory=dict, description="Fixed environment.")
    requires: list[str] = Field(
        default_factory=list, description="Programs the image must provide (checked before start)."
    )
    secrets: list[EnvName] = Field(
        default_factory=list, description="Secrets the agent needs, by variable name."
    )
    secret_sources: dict[EnvName, list[EnvName]] = Field(
        default_factory=dict,
        description="Host variables a secret of `secrets` may be read from, first found first "
        "(default: its own name), e.g. CODEX_API_KEY: [CODEX_API_KEY, OPENAI_API_KEY].",
    )
    endpoint: ProfileSetting | None = Field(
        None, description="How agent.endpoint reaches the CLI (none: it cannot be changed)."
    )
    model: ProfileSetting | None = Field(
        None, description="How agent.model and --model reach the CLI (none: it cannot be changed)."
    )
    state_files: list[str] = Field(
        default_factory=list,
        description="The CLI's own files in the workspace (glob patterns, as git.commit_exclude): "
        "never committed unless git.commit_agent_state.",
    )
    failure: list[FailureSign] = Field(
        default_factory=list,
        description="Output that means the agent failed, for a CLI whose exit code can say "
        "success when it failed: the run then fails (agent_error) with the reason.",
    )
    activity: list[ActivityLine] = Field(
        default_factory=list,
        description="Output lines that report the agent's actions, for a CLI without hooks.",
    )
    login: LoginFile | None = Field(
        None, description="A subscription login file the CLI can use instead of an API key."
    )
    network: ProfileNetwork = Field(default_factory=ProfileNetwork)
    source: str = Field("builtin", description="Where the profile was loaded from (set by Kapsis).")


def _load_file(path: Path, source: str) -> AgentProfile:
    from kapsis.config.loader import read_yaml_layer, validate_model

    layer = (_parsed_builtin(path) if source == "builtin" else None) or read_yaml_layer(path)
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


def builtin_parsed_entries() -> dict[str, Any]:
    """What ``builtin/parsed.json`` must hold: each built-in's text, data and key lines."""
    from kapsis.config.loader import read_yaml_layer

    entries: dict[str, Any] = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        layer = read_yaml_layer(path)
        entries[path.stem] = {
            "text": path.read_text(encoding="utf-8"),
            "data": layer.data,
            "lines": [[list(key), origin.line] for key, origin in layer.origins.items()],
        }
    return entries


def builtin_parsed_text() -> str:
    """What ``builtin/parsed.json`` must say; ``scripts/gen_builtin_profiles.py`` writes it."""
    # One profile per line keeps the file's diffs readable. No sort_keys: key order is data
    # here (the order of a profile's env, for one).
    entries = builtin_parsed_entries().items()
    lines = [f"{json.dumps(name)}: {json.dumps(entry)}" for name, entry in entries]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _parsed_builtin(path: Path) -> ConfigLayer | None:
    """The layer ``read_yaml_layer(path)`` would give, from ``parsed.json``, if it is current."""
    from kapsis.config.loader import ConfigLayer, Origin

    try:
        entry = json.loads(BUILTIN_PARSED.read_text(encoding="utf-8"))[path.stem]
        if entry["text"] != path.read_text(encoding="utf-8"):
            return None  # the YAML was edited after parsed.json was written
    except (OSError, ValueError, KeyError):
        return None
    origins = {tuple(key): Origin("file", path, line) for key, line in entry["lines"]}
    return ConfigLayer(entry["data"], origins, Origin("file", path))


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
