#!/usr/bin/env python3
"""Write ``src/kapsis/agents/builtin/parsed.json``: the built-in agent profiles, pre-parsed.

``kapsis run`` reads a built-in profile from this file instead of parsing its YAML, which saves
importing the YAML parser on every start. Each entry keeps the YAML text it was made from and is
ignored when the file beside it differs, so a stale entry costs speed, never correctness;
``tests/unit/test_profiles_parsed.py`` fails until this script is run again.

Usage::

    python scripts/gen_builtin_profiles.py           # (re)write parsed.json
    python scripts/gen_builtin_profiles.py --check   # exit 1 if parsed.json is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Parse this checkout's profiles, not whatever copy of kapsis happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

from kapsis.agents.profiles import BUILTIN_PARSED, builtin_parsed_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; write nothing")
    args = parser.parse_args()
    wanted = builtin_parsed_text()
    current = BUILTIN_PARSED.read_text(encoding="utf-8") if BUILTIN_PARSED.exists() else ""
    if args.check:
        if current != wanted:
            print(f"{BUILTIN_PARSED} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        BUILTIN_PARSED.write_text(wanted, encoding="utf-8")
        print(f"wrote {BUILTIN_PARSED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
