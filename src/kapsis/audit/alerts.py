"""Alerts: rules evaluated by the host on the live audit stream of one session.

Each rule looks at the records as they are appended (the agent's reported commands and tool use,
already redacted) and raises an alert with a severity. Alerts go to
``~/.kapsis/audit/AGENT_ID.alerts.jsonl``, into the audit chain itself (event ``alert``, source
``host``) and into the status. :data:`RULES` names each rule, its severity and what fires it
(the README's table lists the same).

The commands come from the agent, so no rule may backtrack catastrophically: ``rm`` is judged on
the command's words in one pass (over at most :data:`MAX_COMMAND`), and the patterns have no
nested or adjacent ambiguous repetition; the few that may rescan a word read at most
:data:`MAX_PATTERN_INPUT`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Severity = Literal["medium", "high"]
CREDENTIAL_WINDOW_SECONDS = 120.0
# What of a command the rules read (a longer one is judged on its start; a report line is at
# most 16 KiB): the word rules all of it in one pass; the patterns (some of which may rescan a
# word, at worst in quadratic time) read it in windows of MAX_PATTERN_INPUT that overlap by
# WINDOW_OVERLAP, so no window costs more than before and a match of under WINDOW_OVERLAP
# characters is found wherever it lies.
MAX_COMMAND = 64 * 1024
MAX_PATTERN_INPUT = 8 * 1024
WINDOW_OVERLAP = 1024


def _windows(command: str) -> list[str]:
    text = command[:MAX_COMMAND]
    step = MAX_PATTERN_INPUT - WINDOW_OVERLAP
    last = max(len(text) - MAX_PATTERN_INPUT, 0)
    return [text[start : start + MAX_PATTERN_INPUT] for start in range(0, last + step, step)]


def _found(pattern: re.Pattern[str], windows: list[str]) -> bool:
    return any(pattern.search(window) for window in windows)


_SENSITIVE = re.compile(
    r"(~|\$HOME|/home/\w+|/root)?/?\.ssh\b|\.aws\b|(^|[\s/'\"])\.env\b|\bid_(rsa|ed25519|ecdsa)"
    r"|\.netrc\b|\.git-credentials\b|/etc/shadow\b|keychain|\.gnupg\b|\.kube/config\b"
)
_NETWORK_TOOL = re.compile(r"\b(curl|wget|nc|ncat|ssh|scp|rsync|http)\b")
_URL_HOST = re.compile(r"\b(?:https?|ftp)://([^/\s:'\"]+)|@([A-Za-z0-9.-]+\.[A-Za-z]{2,}):")
# Where a simple command ends: the rules look at each one on its own.
_COMMAND_SEPARATORS = re.compile(r"[;&|\n()`]|\$\(")
# Words that run the command after them (with their own options) and can be looked through.
_WRAPPERS = frozenset({"sudo", "doas", "env", "command", "builtin", "exec", "nohup", "nice",
                       "time", "xargs", "timeout", "stdbuf", "ionice"})  # fmt: skip
# rm -r of these is the whole of something: the root, a home, the workspace, the directory.
_WHOLE_TREES = frozenset({
    "/", "/*", "~", "~/", "~/*", "*", ".*", ".", "./", "./*", "..", "../", "../*",
    "$HOME", "$HOME/", "$HOME/*", "${HOME}", "${HOME}/", "${HOME}/*",
    "/workspace", "/workspace/", "/workspace/*", "/home", "/home/", "/root", "/root/",
})  # fmt: skip
_HOME_DIR = re.compile(r"/home/[^/\s]+/?")
_GIT_CLEAN_X = re.compile(r"\bgit\s+clean\s+-[a-zA-Z]*x")
_FIND_DELETE = re.compile(r"\bfind\s[^;&|]*\s-delete\b")
_GATEWAY = re.compile(
    r"\bnft\s|\biptables\b|\bip6?tables\b|\bip\s+(-\d\s+)?(route|link|addr)\s+(del|add|flush|set)"
    r"|\b(pkill|killall)\s+(-\d+\s+)?(dnsmasq|dnsdist|haproxy)"
    # Writing resolv.conf (reading it is harmless): a redirection, tee, or an in-place edit.
    r"|>\s*/etc/resolv\.conf|\btee\s[^;&|]*/etc/resolv\.conf|\bsed\s[^;&|]*-i[^;&|]*/etc/resolv\.conf"
    r"|\b(cp|mv|ln|install)\s[^;&|]*\s/etc/resolv\.conf\s*($|[;&|])"
)
_PIPE_TO_SHELL = re.compile(r"\b(curl|wget)\b[^|]*\|\s*(sudo\s+)?(ba|z|da)?sh\b")
# A shell's trace shows a pipeline as its commands one by one: a download, then a bare shell.
_DOWNLOAD = re.compile(r"^(curl|wget)\b")
_BARE_SHELL = re.compile(r"^(sudo\s+)?(ba|z|da)?sh(\s+-s)?\s*$")
_HISTORY = re.compile(
    r"\bhistory\s+-c\b|\bunset\s+HISTFILE\b|(rm|truncate|>)\s*[^|;&]*\.(bash|zsh)_history"
)


RULES: dict[str, tuple[Severity, str]] = {
    "sensitive_path": (
        "medium",
        "a command touching ~/.ssh, .aws, .env, private keys, keychains, .netrc, "
        ".git-credentials or /etc/shadow",
    ),
    "credential_exfiltration": (
        "high",
        "a network command to a host outside the package registries within "
        f"{CREDENTIAL_WINDOW_SECONDS:.0f} s after a sensitive_path access",
    ),
    "mass_deletion": (
        "high",
        "rm -r of /, a home (~, $HOME, /home/NAME, /root), *, . or .. or the whole workspace "
        "(also behind sudo, env, timeout ...); git clean -x; find ... -delete",
    ),
    "gateway_tampering": (
        "high",
        "commands aimed at the network gateway: nft, iptables, ip route/link/addr changes, "
        "killing dnsmasq, dnsdist or haproxy, writing /etc/resolv.conf",
    ),
    "pipe_to_shell": (
        "high",
        "curl or wget output piped into a shell, from a host outside the package registries",
    ),
    "history_wiping": (
        "medium",
        "history -c, unset HISTFILE, removing or emptying a shell history file",
    ),
}


@dataclass(frozen=True)
class Alert:
    rule: str
    severity: Severity
    seq: int
    message: str
    evidence: str


def _unquoted(word: str) -> str:
    return word.replace("'", "").replace('"', "")


def _deletes_a_whole_tree(command: str) -> bool:
    """Whether a simple command of ``command`` is ``rm -r`` of a whole tree (see _WHOLE_TREES),
    looked through sudo, env and the like. Linear: one pass over the words."""
    for simple in _COMMAND_SEPARATORS.split(command):
        words = [_unquoted(word) for word in simple.split()]
        while words and (words[0] in _WRAPPERS or "=" in words[0] or words[0].startswith("-")):
            words.pop(0)  # a wrapper, its options, VAR=value
            while words and (words[0].startswith("-") or words[0].isdigit()):
                words.pop(0)
        if not words or words[0].rsplit("/", 1)[-1] != "rm":
            continue
        recursive, targets, options_end = False, [], False
        for word in words[1:]:
            if not options_end and word == "--":
                options_end = True
            elif not options_end and word.startswith("--"):
                recursive = recursive or word == "--recursive"
            elif not options_end and word.startswith("-") and len(word) > 1:
                recursive = recursive or "r" in word or "R" in word
            else:
                targets.append(word)
        if recursive and any(t in _WHOLE_TREES or _HOME_DIR.fullmatch(t) for t in targets):
            return True
    return False


def _command_of(record: dict[str, Any]) -> str | None:
    detail = record.get("detail") or {}
    if record.get("event_type") == "agent_command":
        # As typed and as run: `rm -rf *` is `rm -rf a b` once the shell has expanded it.
        typed = str(detail.get("typed", ""))
        command = str(detail.get("command", ""))
        return f"{typed}\n{command}" if typed else command
    if record.get("event_type") in ("agent_report", "tool_use"):
        reported = detail.get("reported") or {}
        tool_input = reported.get("tool_input") if isinstance(reported, dict) else None
        if isinstance(tool_input, dict):
            return " ".join(str(value) for value in tool_input.values())
    return None


class AlertEngine:
    """Feeds on records one by one; :meth:`observe` returns the alerts a record raises."""

    def __init__(self, registry_hosts: frozenset[str] | Callable[[], frozenset[str]]) -> None:
        # A callable is asked on first need: most runs never send a network command.
        self._registry_hosts = registry_hosts
        self._credential_seen_at: float | None = None
        self._previous_kind: str | None = None

    def _foreign_hosts(self, command: str) -> list[str]:
        hosts = [a or b for a, b in _URL_HOST.findall(command)]
        return [h for h in hosts if h and not self._is_registry(h)]

    def _is_registry(self, host: str) -> bool:
        host = host.lower()
        return any(host == r or host.endswith(f".{r}") for r in self.registry_hosts)

    @property
    def registry_hosts(self) -> frozenset[str]:
        if callable(self._registry_hosts):
            self._registry_hosts = self._registry_hosts()
        return self._registry_hosts

    def observe(self, record: dict[str, Any], now: float | None = None) -> list[Alert]:
        command = _command_of(record)
        if command is None:
            return []
        whole_tree = _deletes_a_whole_tree(command[:MAX_COMMAND])
        windows = _windows(command)
        now = time.monotonic() if now is None else now
        seq = int(record.get("seq", 0))
        evidence = command[:300]
        alerts: list[Alert] = []

        def raise_(rule: str, severity: Severity, message: str) -> None:
            alerts.append(Alert(rule, severity, seq, message, evidence))

        if _found(_SENSITIVE, windows):
            self._credential_seen_at = now
            raise_("sensitive_path", "medium", "the agent touched a credential or secret path")
        foreign = (
            [host for window in windows for host in self._foreign_hosts(window)]
            if _found(_NETWORK_TOOL, windows)
            else []
        )
        recent = self._credential_seen_at is not None and (
            now - self._credential_seen_at <= CREDENTIAL_WINDOW_SECONDS
        )
        if foreign and recent:
            raise_(
                "credential_exfiltration",
                "high",
                f"a network request to {foreign[0]} right after a credential access",
            )
        if whole_tree or _found(_GIT_CLEAN_X, windows) or _found(_FIND_DELETE, windows):
            raise_("mass_deletion", "high", "a command that deletes a whole tree")
        if _found(_GATEWAY, windows):
            raise_("gateway_tampering", "high", "a command aimed at the network gateway")
        # The two sides of a pipeline start together, so their trace lines come in either order;
        # each side is judged as run (the typed form comes first in ``command``).
        ran = str((record.get("detail") or {}).get("command", ""))[:MAX_PATTERN_INPUT]
        ran = ran if record.get("event_type") == "agent_command" else windows[0]
        kind = (
            "download"
            if _DOWNLOAD.match(ran) and foreign
            else "shell"
            if _BARE_SHELL.match(ran)
            else None
        )
        piped = _found(_PIPE_TO_SHELL, windows) and (foreign or not _found(_URL_HOST, windows))
        if piped or {kind, self._previous_kind} == {"download", "shell"}:
            raise_("pipe_to_shell", "high", "downloaded code piped into a shell")
        self._previous_kind = kind
        if _found(_HISTORY, windows):
            raise_("history_wiping", "medium", "a command that wipes shell history")
        return alerts


def alerts_path(audit_file: Path) -> Path:
    return audit_file.with_name(audit_file.name.removesuffix(".jsonl") + ".alerts.jsonl")


def append_alerts(path: Path, alerts: list[Alert]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for alert in alerts:
            handle.write(json.dumps(asdict(alert), sort_keys=True) + "\n")


def read_alerts(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
