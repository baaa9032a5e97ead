"""The HTTP server of the scripted model endpoint: dispatch by path, log every request.

Every request is logged as one JSON line: method, path, headers (names lower-cased), the API
module that answered it (``api``), what it answered (``answer``) and what the module adds
(``logged``). A request no module matches gets a 404 and is logged with ``api: null``. ``HEAD``
answers 200 (Claude Code's connectivity check).
"""

from __future__ import annotations

import gzip
import http.server
import json
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .anthropic import Anthropic
from .gemini import Gemini
from .openai_chat import OpenAIChat
from .openai_responses import OpenAIResponses
from .script import Api, Reply, Request, Script

APIS: tuple[Api, ...] = (Anthropic(), OpenAIResponses(), OpenAIChat(), Gemini())


def parse_body(raw: bytes, encoding: str) -> dict[str, Any]:
    try:
        # Claude Code gzips its request bodies (not to a loopback address, it seems).
        if encoding.lower() == "gzip":
            raw = gzip.decompress(raw)
        body = json.loads(raw or b"{}")
    except (ValueError, OSError, EOFError):
        return {}
    return body if isinstance(body, dict) else {}


def make_handler(
    script: Script, log: Path, apis: Sequence[Api] = APIS
) -> type[http.server.BaseHTTPRequestHandler]:
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
            self._dispatch(b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._dispatch(self.rfile.read(length))

        def _dispatch(self, raw: bytes) -> None:
            body = parse_body(raw, self.headers.get("Content-Encoding", ""))
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = Request(self.command, self.path, headers, body)
            api = next((a for a in apis if a.matches(self.command, self.path)), None)
            if api is None:
                self._log({"api": None})
                self._send(Reply(404, "not_found", body={"error": {"type": "not_found"}}))
                return
            reply = api.reply(request, script)
            self._log({"api": api.name, "answer": reply.kind, "logged": reply.logged})
            self._send(reply)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            if reply.body is not None:
                payload = json.dumps(reply.body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in reply.chunks():
                self.wfile.write(chunk)
                self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the JSON log is the record

    return Handler


def serve(address: str, port: int, log: Path, script: Script) -> None:
    """Serve until SIGTERM; prints "ready" once listening."""

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        allow_reuse_address = True
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = Server((address, port), make_handler(script, log))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pause()


def main(argv: Sequence[str]) -> None:
    if argv[:1] != ["serve"] or len(argv) != 6:
        sys.exit(
            "usage: python -m tests.integration.model_endpoint serve ADDRESS PORT LOG "
            "FILE_PATH CONTENT"
        )
    address, port, log, file_path, content = argv[1:6]
    serve(address, int(port), Path(log), Script(file_path, content))
