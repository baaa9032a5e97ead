"""The audit chain: a real session's log, tampered with in every way, must fail verification at
the right sequence number; the intact log must pass. Also seals, keys, rotation and redaction."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kapsis.audit import AuditLog, rotated_files, verify
from kapsis.audit.chain import GENESIS, record_hash
from kapsis.audit.keys import keys_dir, signing_key


def session(directory: Path, events: int = 10, **options: Any) -> Path:
    log = AuditLog("s1", directory=directory, **options)
    log.record("session_start", project="/p")
    for index in range(events):
        log.record("step", index=index, text=f"event {index}")
    log.record("session_end", phase="complete")
    return directory / "s1.jsonl"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def check(path: Path, **options: Any) -> Any:
    return verify(rotated_files(path), signing_key().public_key(), **options)


def test_an_intact_session_verifies(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    result = check(path)
    assert result.ok, result.damage
    assert (result.records, result.seals, result.sessions) == (13, 1, 1)
    records = [json.loads(line) for line in lines(path)]
    assert records[0]["prev_hash"] == GENESIS
    assert all(r["prev_hash"] == p["hash"] for p, r in itertools.pairwise(records))
    # The hash is what the spec says: SHA-256 of the RFC 8785 JSON of the record without it.
    body = {k: v for k, v in records[3].items() if k != "hash"}
    assert records[3]["hash"] == hashlib.sha256(rfc8785.dumps(body)).hexdigest()
    # Each line is the canonical JSON of the whole record.
    assert lines(path)[3].rstrip(b"\n") == rfc8785.dumps(records[3])
    assert {r["session_id"] for r in records} == {records[0]["session_id"]}


def test_a_modified_record_is_named(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    content = lines(path)
    content[4] = content[4].replace(b"event 3", b"event X")
    path.write_bytes(b"".join(content))
    first = check(path).first
    assert (first.kind, first.seq) == ("modified", 5)


def test_a_modified_record_with_a_recomputed_chain_fails_at_the_seal(
    kapsis_home: Path, tmp_path: Path
) -> None:
    # An attacker who rewrites a record and recomputes every hash after it still cannot sign.
    path = session(tmp_path)
    records = [json.loads(line) for line in lines(path)]
    records[4]["detail"]["text"] = "forged"
    previous = records[3]["hash"]
    for record in records[4:]:
        record["prev_hash"] = previous
        if record["event_type"] == "seal":
            record["detail"]["head_hash"] = previous
        record["hash"] = record_hash(record)
        previous = record["hash"]
    path.write_bytes(b"".join(rfc8785.dumps(r) + b"\n" for r in records))
    first = check(path).first
    assert (first.kind, first.seq) == ("bad_seal", 13)


def test_an_inserted_record_is_named(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    content = lines(path)
    forged = json.loads(content[5])
    forged["detail"] = {"index": 99}
    forged["hash"] = record_hash(forged)  # internally consistent, but it does not link
    content.insert(6, rfc8785.dumps(forged) + b"\n")
    path.write_bytes(b"".join(content))
    first = check(path).first
    assert (first.kind, first.seq) == ("inserted", 6)


def test_a_duplicated_record_is_an_insertion(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    content = lines(path)
    content.insert(8, content[2])
    path.write_bytes(b"".join(content))
    first = check(path).first
    assert (first.kind, first.seq) == ("inserted", 3)


def test_a_deleted_record_is_named(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    content = lines(path)
    del content[6]  # seq 7
    path.write_bytes(b"".join(content))
    first = check(path).first
    assert (first.kind, first.seq) == ("deleted", 7)


def test_reordered_records_are_named(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    content = lines(path)
    content[3], content[4] = content[4], content[3]  # seq 4 and 5
    path.write_bytes(b"".join(content))
    first = check(path).first
    assert (first.kind, first.seq) == ("reordered", 4)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_a_truncated_tail_is_named(kapsis_home: Path, tmp_path: Path, cut: int) -> None:
    path = session(tmp_path)
    content = lines(path)
    path.write_bytes(b"".join(content[:-cut]))
    first = check(path).first
    assert first.kind == "truncated"
    assert first.seq == len(content) - cut + 1  # the first record that is missing


def test_a_tail_cut_right_after_a_periodic_seal_lacks_session_end(
    kapsis_home: Path, tmp_path: Path
) -> None:
    path = session(tmp_path, events=10, seal_every=5)
    content = lines(path)
    seals = [i for i, line in enumerate(content) if b'"event_type":"seal"' in line]
    path.write_bytes(b"".join(content[: seals[0] + 1]))  # ends sealed, but mid-session
    assert check(path, finished=True).first.kind == "truncated"
    assert check(path, finished=False).ok  # a session still running has no session_end yet


def test_another_key_does_not_verify_the_seals(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    other = Ed25519PrivateKey.generate().public_key()
    first = verify([path], other).first
    assert (first.kind, first.seq) == ("bad_seal", 13)


def test_seals_every_n_records(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path, events=20, seal_every=5)
    records = [json.loads(line) for line in lines(path)]
    seals = [r for r in records if r["event_type"] == "seal"]
    assert len(seals) >= 4
    for seal in seals:
        head = next(r for r in records if r["seq"] == seal["detail"]["head_seq"])
        assert seal["detail"]["head_hash"] == head["hash"]
    assert check(path).ok


def test_the_chain_continues_across_rotated_files(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path, events=60, rotate_bytes=4000)
    files = rotated_files(path)
    assert len(files) >= 3
    assert files[-1] == path
    first_of_current = json.loads(lines(path)[0])
    assert first_of_current["event_type"] == "continuation"
    assert first_of_current["detail"]["previous_file"] == files[-2].name
    assert first_of_current["prev_hash"] == json.loads(lines(files[-2])[-1])["hash"]
    assert check(path).ok
    # Damage in an older file is still found.
    older = lines(files[0])
    older[2] = older[2].replace(b'"step"', b'"stop"')
    files[0].write_bytes(b"".join(older))
    assert check(path).first.kind == "modified"


def test_a_second_writer_continues_the_same_chain(kapsis_home: Path, tmp_path: Path) -> None:
    # kapsis run writes the start, a detached supervisor the rest: one chain, one session.
    AuditLog("s1", directory=tmp_path).record("session_start")
    later = AuditLog("s1", directory=tmp_path)
    later.record("sandbox_exited", exit_code=0)
    later.record("session_end")
    path = tmp_path / "s1.jsonl"
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert len({r["session_id"] for r in records}) == 1
    assert check(path).ok


def test_log_and_key_are_private_to_the_host_user(kapsis_home: Path, tmp_path: Path) -> None:
    path = session(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key_file = keys_dir() / "audit-ed25519.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir().stat().st_mode) == 0o700
    assert os.stat(key_file).st_uid == os.geteuid()


def test_threads_sealing_and_recording_through_one_log_keep_the_chain_whole(
    kapsis_home: Path, tmp_path: Path
) -> None:
    # The operator seals from one thread while Pod events record from another.
    import threading

    log = AuditLog("s1", directory=tmp_path, rotate_bytes=200_000)
    log.record("session_start")

    def recording() -> None:
        for index in range(1500):
            log.record("step", index=index)

    def sealing() -> None:
        for _ in range(300):
            log.seal()

    threads = [threading.Thread(target=recording), threading.Thread(target=sealing)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.record("session_end")
    result = check(tmp_path / "s1.jsonl")
    assert result.ok, result.damage
    assert len(rotated_files(tmp_path / "s1.jsonl")) > 1  # rotation happened under contention


def test_a_session_end_that_fills_the_file_leaves_a_log_that_verifies(
    kapsis_home: Path, tmp_path: Path
) -> None:
    # Every record fills the file: a rotation after the sealed session_end would leave an
    # unsealed continuation record as the tail, which verifies as cut off.
    log = AuditLog("s1", directory=tmp_path, rotate_bytes=1)
    log.record("session_start")
    log.record("step", index=1)
    log.record("session_end")
    result = check(tmp_path / "s1.jsonl")
    assert result.ok, result.damage
    assert len(rotated_files(tmp_path / "s1.jsonl")) >= 2
    last = json.loads((tmp_path / "s1.jsonl").read_text().splitlines()[-1])
    assert last["event_type"] == "seal"


def test_a_log_given_the_runs_secrets_redacts_every_records_detail(
    kapsis_home: Path, tmp_path: Path
) -> None:
    from kapsis.secrets.redact import Redactor

    secret = "ghp_0123456789abcdefABCDEF"
    message = f"remote: invalid credentials for https://x:{secret}@git.example/r.git"
    redacting = AuditLog("s1", directory=tmp_path, redactor=Redactor([secret]))
    redacting.record("git_push", status="failed", message=message, notes=[{"text": secret}])
    text = (tmp_path / "s1.jsonl").read_text()
    assert secret not in text and "[REDACTED]@git.example" in text
    # Control: without the run's secrets the same record keeps the value.
    plain = AuditLog("s2", directory=tmp_path)
    plain.record("git_push", status="failed", message=message)
    assert secret in (tmp_path / "s2.jsonl").read_text()
