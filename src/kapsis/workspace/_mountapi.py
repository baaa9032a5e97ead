"""Thin ctypes bindings for the Linux mount API calls Python's standard library lacks.

Used to create an idmapped bind mount: the project's files, owned by a host user, appear owned
by the sandbox's unprivileged agent uid, without copying or chowning anything.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time

_SYSCALLS = {  # open_tree, move_mount, mount_setattr; same numbers on x86_64 and aarch64 (>= 5.12)
    "x86_64": (428, 429, 442),
    "aarch64": (428, 429, 442),
}
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MS_NOSUID = 2
MS_NODEV = 4
MOUNT_ATTR_IDMAP = 0x00100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def user_namespace_fd(inside_uid: int, inside_gid: int, outside_uid: int, outside_gid: int) -> int:
    """An fd of a new user namespace mapping one uid/gid: ``inside`` -> ``outside``."""
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(ready_write)
        code = 0 if _libc.unshare(CLONE_NEWUSER) == 0 else 1
        os.read(ready_read, 1)
        os._exit(code)
    os.close(ready_read)
    try:
        own = os.readlink("/proc/self/ns/user")
        for _ in range(2000):
            if os.readlink(f"/proc/{child}/ns/user") != own:
                break
            time.sleep(0.0005)
        else:
            raise OSError("the helper process did not enter a new user namespace")
        with open(f"/proc/{child}/uid_map", "w") as uid_map:
            uid_map.write(f"{inside_uid} {outside_uid} 1\n")
        with open(f"/proc/{child}/setgroups", "w") as setgroups:
            setgroups.write("deny")
        with open(f"/proc/{child}/gid_map", "w") as gid_map:
            gid_map.write(f"{inside_gid} {outside_gid} 1\n")
        return os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(ready_write, b"x")
        os.close(ready_write)
        os.waitpid(child, 0)


def idmapped_bind(source_fd: int, target: str, userns_fd: int, *, read_only: bool = False) -> None:
    """Bind the directory open as ``source_fd`` (recursively) at ``target`` with ownership seen
    through ``userns_fd``. An fd, not a path: the caller checked what it opened."""
    open_tree, move_mount, mount_setattr = _SYSCALLS[platform.machine()]
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE | AT_EMPTY_PATH
    tree = _check(_libc.syscall(open_tree, source_fd, b"", flags), "open_tree")
    try:
        # nosuid, nodev: a container's bind of this mount keeps both (in a user namespace
        # they are locked), so a set-uid file or a device node the agent makes is inert.
        flags = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        flags |= MOUNT_ATTR_RDONLY if read_only else 0
        attr = _MountAttr(flags, 0, 0, userns_fd)
        _check(
            _libc.syscall(
                mount_setattr,
                tree,
                b"",
                AT_EMPTY_PATH | AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            "mount_setattr(idmap)",
        )
        _check(
            _libc.syscall(
                move_mount, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
            ),
            "move_mount",
        )
    finally:
        os.close(tree)


def mount(source: str, target: str, fstype: str, options: str) -> None:
    """mount(2), always nosuid and nodev (see :func:`idmapped_bind`)."""
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode(),
            MS_NOSUID | MS_NODEV,
            options.encode(),
        ),
        f"mount {fstype}",
    )


def unmount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")
