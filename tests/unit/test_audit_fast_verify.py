"""The two ways `verify` walks a chain must agree: the column-at-a-time check of an intact chain
accepts exactly what the record-by-record walk accepts, and gives up on everything it rejects
(the walk then names the damage)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kapsis.audit import AuditLog, rotated_files
from kapsis.audit.keys import signing_key
from kapsis.audit.verification import _verify_intact_chain, _verify_record_by_record

Tamper = Callable[[list[bytes]], list[bytes]]


def chain_bytes(directory: Path, **options: object) -> bytes:
    log = AuditLog("s1", directory=directory, **options)  # type: ignore[arg-type]
    log.record("session_start", project="/p")
    for index in range(30):
        log.record("step", index=index, text=f"événement {index} ✓", ratio=index / 7)
    log.record("step", detail_like={"hash": "0" * 64, "prev_hash": "1" * 64, "seq": 3})
    log.record("session_end", phase="complete")
    return b"".join(path.read_bytes() for path in rotated_files(directory / "s1.jsonl"))


def both(data: bytes, *, finished: bool = True) -> tuple[object, object]:
    key = signing_key().public_key()
    return (
        _verify_intact_chain(data, key, finished=finished),
        _verify_record_by_record(data, key, finished=finished),
    )


@pytest.mark.parametrize(
    "options", [{}, {"seal_every": 4}, {"rotate_bytes": 3000}], ids=["plain", "seals", "rotated"]
)
def test_an_intact_chain_is_accepted_by_both_with_the_same_counts(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    fast, walked = both(chain_bytes(tmp_path, **options))
    assert fast is not None and walked.ok  # type: ignore[attr-defined]
    counted = ("records", "seals", "sessions")
    assert [getattr(fast, name) for name in counted] == [getattr(walked, name) for name in counted]


def _swap(content: list[bytes]) -> list[bytes]:
    content[3], content[4] = content[4], content[3]
    return content


def _retype(content: list[bytes]) -> list[bytes]:
    content[5] = content[5].replace(b'"event_type":"step"', b'"event_type":"seal"')
    return content


def _pretty(content: list[bytes]) -> list[bytes]:
    # The same content in another layout: not canonical, so only the walk may judge it.
    content[2] = json.dumps(json.loads(content[2])).encode() + b"\n"
    return content


TAMPERS: dict[str, Tamper] = {
    "modified": lambda c: [c[0], c[1].replace("✓".encode(), "✗".encode()), *c[2:]],
    "modified-text": lambda c: [*c[:2], c[2].replace(b"nement 1", b"nement 9"), *c[3:]],
    "inserted": lambda c: [*c[:3], c[2], *c[3:]],
    "deleted": lambda c: [*c[:6], *c[7:]],
    "reordered": _swap,
    "truncated": lambda c: c[:-3],
    "event-type-forged": _retype,
}


@pytest.mark.parametrize("name", TAMPERS)
def test_damage_is_never_accepted_by_the_fast_check(
    kapsis_home: Path, tmp_path: Path, name: str
) -> None:
    content = chain_bytes(tmp_path, seal_every=4).splitlines(keepends=True)
    tampered = b"".join(TAMPERS[name](content))
    fast, walked = both(tampered)
    assert not walked.ok  # type: ignore[attr-defined]
    assert fast is None


@pytest.mark.parametrize(
    "change",
    [_pretty, lambda c: [*c[:4], b"\n", *c[4:]]],
    ids=["reformatted-record", "blank-line"],
)
def test_a_harmless_change_in_layout_is_left_to_the_walk(
    kapsis_home: Path, tmp_path: Path, change: Tamper
) -> None:
    content = chain_bytes(tmp_path).splitlines(keepends=True)
    fast, walked = both(b"".join(change(content)))
    assert fast is None
    assert walked.ok  # type: ignore[attr-defined]


def test_seals_by_another_key_are_rejected_by_both(kapsis_home: Path, tmp_path: Path) -> None:
    data = chain_bytes(tmp_path, seal_every=4)
    other = Ed25519PrivateKey.generate().public_key()
    assert _verify_intact_chain(data, other, finished=True) is None
    assert not _verify_record_by_record(data, other, finished=True).ok


def test_an_unfinished_session_is_accepted_only_when_not_expected_to_be_finished(
    kapsis_home: Path, tmp_path: Path
) -> None:
    lines = chain_bytes(tmp_path, seal_every=4).splitlines(keepends=True)
    seals = [i for i, line in enumerate(lines) if b'"event_type":"seal"' in line]
    cut = b"".join(lines[: seals[-2] + 1])  # sealed, but before session_end
    assert both(cut, finished=True)[0] is None
    fast, walked = both(cut, finished=False)
    assert fast is not None and walked.ok  # type: ignore[attr-defined]
