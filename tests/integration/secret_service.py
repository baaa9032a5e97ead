"""A real Secret Service for tests: a private D-Bus session bus with gnome-keyring on it.

The daemon keeps its keyring under the test's own directory and unlocks it with a throwaway
password, so nothing of the machine's own keychain is read or written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class SecretService:
    env: dict[str, str]

    def store_with_secret_tool(self, value: str, **attributes: str) -> None:
        pairs = [item for pair in attributes.items() for item in pair]
        subprocess.run(
            ["secret-tool", "store", "--label=kapsis-test", *pairs],
            input=value,
            text=True,
            env={**os.environ, **self.env},
            check=True,
            timeout=30,
        )

    def store_with_keyring(self, service: str, account: str, value: str) -> None:
        code = "import keyring, sys; keyring.set_password(sys.argv[1], sys.argv[2], sys.argv[3])"
        subprocess.run(
            [sys.executable, "-c", code, service, account, value],
            env={**os.environ, **self.env},
            check=True,
            timeout=30,
        )


@pytest.fixture
def secret_service(tmp_path: Path) -> Iterator[SecretService]:
    for program in ("dbus-daemon", "gnome-keyring-daemon", "secret-tool"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing; scripts/install.sh installs it")
    home = tmp_path / "keyring-home"
    for sub in (".cache", ".local/share/keyrings", "run"):
        (home / sub).mkdir(parents=True)
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_RUNTIME_DIR": str(home / "run"),
    }
    bus = subprocess.run(
        ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
        capture_output=True, text=True, check=True, env={**os.environ, **env}, timeout=30,
    )  # fmt: skip
    address, pid = bus.stdout.split()[:2]
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    # In the foreground the daemon is ours to stop; it reads the unlock password from stdin.
    daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **env}, text=True,
    )  # fmt: skip
    assert daemon.stdin is not None
    daemon.stdin.write("kapsis-test-password")
    daemon.stdin.close()
    try:
        yield SecretService(env)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        os.kill(int(pid), signal.SIGTERM)
