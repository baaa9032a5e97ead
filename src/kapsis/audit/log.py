"""The host-side audit writer: hash-chained JSON Lines, sealed with Ed25519, rotated by size.

One writer appends at a time (an exclusive lock on the file while it appends), whichever host
process holds the session (``kapsis run``, then a detached supervisor). The file lives in
``~/.kapsis/audit/`` and is never mounted into a sandbox. Each record links to the previous one
(see :mod:`.chain`); a seal record signs the head of the chain at the end of a session and every
``seal_every`` records or ``seal_seconds`` seconds. Past ``rotate_bytes`` the file is sealed and
renamed to ``AGENT_ID.N.jsonl``, and the new file opens with a ``continuation`` record that names
it and its last hash, so the chain spans files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kapsis import paths
from kapsis.audit.chain import GENESIS, canonical, seal_message
from kapsis.status.store import utc_now

if TYPE_CHECKING:
    from kapsis.secrets.redact import Redactor

SEAL = "seal"
CONTINUATION = "continuation"
SESSION_START = "session_start"
SESSION_END = "session_end"
LOG_CUT = "log_cut"
DEFAULT_SEAL_EVERY = 1000
DEFAULT_SEAL_SECONDS = 60.0
DEFAULT_ROTATE_BYTES = 64 * 1024**2
_TAIL_CHUNK = 65536


def audit_path(agent_id: str, directory: Path | None = None) -> Path:
    return (directory or paths.audit_dir()) / f"{agent_id}.jsonl"


def rotated_files(path: Path) -> list[Path]:
    """The files of one chain in order: ``ID.1.jsonl``, ``ID.2.jsonl`` ..., then ``ID.jsonl``."""
    stem = path.name.removesuffix(".jsonl")
    numbered = []
    for candidate in path.parent.glob(f"{stem}.*.jsonl"):
        middle = candidate.name.removeprefix(f"{stem}.").removesuffix(".jsonl")
        if middle.isdigit():
            numbered.append((int(middle), candidate))
    return [file for _, file in sorted(numbered)] + ([path] if path.exists() else [])


def _last_record(path: Path) -> dict[str, Any] | None:
    """The file's last complete record, read backwards a chunk at a time (a record may be
    longer than one chunk)."""
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            tail = b""
            while end > 0:
                start = max(0, end - _TAIL_CHUNK)
                handle.seek(start)
                tail = handle.read(end - start) + tail
                end = start
                lines = tail.rstrip(b"\n").split(b"\n")
                # The first line may be cut by the chunk's start: only trusted at the file's.
                for line in reversed(lines if end == 0 else lines[1:]):
                    try:
                        record: dict[str, Any] = json.loads(line)
                        return record
                    except ValueError:
                        continue
                tail = lines[0] if end else b""
    except OSError:
        return None
    return None


def _write_whole(descriptor: int, data: bytes) -> None:
    """Append ``data`` unbuffered, all of it or none: a write that fails part-way (a full disk)
    is cut back, so no partial line stays behind and nothing is written later out of order."""
    before = os.fstat(descriptor).st_size
    view = memoryview(data)
    try:
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, before)
        raise


def _torn_tail(descriptor: int, size: int) -> int:
    """How many bytes after the file's last newline (0 when it ends with one)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(descriptor, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return size - (start + newline + 1)
        end = start
    return size


