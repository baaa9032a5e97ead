"""Verification of chains with the less common content: non-ASCII text, floats, a detail whose
keys mimic the record's own (a nested ``hash``), periodic seals and rotation; and damage of
every kind in such a chain, which must be named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kapsis.audit import AuditLog, rotated_files, verify
from kapsis.audit.keys import signing_key

Tamper = Callable[[list[bytes]], list[bytes]]


def chain(directory: Path, **options: object) -> list[Path]:
    log = AuditLog("s1", directory=directory, **options)  # type: ignore[arg-type]
    log.record("session_start", project="/p")
    for index in range(30):
        log.record("step", index=index, text=f"événement {index} ✓", ratio=index / 7)
    log.record("step", detail_like={"hash": "0" * 64, "prev_hash": "1" * 64, "seq": 3})
    log.record("session_end", phase="complete")
    return rotated_files(directory / "s1.jsonl")


def check(files: list[Path], **options: bool) -> object:
    return verify(files, signing_key().public_key(), **options)


@pytest.mark.parametrize(
    "options", [{}, {"seal_every": 4}, {"rotate_bytes": 3000}], ids=["plain", "seals", "rotated"]
)
def test_an_intact_chain_with_unusual_content_verifies(
    kapsis_home: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    result = check(chain(tmp_path, **options))
    assert result.ok, result.damage  # type: ignore[attr-defined]
    assert result.records >= 33 and result.sessions == 1  # type: ignore[attr-defined]


def _swap(content: list[bytes]) -> list[bytes]:
    content[3], content[4] = content[4], content[3]
    return content


def _retype(content: list[bytes]) -> list[bytes]:
    content[5] = content[5].replace(b'"event_type":"step"', b'"event_type":"seal"')
    return content


def _pretty(content: list[bytes]) -> list[bytes]:
    # The same content in another layout: still the same record.
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


def _rewrite(files: list[Path], change: Tamper) -> None:
    [path] = files
    path.write_bytes(b"".join(change(path.read_bytes().splitlines(keepends=True))))


@pytest.mark.parametrize("name", TAMPERS)
def test_damage_of_every_kind_is_caught(kapsis_home: Path, tmp_path: Path, name: str) -> None:
    files = chain(tmp_path, seal_every=4)
    _rewrite(files, TAMPERS[name])
    assert not check(files).ok  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change", [_pretty, lambda c: [*c[:4], b"\n", *c[4:]]], ids=["reformatted", "blank-line"]
)
def test_a_harmless_change_in_layout_still_verifies(
    kapsis_home: Path, tmp_path: Path, change: Tamper
) -> None:
    files = chain(tmp_path)
    _rewrite(files, change)
    assert check(files).ok  # type: ignore[attr-defined]


def test_seals_by_another_key_are_rejected(kapsis_home: Path, tmp_path: Path) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    assert not verify(chain(tmp_path, seal_every=4), other).ok


def test_an_unfinished_session_verifies_only_when_not_expected_to_be_finished(
    kapsis_home: Path, tmp_path: Path
) -> None:
    files = chain(tmp_path, seal_every=4)
    lines = files[0].read_bytes().splitlines(keepends=True)
    seals = [i for i, line in enumerate(lines) if b'"event_type":"seal"' in line]
    files[0].write_bytes(b"".join(lines[: seals[-2] + 1]))  # sealed, but before session_end
    assert not check(files, finished=True).ok  # type: ignore[attr-defined]
    assert check(files, finished=False).ok  # type: ignore[attr-defined]
