"""The pre-parsed built-in profiles (``builtin/parsed.json``) stand exactly for their YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.agents import profiles
from kapsis.config.loader import read_yaml_layer

BUILTINS = sorted(profiles.BUILTIN_DIR.glob("*.yaml"))


def test_parsed_json_is_up_to_date() -> None:
    current = profiles.BUILTIN_PARSED.read_text(encoding="utf-8")

    assert current == profiles.builtin_parsed_text(), (
        "builtin/parsed.json is out of date; run `python scripts/gen_builtin_profiles.py`"
    )


@pytest.mark.parametrize("path", BUILTINS, ids=lambda p: p.stem)
def test_parsed_layer_equals_the_yaml_parse(path: Path) -> None:
    parsed = profiles._parsed_builtin(path)
    parsed_from_yaml = read_yaml_layer(path)

    assert parsed == parsed_from_yaml
    # Order matters too: it is the order of a profile's env and of the origins.
    assert list(parsed.origins.items()) == list(parsed_from_yaml.origins.items())
    assert repr(parsed.data) == repr(parsed_from_yaml.data)


def test_an_edited_builtin_is_parsed_from_its_yaml(tmp_path, monkeypatch) -> None:
    builtin_dir = tmp_path / "builtin"
    builtin_dir.mkdir()
    parsed_json = builtin_dir / "parsed.json"
    parsed_json.write_text(profiles.BUILTIN_PARSED.read_text())
    shell = builtin_dir / "shell.yaml"
    shell.write_text((profiles.BUILTIN_DIR / "shell.yaml").read_text())
    monkeypatch.setattr(profiles, "BUILTIN_DIR", builtin_dir)
    monkeypatch.setattr(profiles, "BUILTIN_PARSED", parsed_json)
    assert profiles._parsed_builtin(shell) is not None

    shell.write_text("description: edited\ncommand: [sh, -c, '{task}']\n")

    assert profiles._parsed_builtin(shell) is None
    assert profiles.find_profile("shell").description == "edited"


def test_a_missing_or_broken_parsed_json_falls_back_to_yaml(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(profiles, "BUILTIN_PARSED", tmp_path / "missing.json")
    assert profiles._parsed_builtin(BUILTINS[0]) is None
    assert profiles.find_profile("shell").name == "shell"

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setattr(profiles, "BUILTIN_PARSED", broken)
    assert profiles._parsed_builtin(BUILTINS[0]) is None
    assert profiles.find_profile("shell").name == "shell"
