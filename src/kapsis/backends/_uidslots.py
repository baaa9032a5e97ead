"""Private host uid ranges for rootful sandboxes, one per running agent.

Each sandbox gets ``SLOT_SIZE`` host uids starting at ``BASE + slot * SLOT_SIZE``, so container
root and the agent user map to host uids that belong to no one. The first 65536 are the agent
container's, the next 65536 (from ``GATEWAY_OFFSET``) the network gateway's, so no uid of the
gateway - its resolver's included - is a uid of the agent's. A claim is a file written under
an exclusive lock and names the agent and the process that claimed it. A claim is reclaimed
only when neither lives: the claiming process is gone and the agent has no sandbox. (The pod
alone is not enough: between the claim and ``pod create`` a launching agent has no pod yet.)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from kapsis.errors import SandboxError

BASE = 1_500_000_000
CONTAINER_RANGE = 65536
GATEWAY_OFFSET = CONTAINER_RANGE
SLOT_SIZE = 2 * CONTAINER_RANGE
MAX_SLOTS = 4096  # BASE + MAX_SLOTS * SLOT_SIZE stays below 2**31


def _slots_dir() -> Path:
    # Host-wide, not per KAPSIS_HOME: two homes must never hand out the same host uids.
    return Path(os.environ.get("KAPSIS_UIDSLOTS_DIR", "/var/lib/kapsis/uidslots"))


def _holder(claim_file: Path) -> tuple[str, int | None]:
    agent, _, pid = claim_file.read_text().strip().partition(" ")
    return agent, int(pid) if pid.isdigit() else None


def _process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(agent_id: str, is_live: Callable[[str], bool]) -> int:
    """Claim a free range for ``agent_id``; returns its first host uid."""
    directory = _slots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claims = {p.name: p for p in directory.iterdir() if p.name.isdigit()}
        free: int | None = None
        for slot in range(MAX_SLOTS):
            existing = claims.get(str(slot))
            if existing is None:
                free = slot if free is None else free
                continue
            holder, pid = _holder(existing)
            if holder == agent_id:
                return BASE + slot * SLOT_SIZE
            if free is None and not _process_alive(pid) and not is_live(holder):
                free = slot
        if free is None:
            raise SandboxError(f"all {MAX_SLOTS} uid ranges are in use; run `kapsis cleanup`")
        (directory / str(free)).write_text(f"{agent_id} {os.getpid()}")
        return BASE + free * SLOT_SIZE


def release(agent_id: str) -> None:
    directory = _slots_dir()
    if not directory.is_dir():
        return
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for claim_file in directory.iterdir():
            if claim_file.name.isdigit() and _holder(claim_file)[0] == agent_id:
                claim_file.unlink(missing_ok=True)
