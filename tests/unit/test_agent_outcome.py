"""A CLI whose exit code lies: its profile's failure signs, looked for in the end of the
transcript the host wrote; and its own state files, never committed unless asked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kapsis.agents import find_profile
from kapsis.agents.profiles import FailureSign
from kapsis.errors import ExitCode
from kapsis.sandbox.agent_outcome import MAX_READ, TAIL_LINES, reported_failure

SIGNS = (
    FailureSign(
        output="litellm.APIConnectionError", reason="could not reach its model", exit_0_too=True
    ),
)
GAVE_UP = "litellm.APIConnectionError: OpenAIException - Connection error."


def transcript(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "agent.log"
    path.write_text("".join(f"2026-12-07T10:00:00.0+00:00 stdout F {line}\n" for line in lines))
    return path


def test_a_sign_at_the_end_fails_the_run_with_the_reason_and_the_line(tmp_path: Path) -> None:
    log = transcript(tmp_path, "Aider v0.86.2", "Retrying in 0.2 seconds...", GAVE_UP)

    failure = reported_failure("aider", log, SIGNS, 0)

    assert failure is not None
    assert failure.error_type == "agent_error" and failure.exit_code == ExitCode.AGENT_FAILED
    assert str(failure) == f"aider could not reach its model: {GAVE_UP}"
    assert failure.agent_exit_code == 0


def test_control_a_clean_end_is_no_failure(tmp_path: Path) -> None:
    log = transcript(tmp_path, "Aider v0.86.2", "Applied edit to hello.txt")
    assert reported_failure("aider", log, SIGNS, 0) is None


def test_a_sign_for_a_failed_exit_only_explains_one_and_never_fails_an_exit_0(
    tmp_path: Path,
) -> None:
    """Claude Code's exit code is honest: its signs say why it failed, nothing more. A
    successful run whose last output quotes the text stays successful."""
    sign = FailureSign(output="API Error:", reason="could not reach its model")
    log = transcript(tmp_path, "API Error: Connection refused (ECONNREFUSED)")

    assert reported_failure("claude", log, (sign,), 0) is None
    failure = reported_failure("claude", log, (sign,), 1)
    assert failure is not None and failure.agent_exit_code == 1
    assert str(failure) == (
        "claude could not reach its model: API Error: Connection refused (ECONNREFUSED)"
    )


def test_a_sign_the_cli_got_past_long_before_its_end_is_no_failure(tmp_path: Path) -> None:
    """A retry that went through: what the CLI said last is what counts."""
    log = transcript(tmp_path, GAVE_UP, *(f"edit {n}" for n in range(TAIL_LINES)))
    assert reported_failure("aider", log, SIGNS, 0) is None


def test_the_line_shown_is_bounded_and_printable(tmp_path: Path) -> None:
    log = transcript(tmp_path, GAVE_UP + " \x1b]0;title\x07" + "x" * 5000)
    failure = reported_failure("aider", log, SIGNS, 0)
    assert failure is not None
    assert "\x1b" not in str(failure) and "\x07" not in str(failure)
    assert len(str(failure)) < 300


def test_only_the_end_of_a_huge_transcript_is_read(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    with path.open("wb") as log:
        log.write(GAVE_UP.encode() + b"\n")
        log.write(b"y" * (4 * MAX_READ))  # one endless line after it
    assert reported_failure("aider", path, SIGNS, 0) is None


def test_no_transcript_or_no_signs_is_no_failure(tmp_path: Path) -> None:
    assert reported_failure("aider", tmp_path / "missing.log", SIGNS, 0) is None
    assert reported_failure("aider", transcript(tmp_path, GAVE_UP), (), 0) is None


def test_aider_says_how_it_fails_and_which_files_are_its_own(tmp_path: Path) -> None:
    """What Aider 0.86.2 printed last against an unreachable endpoint, wrapped as it wraps."""
    aider = find_profile("aider")
    signs = tuple(aider.failure)
    log = transcript(
        tmp_path,
        "Retrying in 32.0 seconds...",
        "litellm.InternalServerError: InternalServerError: OpenAIException - Connection ",
        "error.",
        "The API provider's servers are down or overloaded.",
    )
    failure = reported_failure("aider", log, signs, 0)
    assert failure is not None and str(failure).startswith("aider could not reach its model")
    assert ".aider*" in aider.state_files


@pytest.mark.parametrize(("setting", "expected"), [("", (".aider*",)), ("true", ())])
def test_the_cli_state_files_are_left_out_unless_asked(
    make_plan, project: Path, setting: str, expected: tuple[str, ...]
) -> None:
    identity = ["-c", "user.name=U", "-c", "user.email=u@example.test"]
    for step in (["init", "-q"], [*identity, "add", "-A"], [*identity, "commit", "-qm", "one"]):
        subprocess.run(["git", "-C", str(project), *step], check=True, capture_output=True)
    config = "git:\n  committer: U <u@example.test>\n"
    config += f"  commit_agent_state: {setting}\n" if setting else ""
    plan = make_plan(agent="aider", config=config, environ={"OPENAI_API_KEY": "k"})
    assert plan.git.repository and plan.git.state_files == expected
    assert plan.agent_failure == tuple(find_profile("aider").failure)


def test_aiders_printed_actions_are_its_reports_bounded(tmp_path: Path) -> None:
    from kapsis.sandbox.agent_outcome import MAX_ACTIVITY, reported_activity

    lines = tuple(find_profile("aider").activity)
    log = transcript(
        tmp_path,
        "Aider v0.86.2",
        "hello.txt",
        "Applied edit to hello.txt",
        "Commit ef8165a Add hello.txt \x1b[31m",
        "Tokens: 767 sent, 15 received.",
    )
    assert reported_activity(log, lines) == (
        [("Edit", "Applied edit to hello.txt"), ("Commit", "Commit ef8165a Add hello.txt ?[31m")],
        False,
    )
    assert reported_activity(log, ()) == ([], False)  # control: a profile that lists none

    flood = transcript(tmp_path, *(f"Applied edit to f{n}" for n in range(MAX_ACTIVITY + 5)))
    found, cut = reported_activity(flood, lines)
    assert len(found) == MAX_ACTIVITY and cut
