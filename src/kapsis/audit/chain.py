"""The hash chain of an audit log: canonical records, their hashes, and the seal message.

A record is a JSON object with ``seq, ts, session_id, agent_id, source, event_type, detail,
prev_hash, hash``. ``hash`` is the SHA-256 (hex) of the RFC 8785 canonical JSON of the record
without ``hash``; ``prev_hash`` is the previous record's ``hash``, or :data:`GENESIS` for the
first record of the chain. Each line of the file is the canonical JSON of the whole record, so a
verifier can hash the line's bytes with the ``hash`` member cut out (a fast path) and fall back
to re-canonicalising only for lines that are not in that form.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

GENESIS = "0" * 64
SEAL_PURPOSE = "kapsis-audit-seal-v1"


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only what Python's JSON encoder writes exactly as RFC 8785 does:
    ASCII keys, strings, ints, bools, None, lists and dicts (no floats, whose forms differ)."""
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and key.isascii() and _plain(item) for key, item in value.items()
        )
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return value is None or (isinstance(value, str | int) and not isinstance(value, float))


def canonical(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON.

    The rfc8785 package is the reference; for the common case (no floats, ASCII keys) the
    standard encoder gives the same bytes several times faster, which is what makes appending
    tens of thousands of records a second possible. The unit tests compare the two.
    """
    if _plain(value):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
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
