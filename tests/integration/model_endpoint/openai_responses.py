"""The OpenAI Responses API, as Codex CLI uses it.

Codex (0.171) posts every turn to ``{base_url}/responses`` (``stream: true``, the key as
``Authorization: Bearer``) and makes no other request to the base URL. It offers its shell as
``exec_command`` (``{"cmd": ...}``, run as ``bash -lc``); the ``shell_command`` and ``shell``
tools of other versions are answered too.

The script, decided from each request alone:

* a request whose ``input`` holds a tool call's output (``function_call_output``,
  ``custom_tool_call_output``: the agent ran the command we asked for): an assistant message
  (``final``);
* a request that offers a shell tool: a ``function_call`` of it running
  ``printf '%s' CONTENT > FILE_PATH`` (``tool_use``);
* anything else: a short assistant message (``side``).

``stream: true`` requests get server-sent events (response.created, response.in_progress,
response.output_item.added, the deltas, response.output_item.done, response.completed with
usage: Codex fails a stream that ends without response.completed), the others one JSON
response.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

from .script import Reply, Request, Script, sse

MODEL = "gpt-stub-1"
CALL_ID = "call_stub_1"

# The shell tools Codex may offer, best first.
SHELL_TOOLS = ("exec_command", "shell_command", "shell")


def has_tool_output(body: dict[str, Any]) -> bool:
    items = body.get("input")
    return isinstance(items, list) and any(
        isinstance(item, dict) and str(item.get("type", "")).endswith("_call_output")
        for item in items
    )


def tool_names(body: dict[str, Any]) -> list[str]:
    """The names of the offered tools (a built-in tool without a name by its type)."""
    return [
        str(tool.get("name") or tool.get("type"))
        for tool in body.get("tools", [])
        if isinstance(tool, dict)
    ]


def write_command(script: Script) -> str:
    """A bash command line writing exactly ``script.content`` to ``script.file_path``."""
    return f"printf '%s' {shlex.quote(script.content)} > {shlex.quote(script.file_path)}"


def tool_call(tool: str, script: Script) -> dict[str, Any]:
    """The output item calling ``tool`` (one of SHELL_TOOLS) to run the write command."""
    command = write_command(script)
    arguments: dict[str, dict[str, Any]] = {
        "exec_command": {"cmd": command},
        "shell_command": {"command": command},
        "shell": {"command": ["bash", "-lc", command]},
    }
    return {
        "type": "function_call",
        "id": "fc_stub_1",
        "call_id": CALL_ID,
        "name": tool,
        "arguments": json.dumps(arguments[tool]),
        "status": "completed",
    }


def text_message(text: str) -> dict[str, Any]:
    content = {"type": "output_text", "text": text, "annotations": []}
    return {
        "type": "message",
        "id": "msg_stub_1",
        "role": "assistant",
        "status": "completed",
        "content": [content],
    }


def answer_for(body: dict[str, Any], script: Script) -> tuple[str, dict[str, Any]]:
    """(kind, the one output item) for one request."""
    if has_tool_output(body):
        return "final", text_message("I wrote the file.")
    offered = tool_names(body)
    tool = next((name for name in SHELL_TOOLS if name in offered), None)
    if tool is not None:
        return "tool_use", tool_call(tool, script)
    return "side", text_message("stub")


def response(item: dict[str, Any], model: str, status: str) -> dict[str, Any]:
    """A Response object holding ``item`` (none while in progress)."""
    done = status == "completed"
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    return {
        "id": "resp_stub_1",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [item] if done else [],
        "usage": usage if done else None,
        "error": None,
    }


def sse_events(item: dict[str, Any], model: str) -> Iterator[bytes]:
    """The server-sent events of a streamed response holding ``item``."""
    sequence = iter(range(1_000))

    def event(name: str, data: dict[str, Any]) -> bytes:
        return sse({"type": name, "sequence_number": next(sequence), **data}, event=name)

    where = {"output_index": 0, "item_id": item["id"]}
    yield event("response.created", {"response": response(item, model, "in_progress")})
    yield event("response.in_progress", {"response": response(item, model, "in_progress")})
    if item["type"] == "message":
        text = item["content"][0]["text"]
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event(
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        )
        yield event("response.content_part.added", {**where, "content_index": 0, "part": part})
        yield event("response.output_text.delta", {**where, "content_index": 0, "delta": text})
        yield event("response.output_text.done", {**where, "content_index": 0, "text": text})
        yield event(
            "response.content_part.done",
            {**where, "content_index": 0, "part": {**part, "text": text}},
        )
    else:
        yield event(
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "arguments": ""}},
        )
        yield event("response.function_call_arguments.delta", {**where, "delta": item["arguments"]})
        yield event(
            "response.function_call_arguments.done", {**where, "arguments": item["arguments"]}
        )
    yield event("response.output_item.done", {"output_index": 0, "item": item})
    yield event("response.completed", {"response": response(item, model, "completed")})


class OpenAIResponses:
    name = "openai_responses"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.split("?", 1)[0].rstrip("/").endswith("/responses")

    def reply(self, request: Request, script: Script) -> Reply:
        body = request.body
        kind, item = answer_for(body, script)
        model = str(body.get("model") or MODEL)
        logged = {"stream": bool(body.get("stream")), "tools": tool_names(body), "model": model}
        if not body.get("stream"):
            return Reply(200, kind, body=response(item, model, "completed"), logged=logged)
        return Reply(200, kind, events=list(sse_events(item, model)), logged=logged)
