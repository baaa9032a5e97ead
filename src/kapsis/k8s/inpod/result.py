"""The steps' report: one JSON object in the termination-message file the kubelet reads.

The operator takes it from the Pod's status (``terminationMessagePath``); nothing the agent
can write reaches it. The kubelet keeps at most 4096 bytes, so the message is shortened to fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LIMIT = 4096


def write_result(path: Path, result: dict[str, Any]) -> str:
    """Write ``result`` as one JSON line to ``path``; return the text written."""
    text = json.dumps(result, sort_keys=True)
    while len(text.encode()) > LIMIT and len(str(result.get("message", ""))) > 40:
        message = str(result["message"])
        result = {**result, "message": message[: max(40, len(message) - 512)] + "..."}
        text = json.dumps(result, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")
    return text
