"""The ``agent`` section of ``agent-sandbox.yaml``: which agent runs, with what model, where.

``endpoint`` and ``model`` are said once, here, whatever the agent: each agent profile maps them
to what its CLI reads (a variable, arguments; :class:`kapsis.agents.profiles.ProfileSetting`).
The endpoint's host is added to the allowlist. ``args`` are added to the profile's command
without copying it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from kapsis.config.base import FREE, NEEDS_TRUST, PROFILE, SandboxPath, Section

# What an endpoint may hold: a URL's plain characters only, so it goes into an argument, a
# variable or a CLI's TOML string without quoting.
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/\[\]%-]+")
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MAX_ARGS = 64


def _check_endpoint(value: str) -> str:
    if not _URL_CHARS.fullmatch(value) or len(value) > 2048:
        raise ValueError(
            f"{value!r} is not a plain URL (letters, digits and ._~:/[]%- only; no query, "
            "user or spaces); e.g. https://llm.example.com/v1"
        )
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r}: an endpoint is an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535") from None
    return value


def _check_model(value: str) -> str:
    if not _MODEL_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a model name (letters, digits and ._:/@+-, at most 128, not "
            "starting with '-')"
        )
    return value


Endpoint = Annotated[str, AfterValidator(_check_endpoint)]
ModelName = Annotated[str, AfterValidator(_check_model)]


def endpoint_allow_entry(endpoint: str) -> tuple[str, bool]:
    """The allowlist entry that lets the agent reach ``endpoint``: ``host[:port]`` (a name) or
    ``address[:port]``, and whether it is an address. No port given: the default ports."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (f"{host}:{parts.port}" if parts.port else host), False
    shown = f"[{address}]" if address.version == 6 and parts.port else str(address)
    return (f"{shown}:{parts.port}" if parts.port else shown), True


class AgentSection(Section):
    name: str = Field(
        "shell",
        description="Agent profile to run: a built-in (shell, claude, codex, aider, gemini) or a "
        "user profile from ~/.config/kapsis/agents/NAME.yaml.",
        json_schema_extra=PROFILE,
    )
    command: str | list[str] | None = Field(
        None,
        description="Replaces the profile's command. A string runs with `sh -c`; a list is the "
        "argv, where `{task}` stands for the task text. The task is also in $KAPSIS_TASK.",
        json_schema_extra=FREE,
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=MAX_ARGS,
        description="Arguments added at the end of the profile's command (a string command gets "
        "them as $1, $2, ...).",
        json_schema_extra=NEEDS_TRUST,
    )
    endpoint: Endpoint | None = Field(
        None,
        description="The model API's base URL (e.g. https://llm.example.com/v1), handed to the "
        "agent the way its profile says; its host is added to the allowlist. Default: the "
        "CLI's own.",
        json_schema_extra=NEEDS_TRUST,
    )
    model: ModelName | None = Field(
        None,
        description="The model the agent uses, handed to it the way its profile says (--model). "
        "Default: the CLI's own.",
        json_schema_extra=FREE,
    )
    workdir: SandboxPath | None = Field(
        None,
        description="Working directory inside the sandbox (default: the profile's, /workspace).",
        json_schema_extra=FREE,
    )
