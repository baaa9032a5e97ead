"""The base of every config section and the value types more than one section module uses.

Kept apart from :mod:`kapsis.config.models` so that a section defined in a module of its own
(``kubernetes_section``) can share them without importing ``models``, which imports it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

RESERVED_ENV_PREFIX = "KAPSIS_"
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
