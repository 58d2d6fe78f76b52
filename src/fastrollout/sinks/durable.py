"""The durable log: an append-only folder of segment files that a reader in another process
reads and resumes; a batch whose ``write`` returned survives ``kill -9``.

The durable log is a folder of segment files ``<base>.frlog``, ``<base>`` being the log
offset (20 digits) of the segment's first byte; an offset names a byte of the log across
segments. A segment holds whole records, one per batch (all integers little-endian)::

    b"FRLG" | u8 version | u8 id kind | u16 0 | u32 id_len | u64 payload_len
            | u32 body crc32 | u32 0 | u32 crc32 of the 28 bytes before it
    body: batch id (id_len bytes, padded with zeros to 8) | FRXP payload

The id kind is 0 for None, 1 for an int (decimal ASCII), 2 for a str (UTF-8). Segments
roll over at ``segment_bytes`` (a larger record gets a segment of its own). ``write``
returns after ``fdatasync`` of the segment, and of the folder when it made the segment.
Only the record being written when a writer dies can be incomplete: a record cut short,
or (after a power loss) one whose bytes up to the end of the file fail their checksum or
are zeros. Readers stop before such a torn tail; the next writer truncates it. Anything
else that fails its checks is corruption, reported with the file and offset.
"""
from __future__ import annotations

import fcntl
import io
import itertools
import operator
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ..errors import ConfigError, LogCorruptError, LogLockedError, PayloadError, SinkClosedError
from ..experience import ExperienceBatch, decode_experiences
from ..experience.codec import encode_parts
from .base import BatchId, _positive, count

MAGIC = b"FRLG"
VERSION = 1
_HEAD = struct.Struct("<4sBBHIQI4x")    # ... up to the body crc; the head crc follows
_HEAD_CRC = struct.Struct("<I")
HEADER = _HEAD.size + _HEAD_CRC.size    # 32
MAX_ID_BYTES = 4096
_SEGMENT = re.compile(r"^(\d{20})\.frlog$")
_READER_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
_ID_NONE, _ID_INT, _ID_STR = 0, 1, 2
_sync = getattr(os, "fdatasync", os.fsync)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16   # per pwritev


def _pad8(n: int) -> int:
    return -n % 8


def _segment_path(folder: Path, base: int) -> Path:
    return folder / f"{base:020d}.frlog"


def _segments(folder: Path) -> list[int]:
    """Base offsets of the folder's segments, in order."""
    return sorted(int(m.group(1)) for m in map(_SEGMENT.match, os.listdir(folder)) if m)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_id(batch_id: BatchId) -> tuple[int, bytes]:
    if batch_id is None:
        return _ID_NONE, b""
    if isinstance(batch_id, str):
        kind, raw = _ID_STR, batch_id.encode("utf-8", "surrogatepass")
    else:
        try:
            kind, raw = _ID_INT, str(operator.index(batch_id)).encode()
        except TypeError:
            raise ConfigError(f"DurableLogSink.write: batch id must be an int, a str or "
                              f"None, got {type(batch_id).__name__}") from None
    if len(raw) > MAX_ID_BYTES:
        raise ConfigError(f"DurableLogSink.write: batch id of {len(raw)} bytes is longer than "
                          f"{MAX_ID_BYTES}")
    return kind, raw


