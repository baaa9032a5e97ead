"""The user's record of trusted project config files: where each is and what it held.

Kept outside every project, in ``~/.config/kapsis/trusted.json`` (0600): an agent edits its
project, never this file. A file is trusted while it is at the path it was trusted at and its
content has the SHA-256 recorded then; a file that changes by one byte is untrusted again.
The path is the file's place in the project (the project's real path, then the file's path
below it as found), so no link planted in another project (a linked file, a linked ``.kapsis``
folder) borrows this project's trust.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kapsis import paths

TRUST_FILE_NAME = "trusted.json"


@dataclass(frozen=True)
class TrustedFile:
    path: str
    sha256: str
    trusted_at: str
    # The keys that needed trust when the user trusted the file (shown by --list).
    keys: tuple[str, ...] = ()


def trust_file() -> Path:
    return paths.config_dir() / TRUST_FILE_NAME


def revoke_target(target: Path) -> str:
    """The place, or the prefix of places, that ``kapsis trust --revoke TARGET`` means."""
    if target.is_dir():
        return str(target.resolve())
    return str(target.absolute().parent.resolve() / target.name)


def trusted_files() -> dict[str, TrustedFile]:
    """Every trusted file, by place; an unreadable or malformed record trusts nothing."""
    try:
        raw = json.loads(trust_file().read_text(encoding="utf-8"))
        entries = raw["files"]
        return {
            entry["path"]: TrustedFile(
                entry["path"], entry["sha256"], entry["trusted_at"], tuple(entry.get("keys", ()))
            )
            for entry in entries
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def is_trusted(place: str, sha256: str) -> bool:
    record = trusted_files().get(place)
    return record is not None and record.sha256 == sha256


def trust(place: str, sha256: str, keys: tuple[str, ...]) -> TrustedFile:
    """Record the file at ``place`` with the content hash ``sha256`` as trusted (replacing an
    older record)."""
    record = TrustedFile(place, sha256, time.strftime("%Y-%m-%dT%H:%M:%S%z"), keys)
    _save({**trusted_files(), record.path: record})
    return record


def revoke(places: list[str]) -> list[TrustedFile]:
    """Forget the records of these places (files, or folders whose files all go); the removed."""
    files = trusted_files()
    removed = [
        record
        for place, record in files.items()
        if any(place == target or place.startswith(target.rstrip("/") + "/") for target in places)
    ]
    for record in removed:
        del files[record.path]
    _save(files)
    return removed


def _save(files: dict[str, TrustedFile]) -> None:
    directory = paths.private_dir(paths.config_dir())
    entries = [asdict(record) for record in sorted(files.values(), key=lambda r: r.path)]
    paths.write_private(directory / TRUST_FILE_NAME, json.dumps({"files": entries}, indent=2))
