"""What the agent says it is doing: its hook reports, folded into the ``agent_reported`` status.

The status file is written by the host alone, but these fields come from what the agent sent to
its audit socket (Claude Code's hooks, see ``kapsis/host/report_hook.py``): they tell what the
agent claims, never what the host verified. :func:`fold` turns one audit record into the next
:class:`AgentActivity`; :class:`ActivityRecorder` writes it to the status, at most a few times a
second however fast the agent reports, and once more when the socket closes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from kapsis.status.store import StatusStore

ActivityState = Literal["started", "working", "using_tool", "waiting", "idle", "ended"]

# Hook event -> the state it leaves the agent in.
_STATES: dict[str, ActivityState] = {
    "SessionStart": "started",
    "UserPromptSubmit": "working",
    "PreToolUse": "using_tool",
    "PostToolUse": "working",
    "PostToolUseFailure": "working",
    "SubagentStop": "working",
    "Notification": "waiting",
    "Stop": "idle",
    "SessionEnd": "ended",
    # Gemini CLI's names for the same moments.
    "BeforeAgent": "working",
    "BeforeTool": "using_tool",
    "AfterTool": "working",
    "AfterAgent": "idle",
}
# The events that announce one tool call (Claude Code's, Gemini CLI's).
TOOL_CALL_EVENTS = frozenset({"PreToolUse", "BeforeTool"})
MIN_WRITE_INTERVAL = 0.5  # seconds between two status writes caused by reports


class AgentActivity(BaseModel):
    """Agent-reported: the last hook event, the tool it used last, how many tool calls."""

    state: ActivityState
    last_event: str
    last_tool: str | None = None
    tool_uses: int = 0
    reported_at: str


def fold(current: AgentActivity | None, record: dict[str, Any]) -> AgentActivity | None:
    """The activity after the audit ``record``; None when the record is not a hook report."""
    detail = record.get("detail") or {}
    reported = detail.get("reported") if isinstance(detail, dict) else None
    event = reported.get("hook_event_name") if isinstance(reported, dict) else None
    if record.get("source") != "agent" or not isinstance(event, str) or event not in _STATES:
        return None
    assert isinstance(reported, dict)
    tool = reported.get("tool_name")
    last_tool = current.last_tool if current else None
    tool_uses = current.tool_uses if current else 0
    if event in TOOL_CALL_EVENTS and isinstance(tool, str):
        last_tool, tool_uses = tool[:100], tool_uses + 1
    return AgentActivity(
        state=_STATES[event],
        last_event=event,
        last_tool=last_tool,
        tool_uses=tool_uses,
        reported_at=str(record.get("ts", "")),
    )


class ActivityRecorder:
    """Keeps one agent's ``agent_reported`` status field up to date from its audit records."""

    def __init__(self, store: StatusStore, agent_id: str) -> None:
        self.store = store
        self.agent_id = agent_id
        self.activity: AgentActivity | None = None
        self._dirty = False
        self._written_at = 0.0

    def observe(self, record: dict[str, Any]) -> None:
        activity = fold(self.activity, record)
        if activity is None:
            return
        self.activity, self._dirty = activity, True
        now = time.monotonic()
        if now - self._written_at >= MIN_WRITE_INTERVAL or activity.state in ("idle", "ended"):
            self.flush()

    def flush(self) -> None:
        """Write the latest activity, unless the run has already finished."""
        if not self._dirty or self.activity is None:
            return
        current = self.store.read(self.agent_id)
        if current is None or current.finished:
            return
        self.store.update(self.agent_id, agent_reported=self.activity)
        self._dirty, self._written_at = False, time.monotonic()
