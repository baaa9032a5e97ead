"""The operator's audit trail: one sealed, hash-chained log per AgentRequest.

The same records, hash chain and Ed25519 seals as a local run's (``kapsis.audit``), written by
the operator under ``<data_dir>/audit/NAMESPACE_NAME_UID8.jsonl`` with the operator's own key
(``<data_dir>/keys/``; the public half is also written as ``audit-ed25519.pub.pem`` so that
``kapsis audit verify FILE --key PUB`` works anywhere). Nothing here is reachable from an
agent's Pod: the operator runs elsewhere and the agent has no API access.

What is recorded: request accepted or rejected (with the reason), Pod created, each phase
change, the agent's exit as the kubelet reported it, the finisher's result, the request's
deletion, and ``session_end`` with the final status, after which the log is sealed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Final

from kapsis.audit.log import SESSION_END, SESSION_START, AuditLog

SOURCE: Final = "operator"
PUBLIC_KEY_FILE: Final = "audit-ed25519.pub.pem"


def log_name(namespace: str, name: str, uid: str) -> str:
    """The log's id: namespace and name are DNS labels (no ``_``), so this is unambiguous;
    the uid's head tells apart two requests that had the same name at different times."""
    return f"{namespace}_{name}_{uid.replace('-', '')[:8]}"


class OperatorAudit:
    """The audit logs of every request this operator handles (thread-safe: kopf runs sync
    handlers in a thread pool)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / "audit"
        self.keys_directory = data_dir / "keys"
        self._logs: dict[str, AuditLog] = {}
        self._lock = threading.Lock()

    def export_public_key(self) -> Path:
        """Create the key pair if needed and write its public half beside it."""
        from kapsis.audit.keys import public_pem, signing_key

        key = signing_key(self.keys_directory)
        path = self.keys_directory / PUBLIC_KEY_FILE
        path.write_text(public_pem(key.public_key()), encoding="utf-8")
        return path

    def path(self, namespace: str, name: str, uid: str) -> Path:
        return self.directory / f"{log_name(namespace, name, uid)}.jsonl"

    def log(self, namespace: str, name: str, uid: str) -> AuditLog:
        agent_id = log_name(namespace, name, uid)
        with self._lock:
            log = self._logs.get(agent_id)
            if log is None:
                log = AuditLog(
                    agent_id, directory=self.directory, keys_directory=self.keys_directory
                )
                self._logs[agent_id] = log
            return log

    def record(self, ref: tuple[str, str, str], event_type: str, **detail: Any) -> None:
        self.log(*ref).record(event_type, SOURCE, **detail)

    def start(self, ref: tuple[str, str, str], **detail: Any) -> None:
        self.record(ref, SESSION_START, **detail)

    def end(self, ref: tuple[str, str, str], **detail: Any) -> None:
        """``session_end`` (which seals the log)."""
        self.record(ref, SESSION_END, **detail)

    def seal(self, ref: tuple[str, str, str]) -> None:
        self.log(*ref).seal()

    def forget(self, ref: tuple[str, str, str]) -> None:
        """Close a deleted request's log (the file stays)."""
        with self._lock:
            log = self._logs.pop(log_name(*ref), None)
        if log is not None:
            log.close()
