"""Read the agent's transcript: the k8s-file log that conmon writes on the host.

Each line is ``TIMESTAMP STREAM TAG TEXT``; TAG ``P`` marks a partial line that the next record
continues, ``F`` a full one. The file is written by conmon, outside the sandbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path


def parse_records(lines: Iterator[str]) -> Iterator[str]:
    pending = ""
    for raw in lines:
        parts = raw.rstrip("\n").split(" ", 3)
        if len(parts) < 3:
            continue
        tag = parts[2]
        text = parts[3] if len(parts) == 4 else ""
        if tag == "P":
            pending += text
            continue
        yield pending + text
        pending = ""
    if pending:
        yield pending


def read_transcript(path: Path) -> Iterator[str]:
    if not path.exists():
        return iter(())
    with path.open(encoding="utf-8", errors="replace") as handle:
        return iter(list(parse_records(iter(handle))))


def follow_transcript(
    path: Path, still_running: Callable[[], bool], poll_seconds: float = 0.2
) -> Iterator[str]:
    """Yield lines as they are written, until the agent has stopped and the file is drained."""
    return parse_records(_follow_raw_lines(path, still_running, poll_seconds))


def _follow_raw_lines(
    path: Path, still_running: Callable[[], bool], poll_seconds: float
) -> Iterator[str]:
    while not path.exists():
        if not still_running():
            if not path.exists():  # it may have appeared while we asked
                return
            break
        time.sleep(poll_seconds)
    with path.open(encoding="utf-8", errors="replace") as handle:
        partial = ""
        while True:
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    yield partial
                    partial = ""
                continue
            if not still_running():
                rest = partial + handle.read()
                yield from rest.splitlines(keepends=True)
                return
            time.sleep(poll_seconds)
