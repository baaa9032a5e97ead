"""What a scripted conversation holds, and the shape every API module answers in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Script:
    """The model's one job: have the agent write ``content`` to ``file_path`` (absolute)."""

    file_path: str
    content: str


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with its query string
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]  # the parsed JSON body ({} when there is none or it is not an object)


@dataclass
class Reply:
    """One answer: ``kind`` names it in the request log ("tool_use", "final", "side", ...)."""

    status: int
    kind: str
    body: dict[str, Any] | None = None  # a JSON answer
    events: list[bytes] = field(default_factory=list)  # else a stream, written chunk by chunk
    content_type: str = "text/event-stream"
    logged: dict[str, Any] = field(default_factory=dict)  # more for the request log

    def chunks(self) -> Iterator[bytes]:
        yield from self.events


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event."""
    import json

    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class Api(Protocol):
    """One vendor API: which requests it answers and how."""

    name: str

    def matches(self, method: str, path: str) -> bool: ...

    def reply(self, request: Request, script: Script) -> Reply: ...
