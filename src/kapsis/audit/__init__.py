"""The tamper-evident audit trail: written by the host alone, hash-chained, sealed, verifiable.

The public names are loaded on first use, so that importing the writer does not import the
verifier (and its cryptography) on every command's start.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kapsis.audit.log import AuditLog, audit_path, rotated_files
    from kapsis.audit.verification import Damage, VerifyResult, verify

__all__ = ["AuditLog", "Damage", "VerifyResult", "audit_path", "rotated_files", "verify"]
_HOMES = {
    "AuditLog": "kapsis.audit.log",
    "audit_path": "kapsis.audit.log",
    "rotated_files": "kapsis.audit.log",
    "Damage": "kapsis.audit.verification",
    "VerifyResult": "kapsis.audit.verification",
    "verify": "kapsis.audit.verification",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kapsis.audit' has no attribute {name!r}")
