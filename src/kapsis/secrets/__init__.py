"""Secrets: resolved on the host, handed to the sandbox through pipes, redacted everywhere.

``resolve_secrets`` reads the values a plan names (keychain, host environment);
``prepare_inbox`` and ``SecretWriter`` deliver them without writing them to disk; ``Redactor``
hides them in everything the host records.
"""

from kapsis.secrets.redact import REDACTED, Redactor

__all__ = ["REDACTED", "Redactor"]
