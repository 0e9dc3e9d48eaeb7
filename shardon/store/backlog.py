"""The request log's on-disk backlog: framed batches in numbered segment files, and a state file.

The writer thread appends what the request path queued here (`BacklogWriter`); the compactor
reads it back (`read_frame`) into SQLite and records how far it got (`write_state`). The frame
format, the state file and recovery after a crash: ``docs/request-log.md`` (the backlog).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

__all__ = [
    "CORRUPT",
    "KIND_AUDIT",
    "KIND_ROWS",
    "OK",
    "SEGMENT_BYTES",
    "TORN",
    "BacklogWriter",
    "Frame",
    "checked_position",
    "encode_frame",
    "frame_from",
    "frame_parts",
    "frames_from",
    "lengths_of",
    "read_frame",
    "read_segment",
    "read_state",
    "remove_backlog",
    "segment_name",
    "segment_numbers",
    "split_body",
    "write_state",
]

log = logging.getLogger("shardon.store")

SEGMENT_BYTES = 16 << 20
"""A segment past this size is fsynced and closed; the next frame starts the next segment."""
_SEGMENT_SUFFIX = ".seg"
STATE_FILE = "state"
_MAGIC = b"SHBL"
KIND_ROWS = 1  # entries: packed RequestRecord arrays (what `RequestLog.append` queued)
KIND_AUDIT = 2  # entries: packed (id, at, actor, action, target, detail) arrays
_HEAD = struct.Struct("<4sB3xIII")  # magic, kind, (pad), count, body length, crc32 of the body
_U32 = struct.Struct("<I")
_HEAD_SIZE = _HEAD.size + _U32.size  # and the crc32 of the fields before it
_LENGTHS = "I"  # array typecode of the entry lengths (u32, little-endian in the file)
if array(_LENGTHS).itemsize != 4:  # pragma: no cover - no supported platform
    raise ImportError("shardon.store needs a 4-byte C unsigned int")
_SWAP = sys.byteorder != "little"

# read_frame statuses
OK = 0  # a whole frame, checksums good
CORRUPT = 1  # the header is good but the body fails its checksum: skip this frame (its size is known)
TORN = 2  # no readable frame here (cut short, or the header is garbage): nothing after it can be trusted


class Frame(NamedTuple):
    status: int
    kind: int
    n: int  # entries (known from the header even when the body is corrupt)
    entries: list[bytes]
    size: int  # bytes the frame takes in its segment (0 when torn)
    body: bytes = b""  # the checked body, when read with split=False (entries then stays empty)


_NO_FRAME = Frame(TORN, 0, 0, [], 0)


def lengths_of(raw: bytes) -> array[int]:
    """Entry lengths from their stored form (u32, little-endian)."""
    lengths = array(_LENGTHS)
    lengths.frombytes(raw)
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    return lengths


def frame_from(kind: int, count: int, lengths: array[int] | bytes, payload: bytes) -> tuple[list[Any], int]:
    """The pieces of one frame (for a single ``os.writev``) and its size in bytes.

    ``lengths`` are the entry lengths, already in file (little-endian) byte order; ``payload`` the
    entries back to back.
    """
    body_len = 4 * count + len(payload)
    head = _HEAD.pack(_MAGIC, kind, count, body_len, zlib.crc32(payload, zlib.crc32(lengths)))
    return [head + _U32.pack(zlib.crc32(head)), lengths, payload], _HEAD_SIZE + body_len


def frame_parts(kind: int, entries: list[bytes]) -> tuple[list[Any], int]:
    """`frame_from` for a list of entries."""
    lengths = array(_LENGTHS, map(len, entries))
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    return frame_from(kind, len(entries), lengths, b"".join(entries))


def encode_frame(kind: int, entries: list[bytes]) -> bytes:
    """One backlog frame holding ``entries``, as bytes."""
    pieces, _ = frame_parts(kind, entries)
    return b"".join(pieces)


def _parse_head(head: bytes) -> tuple[int, int, int, int] | None:
    """``(kind, count, body length, body crc32)`` of a frame header; None when it is not one."""
    if len(head) != _HEAD_SIZE or head[:4] != _MAGIC:
        return None
    if zlib.crc32(head[: _HEAD.size]) != _U32.unpack_from(head, _HEAD.size)[0]:
        return None
    _, kind, count, body_len, body_crc = _HEAD.unpack_from(head)
    if kind not in (KIND_ROWS, KIND_AUDIT) or body_len < 4 * count:
        return None
    return kind, count, body_len, body_crc


def split_body(body: bytes, count: int, body_crc: int) -> list[bytes] | None:
    """A frame body's entries; None when it fails its checksum or its lengths do not add up."""
    if zlib.crc32(body) != body_crc:
        return None
    start = 4 * count
    lengths = lengths_of(body[:start])
    if start + sum(lengths) != len(body):
        return None
    return [body[a:b] for a, b in itertools.pairwise(itertools.accumulate(lengths, initial=start))]


