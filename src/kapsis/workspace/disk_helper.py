#!/usr/bin/python3 -I
"""kapsis-disk: the disks that hold rootless agents' workspaces, made and removed as root.

A user without root cannot mount a filesystem, so rootless podman alone cannot bound what an
agent writes. This small program, run through sudo, does it for them: an ext4 filesystem in a
sparse, root-owned file, loop-mounted nosuid,nodev at a path the user cannot move or replace,
its root directory owned by the user. The kernel refuses a write past its size (ENOSPC inside
the sandbox). ``scripts/install.sh`` copies this file to :data:`INSTALLED_AT` (root-owned) and
lets the members of the group ``kapsis`` run it without a password (``/etc/sudoers.d/kapsis``).

What a caller may do is narrow on purpose. It names an agent id and a size, never a path: the
files live at fixed places below :data:`STATE`, keyed by the caller's uid as sudo gives it. The
image is root's, so its user cannot feed the kernel a forged filesystem. A caller can make at
most :data:`MAX_DISKS` disks, each at most what is free on :data:`STATE`'s filesystem once
:data:`RESERVE` and every existing disk's unwritten part are counted as taken (the disks are
sparse: each may still grow to its full size; a larger size asked is lowered to that), and can
release or list only its own.

Standalone: it imports only the standard library and nothing of Kapsis, so what root runs is
this one root-owned file. Kapsis imports it for the names and the accounting it shares.

Usage (as ``sudo -n kapsis-disk COMMAND``): ``room`` prints how many bytes a new disk may have;
``make ID BYTES`` makes and mounts one and prints where; ``release ID`` unmounts and deletes it;
``list`` prints ``ID BYTES WRITTEN MOUNTED`` for each of the caller's disks. Exit 0, else one
line on stderr and exit 2 (a usage error) or 1 (it could not be done).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

INSTALLED_AT = Path("/usr/local/libexec/kapsis/kapsis-disk")
GROUP = "kapsis"
STATE = Path("/var/lib/kapsis-disks")
# Kept free on STATE's filesystem whatever the disks take: the system's own writes go there.
RESERVE = 256 * 1024**2
# The sizes a caller may ask for; less room than MIN_ROOM (or than asked) refuses a disk.
MIN_BYTES = 8 * 1024**2
MAX_BYTES = 1024**4
MIN_ROOM = 64 * 1024**2
MAX_DISKS = 64
# Mounts a user may have stacked on a mount point of theirs (a FUSE mount) before release.
MAX_STACKED = 16
LOCK_WAIT = 60
# How long a loop device may take to let go of its file after the last unmount.
RELEASE_WAIT = 2.0
AGENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# No reserved blocks (the agent gets the whole size); inode tables and the journal are
# initialised lazily, so making a 10 GiB filesystem writes a few MB and takes milliseconds.
MKFS_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1"
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class HelperError(Exception):
    """One line for the caller; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def images_dir(state: Path, uid: int) -> Path:
    return state / "images" / str(uid)


def mounts_dir(state: Path, uid: int) -> Path:
    return state / "mounts" / str(uid)


def mount_point(uid: int, agent_id: str, state: Path = STATE) -> Path:
    """Where the disk of ``agent_id`` of user ``uid`` is mounted (the same for Kapsis)."""
    return mounts_dir(state, uid) / agent_id


def unwritten_bytes(images: Iterable[Path]) -> int:
    """What the sparse ``images`` may still take from their filesystem: their sizes less the
    blocks they hold. A file that went away meanwhile counts nothing."""
    total = 0
    for image in images:
        try:
            facts = image.lstat()
        except OSError:
            continue
        if stat.S_ISREG(facts.st_mode):
            total += max(0, facts.st_size - facts.st_blocks * 512)
    return total


def loop_devices(sys_block: Path = Path("/sys/block")) -> list[tuple[str, int]]:
    """Each loop device's backing file as the kernel names it (`` (deleted)`` at its end once
    unlinked) and its size in bytes."""
    found = []
    for device in sys_block.glob("loop*"):
        try:
            backing = (device / "loop" / "backing_file").read_text().rstrip("\n")
            sectors = int((device / "size").read_text())
        except (OSError, ValueError):
            continue  # not bound to a file
        found.append((backing, sectors * 512))
    return found


def promised_bytes(filesystem: Path, images: Iterable[Path]) -> int:
    """What disks may still take from the filesystem of ``filesystem``: the unwritten part of
    each of ``images``, and of every other file bound to a loop device there (a rootful
    Kapsis run's disk, another KAPSIS_HOME's). A loop device whose file was unlinked counts
    whole: where it lies and what it holds can no longer be seen."""
    device = os.stat(filesystem).st_dev
    images = list(images)
    seen = {str(image) for image in images}
    total = unwritten_bytes(images)
    for backing, size in loop_devices():
        if backing in seen:
            continue
        seen.add(backing)
        if backing.endswith(" (deleted)"):
            total += size
            continue
        with contextlib.suppress(OSError):
            if os.stat(backing).st_dev == device:
                total += unwritten_bytes([Path(backing)])
    return total


