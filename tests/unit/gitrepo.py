"""Helpers for the git unit tests: throwaway repositories made with plain git in tmp dirs.

Setup and inspection use plain ``git`` (never Kapsis code), with the caller's ``GIT_*``
environment dropped. :func:`isolate_home` points ``HOME`` at an empty directory so the
machine's global git config (identity, credential helpers, filters) cannot leak into a test.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from kapsis.git.runner import Repo

USER_NAME = "Repo Owner"
USER_EMAIL = "owner@example.com"


@dataclass(frozen=True)
class Link:
    """A symlink to ``target`` (written verbatim, never resolved)."""

    target: str


@dataclass(frozen=True)
class Exe:
    """An executable file."""

    content: str | bytes


FileSpec = str | bytes | Link | Exe


def isolate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update({"LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra or {})
    return env


def run_git(
    cwd: Path,
    *args: str,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        ["git", *args], cwd=cwd, input=input, capture_output=True, env=clean_env(env), check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}"
        )
    return result


def git(
    cwd: Path, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Plain git in ``cwd``; its stdout as text without the trailing newline."""
    return run_git(cwd, *args, input=input, env=env).stdout.decode().rstrip("\n")


def write_files(root: Path, files: Mapping[str, FileSpec]) -> None:
    for name, spec in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        if isinstance(spec, Link):
            os.symlink(spec.target, path)
            continue
        content = spec.content if isinstance(spec, Exe) else spec
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        path.chmod(0o755 if isinstance(spec, Exe) else 0o644)


def init_repo(path: Path, files: Mapping[str, FileSpec], *, bare: bool = False) -> Path:
    """A repository on ``main`` with ``files`` in its first commit."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main", *(["--bare"] if bare else []))
    for key, value in (
        ("user.name", USER_NAME),
        ("user.email", USER_EMAIL),
        ("commit.gpgsign", "false"),
    ):
        git(path, "config", key, value)
    if files:
        commit_files(path, files, "initial")
    return path


def commit_files(
    path: Path,
    files: Mapping[str, FileSpec],
    message: str = "change",
    *,
    remove: Iterable[str] = (),
) -> str:
    for name in remove:
        git(path, "rm", "-rq", "--", name)
    write_files(path, files)
    git(path, "add", "-A")
    git(path, "commit", "-q", "--no-verify", "-m", message)
    return git(path, "rev-parse", "HEAD")


def rev(path: Path, name: str) -> str | None:
    result = run_git(path, "rev-parse", "--verify", "--quiet", name, check=False)
    return result.stdout.decode().strip() if result.returncode == 0 else None


def discover(path: Path) -> Repo:
    repo = Repo.discover(path)
    assert repo is not None
    return repo


def tree(cwd: Path, revision: str) -> dict[str, tuple[str, bytes]]:
    """Path -> (mode, content) of every entry of ``revision``'s tree (gitlinks: the commit id)."""
    raw = run_git(cwd, "ls-tree", "-r", "-z", "--full-tree", revision).stdout
    entries: list[tuple[str, str, str]] = []
    for record in raw.split(b"\0"):
        if record:
            meta, _, name = record.partition(b"\t")
            mode, _kind, oid = meta.decode().split(" ")
            entries.append((os.fsdecode(name), mode, oid))
    wanted = sorted({oid for _, mode, oid in entries if mode != "160000"})
    blobs = read_blobs(cwd, wanted)
    return {
        name: (mode, oid.encode() if mode == "160000" else blobs[oid])
        for name, mode, oid in entries
    }


def read_blobs(cwd: Path, oids: Iterable[str]) -> dict[str, bytes]:
    oids = list(oids)
    if not oids:
        return {}
    output = run_git(cwd, "cat-file", "--batch", input="".join(f"{o}\n" for o in oids).encode())
    data = output.stdout
    blobs: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        end = data.index(b"\n", position)
        oid, _kind, size = data[position:end].decode().split(" ")
        blobs[oid] = data[end + 1 : end + 1 + int(size)]
        position = end + 1 + int(size) + 1
    return blobs


def whiteout(path: Path) -> None:
    """An overlayfs whiteout: a 0/0 character device."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque_dir(path: Path) -> None:
    """An overlayfs opaque directory: what was below it in the lower layer is hidden."""
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def is_whiteout(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
