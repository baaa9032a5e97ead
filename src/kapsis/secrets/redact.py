"""Redaction: every known secret value replaced by a marker before text leaves the host process.

Used on what the agent reports to the audit socket, on the agent's transcript and on anything the
host puts into the status. Values shorter than four characters are left alone: replacing them
would shred ordinary text and hide nothing worth hiding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
MIN_REDACTED_LENGTH = 4


class Redactor:
    """Replaces every known secret value in strings, and in the strings of nested values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted(
            {s for s in secrets if len(s) >= MIN_REDACTED_LENGTH}, key=len, reverse=True
        )

    @property
    def longest(self) -> int:
        """The length of the longest secret (0 without any)."""
        return len(self.secrets[0]) if self.secrets else 0

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value
