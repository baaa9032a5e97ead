"""An agent hook that forwards its JSON payload, as one line, to the host's audit socket.

Installed in the agent images at /usr/local/lib/kapsis/report-hook.py (root-owned) and called by
Claude Code's managed hooks (``/etc/claude-code/managed-settings.json``) with the hook's JSON on
standard input. The host records each line as an agent-reported event (see
``kapsis.audit.agent_reports``). Standard library only.

It must never get in the agent's way: it prints nothing (Claude Code reads a hook's output as
instructions or context), always exits 0, gives up quickly when the socket is absent or slow,
and shortens long strings (a written file's content, a command's output) so that the line stays
within what the host accepts.
"""

import json
import os
import socket
import sys

SOCKET = "/run/kapsis/audit.sock"
MAX_BYTES = 15 * 1024  # the host caps a line at 16 KiB; a cut line would no longer be JSON
TIMEOUT_SECONDS = 2.0


def shorten(value: object, limit: int) -> object:
    """``value`` with every string longer than ``limit`` cut, saying how much was cut."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"...[{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {key: shorten(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [shorten(item, limit) for item in value]
    return value


def encode(payload: object) -> bytes:
    """One JSON line of at most MAX_BYTES, shortening the payload's strings as far as needed."""
    for limit in (4096, 1024, 256, 64):
        line = json.dumps(shorten(payload, limit), ensure_ascii=False).encode() + b"\n"
        if len(line) <= MAX_BYTES:
            return line
    return json.dumps({"truncated_payload": True}).encode() + b"\n"


def send(line: bytes, path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        sock.connect(path)
        sock.sendall(line)


def main() -> int:
    try:
        payload = json.loads(sys.stdin.read() or "{}")
        path = os.environ.get("KAPSIS_AUDIT_SOCKET") or SOCKET
        if isinstance(payload, dict) and os.path.exists(path):
            send(encode(payload), path)
    except Exception:
        pass  # a report lost is better than an agent stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
