"""The base of every config section, the value types and the sandbox paths several modules use.

Kept apart from :mod:`kapsis.config.models` so that a section defined in a module of its own
(``kubernetes_section``) can share them without importing ``models``, which imports it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

RESERVED_ENV_PREFIX = "KAPSIS_"
# Paths inside every sandbox (both backends): the agent's home, and the tmpfs for secret files.
# Config validation checks against them, so they live at the bottom of the imports.
AGENT_HOME = "/home/agent"
SECRETS_TMPFS = "/run/kapsis/secrets"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _)")
    if value.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(f"{value!r}: names starting with {RESERVED_ENV_PREFIX} are reserved")
    return value


EnvName = Annotated[str, AfterValidator(_check_env_name)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
