"""The Anthropic Messages API, as Claude Code uses it.

The script, decided from each request alone:

* a request that carries a ``tool_result`` (the agent ran the tool we asked for): a text reply,
  ``end_turn`` (``final``);
* a request that offers the ``Write`` tool: a ``tool_use`` block asking to write the script's
  file, ``stop_reason: tool_use`` (``tool_use``);
* anything else: a short text reply (``side``).

``stream: true`` requests get server-sent events (message_start, content_block_start,
content_block_delta, content_block_stop, message_delta, message_stop), the others one JSON
message. ``/v1/messages/count_tokens`` answers a count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .script import Reply, Request, Script

MODEL = "claude-stub-1"


def has_tool_result(body: dict[str, Any]) -> bool:
    for message in body.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(block, dict) and block.get("type") == "tool_result" for block in content
        ):
            return True
    return False


def offers_tool(body: dict[str, Any], name: str) -> bool:
    return any(isinstance(t, dict) and t.get("name") == name for t in body.get("tools", []))


def answer_for(body: dict[str, Any], script: Script) -> tuple[str, list[dict[str, Any]], str]:
    """(kind, content blocks, stop_reason) for one request."""
    if has_tool_result(body):
        return "final", [{"type": "text", "text": "I wrote the file."}], "end_turn"
    if offers_tool(body, "Write"):
        tool_input = {"file_path": script.file_path, "content": script.content}
        block = {"type": "tool_use", "id": "toolu_stub_1", "name": "Write", "input": tool_input}
        return "tool_use", [block], "tool_use"
    return "side", [{"type": "text", "text": "stub"}], "end_turn"


def sse_events(blocks: list[dict[str, Any]], stop_reason: str, model: str) -> Iterator[bytes]:
    """The server-sent events of a streamed reply holding ``blocks``."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    usage = {"input_tokens": 10, "output_tokens": 1}
    start = {
        "id": "msg_stub",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    yield event("message_start", {"message": start})
    for index, block in enumerate(blocks):
        if block["type"] == "tool_use":
            first = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            first = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        yield event("content_block_start", {"index": index, "content_block": first})
        yield event("content_block_delta", {"index": index, "delta": delta})
        yield event("content_block_stop", {"index": index})
    stop = {"stop_reason": stop_reason, "stop_sequence": None}
    yield event("message_delta", {"delta": stop, "usage": {"output_tokens": 5}})
    yield event("message_stop", {})


def message(blocks: list[dict[str, Any]], stop_reason: str, model: str) -> dict[str, Any]:
    return {
        "id": "msg_stub",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


class Anthropic:
    name = "anthropic"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.startswith("/v1/messages")

    def reply(self, request: Request, script: Script) -> Reply:
        body = request.body
        if request.path.startswith("/v1/messages/count_tokens"):
            return Reply(200, "count_tokens", body={"input_tokens": 10})
        kind, blocks, stop_reason = answer_for(body, script)
        model = str(body.get("model") or MODEL)
        tools = [t.get("name") for t in body.get("tools", []) if isinstance(t, dict)]
        logged = {"stream": bool(body.get("stream")), "tools": tools, "model": model}
        if not body.get("stream"):
            return Reply(200, kind, body=message(blocks, stop_reason, model), logged=logged)
        return Reply(200, kind, events=list(sse_events(blocks, stop_reason, model)), logged=logged)
