"""Redaction: every known secret value replaced by a marker before text leaves the host process.

Used on what the agent reports to the audit socket, on the agent's transcript and on anything the
host puts into the status. Values shorter than four characters are left alone: replacing them
would shred ordinary text and hide nothing worth hiding. A secret that is a JSON document (a
subscription login file: Claude Code's credentials, Codex's auth.json) also has each string in
it of :data:`MIN_JSON_PART` characters or more redacted: a token printed alone is a secret too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

REDACTED = "[REDACTED]"
MIN_REDACTED_LENGTH = 4
# The strings of a JSON secret that are redacted on their own (shorter ones are field values such
# as "Bearer" or a date), and how many at most.
MIN_JSON_PART = 8
MAX_JSON_PARTS = 1000


def json_parts(secret: str) -> Iterator[str]:
    """The strings of a secret that is a JSON object or array (none for any other secret)."""
    if not secret.lstrip().startswith(("{", "[")):
        return
    try:
        document = json.loads(secret)
    except ValueError:
        return
    pending, found = [document], 0
    while pending and found < MAX_JSON_PARTS:  # a loop, not recursion: the depth is the file's
        item = pending.pop()
        if isinstance(item, str) and len(item) >= MIN_JSON_PART:
            found += 1
            yield item
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


class Redactor:
    """Replaces every known secret value in strings, and in the strings of nested values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        given = list(secrets)
        parts = [part for secret in given for part in json_parts(secret)]
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted(
            {s for s in [*given, *parts] if len(s) >= MIN_REDACTED_LENGTH}, key=len, reverse=True
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