class AuditLog:
    """Appends records to one agent's audit chain. ``record()`` is the only way in."""

    def __init__(
        self,
        agent_id: str,
        *,
        enabled: bool = True,
        directory: Path | None = None,
        seal_every: int = DEFAULT_SEAL_EVERY,
        seal_seconds: float = DEFAULT_SEAL_SECONDS,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        keys_directory: Path | None = None,
        redactor: Redactor | None = None,
        keep_going: bool = False,
    ) -> None:
        self.agent_id = agent_id
        self.keep_going = keep_going
        self.failures = 0
        self.failure: OSError | None = None
        # The run's secret values, hidden in every record's detail whoever its writer is.
        self.redactor = redactor
        # None: the host's key (~/.kapsis/keys); the Kubernetes operator keeps its own.
        self.keys_directory = keys_directory
        self.enabled = enabled
        self.path = audit_path(agent_id, directory)
        self.seal_every = seal_every
        self.seal_seconds = seal_seconds
        self.rotate_bytes = rotate_bytes
        self._head: tuple[int, str, str] | None = None  # seq, hash, session_id
        self._known_size = -1
        self._since_seal = 0
        self._last_seal = time.monotonic()
        self._torn_bytes = 0
        self._handle: Any = None
        # The agent-report thread and the launcher write through one instance.
        self._thread_lock = threading.RLock()

    # -- public ----------------------------------------------------------------------------

    def record(self, event_type: str, source: str = "host", **detail: Any) -> dict[str, Any]:
        """Append one record and return it; ``session_start`` opens a new session.

        With ``keep_going``, a record that cannot be written (a full disk) is counted in
        ``failures`` (the first error kept in ``failure``) instead of raised: the end of a run
        must still reach its final status. A partial line it left is cut off, and said, by the
        next write that succeeds."""
        try:
            return self._record(event_type, source, detail)
        except OSError as error:
            if not self.keep_going:
                raise
            self.failures += 1
            self.failure = self.failure or error
            return {}

    def _record(self, event_type: str, source: str, detail: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return {}
        if self.redactor:
            detail = self.redactor.value(detail)
        with self._thread_lock:
            # A full file is rotated before the next record, not after the last one: rotating
            # after a session's sealed end would leave the new file's unsealed continuation
            # record as the log's tail, which verifies as cut off.
            if self._known_size >= self.rotate_bytes:
                self.rotate()
            with self._locked() as handle:
                appended = self._append(handle, event_type, source, detail)
                if (
                    event_type == SESSION_END
                    or self._since_seal >= self.seal_every
                    or (time.monotonic() - self._last_seal >= self.seal_seconds)
                ):
                    self._seal(handle)
        return appended

    def seal(self) -> None:
        """Sign the head of the chain now (also done at session end and periodically)."""
        if not self.enabled:
            return
        with self._locked() as handle:
            self._seal(handle)

    def rotate(self) -> None:
        """Seal this file, move it aside as ``ID.N.jsonl`` and continue the chain in a new one."""
        with self._thread_lock:  # the whole move: no other thread may append in between
            with self._locked() as handle:
                self._seal(handle)
                number = len(rotated_files(self.path))
                previous = self.path.with_name(f"{self.agent_id}.{number}.jsonl")
                os.rename(self.path, previous)
            self.close()  # the next append opens the new file
            assert self._head is not None
            _, head_hash, _ = self._head
            with self._locked() as handle:
                self._append(
                    handle,
                    CONTINUATION,
                    "host",
                    {"previous_file": previous.name, "previous_hash": head_hash},
                )

    # -- internals -------------------------------------------------------------------------

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        self._handle = None

    def _locked(self) -> _Locked:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.parent.chmod(0o700)
        return _Locked(self)

    def _refresh(self, handle: Any) -> None:
        size = os.fstat(handle.fileno()).st_size
        if size == self._known_size and self._head is not None:
            return
        torn = _torn_tail(handle.fileno(), size)
        if torn:
            # A writer died mid-record (killed, out of memory, disk full): its partial line is
            # no record. It is cut off, and the next record says so, so the chain goes on.
            size -= torn
            os.ftruncate(handle.fileno(), size)
            self._torn_bytes += torn
        last = _last_record(self.path)
        if last is None:
            # A new chain, or the continuation of a rotated one.
            earlier = rotated_files(self.path)[:-1] if self.path.exists() else []
            tail = _last_record(earlier[-1]) if earlier else None
            self._head = (
                (int(tail["seq"]), str(tail["hash"]), str(tail["session_id"]))
                if tail
                else (0, GENESIS, "")
            )
        else:
            self._head = (int(last["seq"]), str(last["hash"]), str(last["session_id"]))
        self._known_size = size

    def _append(
        self, handle: Any, event_type: str, source: str, detail: dict[str, Any]
    ) -> dict[str, Any]:
        self._refresh(handle)
        if self._torn_bytes and event_type != LOG_CUT:
            dropped, self._torn_bytes = self._torn_bytes, 0
            reason = "a writer ended in the middle of a record; its partial line was removed"
            self._append(handle, LOG_CUT, "host", {"dropped_bytes": dropped, "reason": reason})
        assert self._head is not None
        seq, prev_hash, session_id = self._head
        if event_type == SESSION_START or not session_id:
            session_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "seq": seq + 1,
            "ts": utc_now(),
            "session_id": session_id,
            "agent_id": self.agent_id,
            "source": source,
            "event_type": event_type,
            "detail": detail,
            "prev_hash": prev_hash,
        }
        body = canonical(record)
        record["hash"] = hashlib.sha256(body).hexdigest()
        # The canonical record is the body with "hash" added; sorted keys put it right before
        # the top-level "prev_hash", whose member is the last one of that name in the body.
        cut = body.rindex(b',"prev_hash":"')
        line = body[:cut] + b',"hash":"' + record["hash"].encode() + b'"' + body[cut:] + b"\n"
        _write_whole(handle.fileno(), line)
        self._head = (seq + 1, record["hash"], session_id)
        self._known_size = os.fstat(handle.fileno()).st_size
        self._since_seal += 1
        return record

    def _seal(self, handle: Any) -> None:
        self._refresh(handle)
        assert self._head is not None
        seq, head_hash, session_id = self._head
        if seq == 0:
            return
        # cryptography is loaded only to seal (status, logs and the like never need it).
        from kapsis.audit.keys import key_id, sign, signing_key

        key = signing_key(self.keys_directory)
        self._append(
            handle,
            SEAL,
            "host",
            {
                "head_seq": seq,
                "head_hash": head_hash,
                "key_id": key_id(key.public_key()),
                "signature": sign(key, seal_message(session_id, seq, head_hash)),
            },
        )
        self._since_seal = 0
        self._last_seal = time.monotonic()


class _Locked:
    """The log file, opened for appending (kept open between appends), under an exclusive lock:
    the instance's thread lock (flock does not keep threads of one process apart), then flock
    (other processes: a detached supervisor writes the same chain)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def __enter__(self) -> Any:
        self.log._thread_lock.acquire()
        try:
            handle = self.log._handle
            if handle is None or handle.closed or not self.log.path.exists():
                descriptor = os.open(self.log.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                # Unbuffered: a record is on disk when its write returns (see _write_whole).
                handle = self.log._handle = os.fdopen(descriptor, "ab", buffering=0)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            self.log._thread_lock.release()
            raise
        return handle

    def __exit__(self, *exc_info: object) -> None:
        try:
            assert self.log._handle is not None
            fcntl.flock(self.log._handle, fcntl.LOCK_UN)
        finally:
            self.log._thread_lock.release()
