"""Per-agent status, written by the host alone, atomically, under ~/.kapsis/status/."""

from kapsis.status.store import AgentStatus, Phase, StatusStore

__all__ = ["AgentStatus", "Phase", "StatusStore"]