def read_frame(fd: int, off: int, end: int, body: bool = True, split: bool = True) -> Frame:
    """The frame at byte ``off`` of the segment open as ``fd``, whose frames end at or before ``end``.

    ``body=False`` reads and checks only the header (``entries`` stays empty). ``split=False``
    checks the body but leaves it whole in ``body`` (the compactor hands row frames to
    ``RowWriter.insert_frame`` as they are).
    """
    if end - off < _HEAD_SIZE:
        return _NO_FRAME
    parsed = _parse_head(os.pread(fd, _HEAD_SIZE, off))
    if parsed is None:
        return _NO_FRAME
    kind, count, body_len, body_crc = parsed
    size = _HEAD_SIZE + body_len
    if off + size > end:
        return _NO_FRAME
    if not body:
        return Frame(OK, kind, count, [], size)
    data = os.pread(fd, body_len, off + _HEAD_SIZE)
    if len(data) != body_len:
        return _NO_FRAME
    if not split:
        if zlib.crc32(data) != body_crc:
            return Frame(CORRUPT, kind, count, [], size)
        return Frame(OK, kind, count, [], size, data)
    entries = split_body(data, count, body_crc)
    if entries is None:
        return Frame(CORRUPT, kind, count, [], size)
    return Frame(OK, kind, count, entries, size)


def read_segment(path: str | os.PathLike[str]) -> list[Frame]:
    """Every frame of a segment file, in order, up to and including the first torn one (for tools and tests)."""
    frames: list[Frame] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            frame = read_frame(fd, off, end)
            frames.append(frame)
            if frame.status == TORN:
                break
            off += frame.size
    finally:
        os.close(fd)
    return frames


def segment_name(n: int) -> str:
    return f"{n:012d}{_SEGMENT_SUFFIX}"


