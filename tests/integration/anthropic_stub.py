"""A scripted Anthropic Messages API endpoint, standard library only, for the real Claude Code CLI.

The script of a conversation, decided from each request alone (Claude Code may send side
requests, and a stateless answer cannot lose track):

* a request that carries a ``tool_result`` (the agent ran the tool we asked for): a text reply,
  ``end_turn``;
* a request that offers the ``Write`` tool: a ``tool_use`` block asking to write
  :attr:`Script.file_path` with :attr:`Script.content`, ``stop_reason: tool_use``;
* anything else: a short text reply.

``stream: true`` requests get server-sent events (message_start, content_block_start,
content_block_delta, content_block_stop, message_delta, message_stop), the others one JSON
message. ``HEAD /`` (Claude Code's connectivity check) answers 200. Every request is logged as one
JSON line (method, path, headers, the body's model/stream/tools and what was answered).

Run inside the test internet's network namespace as a script::

    python anthropic_stub.py serve ADDRESS PORT LOG FILE_PATH CONTENT
"""

from __future__ import annotations

import gzip
import http.server
import json
import signal
import socketserver
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "claude-stub-1"


@dataclass(frozen=True)
class Script:
    file_path: str
    content: str


def has_tool_result(body: dict[str, Any]) -> bool:
    for message in body.get("messages", []):
        content = message.get("content")
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
    yield event(
        "message_start",
        {
            "message": {
                "id": "msg_stub",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            }
        },
    )
    for index, block in enumerate(blocks):
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        yield event("content_block_start", {"index": index, "content_block": start})
        yield event("content_block_delta", {"index": index, "delta": delta})
        yield event("content_block_stop", {"index": index})
    yield event(
        "message_delta",
        {
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    )
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


def make_handler(script: Script, log: Path) -> type[http.server.BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _log(self, entry: dict[str, Any]) -> None:
            entry = {"method": self.command, "path": self.path, **entry}
            entry["headers"] = {k.lower(): v for k, v in self.headers.items()}
            with lock, log.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")

        def do_HEAD(self) -> None:
            self._log({})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self._log({})
            self._json(404, {"type": "error", "error": {"type": "not_found_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                # Claude Code gzips its request bodies (not to a loopback address, it seems).
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    raw = gzip.decompress(raw)
                body = json.loads(raw or b"{}")
            except (ValueError, OSError, EOFError):
                body = {}
            if not self.path.startswith("/v1/messages") or not isinstance(body, dict):
                self._log({})
                self._json(404, {"type": "error", "error": {"type": "not_found_error"}})
                return
            if self.path.startswith("/v1/messages/count_tokens"):
                self._log({"answer": "count_tokens"})
                self._json(200, {"input_tokens": 10})
                return
            kind, blocks, stop_reason = answer_for(body, script)
            model = str(body.get("model") or MODEL)
            tools = [t.get("name") for t in body.get("tools", []) if isinstance(t, dict)]
            self._log({"answer": kind, "stream": bool(body.get("stream")), "tools": tools})
            if not body.get("stream"):
                self._json(200, message(blocks, stop_reason, model))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in sse_events(blocks, stop_reason, model):
                self.wfile.write(chunk)
                self.wfile.flush()
            self.close_connection = True

        def _json(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the JSON log is the record

    return Handler


def serve(address: str, port: int, log: Path, script: Script) -> None:
    """Serve until SIGTERM; prints "ready" once listening."""

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        allow_reuse_address = True
        daemon_threads = True

    server = Server((address, port), make_handler(script, log))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pause()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        address, port, log, file_path, content = sys.argv[2:7]
        serve(address, int(port), Path(log), Script(file_path, content))
