"""Hand secret values to the sandbox through named pipes, so that they never touch a disk.

The host creates, in the sandbox dir, a directory with one FIFO per secret and a manifest (names
and target paths only). Both are mounted read-only into the agent container, whose command is
prefixed with ``init.sh``: it reads each FIFO in manifest order, exports environment secrets and
writes file secrets onto a tmpfs, then execs the agent. The host writes each value once, when the
sandbox opens the pipe, and removes the pipes afterwards. Nothing of a value is stored: not in
podman's container config (as ``--env`` would), not in a file the agent or a backup could read
later.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.resources
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kapsis.sandbox.secrets_plan import INBOX, INIT_SCRIPT, SecretPlan

MANIFEST = "manifest"
DELIVERY_TIMEOUT = 60.0


def prepare_inbox(root: Path, secrets: Sequence[SecretPlan], owner: int | None) -> None:
    """Create the manifest, the FIFOs and the init script under ``root`` (owned by ``owner``)."""
    inbox = root / INBOX
    inbox.mkdir(mode=0o700, exist_ok=True)
    lines = []
    for secret in secrets:
        fifo = inbox / secret.name
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        lines.append(
            f"file {secret.name} {secret.target_file}" if secret.to_file else f"env {secret.name}"
        )
    (inbox / MANIFEST).write_text("\n".join(lines) + "\n")
    script = importlib.resources.files("kapsis.secrets").joinpath("init.sh").read_text()
    (root / INIT_SCRIPT).write_text(script)
    (root / INIT_SCRIPT).chmod(0o644)
    if owner is not None:
        for path in (inbox, *inbox.iterdir()):
            os.chown(path, owner, owner)


class SecretWriter:
    """Writes each value into its FIFO once the sandbox reads it; runs in a thread."""

    def __init__(
        self, root: Path, secrets: Sequence[SecretPlan], values: Mapping[str, str]
    ) -> None:
        self._inbox = root / INBOX
        self._items = [(s.name, s.render(values[s.name])) for s in secrets]
        self._thread = threading.Thread(target=self._run, name="kapsis-secrets", daemon=True)
        self._stop = threading.Event()
        self.delivered: list[str] = []
        self.error: str | None = None

    def start(self) -> SecretWriter:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the hand-over; True when every secret was delivered."""
        self._thread.join(timeout)
        return len(self.delivered) == len(self._items)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        try:
            for name, content in self._items:
                if not self._deliver(self._inbox / name, content.encode(), deadline):
                    self.error = f"the sandbox did not take the secret {name}"
                    return
                self.delivered.append(name)
        finally:
            self._remove_pipes()

    def _deliver(self, fifo: Path, data: bytes, deadline: float) -> bool:
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                # Non-blocking: fails with ENXIO until the sandbox has opened the pipe to read.
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                time.sleep(0.005)
                continue
            try:
                if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                    return False  # never write a secret into anything but our pipe
                os.set_blocking(fd, True)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                return True
            except BrokenPipeError:
                return False  # the reader went away before taking it all
            finally:
                os.close(fd)
        return False

    def _remove_pipes(self) -> None:
        for name, _ in self._items:
            with contextlib.suppress(FileNotFoundError):
                (self._inbox / name).unlink()