def segment_numbers(directory: Path) -> list[int]:
    """The numbers of the segment files in ``directory``, ascending (none if it is missing)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    n = len(_SEGMENT_SUFFIX)
    return sorted(
        int(name[:-n])
        for name in names
        if name.endswith(_SEGMENT_SUFFIX) and len(name) == 12 + n and name[:-n].isdigit()
    )


def read_state(directory: Path) -> tuple[int, int] | None:
    """The compaction position the state file records, or None (missing or unreadable)."""
    try:
        data = orjson.loads((directory / STATE_FILE).read_bytes())
        pos = (int(data["segment"]), int(data["offset"]))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("request log backlog %s: ignoring an unreadable state file (%s); replaying it all", directory, exc)
        return None
    if pos[0] < 0 or pos[1] < 0:
        log.warning("request log backlog %s: ignoring a state file that records %s; replaying it all", directory, pos)
        return None
    return pos


def write_state(directory: Path, pos: tuple[int, int]) -> None:
    """Record the compaction position: write a temporary file and rename it over the state file."""
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps({"segment": pos[0], "offset": pos[1]}))
    os.replace(tmp, directory / STATE_FILE)


def checked_position(directory: Path, state: tuple[int, int]) -> tuple[int, int]:
    """The state file's position, or the start of its segment if no frame starts there."""
    seg, off = state
    if off == 0:
        return state
    try:
        fd = os.open(directory / segment_name(seg), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return state  # compaction moves on to the next segment there is
    try:
        size = os.fstat(fd).st_size
        if off == size or (off < size and os.pread(fd, 4, off) == _MAGIC):
            return state
    finally:
        os.close(fd)
    log.warning("request log backlog: no frame at the recorded position %s; replaying segment %d", state, seg)
    return (seg, 0)


def frames_from(directory: Path, start: tuple[int, int], before: int, body: bool) -> Iterator[Frame]:
    """The readable frames of the segments numbered below ``before``, from position ``start`` on."""
    seg, off = start
    for n in segment_numbers(directory):
        if n < seg or n >= before:
            continue
        try:
            fd = os.open(directory / segment_name(n), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            end = os.fstat(fd).st_size
            pos = off if n == seg else 0
            while pos < end:
                frame = read_frame(fd, pos, end, body)
                if frame.status == TORN:
                    break
                yield frame
                pos += frame.size
        finally:
            os.close(fd)


def remove_backlog(directory: Path) -> None:
    """Delete the segments and the state file, then the directory if nothing else is in it."""
    try:
        for n in segment_numbers(directory):
            (directory / segment_name(n)).unlink(missing_ok=True)
        for name in (STATE_FILE + ".tmp", STATE_FILE):
            (directory / name).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("request log: cannot remove the backlog %s: %s", directory, exc)
        return
    with contextlib.suppress(OSError):  # not there, or someone else's file in it
        directory.rmdir()


class BacklogWriter:
    """The writer thread's end of the backlog: whole frames appended to the newest segment.

    ``published`` is where the backlog ends, ``(segment, offset)``: every frame before it is whole
    on disk. A segment past `SEGMENT_BYTES` is sealed (fsynced, closed); the next frame starts the
    next one. Used by one thread.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segment = 1  # the segment frames are appended to
        self.offset = 0  # its size: where the next frame goes
        self.published: tuple[int, int] = (1, 0)
        self.entries = 0  # entries put in the backlog (a previous process's, found at start, included)
        self.bytes = 0
        self._fd: int | None = None

    def start_at(self, segment: int) -> None:
        """Append from segment ``segment`` on (at start: after every segment already there)."""
        self.segment, self.offset = segment, 0
        self.published = (segment, 0)

    def append(self, pieces: list[Any], size: int, count: int) -> None:
        """Write whole frames (``size`` bytes, ``count`` entries) with one ``os.writev``.

        Raises OSError when it failed; nothing of it is then left in the backlog (a partial write is
        truncated away, or, if that fails too, its segment sealed there: recovery ignores a torn tail).
        """
        try:
            fd = self._fd
            if fd is None:
                fd = self._open()
            n = os.writev(fd, pieces)
            if n != size:
                raise OSError(errno.EIO, f"short write to the backlog ({n} of {size} bytes)")
        except OSError:
            self._undo_partial_write()
            raise
        self.offset += size
        self.entries += count
        self.bytes += size
        self.published = (self.segment, self.offset)
        if self.offset >= SEGMENT_BYTES:
            self.seal()

    def _open(self) -> int:
        while True:
            os.makedirs(self.directory, exist_ok=True)
            path = self.directory / segment_name(self.segment)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_size == 0:
                self._fd, self.offset = fd, 0
                return fd
            os.close(fd)  # pragma: no cover - someone else's file: leave it to the compactor, take the next
            log.warning("request log backlog: %s is not empty; starting the next segment", path)
            self.start_at(self.segment + 1)

    def _undo_partial_write(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            os.ftruncate(fd, self.offset)  # drop the start of a frame a short write left
        except OSError:  # the segment may end in a torn frame: seal it there (recovery skips the tail)
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)
            self.start_at(self.segment + 1)

    def seal(self) -> None:
        """Seal the current segment (fsync, close); the next frame starts a new one."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as exc:
                log.warning("request log backlog: fsync of segment %d failed: %s", self.segment, exc)
            os.close(fd)
        self.start_at(self.segment + 1)

    def close(self, sync: bool) -> None:
        """Close the segment being appended to (fsynced first when ``sync``: its rows wait for the next start)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            os.close(fd)
