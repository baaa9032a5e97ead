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

import gc
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kapsis.audit.chain import GENESIS, record_hash, seal_message
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


class _Entry(NamedTuple):
    seq: int
    hash: bytes
    prev_hash: bytes
    event_type: bytes
    intact: bool
    line: bytes


_HASH_AT = b',"hash":"'
_PREV_AT = b',"prev_hash":"'
_SEQ_AFTER_PREV = b'","seq":'
_EVENT_AT = b',"event_type":"'
_START = b'{"agent_id":"'


def _read_chunk(data: bytes) -> list[_Entry]:
    """Entries of the lines in ``data``. Lines in the writer's canonical form are read by
    position (the top-level hash, prev_hash and seq follow ``detail``, so their last
    occurrences are the top-level ones); anything else is parsed as JSON and judged by its
    content. Only seals keep their line (their signature is checked later)."""
    entries: list[_Entry] = []
    append = entries.append
    sha256 = hashlib.sha256
    new_entry = _Entry._make  # from an iterable: cheaper than NamedTuple's keyword __new__
    for line in data.split(b"\n"):
        at_hash = line.rfind(_HASH_AT)
        at_prev = at_hash + 74
        at_seq = at_prev + 86
        end_seq = line.find(b",", at_seq)
        if (
            at_hash > 0
            and end_seq > at_seq
            and line.startswith(_START)
            and line.startswith(_PREV_AT, at_prev)
            and line.startswith(_SEQ_AFTER_PREV, at_prev + 78)
        ):
            digest = sha256(line[:at_hash])
            digest.update(line[at_prev:])
            stored = line[at_hash + 9 : at_hash + 73]
            digits = line[at_seq:end_seq]
            seq = int(digits) if digits.isdigit() else -1
            # Sorted keys: "event_type" comes right before "hash", so its value ends there.
            at_event = line.rfind(_EVENT_AT, 0, at_hash) + 15
            event = line[at_event : at_hash - 1]
            append(
                new_entry(
                    (
                        seq,
                        stored,
                        line[at_prev + 14 : at_prev + 78],
                        event,
                        seq > 0 and digest.hexdigest().encode() == stored,
                        line if event == _SEAL else b"",
                    )
                )
            )
        elif line.strip():
            append(_parsed(line))
    return entries


def _parsed(line: bytes) -> _Entry:
    """An entry from a line not in canonical form: parse it, judge the content."""
    try:
        record = json.loads(line)
        return _Entry(
            int(record["seq"]),
            str(record["hash"]).encode(),
            str(record.get("prev_hash")).encode(),
            str(record.get("event_type")).encode(),
            record_hash(record) == record["hash"],
            line,
        )
    except (ValueError, KeyError, TypeError):
        return _Entry(-1, b"", b"", b"", False, line)


_SESSION_START, _SESSION_END, _SEAL = (name.encode() for name in (SESSION_START, SESSION_END, SEAL))


def _seal_valid(
    seal: dict[str, Any], head_seq: int, head_hash: bytes, key: Ed25519PublicKey
) -> bool:
    """Whether ``seal`` signs the record before it (``head_seq``, ``head_hash``)."""
    detail = seal.get("detail") or {}
    if detail.get("head_seq") != head_seq or str(detail.get("head_hash")).encode() != head_hash:
        return False
    message = seal_message(str(seal.get("session_id")), head_seq, head_hash.decode())
    return signature_valid(key, message, str(detail.get("signature")))


# The chain is read this much at a time: memory stays flat however long the chain is. A line
# longer than MAX_LINE (no writer makes one: reports are bounded far below it) is read no
# further and counts as a damaged record.
CHUNK = 8 * 1024 * 1024
MAX_LINE = 256 * 1024 * 1024


def _entries(files: list[Path]) -> Iterator[_Entry]:
    """The entries of the chain's lines, streamed from ``files`` in order as one text."""
    carry = b""
    overlong = False
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    if overlong or len(carry) + len(chunk) > MAX_LINE:
                        overlong, carry = True, b""
                    else:
                        carry += chunk
                    continue
                if overlong:
                    yield _Entry(-1, b"", b"", b"", False, b"")
                    overlong, head = False, b""
                else:
                    head = carry + chunk[:cut]
                yield from _read_chunk(head)
                carry = chunk[cut + 1 :]
    if overlong:
        yield _Entry(-1, b"", b"", b"", False, b"")
    elif carry:
        yield from _read_chunk(carry)


def verify(files: list[Path], key: Ed25519PublicKey, *, finished: bool = True) -> VerifyResult:
    """Check a chain spread over ``files`` (in order) against the public ``key``."""
    # Verification allocates a few objects per record and frees none until the end: the cyclic
    # collector would rescan them again and again for nothing (there are no cycles here).
    collecting = gc.isenabled()
    gc.disable()
    try:
        result = _verify_record_by_record(_entries(files), key, finished=finished)
    finally:
        if collecting:
            gc.enable()
    result.files = [str(f) for f in files]
    return result


def _verify_record_by_record(
    entries: Iterator[_Entry], key: Ed25519PublicKey, *, finished: bool
) -> VerifyResult:
    """Walk the chain one record at a time, never holding more than one; names the first
    damage it finds (and counts the records past it)."""
    result = VerifyResult(files=[])
    expected_seq, expected_prev = 1, GENESIS.encode()
    previous: _Entry | None = None
    sealed_through = 0
    last_session_ended = False
    for entry in entries:
        result.records += 1
        if not entry.intact:
            result.damage.append(
                Damage("modified", entry.seq if entry.seq > 0 else expected_seq,
                       "the record does not match its hash")
            )  # fmt: skip
            break
        seq = entry.seq
        if seq < expected_seq:
            # Every number below expected_seq came already, in order: this one is again.
            result.damage.append(Damage("inserted", seq, f"seq {seq} after seq {expected_seq - 1}"))
            break
        if seq > expected_seq:
            later = False
            for after in entries:
                result.records += 1
                later = later or after.seq == expected_seq
            kind: DamageKind = "reordered" if later else "deleted"
            what = "comes later" if kind == "reordered" else "is missing"
            result.damage.append(Damage(kind, expected_seq, f"seq {expected_seq} {what}"))
            break
        if entry.prev_hash != expected_prev:
            # The numbers run on, so the chain alone cannot tell which side changed: seq-1
            # rewritten with its own hash recomputed, or a record removed, added or swapped
            # here with the numbers redone. The break is named where it shows; both are said.
            result.damage.append(
                Damage(
                    "inserted",
                    seq,
                    f"seq {seq} does not link to seq {seq - 1} as it stands: seq {seq - 1} was "
                    f"rewritten, or records were removed, added or swapped here",
                )
            )
            break
        event = entry.event_type
        if event == _SESSION_START:
            result.sessions += 1
            last_session_ended = False
        elif event == _SESSION_END:
            last_session_ended = True
        elif event == _SEAL:
            result.seals += 1
            if previous is None or not _seal_valid(
                json.loads(entry.line), previous.seq, previous.hash, key
            ):
                result.damage.append(
                    Damage("bad_seal", seq, "the seal's signature does not verify with this key")
                )
                break
            sealed_through = seq
        previous = entry
        expected_seq, expected_prev = seq + 1, entry.hash
    if result.damage:
        result.records += sum(1 for _ in entries)
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
