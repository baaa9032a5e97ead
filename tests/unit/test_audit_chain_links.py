"""The verifier's link check (each record's ``prev_hash`` must be the hash of the record before
it): a middle record rewritten with only its own hash recomputed, deleted, or swapped with its
neighbour, in a sealed chain, must fail verification. The seals sign only the head of the chain,
so for a forger who recomputes each touched record's own hash the link is the only thing left
that ties a record to the ones after it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from kapsis.audit import AuditLog, Damage, rotated_files, verify
from kapsis.audit.chain import record_hash
from kapsis.audit.keys import signing_key

Record = dict[str, Any]

# AuditLog options: one seal at the end, or a seal every few records.
CHAINS = [pytest.param({}, id="end-seal"), pytest.param({"seal_every": 4}, id="periodic-seals")]


def session(directory: Path, **options: Any) -> Path:
    log = AuditLog("s1", directory=directory, **options)
    log.record("session_start", project="/p")
    for index in range(12):
        log.record("step", index=index, text=f"event {index}")
    log.record("session_end", phase="complete")
    return directory / "s1.jsonl"


def read(path: Path) -> list[Record]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def write(path: Path, records: list[Record]) -> None:
    path.write_bytes(b"".join(rfc8785.dumps(record) + b"\n" for record in records))


def first_damage(path: Path) -> Damage | None:
    return verify(rotated_files(path), signing_key().public_key()).first


def unsealed_middle(records: list[Record]) -> int:
    """The index of a step record in the middle of the chain that no seal names as its head,
    and whose successor is not a seal either: rewriting it touches no signature."""
    heads = {r["detail"]["head_seq"] for r in records if r["event_type"] == "seal"}
    for index in range(len(records) // 2, len(records) - 2):
        record, following = records[index], records[index + 1]
        if (
            record["event_type"] == "step"
            and following["event_type"] == "step"
            and record["seq"] not in heads
            and following["seq"] not in heads
        ):
            return index
    raise AssertionError("no unsealed middle record in the test chain")


def reseq(record: Record, seq: int) -> Record:
    """``record`` renumbered to ``seq``, its own hash recomputed, its prev_hash left alone."""
    changed = {**record, "seq": seq}
    changed["hash"] = record_hash(changed)
    return changed


@pytest.mark.parametrize("options", CHAINS)
def test_the_untouched_chain_verifies(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    path = session(tmp_path, **options)
    result = verify(rotated_files(path), signing_key().public_key())
    assert result.ok, result.damage
    assert result.records == len(read(path))
    # Rewriting the file in the test's own canonical form changes nothing.
    write(path, read(path))
    assert first_damage(path) is None


@pytest.mark.parametrize("options", CHAINS)
def test_a_middle_record_rewritten_with_its_own_hash_recomputed_is_caught(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    path = session(tmp_path, **options)
    records = read(path)
    index = unsealed_middle(records)
    forged = records[index]
    forged["detail"] = {**forged["detail"], "text": "forged"}
    forged["hash"] = record_hash(forged)
    write(path, records)
    # The forged record is consistent in itself and links to the one before it: only the next
    # record's prev_hash (the old hash) shows the change, so that is where the break is named.
    assert forged["prev_hash"] == records[index - 1]["hash"]
    damage = first_damage(path)
    assert damage is not None, "a rewritten middle record verified"
    assert (damage.kind, damage.seq) == ("inserted", forged["seq"] + 1)
    # The report names the rewritten record as a cause, not only the one after it.
    assert f"seq {forged['seq']} was rewritten" in damage.detail


@pytest.mark.parametrize("options", CHAINS)
def test_a_deleted_middle_record_is_caught(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    path = session(tmp_path, **options)
    records = read(path)
    index = unsealed_middle(records)
    gone = records.pop(index)  # the following record's prev_hash is left alone
    write(path, records)
    damage = first_damage(path)
    assert damage is not None
    assert (damage.kind, damage.seq) == ("deleted", gone["seq"])


@pytest.mark.parametrize("options", CHAINS)
def test_a_deleted_middle_record_with_the_rest_renumbered_is_caught_at_the_gap(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    # The sequence numbers close up again (each later record renumbered and its own hash
    # recomputed), so the gap shows only in the link of the record that now follows.
    path = session(tmp_path, **options)
    records = read(path)
    index = unsealed_middle(records)
    gone = records.pop(index)
    records[index:] = [reseq(r, r["seq"] - 1) for r in records[index:]]
    write(path, records)
    damage = first_damage(path)
    assert damage is not None
    assert (damage.kind, damage.seq) == ("inserted", gone["seq"])


def _swap(records: list[Record], index: int) -> None:
    records[index], records[index + 1] = records[index + 1], records[index]


def _swap_renumbered(records: list[Record], index: int) -> None:
    # Each takes the other's place and number, with its own hash recomputed: the sequence
    # numbers read 1, 2, 3 ... again, and no seal names either record.
    first, second = records[index], records[index + 1]
    records[index], records[index + 1] = reseq(second, first["seq"]), reseq(first, second["seq"])


@pytest.mark.parametrize("options", CHAINS)
@pytest.mark.parametrize(
    ("swap", "kind"),
    [(_swap, "reordered"), (_swap_renumbered, "inserted")],
    ids=["as-written", "renumbered"],
)
def test_two_swapped_records_are_caught(
    kapsis_home: Path,
    tmp_path: Path,
    options: dict[str, int],
    swap: Callable[[list[Record], int], None],
    kind: str,
) -> None:
    path = session(tmp_path, **options)
    records = read(path)
    index = unsealed_middle(records)
    seq = records[index]["seq"]
    swap(records, index)
    write(path, records)
    damage = first_damage(path)
    assert damage is not None, "two swapped records verified"
    assert (damage.kind, damage.seq) == (kind, seq)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_the_chain_is_read_in_chunks_with_the_same_verdicts(
    kapsis_home: Path, tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read a few bytes at a time (lines cut anywhere), the chain verifies as read whole, and
    its damage is named the same: the reader never holds more than a chunk and a line."""
    from kapsis.audit import verification

    path = session(tmp_path, seal_every=4)
    records = read(path)
    whole = verify(rotated_files(path), signing_key().public_key())
    monkeypatch.setattr(verification, "CHUNK", chunk)
    chunked = verify(rotated_files(path), signing_key().public_key())
    assert chunked.ok and chunked.records == whole.records == len(records)
    index = unsealed_middle(records)
    records[index] = {**records[index], "detail": {"index": 99, "text": "rewritten"}}
    write(path, records)
    damage = first_damage(path)
    assert damage is not None and damage.kind == "modified"
    assert damage.seq == records[index]["seq"]


def test_a_line_longer_than_any_record_is_damage_and_never_held_whole(
    kapsis_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kapsis.audit import verification

    path = session(tmp_path)
    records = read(path)
    monkeypatch.setattr(verification, "CHUNK", 256)
    monkeypatch.setattr(verification, "MAX_LINE", 4096)
    held: list[int] = []
    real = verification._read_chunk
    monkeypatch.setattr(
        verification, "_read_chunk", lambda data: held.append(len(data)) or real(data)
    )
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + b"x" * 100_000 + b"\n" + b"".join(lines[3:]))
    result = verify(rotated_files(path), signing_key().public_key())
    assert result.first is not None and result.first.kind == "modified"
    assert result.first.seq == records[3]["seq"]
    assert max(held) <= 4096 + 256
