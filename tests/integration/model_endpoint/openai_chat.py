"""The OpenAI Chat Completions API, as Aider (through litellm) uses it.

Aider has no tools: its model answers in an *edit format*, text that aider parses and applies.
For a model it does not know (``openai/NAME``) that is ``whole``: the file's path on one line,
then the entire file in a fence. With ``--edit-format diff`` it is a *SEARCH/REPLACE* block
(an empty SEARCH creates a file). The format and the fence aider uses are read from its system
prompt.

The script, decided from each request alone:

* a main request (its system prompt teaches an edit format) whose conversation already holds
  our edit: a short text reply (``final``);
* any other main request: the script's file (its path relative to the repository, i.e. without
  the leading ``/workspace/``) in the edit format (``edit``);
* a side request (weak model): a commit message for the commit-message prompt, a one-line
  summary for the summary prompt, else a short text reply (``side``).

``stream: true`` requests get server-sent ``chat.completion.chunk`` events ending with
``data: [DONE]``, the others one ``chat.completion`` JSON object. ``GET .../models`` lists the
model. A ``content`` without a final newline ends the reply inside its file listing (aider takes
an unclosed listing as ending where the reply ends; a closed one's last line ends in a newline);
in the diff format it gets a final newline (aider adds one).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .script import Reply, Request, Script, sse

MODEL = "stub-model"
WORKSPACE = "/workspace/"
CREATED = 1700000000


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def messages(body: dict[str, Any], role: str) -> list[str]:
    return [
        text_of(m.get("content"))
        for m in body.get("messages", [])
        if isinstance(m, dict) and m.get("role") == role
    ]


def edit_format(system: str) -> str | None:
    """The edit format the system prompt teaches: "whole", "diff" or None (a side request)."""
    if "Act as an expert software developer" not in system:
        return None
    if "*SEARCH/REPLACE block*" in system:
        return "diff"
    if "*file listing*" in system:
        return "whole"
    return None


def fence(system: str) -> tuple[str, str]:
    """The fence aider asks for: ``` unless its prompt's example shows another."""
    found = re.search(r"(?:path/to/filename\.js|mathweb/flask/app\.py)\n(`{3,}|<\w+>)", system)
    opening = found.group(1) if found else "```"
    return opening, opening if opening.startswith("`") else "</" + opening[1:]


def relative_path(script: Script) -> str:
    path = script.file_path
    return path[len(WORKSPACE) :] if path.startswith(WORKSPACE) else path.lstrip("/")


def edit_text(script: Script, fmt: str, system: str) -> str:
    """Our reply that makes aider write the script's file, in edit format ``fmt``."""
    path = relative_path(script)
    start, end = fence(system)
    head = f"{intro(script)}\n\n{path}\n{start}\n"
    if fmt == "diff":
        content = script.content if script.content.endswith("\n") else script.content + "\n"
        return f"{head}<<<<<<< SEARCH\n=======\n{content}>>>>>>> REPLACE\n{end}\n"
    if script.content.endswith("\n"):
        return f"{head}{script.content}{end}\n"
    # A file listing's lines end in newlines; one the reply leaves open ends where it ends.
    return head + script.content


def intro(script: Script) -> str:
    """The first line of our edit reply: how a later request shows we already answered."""
    return f"I will create {relative_path(script)}."


def answer_for(body: dict[str, Any], script: Script) -> tuple[str, str, str, str | None]:
    """(kind, purpose, text, edit format) for one request."""
    system = "\n".join(messages(body, "system"))
    fmt = edit_format(system)
    if fmt is not None:
        if any(intro(script) in text for text in messages(body, "assistant")):
            return "final", "final", f"I created {relative_path(script)}.", fmt
        return "edit", "edit", edit_text(script, fmt, system), fmt
    if "commit message" in system:
        return "side", "commit_message", f"Add {relative_path(script)}", None
    if "summarize" in system.lower():
        return "side", "summary", f"I asked you to create {relative_path(script)}.", None
    return "side", "other", "OK.", None


def completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def chunk_events(text: str, model: str, usage: bool) -> Iterator[bytes]:
    """The server-sent events of a streamed reply of ``text``."""

    def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
        data = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": choices,
            **more,
        }
        return sse(data)

    yield chunk(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    )
    for line in text.splitlines(keepends=True):
        yield chunk([{"index": 0, "delta": {"content": line}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if usage:
        counts = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        yield chunk([], usage=counts)
    yield b"data: [DONE]\n\n"


class OpenAIChat:
    name = "openai_chat"

    def matches(self, method: str, path: str) -> bool:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "POST":
            return path.endswith("/chat/completions")
        return method == "GET" and path.endswith("/models")

    def reply(self, request: Request, script: Script) -> Reply:
        body = request.body
        if request.method == "GET":
            listed = {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "kapsis"}
            return Reply(200, "models", body={"object": "list", "data": [listed]})
        kind, purpose, text, fmt = answer_for(body, script)
        model = str(body.get("model") or MODEL)
        stream = bool(body.get("stream"))
        logged = {
            "model": model,
            "stream": stream,
            "request": "side" if kind == "side" else "main",
            "purpose": purpose,
            "edit_format": fmt,
        }
        if not stream:
            return Reply(200, kind, body=completion(text, model), logged=logged)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return Reply(200, kind, events=list(chunk_events(text, model, usage)), logged=logged)
