"""The generated docs match the code: config reference, security profiles and exit codes."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from kapsis.config.models import KapsisConfig

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen_docs.py"
REFERENCE = ROOT / "docs" / "config-reference.md"


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key path whose value is not itself a section, e.g. ``resources.memory``."""
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        annotation = info.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            yield from _leaf_paths(annotation, path)
        else:
            yield path


def test_generated_docs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, (
        "generated docs are out of date; run `python scripts/gen_docs.py`\n" + result.stderr
    )


def test_every_config_key_is_in_the_reference() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    paths = list(_leaf_paths(KapsisConfig))
    assert "resources.memory" in paths  # the walk itself works
    missing = [path for path in paths if f"`{path}`" not in text]
    assert not missing, f"keys missing from docs/config-reference.md: {missing}"