def _decode_id(kind: int, raw: bytes, where: str) -> BatchId:
    try:
        if kind == _ID_NONE and not raw:
            return None
        if kind == _ID_INT and (raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit())):
            return int(raw)
        if kind == _ID_STR:
            return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        pass
    raise LogCorruptError(f"{where}: batch id {raw[:64]!r} of kind {kind} is not one a writer "
                          f"writes")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One finalized batch as stored: ``offset`` is where the record starts, ``end`` where
    the next one does (what ``DurableLogReader.ack`` takes to mark this one done)."""

    offset: int
    end: int
    batch_id: BatchId
    payload: memoryview     # the FRXP payload, a view of bytes read for this record alone
    path: str

    def batch(self) -> ExperienceBatch:
        """The decoded experiences (zero-copy views into ``payload``)."""
        try:
            return decode_experiences(self.payload)
        except PayloadError as exc:
            raise PayloadError(f"{self.path} at offset {self.offset}: {exc}") from None


class _Torn(Exception):
    """The record at this place is a torn tail, if it is in the last segment."""


def _zeros_to_end(fd: int, rel: int, size: int) -> bool:
    while rel < size:
        chunk = os.pread(fd, min(size - rel, 1 << 20), rel)
        if not chunk or chunk.strip(b"\0"):
            return not chunk
        rel += len(chunk)
    return True


def _read_record(fd: int, path: Path, base: int, rel: int) -> LogRecord | None:
    """The record at byte ``rel`` of a segment, None at its end; raises _Torn for a torn
    tail and LogCorruptError for anything else that fails its checks.

    The body is read with ``pread`` into one bytes object, which the decoder then views
    without copying: one copy in all. A memory map would cost the same copy (the decoder
    copies any buffer that is not bytes) and a SIGBUS when the next writer truncates a
    torn tail under it."""
    where = f"{path} at offset {base + rel}"
    size = os.fstat(fd).st_size
    if rel >= size:
        if rel > size:
            raise LogCorruptError(f"{where}: past the end of the segment ({size} bytes)")
        return None
    head = os.pread(fd, HEADER, rel)
    if len(head) < HEADER:
        raise _Torn(f"{where}: {len(head)} bytes is a cut-short record header")
    if zlib.crc32(head[:_HEAD.size]) != _HEAD_CRC.unpack_from(head, _HEAD.size)[0]:
        if _zeros_to_end(fd, rel, size):
            raise _Torn(f"{where}: zeros up to the end of the file")
        raise LogCorruptError(f"{where}: record header fails its checksum (corrupt, or not "
                              f"a record boundary)")
    magic, version, kind, _, id_len, payload_len, body_crc = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise LogCorruptError(f"{where}: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise LogCorruptError(f"{where}: record version {version}; this build reads "
                              f"{VERSION}")
    if id_len > MAX_ID_BYTES:
        raise LogCorruptError(f"{where}: batch id length {id_len} > {MAX_ID_BYTES}")
    id_end = id_len + _pad8(id_len)
    end = rel + HEADER + id_end + payload_len
    if end > size:
        raise _Torn(f"{where}: the record needs {end - rel} bytes, the file has "
                    f"{size - rel}")
    body = os.pread(fd, end - rel - HEADER, rel + HEADER)
    if len(body) < end - rel - HEADER:       # truncated since fstat: by the next writer
        raise _Torn(f"{where}: cut short while reading")
    if zlib.crc32(body) != body_crc:
        if end == size:
            raise _Torn(f"{where}: the last record fails its checksum")
        raise LogCorruptError(f"{where}: record body fails its checksum")
    batch_id = _decode_id(kind, body[:id_len], where)
    return LogRecord(base + rel, base + end, batch_id, memoryview(body)[id_end:], str(path))


class DurableLogSink:
    """Appends each batch to the log in ``folder`` (made if missing) as one record, durable
    when ``write`` returns. One writer per folder (a ``flock`` on ``folder/LOCK``; a second
    raises LogLockedError). Opening truncates a torn tail left by a writer that died.

    ``write`` blocks for the disk (``fdatasync``): from an event loop, call it in a worker
    thread. It is thread-safe. After an I/O error the sink closes itself (the state of
    unsynced data is unknown) and the error is raised with the file and offset."""

    blocking = True

    def __init__(self, folder: str | os.PathLike[str], *, segment_bytes: int = 64 << 20) -> None:
        self.folder = Path(folder)
        self.segment_bytes = _positive(segment_bytes, "DurableLogSink.segment_bytes")
        self._mutex = threading.Lock()
        self._lock: io.FileIO | None = None
        self._file: io.FileIO | None = None
        created = not self.folder.is_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        if created:
            _sync_folder(self.folder.parent)
        self._lock = _acquire(self.folder / "LOCK")
        try:
            self._open_tail()
        except BaseException:
            self.close()
            raise

    @property
    def end(self) -> int:
        """The log offset the next record will start at."""
        return self._base + self._pos

    def _open_tail(self) -> None:
        bases = _segments(self.folder)
        if not bases:
            self._new_segment(0)
            return
        for prev, base in itertools.pairwise(bases):
            size = _segment_path(self.folder, prev).stat().st_size
            if prev + size != base:
                raise LogCorruptError(f"{_segment_path(self.folder, base)}: segment starts at "
                                      f"offset {base}, the one before it ends at {prev + size}")
        self._base, path = bases[-1], _segment_path(self.folder, bases[-1])
        self._file = file = open(path, "r+b", buffering=0)
        fd, rel = file.fileno(), 0
        try:
            while (record := _read_record(fd, path, self._base, rel)) is not None:
                rel = record.end - self._base
        except _Torn:
            os.ftruncate(fd, rel)
            _sync(fd)
        self._pos = rel

    def _new_segment(self, base: int) -> None:
        self._close_file()
        self._file = open(_segment_path(self.folder, base), "x+b", buffering=0)
        self._base, self._pos = base, 0
        _sync_folder(self.folder)

    def write(self, batch_id: BatchId, parts: Sequence[ExperienceBatch]) -> None:
        """Append the batch as one record and return once it is on disk."""
        kind, raw = _encode_id(batch_id)
        if not count(parts):
            return
        # The payload stays in pieces (views of the batch's columns) until the kernel copies
        # them: nothing of it is joined here.
        payload = [memoryview(b).cast("B") for b in encode_parts(ExperienceBatch.concat(parts))]
        id_part = raw + b"\0" * _pad8(len(raw))
        body_crc = zlib.crc32(id_part)
        for buf in payload:
            body_crc = zlib.crc32(buf, body_crc)
        payload_len = sum(map(len, payload))
        head = _HEAD.pack(MAGIC, VERSION, kind, 0, len(raw), payload_len, body_crc)
        head += _HEAD_CRC.pack(zlib.crc32(head))
        size = len(head) + len(id_part) + payload_len
        with self._mutex:
            if self._file is None:
                raise SinkClosedError(f"DurableLogSink {self.folder} is closed; batch "
                                      f"{batch_id} was not written")
            try:
                if self._pos and self._pos + size > self.segment_bytes:
                    self._new_segment(self._base + self._pos)
                _pwrite_all(self._file.fileno(), [head, id_part, *payload], self._pos)
                _sync(self._file.fileno())
            except OSError as exc:
                exc.add_note(f"writing batch {batch_id} at offset {self.end} of "
                             f"{_segment_path(self.folder, self._base)}; the sink is closed")
                self._close_file()
                raise
            self._pos += size

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Release the folder (idempotent); every returned write is already on disk."""
        with self._mutex:
            self._close_file()
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _acquire(path: Path) -> io.FileIO:
    lock = open(path, "a+b", buffering=0)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(errors="replace").strip() or "unknown"
        lock.close()
        raise LogLockedError(f"{path.parent}: another writer has this log (pid {holder}, "
                             f"lock {path}); close it first") from None
    except BaseException:
        lock.close()
        raise
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    return lock


