"""Helpers for the frozen-view tests: edit the user's checkout while an agent is running.

The agent's task reads a file, says it started (a file in its own workspace, which the host sees
in the upper dir or the worktree), waits, reads the file again and appends to it. The test edits
the checkout from a thread as soon as the agent has started, so the edit falls inside the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STARTED = "started-marker"
WAIT_SECONDS = 4
FROZEN_TASK = (
    f"cat base.txt > before.txt; touch {STARTED}; sleep {WAIT_SECONDS}; "
    "cat base.txt > after.txt; echo agent >> base.txt; rm {STARTED}"
).replace("{STARTED}", STARTED)
EDIT = "edited during the run\n"


def _started(kapsis_home: Path) -> bool:
    patterns = (
        f"sandboxes/*/upper/{STARTED}",
        f"sandboxes/*/layer/upper/{STARTED}",  # on the disk of its own (resources.disk)
        f"worktrees/*/{STARTED}",
    )
    return any(any(kapsis_home.glob(pattern)) for pattern in patterns)


@contextmanager
def edit_once_started(kapsis_home: Path, edit: Callable[[], None]) -> Iterator[threading.Event]:
    """Run ``edit`` as soon as an agent under ``kapsis_home`` has started; the event says it did."""
    done = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if _started(kapsis_home):
                edit()
                done.set()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=10)
