"""The agent's transcript: copied from conmon's log pipe by the host, redacted, and read back.

conmon writes the container's output in the k8s-file format, one record per line:
``TIMESTAMP STREAM TAG TEXT``, where TAG ``P`` marks a partial line that the next record
continues and ``F`` a full one. Kapsis points conmon's log at a FIFO, not a file:
:class:`TranscriptPump` joins partial records into lines, replaces secret values, appends the
result to the transcript file (same format) and, in the foreground, shows it on the terminal.
So a secret the agent prints never reaches a disk file, and ``kapsis logs`` reads the same
redacted text.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from kapsis.secrets.redact import Redactor
from kapsis.terminal import shown

LOG_FIFO = "transcript.fifo"  # in the sandbox dir
# Past this the transcript file stops growing (what follows is read and dropped, so conmon never
# blocks) and ends with a line that says how much was cut.
MAX_TRANSCRIPT_BYTES = 64 * 1024**2
CUT_MARK = "[kapsis: the transcript was cut at"
# A line longer than this is written out in parts (redacted part by part).
MAX_PENDING = 1024 * 1024


class TranscriptPump:
    """Copies records from conmon's log FIFO into the transcript, redacted; runs in a thread.

    The host holds a write end of the FIFO too (``keep_fd``) until the container has exited, so
    that the reader does not see end-of-file before conmon has opened the pipe.
    """

    def __init__(
        self,
        read_fd: int,
        keep_fd: int,
        transcript: Path,
        redactor: Redactor,
        *,
        echo: bool,
    ) -> None:
        self.read_fd, self.keep_fd = read_fd, keep_fd
        self._transcript = transcript
        self._redactor = redactor
        self._echo = echo
        self.max_bytes = MAX_TRANSCRIPT_BYTES
        self.dropped_bytes = 0
        self._touched = 0.0
        self._thread = threading.Thread(target=self._run, name="kapsis-transcript", daemon=True)

    @classmethod
    def open(
        cls, fifo: Path, transcript: Path, redactor: Redactor, *, echo: bool
    ) -> TranscriptPump:
        if not fifo.exists():
            os.mkfifo(fifo, 0o600)
        read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        keep_fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        os.set_blocking(read_fd, True)
        return cls(read_fd, keep_fd, transcript, redactor, echo=echo)

    def start(self) -> TranscriptPump:
        self._thread.start()
        return self

    def finish(self, timeout: float = 10.0) -> None:
        """The container has exited: drain what conmon wrote and stop."""
        if self.keep_fd >= 0:
            os.close(self.keep_fd)
            self.keep_fd = -1
        self._thread.join(timeout)

    def close(self) -> None:
        """Give up without pumping (the container never started)."""
        for fd in (self.read_fd, self.keep_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.keep_fd = -1

    def _run(self) -> None:
        self._transcript.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The agent's output may hold what it read: the user's alone (0600).
        descriptor = os.open(
            self._transcript, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        pending: dict[str, str] = {}
        stamps: dict[str, str] = {}
        with (
            os.fdopen(self.read_fd, "r", encoding="utf-8", errors="replace") as pipe,
            os.fdopen(descriptor, "a", encoding="utf-8") as out,
        ):
            for raw in pipe:
                parts = raw.rstrip("\n").split(" ", 3)
                if len(parts) < 3:
                    continue
                stamp, stream, tag = parts[:3]
                text = pending.pop(stream, "") + (parts[3] if len(parts) == 4 else "")
                stamps[stream] = stamp
                if tag == "P":
                    if len(text) < MAX_PENDING:
                        pending[stream] = text
                        continue
                    # Too long to hold: write it out, but keep back what could be the start
                    # of a secret that the next record completes.
                    keep = self._redactor.longest - 1
                    if keep > 0:
                        text, pending[stream] = text[:-keep], text[-keep:]
                self._emit(out, stamp, stream, "F" if tag == "F" else "P", text)
            for stream, text in pending.items():  # the last line had no newline
                self._emit(out, stamps[stream], stream, "F", text)
            if self.dropped_bytes:
                note = f"{CUT_MARK} {self.max_bytes} bytes; {self.dropped_bytes} more were dropped]"
                out.write(f"{stamps.get('stdout', '-')} stderr F {note}\n")

    def _emit(self, out: TextIO, stamp: str, stream: str, tag: str, text: str) -> None:
        redacted = self._redactor.text(text)
        record = f"{stamp} {stream} {tag} {redacted}\n"
        size = len(record.encode("utf-8", "replace"))
        if self.dropped_bytes or out.tell() + size > self.max_bytes:
            self.dropped_bytes += size
            # The file no longer grows, but its time still says the agent is talking (the idle
            # watcher reads it): touched at most once a second.
            now = time.monotonic()
            if now - self._touched >= 1.0:
                self._touched = now
                with contextlib.suppress(OSError):
                    os.utime(self._transcript)
        else:
            out.write(record)
            out.flush()
        if self._echo:
            terminal = sys.stderr if stream == "stderr" else sys.stdout
            try:
                # The agent's control sequences are shown, never obeyed by the user's terminal.
                terminal.write(shown(redacted) + ("\n" if tag == "F" else ""))
                terminal.flush()
            except (OSError, ValueError):
                # A closed terminal (`kapsis run | head`) ends the echo, never the pump: the
                # FIFO must be read to the end, or conmon and the agent block.
                self._echo = False


def parse_records(lines: Iterator[str]) -> Iterator[str]:
    pending = ""
    for raw in lines:
        parts = raw.rstrip("\n").split(" ", 3)
        if len(parts) < 3:
            continue
        tag = parts[2]
        text = parts[3] if len(parts) == 4 else ""
        if tag == "P":
            pending += text
            continue
        yield pending + text
        pending = ""
    if pending:
        yield pending


def read_transcript(path: Path) -> Iterator[str]:
    """The transcript's lines, read as they are yielded (never the whole file at once)."""
    if not path.exists():
        return iter(())
    return _stream_records(path)


