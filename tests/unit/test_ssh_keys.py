"""SSH keys as data: the pinned provider keys, known_hosts parsing, hosts and fingerprints."""

from __future__ import annotations

import re
import subprocess
from importlib import resources

import pytest

from kapsis.ssh.keys import (
    check_key,
    fingerprint,
    host_field,
    parse_host,
    parse_known_hosts,
    parse_known_hosts_line,
    parse_public_key,
)
from kapsis.ssh.providers import pinned

GITHUB_ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
GITHUB_ECDSA = (
    "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNu"
    "G5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg="
)


def test_every_pinned_key_has_the_fingerprint_written_above_it():
    # The comments are the fingerprints the operators publish; a key mistyped in the data file
    # would not hash to them.
    text = (resources.files("kapsis.ssh") / "pinned_known_hosts").read_text()
    pairs = re.findall(r"# (SHA256:\S+).*\n\S+ (\S+) (\S+)", text)
    assert len(pairs) == 9
    for published, key_type, blob in pairs:
        check_key(key_type, blob)
        assert fingerprint(blob) == published, key_type


def test_the_pinned_lists_cover_the_three_providers_with_every_key_type():
    lists = pinned()
    assert sorted(lists) == ["bitbucket.org", "github.com", "gitlab.com"]
    for keys in lists.values():
        assert sorted(key_type for key_type, _ in keys.keys) == [
            "ecdsa-sha2-nistp256",
            "ssh-ed25519",
            "ssh-rsa",
        ]
    assert ("ssh-ed25519", GITHUB_ED25519) in lists["github.com"].keys


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path):
    key_file = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True)
    public = key_file.with_suffix(".pub").read_text()
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(key_file.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert fingerprint(public.split()[1]) == printed


def test_a_known_hosts_line_gives_one_key_per_host():
    keys = parse_known_hosts_line(
        f"git.Corp.example,[git.corp.example]:2222,10.0.0.5 ssh-ed25519 {GITHUB_ED25519} a comment",
        "here",
    )
    assert [key.host for key in keys] == ["git.corp.example", "[git.corp.example]:2222", "10.0.0.5"]
    assert {key.key for key in keys} == {GITHUB_ED25519}
    assert {key.source for key in keys} == {"here"}
    assert keys[0].line() == f"git.corp.example ssh-ed25519 {GITHUB_ED25519}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"@cert-authority *.corp ssh-ed25519 {GITHUB_ED25519}", "not supported"),
        (f"|1|abc=|def= ssh-ed25519 {GITHUB_ED25519}", "hashed"),
        (f"*.corp.example ssh-ed25519 {GITHUB_ED25519}", "patterns"),
        (f"host ssh-dss {GITHUB_ED25519}", "DSA"),
        (f"host ssh-foo {GITHUB_ED25519}", "not an SSH host key type"),
        (f"host ssh-ed25519 {GITHUB_ED25519[:30]}", "cut short"),
        (f"host ecdsa-sha2-nistp256 {GITHUB_ED25519}", "not a ecdsa-sha2-nistp256 key"),
        (f"host ssh-ed25519 {GITHUB_ED25519}!", "base64"),
        ("host ssh-ed25519", "known_hosts line"),
        (f"-oProxyCommand=x ssh-ed25519 {GITHUB_ED25519}", "not a host"),
        (f"user@host ssh-ed25519 {GITHUB_ED25519}", "not a host"),
    ],
)
def test_bad_known_hosts_lines_are_refused_with_the_reason(line, message):
    with pytest.raises(ValueError, match=message):
        parse_known_hosts_line(line, "test")


def test_known_hosts_text_skips_comments_and_names_the_bad_line():
    text = f"# comment\n\ngithub.com ssh-ed25519 {GITHUB_ED25519}\nbroken\n"
    with pytest.raises(ValueError, match="line 4"):
        parse_known_hosts(text, "t")
    assert len(parse_known_hosts(text.replace("broken\n", ""), "t")) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GitHub.com", ("github.com", 22)),
        ("git.corp:2222", ("git.corp", 2222)),
        ("[git.corp]:2222", ("git.corp", 2222)),
        ("203.0.113.2", ("203.0.113.2", 22)),
        ("[2001:db8::1]:2222", ("2001:db8::1", 2222)),
        ("2001:db8::1", ("2001:db8::1", 22)),
    ],
)
def test_hosts_and_ports(text, expected):
    assert parse_host(text) == expected


@pytest.mark.parametrize("text", ["git.corp:0", "git.corp:99999", "-p", "a b", "[x:22", ""])
def test_bad_hosts_are_refused(text):
    with pytest.raises(ValueError):
        parse_host(text)


def test_host_field_brackets_a_port_other_than_22():
    assert host_field("git.corp") == "git.corp"
    assert host_field("git.corp", 2222) == "[git.corp]:2222"
    assert host_field("2001:db8::1", 2222) == "[2001:db8::1]:2222"


def test_a_public_key_may_carry_a_comment():
    assert parse_public_key(f"ecdsa-sha2-nistp256 {GITHUB_ECDSA} me@host") == (
        "ecdsa-sha2-nistp256",
        GITHUB_ECDSA,
    )
    with pytest.raises(ValueError, match="TYPE BASE64"):
        parse_public_key(GITHUB_ECDSA)
