"""The tamper-evident audit trail: written by the host alone, hash-chained, sealed, verifiable."""

from kapsis.audit.log import AuditLog, audit_path, rotated_files
from kapsis.audit.verify import Damage, VerifyResult, verify

__all__ = ["AuditLog", "Damage", "VerifyResult", "audit_path", "rotated_files", "verify"]
