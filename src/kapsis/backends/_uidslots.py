"""Private host uid ranges for rootful sandboxes, one per running agent.

Each sandbox gets ``SLOT_SIZE`` host uids starting at ``BASE + slot * SLOT_SIZE``, so container
root and the agent user map to host uids that belong to no one. A claim is a file written under
an exclusive lock; claims of agents that no longer run are reclaimed.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from kapsis.errors import SandboxError

BASE = 1_500_000_000
SLOT_SIZE = 65536
MAX_SLOTS = 4096


def _slots_dir() -> Path:
    # Host-wide, not per KAPSIS_HOME: two homes must never hand out the same host uids.
    return Path(os.environ.get("KAPSIS_UIDSLOTS_DIR", "/var/lib/kapsis/uidslots"))


def claim(agent_id: str, is_live: Callable[[str], bool]) -> int:
    """Claim a free range for ``agent_id``; returns its first host uid."""
    directory = _slots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claims = {p.name: p for p in directory.iterdir() if p.name.isdigit()}
        for slot in range(MAX_SLOTS):
            existing = claims.get(str(slot))
            if existing is not None:
                holder = existing.read_text().strip()
                if holder == agent_id or is_live(holder):
                    continue
                existing.unlink()
            (directory / str(slot)).write_text(agent_id)
            return BASE + slot * SLOT_SIZE
    raise SandboxError(f"all {MAX_SLOTS} uid ranges are in use; run `kapsis cleanup`")


def release(agent_id: str) -> None:
    directory = _slots_dir()
    if not directory.is_dir():
        return
    for claim_file in directory.iterdir():
        if claim_file.name.isdigit() and claim_file.read_text().strip() == agent_id:
            claim_file.unlink(missing_ok=True)
