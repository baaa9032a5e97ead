"""Hosts the user added with ``kapsis ssh add-host``: one known_hosts file each, under
``~/.kapsis/ssh/known_hosts.d/``.

Keys arrive either pinned (``--key``, given out of band: the safe way) or scanned from the host
with ``ssh-keyscan`` (trust on first use: whoever answers first is believed, so the fingerprints
are shown for the user to compare). Each file says in its first line how and when it was made;
that line is the source ``kapsis ssh list`` and the plan show.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

from kapsis import paths
from kapsis.errors import ConfigError, HostUnsupportedError
from kapsis.ssh.keys import HostKey, host_field, parse_host, parse_known_hosts, parse_public_key

KEYSCAN_TIMEOUT = 5
SCANNED = "scanned with ssh-keyscan (trust on first use)"
PINNED = "pinned with --key"


def hosts_dir() -> Path:
    return paths.kapsis_home() / "ssh" / "known_hosts.d"


def _file_of(field: str) -> Path:
    return hosts_dir() / f"{urllib.parse.quote(field, safe='')}.known_hosts"


def added_keys() -> list[HostKey]:
    """Every added host's keys, oldest file first; a damaged file is an error naming it."""
    directory = hosts_dir()
    if not directory.is_dir():
        return []
    keys: list[HostKey] = []
    files = sorted(directory.glob("*.known_hosts"), key=lambda p: (p.stat().st_mtime, p.name))
    for file in files:
        text = file.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        source = first.removeprefix("#").strip() or f"added ({file.name})"
        try:
            keys += parse_known_hosts(text, source)
        except ValueError as error:
            raise ConfigError(
                f"{file}: {error}; fix the file or remove it with `kapsis ssh remove-host`"
            ) from None
    return keys


def keys_from_text(host: str, port: int, entries: list[str], how: str) -> list[HostKey]:
    """``--key`` values (``TYPE BASE64``) as keys of ``host:port``. Raises ConfigError."""
    field = host_field(host, port)
    keys = []
    for entry in entries:
        try:
            key_type, blob = parse_public_key(entry)
        except ValueError as error:
            raise ConfigError(f"--key: {error}") from None
        keys.append(HostKey(host=field, key_type=key_type, key=blob, source=how))
    return keys


def scan(host: str, port: int, timeout: int = KEYSCAN_TIMEOUT) -> list[HostKey]:
    """The keys ``host:port`` presents now, by ``ssh-keyscan``. Raises ConfigError / Host..."""
    keyscan = shutil.which("ssh-keyscan")
    if keyscan is None:
        raise HostUnsupportedError(
            "ssh-keyscan is not installed (apt-get install openssh-client); or pin the keys "
            "with --key"
        )
    result = subprocess.run(
        [keyscan, "-T", str(timeout), "-p", str(port), "--", host],
        capture_output=True,
        text=True,
        timeout=timeout * 4 + 5,
        check=False,
    )
    try:
        keys = parse_known_hosts(result.stdout, SCANNED)
    except ValueError as error:
        raise ConfigError(f"ssh-keyscan {host}: unreadable answer ({error})") from None
    field = host_field(host, port)
    keys = [key for key in keys if key.host == field]
    if not keys:
        detail = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConfigError(
            f"ssh-keyscan found no host keys at {field} ({detail}); check the name and port"
        )
    return keys


def save(keys: list[HostKey], how: str) -> Path:
    """Store (replace) the keys of one host; the file's first line records ``how`` and when."""
    field = keys[0].host
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# kapsis ssh add-host {field}: {how}, {when}"]
    lines += [key.line() for key in keys]
    directory = hosts_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = _file_of(field)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(target)
    return target


def remove(text: str) -> bool:
    """Forget an added host; False when it was not added."""
    host, port = parse_host(text)
    target = _file_of(host_field(host, port))
    if not target.exists():
        return False
    target.unlink()
    return True
