"""Which host process supervises a run, and whether it still lives.

A run's status names its supervisor: ``kapsis run`` in the foreground, or the detached
``kapsis.sandbox.supervise`` process. A pid alone is not an identity (pids are reused, and a
reboot starts them over), so the record is the pid, the process's start time in clock ticks
since boot (field 22 of ``/proc/PID/stat``) and the boot's id. A supervisor is gone when no
process has that pid and start time in this boot.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

_PROC = Path("/proc")
_BOOT_ID = _PROC / "sys/kernel/random/boot_id"


class Supervisor(BaseModel):
    pid: int
    start_ticks: int
    boot_id: str
    # The pid namespace the pid belongs to: a reader in another one cannot judge it.
    pid_ns: str = ""


def pid_namespace(pid: int | str = "self") -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _proc_hides_others() -> bool:
    """Whether /proc hides other users' processes from this one (hidepid)."""
    if os.geteuid() == 0:
        return False
    try:
        mounts = (_PROC / "self" / "mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == "/proc" and "hidepid" in fields[3]:
            return not any(option in fields[3] for option in ("hidepid=0", "hidepid=off"))
    return False


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is none (or
    it has exited)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': the fields after
    # it start at the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None  # a zombie has exited: only its parent has not yet collected it
    try:
        return int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None


def identify(pid: int) -> Supervisor:
    """The identity of process ``pid``; one that has already exited gets a start time no
    process has (-1), so it reads as gone."""
    ticks = start_ticks(pid)
    return Supervisor(
        pid=pid,
        start_ticks=-1 if ticks is None else ticks,
        boot_id=boot_id(),
        pid_ns=pid_namespace(),
    )


def is_alive(supervisor: Supervisor) -> bool:
    """Whether the recorded supervisor still runs. An unreadable ``/proc`` (``hidepid``) or an
    unknown boot id counts as alive: a run is never declared dead on a guess."""
    current_boot = boot_id()
    if not current_boot or not supervisor.boot_id:
        return True
    if supervisor.boot_id != current_boot:
        return False  # the machine rebooted since
    if not _PROC.joinpath("self").exists():
        return True
    if supervisor.pid_ns and supervisor.pid_ns != pid_namespace():
        return True  # its pid means another process here (a container's reader, say)
    if start_ticks(supervisor.pid) == supervisor.start_ticks:
        return True
    # Gone, or hidden from this reader (hidepid): only the first is a judgement.
    return _proc_hides_others() and not _PROC.joinpath(str(supervisor.pid)).exists()
