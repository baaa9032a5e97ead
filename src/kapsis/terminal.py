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
import unicodedata

# Candidates: anything but printable ASCII and tab. Which of them are escaped is decided by
# their Unicode category, so ordinary text in any script passes, in one linear pass.
_CANDIDATE = re.compile("[^\x20-\x7e\t]")
_CANDIDATE_KEEPING_NEWLINES = re.compile("[^\x20-\x7e\t\n]")
# Controls (C0, DEL, C1), format characters (direction overrides, zero-width and tag
# characters, which hide or reorder text), lone surrogates, line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control or format character escaped visibly (tabs kept; newlines
    too when ``keep_newlines``)."""
    pattern = _CANDIDATE_KEEPING_NEWLINES if keep_newlines else _CANDIDATE
    return pattern.sub(_escape, text)
