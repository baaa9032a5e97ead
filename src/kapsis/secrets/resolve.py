"""Read the values of a plan's secrets on the host, just before the sandbox starts.

Values live in this process's memory only: they go to the sandbox through
:mod:`kapsis.secrets.delivery` and to the redactors, never into a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from kapsis.errors import ConfigError
from kapsis.sandbox.secrets_plan import SecretPlan
from kapsis.secrets.keychain import lookup


def resolve_secrets(
    secrets: Sequence[SecretPlan], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{name: value}`` for every secret; a missing one is a ConfigError naming where we looked."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for secret in secrets:
        if secret.source == "keychain":
            assert secret.service is not None
            found = lookup(secret.service, secret.accounts)
            if found.value is None:
                accounts = " or ".join(repr(a) for a in secret.accounts)
                asked = ", ".join(found.asked) or (
                    "no store answered: on Linux run a Secret Service (e.g. gnome-keyring) "
                    "or install secret-tool (libsecret-tools)"
                )
                raise ConfigError(
                    f"{secret.origin}: environment.keychain.{secret.name}: no secret for service "
                    f"{secret.service!r}, account {accounts} (asked: {asked}); store it with "
                    f"`secret-tool store --label={secret.name} service {secret.service} "
                    f"account {secret.accounts[0]}` or `keyring set {secret.service} "
                    f"{secret.accounts[0]}`"
                )
            values[secret.name] = found.value
        else:
            variable = secret.host_variable or secret.name
            value = environ.get(variable)
            if value is None:
                shown = secret.name if variable == secret.name else f"{secret.name} (${variable})"
                raise ConfigError(
                    f"{secret.origin}: the secret {shown} is no longer set in the host "
                    "environment; export it and run again"
                )
            values[secret.name] = value
    return values
