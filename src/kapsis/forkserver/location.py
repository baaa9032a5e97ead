"""Where a start-up server listens, and the build identity that decides which server may serve.

A server may only serve a client that would have run the very same code: the socket's name
carries a digest of the interpreter, the import path (each directory's mtime changes when a
package is installed or removed there) and every file of the ``kapsis`` package. A stale server
is simply never asked again and leaves when it has been idle for a while.
"""

from __future__ import annotations

import os
import stat
import sys
import zlib

DISABLE_VARIABLE = "KAPSIS_NO_SERVER"
RUNTIME_VARIABLE = "KAPSIS_RUNTIME_DIR"


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


# Paths are plain strings here: pathlib would add ~10 ms to every start of the command.


def runtime_dir() -> str:
    """The per-user directory for sockets (never KAPSIS_HOME: one server serves them all)."""
    explicit = os.environ.get(RUNTIME_VARIABLE)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    # Only this user's own runtime directory: under `sudo -E` it is the invoking user's.
    if xdg and _owned_by_me(xdg):
        return os.path.join(xdg, "kapsis")
    return f"/tmp/kapsis-{os.getuid()}"


def _owned_by_me(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False


def private_runtime_dir() -> str | None:
    """The runtime directory, created 0700 if missing; None unless it is a directory that only
    this user can enter (a shared /tmp must not let anyone else plant or read the socket)."""
    directory = runtime_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    return directory if private else None


def build_id() -> str:
    """A digest of what the command would run: interpreter, import path, the package's files."""
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    parts = [sys.executable, sys.version]
    # sys.path[0] is the script's folder or the working directory: it says where the command was
    # started from, not what it runs (the server starts with it removed).
    search_path = sys.path if sys.flags.safe_path else sys.path[1:]
    for entry in search_path:
        parts.append(entry)
        try:
            parts.append(str(os.stat(entry or ".").st_mtime_ns))
        except OSError:
            parts.append("-")
    for folder, subfolders, files in os.walk(package):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(files):
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            parts.append(f"{folder}/{name}:{info.st_size}:{info.st_mtime_ns}")
    data = "\0".join(parts).encode("utf-8", "surrogateescape")
    # Not a security boundary (only this user reaches the directory); two checksums make a
    # 64-bit name for a cache key without loading hashlib on every start.
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def socket_path(directory: str, build: str) -> str:
    return os.path.join(directory, f"server-{build}.sock")


def lock_path(directory: str, build: str) -> str:
    return os.path.join(directory, f"server-{build}.lock")


def log_path(directory: str, build: str) -> str:
    return os.path.join(directory, f"server-{build}.log")
