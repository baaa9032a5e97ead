"""Host-side record of what happened in each agent session."""

from kapsis.audit.events import AuditLog

__all__ = ["AuditLog"]
