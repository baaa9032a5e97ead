"""What the agent's own output says of how it went, for CLIs whose exit code can lie.

Aider, for one, retries an unreachable model, gives up and exits 0; Claude Code exits 1 with
"API Error: ..." on its last line. Each profile lists the output that means failure
(``failure:``, plain text, never a pattern: the output is the agent's) and whether it counts
after an exit 0 too; the host looks for it in the end of the transcript it wrote itself, after
the agent exited. What is read is bounded (:data:`MAX_READ`) and matched in one pass per sign.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kapsis.agents.profiles import ActivityLine, FailureSign
from kapsis.errors import AgentReportedFailure

# The end of the transcript that is looked through: a CLI says why it gave up last, and a
# sign earlier on (a retry that then went through) means nothing.
MAX_READ = 64 * 1024
TAIL_LINES = 40
MAX_SHOWN = 200
# What is read of the transcript for the lines that report the agent's actions, and how many
# are recorded at most: a run's output is the agent's, as large as it likes.
MAX_ACTIVITY_READ = 8 * 1024 * 1024
MAX_ACTIVITY = 500
MAX_ACTIVITY_LINE = 500
# conmon's k8s-file lines: TIMESTAMP STREAM F|P TEXT.
_LOG_PREFIX = re.compile(r"^\S+ (?:stdout|stderr) [FP] ")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def reported_failure(
    agent: str, transcript: Path, signs: tuple[FailureSign, ...], agent_exit_code: int
) -> AgentReportedFailure | None:
    """The failure the agent's output shows (the first sign found, with the line it is on)."""
    if not any(sign.exit_0_too or agent_exit_code != 0 for sign in signs):
        return None  # no sign that could count: the transcript is not read
    try:
        with transcript.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - MAX_READ))
            text = log.read(MAX_READ).decode("utf-8", "replace")
    except OSError:
        return None
    return failure_in(agent, text, signs, agent_exit_code)


def failure_in(
    agent: str,
    text: str,
    signs: tuple[FailureSign, ...],
    agent_exit_code: int,
    *,
    show_line: bool = True,
) -> AgentReportedFailure | None:
    """The failure the end of ``text`` (the agent's output, a transcript's or a Pod log's
    lines) shows; only its last :data:`TAIL_LINES` lines are looked through. Without
    ``show_line`` the message names the sign, not the agent's line (which may hold a secret
    where nothing can redact it)."""
    if agent_exit_code == 0:
        signs = tuple(sign for sign in signs if sign.exit_0_too)
    text = "\n".join(text[-MAX_READ:].rstrip("\n").split("\n")[-TAIL_LINES:])
    for sign in signs:
        at = text.rfind(sign.output)
        if at < 0:
            continue
        if not show_line:
            said = f"{agent} {sign.reason} (its output says {sign.output.strip()!r})"
            return AgentReportedFailure(said, agent_exit_code)
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        line = _LOG_PREFIX.sub("", text[start : end if end >= 0 else len(text)]).strip()
        shown = _UNPRINTABLE.sub("?", line)[:MAX_SHOWN]
        return AgentReportedFailure(f"{agent} {sign.reason}: {shown}", agent_exit_code)
    return None


def reported_activity(
    transcript: Path, lines: tuple[ActivityLine, ...]
) -> tuple[list[tuple[str, str]], bool]:
    """(tool, line) for each transcript line that reports an action, in order, and whether
    more were left out (past :data:`MAX_ACTIVITY`, or past what is read). The signs are looked
    for with ``bytes.find`` over what was read, never line by line in Python: a transcript of
    millions of empty lines costs milliseconds."""
    if not lines:
        return [], False
    try:
        with transcript.open("rb") as log:
            data = log.read(MAX_ACTIVITY_READ + 1)
    except OSError:
        return [], False
    cut = len(data) > MAX_ACTIVITY_READ
    data = data[:MAX_ACTIVITY_READ]
    found: list[tuple[int, str, str]] = []  # (where the line starts, tool, line)
    for entry in lines:
        sign, of_this_sign = entry.starts_with.encode(), 0
        at = data.find(sign)
        # The first MAX_ACTIVITY + 1 of each sign hold the first MAX_ACTIVITY of all of them.
        while at >= 0 and of_this_sign <= MAX_ACTIVITY:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            raw = data[start : end if end >= 0 else len(data)][: 4 * MAX_ACTIVITY_LINE]
            text = _LOG_PREFIX.sub("", raw.decode("utf-8", "replace")).strip()
            if text.startswith(entry.starts_with):
                found.append((start, entry.tool, _UNPRINTABLE.sub("?", text)[:MAX_ACTIVITY_LINE]))
                of_this_sign += 1
            at = data.find(sign, end if end >= 0 else len(data))
    found.sort(key=lambda item: item[0])
    kept = [(tool, text) for _, tool, text in dict.fromkeys(found)][:MAX_ACTIVITY]
    return kept, cut or len(found) > MAX_ACTIVITY
