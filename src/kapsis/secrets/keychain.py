"""Read a secret from the host's keychain: the ``keyring`` library first, then ``secret-tool``.

``keyring`` talks to the platform's store (Linux Secret Service, macOS Keychain) and files its
items under the attributes ``service`` and ``username``; ``secret-tool`` (libsecret) looks up
arbitrary attributes, and by convention people store API keys there as ``service`` + ``account``.
Both are asked, so a secret stored either way is found.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

SECRET_TOOL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Lookup:
    """The value found (or None) and every place that was asked, for the error message."""

    value: str | None
    asked: tuple[str, ...]


def lookup(service: str, accounts: tuple[str, ...]) -> Lookup:
    """The first account (in order) that holds a secret for ``service``, in either store."""
    asked: list[str] = []
    for account in accounts:
        for store in (_from_keyring, _from_secret_tool):
            value, where = store(service, account)
            if where:
                asked.append(where)
            if value:
                return Lookup(value, tuple(asked))
    return Lookup(None, tuple(dict.fromkeys(asked)))


def _from_keyring(service: str, account: str) -> tuple[str | None, str]:
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        return None, ""
    backend = keyring.get_keyring()
    name = f"keyring ({type(backend).__module__.rpartition('.')[2]})"
    try:
        return backend.get_password(service, account), name
    except KeyringError:
        return None, f"{name}: unavailable"
    except Exception as error:
        return None, f"{name}: {type(error).__name__}"


def _from_secret_tool(service: str, account: str) -> tuple[str | None, str]:
    tool = shutil.which("secret-tool")
    if tool is None:
        return None, ""
    try:
        result = subprocess.run(
            [tool, "lookup", "service", service, "account", account],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=SECRET_TOOL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return None, "secret-tool: timed out"
    # secret-tool prints the secret without a trailing newline when stdout is not a terminal.
    return (result.stdout if result.returncode == 0 else None), "secret-tool"