def room(state: Path, images: Iterable[Path], reserve: int = RESERVE) -> int:
    """Bytes a new disk may have on the filesystem of ``state``: what is free there, less
    ``reserve`` and less what the disks there may still grow by (:func:`promised_bytes`)."""
    facts = os.statvfs(state)
    return facts.f_bavail * facts.f_frsize - reserve - promised_bytes(state, images)


def room_for(state: Path, uid: int) -> int:
    """What a new disk of user ``uid`` may have: the room, and at most what keeps the user's
    disks together under half of the room there is for disks (their own unwritten parts
    counted as room), so that no one user can promise all of it to themselves."""
    images = all_images(state)
    own = unwritten_bytes(i for i in images if i.parent == images_dir(state, uid))
    left = room(state, images)
    return min(left, (left + own) // 2 - own)


def all_images(state: Path) -> list[Path]:
    """Every user's disk images (one level per uid; nothing below is followed)."""
    found: list[Path] = []
    top = state / "images"
    if not top.is_dir():
        return found
    with os.scandir(top) as users:
        for user in users:
            if user.is_dir(follow_symlinks=False):
                with os.scandir(user.path) as entries:
                    found += [Path(e.path) for e in entries if e.name.endswith(".img")]
    return found


def parse_agent_id(text: str) -> str:
    if not AGENT_ID.fullmatch(text):
        raise HelperError(f"{text!r} is not an agent id ([a-z0-9-], at most 32)", 2)
    return text


def parse_bytes(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        raise HelperError(f"{text!r} is not a number of bytes", 2)
    size = int(text)
    if not MIN_BYTES <= size <= MAX_BYTES:
        raise HelperError(f"a disk has {MIN_BYTES} to {MAX_BYTES} bytes, not {size}", 2)
    return size


def caller_uid(environ: dict[str, str]) -> int:
    """The user sudo runs us for (SUDO_UID, set by sudo itself)."""
    text = environ.get("SUDO_UID", "")
    if not text.isdigit():
        raise HelperError("run through sudo (SUDO_UID is not set)", 2)
    return int(text)


def private_dir(path: Path, mode: int) -> None:
    """``path`` as a root-owned directory of ``mode`` that no other user can write: made if
    missing, refused if it is a link or someone else's."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    facts = path.lstat()
    if not stat.S_ISDIR(facts.st_mode) or facts.st_uid != 0 or facts.st_mode & 0o022:
        raise HelperError(f"{path} is not a root-owned directory only root can write")
    os.chmod(path, mode)


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """One change of the disks at a time, for every user: room is counted, then taken."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    descriptor = os.open(state / "lock", flags, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HelperError(
                        f"the disks stayed busy for {LOCK_WAIT} s; try again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(descriptor)


def run_tool(argv: list[str], what: str, stdin: str = "") -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=120, input=stdin,
            env={"PATH": TOOL_PATH, "LC_ALL": "C"},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HelperError(f"{what} failed: {error}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
        raise HelperError(f"{what} failed: {detail[0]}")


def make(state: Path, uid: int, agent_id: str, size: int) -> Path:
    """Make and mount the disk; its mount point, owned by ``uid``, mode 0700."""
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise HelperError(f"uid {uid} is no user of this host") from None
    private_dir(state / "images", 0o700)
    private_dir(state / "mounts", 0o711)
    private_dir(images_dir(state, uid), 0o700)
    private_dir(mounts_dir(state, uid), 0o711)
    with state_lock(state):
        mine = sorted(images_dir(state, uid).glob("*.img"))
        if len(mine) >= MAX_DISKS:
            raise HelperError(
                f"you have {len(mine)} disks already, the most there may be: release some "
                "(kapsis cleanup)"
            )
        image = images_dir(state, uid) / f"{agent_id}.img"
        target = mount_point(uid, agent_id, state)
        if image.exists() or os.path.lexists(target):
            raise HelperError(f"agent {agent_id} has a disk already")
        # Lowered to the room left (what was written since the caller asked for it counts).
        left = room_for(state, uid)
        if left < min(size, MIN_ROOM):
            raise HelperError(
                f"no room for a disk on the filesystem of {state}: {max(left, 0) >> 20} MiB "
                "left for you once the disks there may fill up (a user's disks may promise at "
                "most half of it)"
            )
        size = min(size, left)
        try:
            descriptor = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(descriptor, size)  # sparse: no block is written
            finally:
                os.close(descriptor)
            os.mkdir(target, 0o700)
            extended = f"{MKFS_EXTENDED},root_owner={uid}:{gid}"
            run_tool(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", extended, str(image)], "mkfs.ext4")
            # Before it is mounted: its root closed to others (mkfs makes it 0755) from the first
            # moment it can be reached, and empty (git must not see lost+found in a worktree).
            edit = "rmdir lost+found\nsif <2> mode 040700\n"
            run_tool(["debugfs", "-w", "-f", "-", str(image)], "debugfs", stdin=edit)
            options = "loop,nosuid,nodev"
            run_tool(["mount", "-t", "ext4", "-o", options, str(image), str(target)], "mount")
        except BaseException:
            _remove(image, target)
            raise
    return target


def release(state: Path, uid: int, agent_id: str) -> None:
    """Unmount and delete the disk; nothing if none. While anything still holds it (a process
    in it, a bind of it elsewhere) its file stays, counted, and the release fails: a later one
    finishes it."""
    target = mount_point(uid, agent_id, state)
    if mounted(target):
        # Written out before the lock is taken, so that the unmount under it is short.
        subprocess.run(
            ["sync", "--file-system", str(target)], capture_output=True, check=False,
            timeout=600, env={"PATH": TOOL_PATH},
        )  # fmt: skip
    with state_lock(state):
        _remove(images_dir(state, uid) / f"{agent_id}.img", target)


def mounted(target: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> int:
    """How many mounts are stacked at ``target``, as the kernel lists them (a stat of the path
    could be refused by a FUSE mount its user put on top)."""
    wanted = str(target)
    count = 0
    with mountinfo.open(encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split(" ", 5)
            if len(fields) > 4 and _unescape(fields[4]) == wanted:
                count += 1
    return count


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def in_use(image: Path) -> bool:
    """Whether a loop device still reads and writes ``image``."""
    return any(backing == str(image) for backing, _ in loop_devices())


def _remove(image: Path, target: Path) -> None:
    for _ in range(MAX_STACKED):  # what a user stacked on top comes off first
        if not mounted(target):
            break
        done = subprocess.run(
            ["umount", str(target)], capture_output=True, check=False, env={"PATH": TOOL_PATH}
        )
        if done.returncode != 0:
            run_tool(["umount", "--lazy", str(target)], "umount")
    if mounted(target):
        raise HelperError(f"{target} is still mounted after {MAX_STACKED} unmounts")
    # A loop device lets go of its file just after the last unmount; one held elsewhere keeps
    # it, and the file then stays to be counted.
    deadline = time.monotonic() + RELEASE_WAIT
    while in_use(image):
        if time.monotonic() > deadline:
            raise HelperError(
                f"the disk {image.stem} is still in use (a process or a mount elsewhere holds "
                "it); it stays, counted as taken, until a later release finds it free"
            )
        time.sleep(0.05)
    image.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


def listing(state: Path, uid: int) -> list[str]:
    lines = []
    for image in sorted(images_dir(state, uid).glob("*.img")):
        facts = image.lstat()
        is_mounted = mounted(mount_point(uid, image.stem, state)) > 0
        lines.append(f"{image.stem} {facts.st_size} {facts.st_blocks * 512} {int(is_mounted)}")
    return lines


def harden_process() -> None:
    """What sudo hands over from the caller must not stop or starve root's work: their signals
    (a stop while the lock is held would block every user), rlimits, niceness and umask."""
    for stop in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(stop, signal.SIG_IGN)
    # What is begun is finished (each step is short); the lock then goes with the process.
    signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    )
    unlimited = resource.RLIM_INFINITY
    for limit, wanted in (
        (resource.RLIMIT_FSIZE, unlimited),
        (resource.RLIMIT_CPU, unlimited),
        (resource.RLIMIT_AS, unlimited),
        (resource.RLIMIT_DATA, unlimited),
        (resource.RLIMIT_NPROC, unlimited),
        (resource.RLIMIT_NOFILE, 4096),
    ):
        try:
            resource.setrlimit(limit, (wanted, wanted))
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE: as far as the hard limit goes
            hard = resource.getrlimit(limit)[1]
            resource.setrlimit(limit, (hard, hard))
    with contextlib.suppress(OSError):  # no CAP_SYS_NICE: as nice as the caller left it
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    os.umask(0o022)


def main(argv: list[str], environ: dict[str, str], state: Path = STATE) -> int:
    try:
        if os.geteuid() != 0:
            raise HelperError("kapsis-disk runs as root, through sudo", 2)
        uid = caller_uid(environ)
        if not argv:
            raise HelperError("usage: kapsis-disk room | make ID BYTES | release ID | list", 2)
        command, args = argv[0], argv[1:]
        shapes = {"room": 0, "make": 2, "release": 1, "list": 0}
        if command not in shapes or len(args) != shapes[command]:
            raise HelperError("usage: kapsis-disk room | make ID BYTES | release ID | list", 2)
        private_dir(state, 0o755)
        if command == "room":
            with state_lock(state):
                print(max(0, room_for(state, uid)))
        elif command == "make":
            print(make(state, uid, parse_agent_id(args[0]), parse_bytes(args[1])))
        elif command == "release":
            release(state, uid, parse_agent_id(args[0]))
        elif images_dir(state, uid).is_dir():
            print("\n".join(listing(state, uid)))
        return 0
    except HelperError as error:
        print(f"kapsis-disk: {error}", file=sys.stderr)
        return error.code
    except OSError as error:
        print(f"kapsis-disk: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    harden_process()
    sys.exit(main(sys.argv[1:], dict(os.environ)))
