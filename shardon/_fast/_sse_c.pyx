# cython: language_level=3
"""What Shardon reads in a streamed (SSE) answer, compiled: the same as ``_sse_py.py`` (read it).

Both classes run once per chunk of every stream (tens of thousands of chunks a second under load),
where the Python twins' slicing, method calls and attribute traffic cost more than the JSON decode
itself. The decoders and the lenient fallback are shared with the twin; the strict decode and the
text of choice 0 are done here, without a Python frame per event.

Substring tests use ``memmem``, not ``needle in data``: CPython's ``bytes.__contains__`` first tries
the argument as an integer, and for a bytes argument formats and discards a TypeError each time
(a third of the stripper's cost per chunk in a profile of 500 streams).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy


cdef extern from "string.h":
    # GNU and BSD libc (Python.h defines _GNU_SOURCE, which glibc needs to declare it).
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen) nogil

import hashlib

import msgspec

from shardon._fast._sse_py import EVENT_DECODER, _ANY_DECODER, is_usage_only, lenient_event

__all__ = ["OutputHasher", "UsageStripper", "hash_response"]

cdef object _ValidationError = msgspec.ValidationError
cdef object _DecodeError = msgspec.DecodeError
cdef object _sha256 = hashlib.sha256
cdef str _EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
cdef object _decode_strict = EVENT_DECODER.decode


cdef inline bint _contains(bytes data, bytes needle):
    """``needle in data``, without the integer attempt that costs an exception each call."""
    return memmem(
        PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data),
        PyBytes_AS_STRING(needle), <size_t>PyBytes_GET_SIZE(needle),
    ) != NULL


cdef inline object _choice0_text(ev):
    """`choice0_text` (the twin's), inline."""
    choices = ev.choices
    if not choices:
        return None
    for ch in choices:
        if ch.index != 0:
            continue
        text = ch.text
        if text is None:
            part = ch.delta if ch.delta is not None else ch.message
            text = part.content if part is not None else None
        return text
    return None


cpdef tuple hash_response(bytes body):
    """``(output_sha256, usage)`` of a complete non-streamed response body (see ``_sse_py.py``)."""
    try:
        ev = _decode_strict(body)
    except _ValidationError:
        ev = lenient_event(body)
    except _DecodeError:
        ev = None
    if ev is None:
        return _EMPTY_SHA256, None
    text = _choice0_text(ev)
    if text:
        return _sha256((<str>text).encode()).hexdigest(), ev.usage
    return _EMPTY_SHA256, ev.usage


# The text is hashed in batches: SHA-256 of the concatenation is the same digest, and an update
# call per event (a few bytes each) cost more than the hashing.
cdef Py_ssize_t _HASH_BATCH = 8192


cdef inline int _append_utf8(bytearray buf, str text) except -1:
    """``buf += text.encode()`` (strict UTF-8, as ``encode`` is), without the bytes in between."""
    cdef Py_ssize_t n
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(text, &n)
    cdef Py_ssize_t size = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, size + n)
    memcpy(PyByteArray_AS_STRING(buf) + size, utf8, n)
    return 0


cdef inline Py_ssize_t _count_newlines(bytes data):
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t count = 0
    cdef const char* hit
    while n > 0:
        hit = <const char*>memchr(p, 10, n)
        if hit == NULL:
            break
        count += 1
        n -= (hit - p) + 1
        p = hit + 1
    return count


