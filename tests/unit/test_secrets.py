"""Secrets: which are planned from where, how values are found, delivered and redacted."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kapsis.backends.transcript import TranscriptPump, read_transcript
from kapsis.errors import ConfigError
from kapsis.sandbox.secrets_plan import INBOX, SecretPlan
from kapsis.secrets import keychain
from kapsis.secrets.delivery import MANIFEST, SecretWriter, prepare_inbox
from kapsis.secrets.redact import REDACTED, Redactor
from kapsis.secrets.resolve import resolve_secrets

VALUE = "sk-unit-secret-value-42"

KEYCHAIN_CONFIG = """\
environment:
  set:
    API_KEY: plain
    LANG: C
  passthrough: [API_KEY, HOST_TOKEN]
  keychain:
    API_KEY: {service: anthropic, account: [me, default]}
    GH_TOKEN:
      service: github
      account: me
      inject_to_file: /home/agent/.config/gh/hosts.yml
      template: "token: {value}\\n"
"""


def test_keychain_wins_over_passthrough_and_set_and_values_stay_out_of_the_plan(make_plan):
    plan = make_plan(config=KEYCHAIN_CONFIG, environ={"API_KEY": VALUE, "HOST_TOKEN": VALUE})

    by_name = {s.name: s for s in plan.secrets}
    assert [(s.name, s.source) for s in plan.secrets] == [
        ("API_KEY", "keychain"),
        ("GH_TOKEN", "keychain"),
        ("HOST_TOKEN", "passthrough"),
    ]
    assert by_name["API_KEY"].accounts == ("me", "default")
    assert by_name["API_KEY"].origin.endswith(":7")
    assert by_name["GH_TOKEN"].target_file == "/home/agent/.config/gh/hosts.yml"
    assert "API_KEY" not in plan.env  # the secret wins over environment.set
    assert plan.env["LANG"] == "C"
    assert VALUE not in plan.model_dump_json()


def test_a_profile_secret_falls_back_to_the_host_environment(make_plan):
    plan = make_plan(agent="claude", environ={"ANTHROPIC_API_KEY": VALUE})

    assert [(s.name, s.source) for s in plan.secrets] == [("ANTHROPIC_API_KEY", "host-environment")]
    assert plan.secrets[0].origin.startswith("agent profile claude")


def test_a_profile_secret_nobody_provides_is_an_error_saying_how_to_give_it(make_plan):
    with pytest.raises(ConfigError) as caught:
        make_plan(agent="claude", environ={})

    message = str(caught.value)
    assert "agent 'claude' needs the secret ANTHROPIC_API_KEY" in message
    assert "environment.keychain.ANTHROPIC_API_KEY" in message
    assert "export ANTHROPIC_API_KEY" in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("{service: s, account: a, inject_to_file: /etc/token}", "not on a tmpfs"),
        ("{service: s, account: a, inject_to_file: /workspace/t}", "not on a tmpfs"),
        ("{service: s, account: a, inject_to_file: '/home/agent/a b'}", "plain absolute path"),
        ("{service: s, account: a, inject_to_file: /home/agent/../../etc/x}", "plain absolute"),
        ("{service: s, account: a, template: 'x {value}'}", "only used with inject_to_file"),
        ("{service: s, account: []}", "at least one account"),
    ],
)
def test_bad_keychain_entries_are_refused_with_the_line(make_plan, entry, complaint):
    with pytest.raises(ConfigError) as caught:
        make_plan(config=f"environment:\n  keychain:\n    TOKEN: {entry}\n")

    assert complaint in str(caught.value)
    assert ":3: environment.keychain.TOKEN" in str(caught.value)


def _keychain_secret(**fields: object) -> SecretPlan:
    base = {"name": "TOKEN", "source": "keychain", "origin": "cfg.yaml:4", "service": "svc"}
    return SecretPlan.model_validate({**base, "accounts": ("first", "second"), **fields})


def test_resolve_tries_each_account_in_both_stores(monkeypatch):
    asked: list[tuple[str, str, str]] = []

    def keyring_store(service: str, account: str) -> tuple[str | None, str]:
        asked.append(("keyring", service, account))
        return None, "keyring (SecretService)"

    def secret_tool(service: str, account: str) -> tuple[str | None, str]:
        asked.append(("secret-tool", service, account))
        return (VALUE if account == "second" else None), "secret-tool"

    monkeypatch.setattr(keychain, "_from_keyring", keyring_store)
    monkeypatch.setattr(keychain, "_from_secret_tool", secret_tool)

    assert resolve_secrets([_keychain_secret()], environ={}) == {"TOKEN": VALUE}
    assert asked == [
        ("keyring", "svc", "first"),
        ("secret-tool", "svc", "first"),
        ("keyring", "svc", "second"),
        ("secret-tool", "svc", "second"),
    ]


def test_a_missing_keychain_secret_names_the_variable_the_service_and_the_stores(monkeypatch):
    monkeypatch.setattr(keychain, "_from_keyring", lambda s, a: (None, "keyring (SecretService)"))
    monkeypatch.setattr(keychain, "_from_secret_tool", lambda s, a: (None, "secret-tool"))

    with pytest.raises(ConfigError) as caught:
        resolve_secrets([_keychain_secret()], environ={})

    message = str(caught.value)
    assert message.startswith("cfg.yaml:4: environment.keychain.TOKEN: no secret for service 'svc'")
    assert "account 'first' or 'second'" in message
    assert "asked: keyring (SecretService), secret-tool" in message
    assert "secret-tool store --label=TOKEN service svc account first" in message


def test_passthrough_values_come_from_the_environment_at_start():
    secret = SecretPlan(name="HOST_TOKEN", source="passthrough", origin="cfg.yaml:2")

    assert resolve_secrets([secret], environ={"HOST_TOKEN": VALUE}) == {"HOST_TOKEN": VALUE}
    with pytest.raises(ConfigError, match="HOST_TOKEN is no longer set"):
        resolve_secrets([secret], environ={})


def test_redactor_replaces_longest_first_and_ignores_tiny_values():
    redactor = Redactor([VALUE, VALUE[:10], "abc"])

    assert redactor.text(f"a {VALUE} b {VALUE[:10]} abc") == f"a {REDACTED} b {REDACTED} abc"
    assert redactor.value({"k": [VALUE, 1]}) == {"k": [REDACTED, 1]}
    assert not Redactor(["abc"])


def test_the_writer_hands_each_value_to_a_reader_of_its_pipe_then_removes_it(tmp_path):
    secrets = [
        SecretPlan(name="ENV_ONE", source="passthrough", origin="x"),
        _keychain_secret(name="FILE_ONE", target_file="/home/agent/t", template="t={value}\n"),
    ]
    prepare_inbox(tmp_path, secrets, owner=None)
    inbox = tmp_path / INBOX
    assert (inbox / MANIFEST).read_text() == "env ENV_ONE\nfile FILE_ONE /home/agent/t\n"
    assert all(p.is_fifo() for p in (inbox / "ENV_ONE", inbox / "FILE_ONE"))
    received: dict[str, bytes] = {}

    def sandbox_side() -> None:  # what init.sh does: read the pipes in manifest order
        for name in ("ENV_ONE", "FILE_ONE"):
            received[name] = (inbox / name).read_bytes()

    reader = threading.Thread(target=sandbox_side)
    reader.start()
    writer = SecretWriter(tmp_path, secrets, {"ENV_ONE": "one", "FILE_ONE": VALUE}).start()
    assert writer.join(10)
    reader.join(10)

    assert received == {"ENV_ONE": b"one", "FILE_ONE": f"t={VALUE}\n".encode()}
    assert not (inbox / "ENV_ONE").exists() and not (inbox / "FILE_ONE").exists()
    assert VALUE not in "".join(p.read_text() for p in inbox.iterdir() if p.is_file())


def test_the_writer_never_writes_into_a_plain_file_put_in_place_of_its_pipe(tmp_path):
    secret = SecretPlan(name="ENV_ONE", source="passthrough", origin="x")
    prepare_inbox(tmp_path, [secret], owner=None)
    fifo = tmp_path / INBOX / "ENV_ONE"
    fifo.unlink()
    fifo.write_text("")  # a regular file: open(O_NONBLOCK) succeeds, but it is not our pipe

    writer = SecretWriter(tmp_path, [secret], {"ENV_ONE": VALUE}).start()

    assert not writer.join(10)
    assert writer.error is not None


def test_the_transcript_pump_joins_partial_records_before_redacting(tmp_path):
    fifo = tmp_path / "log.fifo"
    transcript = tmp_path / "transcript.log"
    pump = TranscriptPump.open(fifo, transcript, Redactor([VALUE]), echo=False).start()
    half = len(VALUE) // 2
    records = [
        f"T1 stdout P key={VALUE[:half]}\n",  # conmon split the line inside the secret
        f"T2 stdout F {VALUE[half:]} end\n",
        "T3 stderr F plain\n",
        "T4 stdout P no newline at the end\n",
    ]
    with open(fifo, "w") as conmon:
        conmon.write("".join(records))
    pump.finish()

    text = transcript.read_text()
    assert VALUE[:half] not in text and VALUE[half:] not in text
    assert list(read_transcript(transcript)) == [
        f"key={REDACTED} end",
        "plain",
        "no newline at the end",
    ]
    assert text.splitlines()[0].startswith("T2 stdout F ")


def test_a_secret_across_the_cut_of_an_overlong_partial_line_is_still_redacted(tmp_path):
    from kapsis.backends.transcript import MAX_PENDING

    fifo = tmp_path / "log.fifo"
    transcript = tmp_path / "transcript.log"
    pump = TranscriptPump.open(fifo, transcript, Redactor([VALUE]), echo=False).start()
    half = len(VALUE) // 2
    padding = "x" * (MAX_PENDING - half)  # the pump must write this record out unfinished
    with open(fifo, "w") as conmon:
        conmon.write(f"T1 stdout P {padding}{VALUE[:half]}\nT2 stdout F {VALUE[half:]} end\n")
    pump.finish()

    text = transcript.read_text()
    assert VALUE[:half] not in text and VALUE[half:] not in text
    assert list(read_transcript(transcript)) == [f"{padding}{REDACTED} end"]


def test_the_pump_waits_for_a_writer_instead_of_ending_at_once(tmp_path):
    fifo = tmp_path / "log.fifo"
    transcript = tmp_path / "transcript.log"
    pump = TranscriptPump.open(fifo, transcript, Redactor(()), echo=False).start()
    # No writer yet besides the pump's own: the reader must not have seen end-of-file.
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"T1 stdout F late\n")
    os.close(fd)
    pump.finish()

    assert list(read_transcript(transcript)) == ["late"]


def test_init_script_is_shipped_and_valid_sh():
    import shutil
    import subprocess
    from importlib import resources

    script = Path(str(resources.files("kapsis.secrets") / "init.sh"))
    shell = shutil.which("sh")
    assert shell is not None
    assert subprocess.run([shell, "-n", str(script)], check=False).returncode == 0
    assert 'exec "$@"' in script.read_text()


def test_the_transcript_stops_growing_at_its_cap_and_says_how_much_was_cut(tmp_path):
    fifo = tmp_path / "log.fifo"
    transcript = tmp_path / "transcript.log"
    pump = TranscriptPump.open(fifo, transcript, Redactor(()), echo=False)
    pump.max_bytes = 4096
    pump.start()
    line = "x" * 100
    with open(fifo, "w") as conmon:
        for index in range(1000):  # about 130 KB: far past the cap, and conmon is never blocked
            conmon.write(f"T{index} stdout F {line}\n")
    pump.finish()

    text = transcript.read_text()
    assert len(text.encode()) < 4096 + 200
    assert pump.dropped_bytes > 100_000
    assert text.splitlines()[-1].endswith(f"{pump.dropped_bytes} more were dropped]")
    assert "the transcript was cut at 4096 bytes" in text
