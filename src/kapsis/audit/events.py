"""Lifecycle events of a session, appended as JSON Lines by the host.

The file (``~/.kapsis/audit/AGENT_ID.jsonl``) is never mounted into the sandbox. Each record
has seq, ts, agent_id, source, event_type and detail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kapsis import paths
from kapsis.status.store import utc_now


class AuditLog:
    def __init__(
        self, agent_id: str, *, enabled: bool = True, directory: Path | None = None
    ) -> None:
        self.agent_id = agent_id
        self.enabled = enabled
        self.path = (directory or paths.audit_dir()) / f"{agent_id}.jsonl"
        self._seq = self._last_seq()

    def _last_seq(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open(encoding="utf-8") as handle:
            return sum(1 for _ in handle)

    def record(self, event_type: str, source: str = "host", **detail: Any) -> None:
        if not self.enabled:
            return
        self._seq += 1
        entry = {
            "seq": self._seq,
            "ts": utc_now(),
            "agent_id": self.agent_id,
            "source": source,
            "event_type": event_type,
            "detail": detail,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
