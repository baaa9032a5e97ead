"""Text that came out of a sandbox, made safe to show on the user's terminal.

The agent writes its transcript, names its files and fills its reports: any of it may carry
terminal control sequences (move the cursor and overwrite what Kapsis printed, set the window
title, write the clipboard with OSC 52, hide text) or Unicode direction overrides that make text
read other than it is. :func:`shown` replaces each such character with a visible escape
(``\\x1b``, ``\\u202e``) in one linear pass; the bytes themselves are kept for scripts (``--raw``,
``--json``).
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls; the bidirectional controls; line and paragraph
# separators (a terminal may break the line there).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_KEEPING_NEWLINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character escaped visibly (tabs kept; newlines too when
    ``keep_newlines``)."""
    pattern = _UNSAFE_KEEPING_NEWLINES if keep_newlines else _UNSAFE
    return pattern.sub(_escape, text)