@cython.final
cdef class OutputHasher:
    """Incremental SHA-256 of the text generated for choice 0 (see ``_sse_py.py``; fields: ``_sse_c.pxd``)."""

    def __init__(self):
        self._hash = _sha256()
        self._text = bytearray()
        self._buf = bytearray()
        self._data = []
        self.usage = None
        self.events = 0
        self.text_events = 0
        self.bad_events = 0
        self.done = False

    def feed_json(self, body):
        """Hash choice 0 of a complete (non-streamed) chat or completions response body."""
        ev = self._decode(body if isinstance(body, (bytes, str)) else bytes(body))
        if ev is not None:
            self._take(ev)

    cpdef feed_sse(self, chunk):
        """Feed one network chunk of an SSE stream (any boundaries)."""
        if not chunk:
            return
        cdef bytes data
        if type(chunk) is bytes:
            data = <bytes>chunk
        else:
            data = bytes(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const char* p = PyBytes_AS_STRING(data)
        if (
            not self._buf
            and not self._data
            and n >= 8
            and p[0] == b"d" and p[1] == b"a" and p[2] == b"t" and p[3] == b"a" and p[4] == b":" and p[5] == b" "
            and p[n - 1] == b"\n" and p[n - 2] == b"\n"
            and _count_newlines(data) == 2
            and memchr(p, 13, n) == NULL
        ):
            # The usual chunk: exactly one whole event on one data line.
            self._payload(data[6 : n - 2])
            return
        if memchr(p, 10, n) == NULL:
            self._buf += data  # no line ends here: no re-scan later
            return
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        cdef list lines = data.split(b"\n")
        cdef bytes tail = lines.pop()
        if tail:
            self._buf += tail
        cdef list pending = self._data
        cdef bytes line, value
        for line in lines:
            if line.endswith(b"\r"):
                line = line[: len(line) - 1]
            if not line:
                if pending:
                    self._dispatch()
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                pending.append(value)

    def finish(self):
        """End of stream: process a last event that was not followed by a blank line. Idempotent."""
        cdef bytes line, value
        if self._buf:
            line = bytes(self._buf).rstrip(b"\r")
            self._buf.clear()
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        if self._data:
            self._dispatch()

    def hexdigest(self):
        """The hex SHA-256 of the text hashed so far (calls `finish()` first)."""
        self.finish()
        self._flush_text()
        return self._hash.hexdigest()

    cdef _flush_text(self):
        if PyByteArray_GET_SIZE(self._text):
            self._hash.update(self._text)
            PyByteArray_Resize(self._text, 0)

    cdef _dispatch(self):
        cdef list pending = self._data
        cdef list payloads
        if len(pending) == 1:
            payloads = [pending[0]]
        else:
            joined = b"\n".join(pending)
            # Per SSE, several data lines form one payload; a server that omits blank lines between
            # events yields several JSON documents instead: decode them one by one.
            payloads = [joined] if _decodes(joined) else list(pending)
        pending.clear()
        for payload in payloads:
            self._payload(payload)

    cdef _payload(self, bytes payload):
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        ev = self._decode(payload)
        if ev is not None:
            self._take(ev)

    cdef _decode(self, payload):
        """`decode_event` (strict, then lenient), with the strict attempt inline."""
        try:
            return _decode_strict(payload)
        except _ValidationError:
            ev = lenient_event(payload.encode() if isinstance(payload, str) else payload)
        except _DecodeError:
            ev = None
        if ev is None:
            self.bad_events += 1
        return ev

    cdef _take(self, ev):
        self.events += 1
        usage = ev.usage
        if usage is not None:
            self.usage = usage
        text = _choice0_text(ev)
        if text:
            self.text_events += 1
            _append_utf8(self._text, <str>text)
            if PyByteArray_GET_SIZE(self._text) >= _HASH_BATCH:
                self._flush_text()


cdef bint _decodes(bytes payload):
    try:
        _ANY_DECODER.decode(payload)
    except _DecodeError:
        return False
    return True


cdef bytes _USAGE = b'"usage"'
cdef bytes _USAGE_NULL = b'"usage":null'


@cython.final
cdef class UsageStripper:
    """Removes the usage-only SSE event Shardon asked the node for (see ``_sse_py.py``; fields: ``_sse_c.pxd``)."""

    def __init__(self):
        self._pending = b""

    cpdef bytes feed(self, bytes data):
        if self._pending:
            data = self._pending + data
        cdef Py_ssize_t end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        cdef bytes complete
        if end + 2 == len(data):
            complete = data
            self._pending = b""
        else:
            complete = data[: end + 2]
            self._pending = data[end + 2 :]
        if not _contains(complete, _USAGE):
            return complete
        if _contains(complete, _USAGE_NULL):
            # Nodes that honour include_usage add "usage": null to every chunk (as OpenAI does),
            # usually as the last member. Unescaped quotes only occur in JSON structure, never
            # inside a string value.
            complete = complete.replace(b',"usage":null', b"")
            if not _contains(complete, _USAGE):
                return complete  # the usual chunk: nothing else to look at
            complete = complete.replace(b'"usage":null,', b"")
            if not _contains(complete, _USAGE):
                return complete
        kept = [event for event in complete.split(b"\n\n") if event and not is_usage_only(event)]
        return b"".join([event + b"\n\n" for event in kept])

    cpdef bytes flush(self):
        cdef bytes rest = self._pending
        self._pending = b""
        return rest
