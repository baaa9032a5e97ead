"""The base of every config section, the value types and the sandbox paths several modules use.

Kept apart from :mod:`kapsis.config.models` so that a section defined in a module of its own
(``kubernetes_section``) can share them without importing ``models``, which imports it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

RESERVED_ENV_PREFIX = "KAPSIS_"
# Paths inside every sandbox (both backends): the agent's home, and the tmpfs for secret files.
# Config validation checks against them, so they live at the bottom of the imports.
AGENT_HOME = "/home/agent"
SECRETS_TMPFS = "/run/kapsis/secrets"
# The script each of the agent's bash shells sources (BASH_ENV): it traces their commands to
# the audit trail (kapsis.audit.agent_reports).
BASH_ENV_TARGET = "/run/kapsis/bash-env.sh"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _)")
    if value.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(f"{value!r}: names starting with {RESERVED_ENV_PREFIX} are reserved")
    return value


EnvName = Annotated[str, AfterValidator(_check_env_name)]


def _check_absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path inside the sandbox")
    return value


SandboxPath = Annotated[str, AfterValidator(_check_absolute)]


# The trust marker of a config field (see kapsis.config.trust): what a value from a project's own
# file, which the agent can edit, may do without the user's `kapsis trust`. It is part of each
# field's JSON Schema, so the schema and the generated reference show it.
TRUST_KEY = "x-kapsis-trust"
# Any value is fine: the key only narrows or describes the run.
FREE: dict[str, Any] = {TRUST_KEY: "free"}
# Any value other than the trusted one needs trust (it runs, reaches or hands over something).
NEEDS_TRUST: dict[str, Any] = {TRUST_KEY: "trust"}
# A number or size no higher than the trusted one is fine (none means no limit).
AT_MOST: dict[str, Any] = {TRUST_KEY: "at_most"}
# A duration no longer than the trusted one is fine (none means no limit).
AT_MOST_TIME: dict[str, Any] = {TRUST_KEY: "at_most_time"}
# An agent profile that gets no secret and no host the trusted one does not get is fine.
PROFILE: dict[str, Any] = {TRUST_KEY: "profile"}
# Items (or key: value pairs) the trusted value already holds are fine; adding needs trust.
SUBSET: dict[str, Any] = {TRUST_KEY: "subset"}
# Holding every item of the trusted value is fine; removing one, or adding a negation (a "!"
# line, which un-hides in a .gitignore-style list), needs trust.
SUPERSET: dict[str, Any] = {TRUST_KEY: "superset"}


def widest_first(*values: Any) -> dict[str, Any]:
    """Values ordered from the widest to the narrowest: no wider than the trusted one is fine."""
    return {TRUST_KEY: {"order": list(values)}}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
