"""Verify an audit chain: every hash, every link, every seal, and that the end is sealed.

Damage is named by kind and by the first sequence number where it shows:

* ``modified``: a record's content does not match its hash (or the line is not JSON);
* ``inserted``: a record that does not belong in the chain (a duplicate, or a forged link);
* ``deleted``: a sequence number is missing;
* ``reordered``: a record appears out of order;
* ``bad_seal``: a seal whose signature or head does not match;
* ``truncated``: the end is not covered by a seal, or a finished session has no session_end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kapsis.audit.chain import GENESIS, line_hash, record_hash, seal_message
from kapsis.audit.keys import signature_valid
from kapsis.audit.log import SEAL, SESSION_END, SESSION_START

DamageKind = Literal["modified", "inserted", "deleted", "reordered", "bad_seal", "truncated"]


@dataclass(frozen=True)
class Damage:
    kind: DamageKind
    seq: int
    detail: str


@dataclass
class VerifyResult:
    files: list[str]
    records: int = 0
    seals: int = 0
    sessions: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def first(self) -> Damage | None:
        return min(self.damage, key=lambda d: d.seq) if self.damage else None


@dataclass
class _Entry:
    position: int
    seq: int
    record: dict[str, Any] | None
    intact: bool


def _read(files: list[Path]) -> list[_Entry]:
    entries: list[_Entry] = []
    for file in files:
        with file.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                position = len(entries)
                try:
                    record = json.loads(line)
                    seq = int(record["seq"])
                except (ValueError, KeyError, TypeError):
                    entries.append(_Entry(position, -1, None, False))
                    continue
                hashes = line_hash(line)
                intact = hashes is not None and hashes[0] == hashes[1]
                if not intact and isinstance(record, dict) and "hash" in record:
                    # Not the writer's canonical bytes: judge the content, not the formatting.
                    intact = record_hash(record) == record["hash"]
                entries.append(_Entry(position, seq, record, intact))
    return entries


def verify(files: list[Path], key: Ed25519PublicKey, *, finished: bool = True) -> VerifyResult:
    """Check a chain spread over ``files`` (in order) against the public ``key``."""
    result = VerifyResult(files=[str(f) for f in files])
    entries = _read(files)
    result.records = len(entries)
    seen: dict[int, str] = {}
    later = {entry.seq for entry in entries}
    expected_seq, expected_prev = 1, GENESIS
    previous: dict[str, Any] | None = None
    sealed_through = 0
    last_session_ended = False
    for entry in entries:
        record = entry.record
        if record is None or not entry.intact:
            result.damage.append(
                Damage("modified", entry.seq if entry.seq > 0 else expected_seq,
                       "the record does not match its hash")
            )  # fmt: skip
            break
        seq, prev = entry.seq, record.get("prev_hash")
        if seq < expected_seq:
            kind: DamageKind = "inserted" if seq in seen else "reordered"
            result.damage.append(Damage(kind, seq, f"seq {seq} after seq {expected_seq - 1}"))
            break
        if seq > expected_seq:
            kind = "reordered" if expected_seq in later else "deleted"
            what = "comes later" if kind == "reordered" else "is missing"
            result.damage.append(Damage(kind, expected_seq, f"seq {expected_seq} {what}"))
            break
        if prev != expected_prev:
            result.damage.append(
                Damage("inserted", seq, "the record does not link to the one before it")
            )
            break
        seen[seq] = record["hash"]
        later.discard(seq)
        event = record.get("event_type")
        if event == SESSION_START:
            result.sessions += 1
            last_session_ended = False
        elif event == SESSION_END:
            last_session_ended = True
        elif event == SEAL:
            result.seals += 1
            detail = record.get("detail") or {}
            head_ok = previous is not None and (
                detail.get("head_seq") == previous["seq"]
                and detail.get("head_hash") == previous["hash"]
            )
            message = seal_message(
                str(record.get("session_id")), int(detail.get("head_seq", -1)),
                str(detail.get("head_hash")),
            )  # fmt: skip
            if not head_ok or not signature_valid(key, message, str(detail.get("signature"))):
                result.damage.append(
                    Damage("bad_seal", seq, "the seal's signature does not verify with this key")
                )
                break
            sealed_through = seq
        previous = record
        expected_seq, expected_prev = seq + 1, record["hash"]
    if result.damage:
        return result
    last_seq = expected_seq - 1
    if last_seq and sealed_through != last_seq:
        result.damage.append(
            Damage("truncated", last_seq + 1,
                   f"the log ends at seq {last_seq}, but its last seal covers only "
                   f"{sealed_through or 'nothing'}: the tail was cut off or never sealed")
        )  # fmt: skip
    elif finished and result.sessions and not last_session_ended:
        result.damage.append(
            Damage("truncated", last_seq + 1,
                   f"the session ends at seq {last_seq} without session_end: the tail is missing")
        )  # fmt: skip
    return result