def _pwrite_all(fd: int, buffers: list[bytes | memoryview], at: int) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    first = 0
    while first < len(views):
        done = os.pwritev(fd, views[first:first + _IOV_MAX], at)
        at += done
        while first < len(views) and done >= len(views[first]):
            done -= len(views[first])
            first += 1
        if done:
            views[first] = views[first][done:]


class DurableLogReader:
    """Iterates the records of the log in ``folder``, from ``start``, else from where the
    reader called ``name`` last acked, else from the beginning; any number of processes
    may read while one writes. Iteration stops at the current end of the log (or before a
    torn tail); iterating again goes on from there.

    ``ack(offset)`` stores, for the next reader of this ``name``, where to resume (written
    to a temporary file, synced and renamed over ``folder/<name>.ack``)."""

    def __init__(self, folder: str | os.PathLike[str], name: str | None = None, *,
                 start: int | None = None) -> None:
        self.folder = Path(folder)
        if name is not None and not (isinstance(name, str) and _READER_NAME.match(name)):
            raise ConfigError(f"DurableLogReader.name: expected up to 64 letters, digits, "
                              f"'_', '-' or '.' (not first), got {name!r}")
        self.name = name
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such log folder")
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ConfigError(f"DurableLogReader.start: expected an int >= 0, "
                                  f"got {start!r}")
            where, position = "DurableLogReader.start", start
        elif name is not None:
            where, position = str(self._ack_path), self._load_ack()
        else:
            where, position = str(self.folder), 0
        self.position = position      # where the next record starts
        self._file: io.FileIO | None = None
        self._base = 0
        try:
            self._locate(where)
        except BaseException:
            self.close()
            raise

    @property
    def _ack_path(self) -> Path:
        return self.folder / f"{self.name}.ack"

    def _load_ack(self) -> int:
        try:
            text = self._ack_path.read_text()
        except FileNotFoundError:
            return 0
        if not re.fullmatch(r"\d{1,20}\n", text):
            raise LogCorruptError(f"{self._ack_path}: expected an offset, got {text[:64]!r}")
        return int(text)

    def _locate(self, where: str) -> None:
        """Open the segment holding ``position`` (none while the log has no segment)."""
        bases = _segments(self.folder)
        held = [b for b in bases if b <= self.position]
        if not held:
            if self.position == 0 and not bases:
                return
            raise LogCorruptError(f"{where}: offset {self.position} is before the first "
                                  f"segment of {self.folder}")
        file = self._open(held[-1])
        if self.position - self._base > os.fstat(file.fileno()).st_size:
            raise LogCorruptError(f"{where}: offset {self.position} is past the end of "
                                  f"{file.name}")

    def _open(self, base: int) -> io.FileIO:
        self.close()
        self._file = open(_segment_path(self.folder, base), "rb", buffering=0)
        self._base = base
        return self._file

    def __iter__(self) -> Iterator[LogRecord]:
        return self.records()

    def records(self) -> Iterator[LogRecord]:
        """The records from ``position`` to the current end of the log."""
        while (record := self._next()) is not None:
            self.position = record.end
            yield record

    def _next(self) -> LogRecord | None:
        while True:
            if self._file is None:               # the log had no segment yet
                self._locate(str(self.folder))
                if self._file is None:
                    return None
            record = self._read(final=False)
            if record is not None:
                return record
            later = [b for b in _segments(self.folder) if b > self._base]
            if not later:
                return None
            # The writer made a later segment after this one was complete: read its rest.
            record = self._read(final=True)
            if record is not None:
                return record
            if later[0] != self.position:
                raise LogCorruptError(f"{_segment_path(self.folder, later[0])}: segment "
                                      f"starts at offset {later[0]}, the one before it ends "
                                      f"at {self.position}")
            self._open(later[0])

    def _read(self, *, final: bool) -> LogRecord | None:
        assert self._file is not None
        try:
            return _read_record(self._file.fileno(), Path(str(self._file.name)), self._base,
                                self.position - self._base)
        except _Torn as torn:
            if final:
                raise LogCorruptError(f"{torn}, and another segment follows") from None
            return None

    def ack(self, offset: int | None = None) -> None:
        """Mark the records before ``offset`` (default: every record iterated so far)
        done for this reader's name: a reader opened later with it starts at ``offset``."""
        if self.name is None:
            raise ConfigError("DurableLogReader.ack: this reader has no name to ack under")
        offset = self.position if offset is None else offset
        if isinstance(offset, bool) or not isinstance(offset, int) \
                or not 0 <= offset <= self.position:
            raise ConfigError(f"DurableLogReader.ack: offset must be an int from 0 to the "
                              f"reader's position {self.position}, got {offset!r}")
        tmp = self.folder / f".{self.name}.ack.{os.getpid()}.tmp"
        with open(tmp, "wb", buffering=0) as f:
            f.write(f"{offset}\n".encode())
            os.fsync(f.fileno())
        os.replace(tmp, self._ack_path)
        _sync_folder(self.folder)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
