"""The Gemini API (``generativelanguage``, ``v1beta``), as Gemini CLI uses it.

Gemini CLI posts to ``/v1beta/models/MODEL:streamGenerateContent?alt=sse`` for its turns and to
``/v1beta/models/MODEL:generateContent`` for side requests (the "next speaker" check, loop
detection, routing), which ask for JSON through ``generationConfig.responseJsonSchema`` (or
``responseSchema``). The script, decided from each request alone:

* a request asking for JSON (a side request; its ``contents`` repeat the conversation, tool calls
  included): an object that fits the requested schema, preferring ``"user"`` in an enum so that
  a "next speaker" check ends the turn (``side``);
* a request whose ``contents`` carry a ``functionResponse`` (the agent ran the tool we asked for):
  a text reply, ``finishReason: STOP`` (``final``);
* a request that offers the ``write_file`` tool: a ``functionCall`` asking to write the script's
  file (``file_path``, ``content``) (``tool_use``);
* anything else: a short text reply (``side``).

Streamed requests get server-sent events (one ``data:`` chunk per reply, no ``event:`` names),
the others one JSON ``GenerateContentResponse``; ``:countTokens`` answers a count. The API key
arrives in the ``x-goog-api-key`` header. Gemini CLI 0.61 only gets here with
``GOOGLE_GEMINI_BASE_URL`` *and* ``security.auth.selectedType: "gemini-api-key"`` in a settings
file (the variable alone selects its "gateway" auth, which headless mode rejects).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .script import Reply, Request, Script, sse

MODEL = "gemini-stub"
WRITE_TOOL = "write_file"
METHODS = ("streamGenerateContent", "generateContent", "countTokens")
PATH_RE = re.compile(r"^/v1[a-z0-9]*/models/(?P<model>[^:/?]+):(?P<method>[A-Za-z]+)")


def parse_path(path: str) -> tuple[str | None, str | None]:
    """(model, method) of a ``/v1beta/models/MODEL:METHOD...`` path; (None, None) if not one."""
    match = PATH_RE.match(path)
    if match is None:
        return None, None
    return match.group("model"), match.group("method")


def has_function_response(body: dict[str, Any]) -> bool:
    for content in body.get("contents", []):
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list) and any(
            isinstance(part, dict) and "functionResponse" in part for part in parts
        ):
            return True
    return False


def offered_functions(body: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for tool in body.get("tools", []):
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for declaration in declarations if isinstance(declarations, list) else []:
            if isinstance(declaration, dict) and isinstance(declaration.get("name"), str):
                names.append(declaration["name"])
    return names


def requested_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request asks its answer to fit, if it asks for JSON."""
    config = body.get("generationConfig")
    if not isinstance(config, dict):
        return None
    for key in ("responseJsonSchema", "responseSchema"):
        schema = config.get(key)
        if isinstance(schema, dict):
            return schema
    if config.get("responseMimeType") == "application/json":
        return {"type": "object"}
    return None


def fill(schema: dict[str, Any]) -> Any:
    """A value that fits ``schema`` (types in either case, as the two schema flavours spell it)."""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return "user" if "user" in enum else enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):  # JSON Schema allows ["string", "null"]
        kind = next((k for k in kind if k != "null"), "null")
    kind = str(kind or "object").lower()
    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        return {name: fill(sub) for name, sub in properties.items() if isinstance(sub, dict)}
    if kind == "array":
        items = schema.get("items")
        count = int(schema.get("minItems") or 0)
        return [fill(items) for _ in range(count)] if isinstance(items, dict) else []
    if kind == "integer":  # the routing classifier's complexity_score must be 1-100
        return int(schema.get("minimum", 1))
    if kind == "number":  # loop detection's unproductive_state_confidence: 0 is "no loop"
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "stub"


def answer_for(body: dict[str, Any], script: Script) -> tuple[str, list[dict[str, Any]]]:
    """(kind, parts of the model's content) for one request."""
    schema = requested_schema(body)
    if schema is not None:  # a side request: its contents repeat the conversation so far
        return "side", [{"text": json.dumps(fill(schema))}]
    if has_function_response(body):
        return "final", [{"text": "I wrote the file."}]
    if WRITE_TOOL in offered_functions(body):
        args = {"file_path": script.file_path, "content": script.content}
        return "tool_use", [{"functionCall": {"name": WRITE_TOOL, "args": args}}]
    return "side", [{"text": "stub"}]


def response(parts: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """One ``GenerateContentResponse`` holding ``parts``."""
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 5,
            "totalTokenCount": 15,
        },
        "modelVersion": model,
        "responseId": "stub-response",
    }


class Gemini:
    name = "gemini"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and parse_path(path)[1] in METHODS

    def reply(self, request: Request, script: Script) -> Reply:
        body = request.body
        path_model, method = parse_path(request.path)
        model = path_model or MODEL
        tools = offered_functions(body)
        logged: dict[str, Any] = {"method": method, "tools": tools, "model": model}
        if method == "countTokens":
            return Reply(200, "count_tokens", body={"totalTokens": 10}, logged=logged)
        kind, parts = answer_for(body, script)
        logged["json"] = requested_schema(body) is not None
        if method == "streamGenerateContent":
            return Reply(200, kind, events=[sse(response(parts, model))], logged=logged)
        return Reply(200, kind, body=response(parts, model), logged=logged)
