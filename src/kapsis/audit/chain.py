"""The hash chain of an audit log: canonical records, their hashes, and the seal message.

A record is a JSON object with ``seq, ts, session_id, agent_id, source, event_type, detail,
prev_hash, hash``. ``hash`` is the SHA-256 (hex) of the RFC 8785 canonical JSON of the record
without ``hash``; ``prev_hash`` is the previous record's ``hash``, or :data:`GENESIS` for the
first record of a session. Each line of the file is the canonical JSON of the whole record, so a
verifier can hash the line's bytes with the ``hash`` member cut out (a fast path) and fall back
to re-canonicalising only when that does not match.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import rfc8785

GENESIS = "0" * 64
SEAL_PURPOSE = "kapsis-audit-seal-v1"
RECORD_FIELDS = (
    "seq",
    "ts",
    "session_id",
    "agent_id",
    "source",
    "event_type",
    "detail",
    "prev_hash",
    "hash",
)
# In a canonical line the members are sorted, so "hash" comes right before "prev_hash".
_HASH_MEMBER = re.compile(rb'"hash":"([0-9a-f]{64})",')


def canonical(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON."""
    return rfc8785.dumps(value)


def record_hash(record: dict[str, Any]) -> str:
    """The hash of a record: SHA-256 of the canonical JSON of every member but ``hash``."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal_message(session_id: str, seq: int, head_hash: str) -> bytes:
    """What a seal signs: the canonical JSON of the chain's head, with a purpose string."""
    return canonical(
        {"purpose": SEAL_PURPOSE, "session_id": session_id, "seq": seq, "hash": head_hash}
    )


def line_hash(line: bytes) -> tuple[str, str] | None:
    """(stored hash, hash of the line without it) for a canonical line, or None if no hash."""
    match = _HASH_MEMBER.search(line)
    if match is None:
        return None
    body = line[: match.start()] + line[match.end() :]
    return match.group(1).decode(), hashlib.sha256(body.rstrip(b"\n")).hexdigest()