def _stream_records(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        yield from parse_records(iter(handle))


def follow_transcript(
    path: Path, still_running: Callable[[], bool], poll_seconds: float = 0.2
) -> Iterator[str]:
    """Yield lines as they are written, until the agent has stopped and the file is drained."""
    return parse_records(_follow_raw_lines(path, still_running, poll_seconds))


def _follow_raw_lines(
    path: Path, still_running: Callable[[], bool], poll_seconds: float
) -> Iterator[str]:
    while not path.exists():
        if not still_running():
            if not path.exists():  # it may have appeared while we asked
                return
            break
        time.sleep(poll_seconds)
    with path.open(encoding="utf-8", errors="replace") as handle:
        partial = ""
        while True:
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    yield partial
                    partial = ""
                continue
            if not still_running():
                rest = partial + handle.read()
                yield from rest.splitlines(keepends=True)
                return
            time.sleep(poll_seconds)


@contextlib.contextmanager
def drain_fifo(fifo: Path) -> Iterator[None]:
    """Read and drop whatever is written to ``fifo`` while the block runs (nothing when it is
    not a FIFO). Opening the read end without blocking needs no writer."""
    try:
        descriptor = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        yield
        return
    if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        yield
        return
    done = threading.Event()

    poller = select.poll()  # select() cannot take a descriptor past 1023
    poller.register(descriptor, select.POLLIN)

    def drain() -> None:
        while not done.is_set():
            if poller.poll(100):
                try:
                    if not os.read(descriptor, 65536):
                        time.sleep(0.05)  # no writer at the moment: readable at end of file
                except BlockingIOError:
                    continue
                except OSError:
                    return

    thread = threading.Thread(target=drain, name="fifo-drain", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.close(descriptor)
