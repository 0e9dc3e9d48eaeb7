# cython: language_level=3
"""Access-log lines from packed request rows, compiled: the rows are read and the lines written in C
without the GIL, so the thread formatting them never holds up the event loop.

Specification and reference: ``_accesslog_py.py`` (same API, byte-for-byte the same lines). The rows
are read by the parser the request log's SQLite writer uses (``_msgpack_row.pxi``); the lines go
into one C buffer, grown by doubling, made a ``bytes`` once at the end.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport fabs, floor, signbit
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from libc.time cimport time_t, tm

include "_msgpack_row.pxi"

cdef extern from "<time.h>" nogil:
    tm* gmtime_r(const time_t* timep, tm* result)

__all__ = ["AccessFormatter"]

_FIELDS = (
    "id",
    "received_at",
    "finished_at",
    "client_addr",
    "endpoint",
    "status",
    "model",
    "node_id",
    "tenant",
    "bytes_in",
    "bytes_out",
    "error_type",
    "variant",
    "overflow",
)

cdef enum:
    F_ID = 0
    F_RECEIVED = 1
    F_FINISHED = 2
    F_CLIENT = 3
    F_PATH = 4
    F_STATUS = 5
    F_MODEL = 6
    F_NODE = 7
    F_TENANT = 8
    F_BYTES_IN = 9
    F_BYTES_OUT = 10
    F_ERROR = 11
    F_VARIANT = 12
    F_OVERFLOW = 13
    N_FIELDS = 14

cdef double _MAX_TIME = 253402300800.0  # 10000-01-01T00:00:00Z
cdef double _MAX_DURATION_MS = 1e12
cdef const char* _HEX = b"0123456789abcdef"
cdef unsigned char _CONSOLE_SAFE[256]  # 1: a byte a console field holds as it is
cdef int _b
for _b in range(256):
    _CONSOLE_SAFE[_b] = not (_b < 0x21 or _b == 0x7F or _b == 0x22 or _b == 0x5C)


cdef struct Out:
    char* p
    Py_ssize_t n
    Py_ssize_t cap
    bint failed


cdef bint _room(Out* o, Py_ssize_t extra) noexcept nogil:
    """Room for ``extra`` more bytes; False (and ``failed``) when memory ran out."""
    cdef Py_ssize_t cap
    cdef char* grown
    if o.n + extra <= o.cap:
        return True
    if o.failed:
        return False
    cap = o.cap * 2 if o.cap else 4096
    while cap < o.n + extra:
        cap *= 2
    grown = <char*>realloc(o.p, cap)
    if grown == NULL:
        o.failed = True
        return False
    o.p = grown
    o.cap = cap
    return True


cdef inline void _raw(Out* o, const char* s, Py_ssize_t n) noexcept nogil:
    if _room(o, n):
        memcpy(o.p + o.n, s, n)
        o.n += n


cdef inline void _dash(Out* o) noexcept nogil:
    _raw(o, b"-", 1)


cdef inline void _null(Out* o) noexcept nogil:
    _raw(o, b"null", 4)


cdef void _console_text(Out* o, Cell* c) noexcept nogil:
    """Text with bytes below 0x21, 0x7f, '"' and '\\' as \\xHH; '-' when not text."""
    cdef Py_ssize_t i = 0, run
    cdef unsigned char b
    cdef const unsigned char* s = <const unsigned char*>c.s
    if c.kind != CELL_TEXT:
        _dash(o)
        return
    if not _room(o, 4 * c.n):
        return
    while i < c.n:
        run = i
        while run < c.n and _CONSOLE_SAFE[s[run]]:
            run += 1
        if run > i:
            memcpy(o.p + o.n, s + i, run - i)
            o.n += run - i
            i = run
            continue
        b = s[i]
        o.p[o.n] = 0x5C
        o.p[o.n + 1] = 0x78  # x
        o.p[o.n + 2] = _HEX[b >> 4]
        o.p[o.n + 3] = _HEX[b & 15]
        o.n += 4
        i += 1


cdef void _json_escaped(Out* o, const char* s, Py_ssize_t n) noexcept nogil:
    """A JSON string: '"' and '\\' escaped, bytes below 0x20 as \\u00HH, the rest as they are."""
    cdef Py_ssize_t i
    cdef unsigned char b
    if not _room(o, 6 * n + 2):
        return
    o.p[o.n] = 0x22
    o.n += 1
    for i in range(n):
        b = <unsigned char>s[i]
        if b == 0x22 or b == 0x5C:
            o.p[o.n] = 0x5C
            o.p[o.n + 1] = <char>b
            o.n += 2
        elif b < 0x20:
            memcpy(o.p + o.n, b"\\u00", 4)
            o.p[o.n + 4] = _HEX[b >> 4]
            o.p[o.n + 5] = _HEX[b & 15]
            o.n += 6
        else:
            o.p[o.n] = <char>b
            o.n += 1
    o.p[o.n] = 0x22
    o.n += 1


cdef inline void _json_text(Out* o, Cell* c) noexcept nogil:
    if c.kind != CELL_TEXT:
        _null(o)
    else:
        _json_escaped(o, c.s, c.n)


cdef inline bint _number(Cell* c, double* value) noexcept nogil:
    if c.kind == CELL_FLOAT:
        value[0] = c.d
        return True
    if c.kind == CELL_INT:
        value[0] = <double>c.i
        return True
    return False


cdef struct Clock:
    long long secs  # the second ``text`` shows (-1: none yet)
    char text[20]  # "YYYY-MM-DDTHH:MM:SS."


cdef int _time(Cell* c, char* buf, Clock* clock) noexcept nogil:
    """The time in ``c`` as ISO 8601 UTC with milliseconds into ``buf`` (32 bytes); its length, or 0.

    The rows of a batch fall in a few seconds: ``clock`` keeps the last second's text."""
    cdef double t
    cdef long long ms, secs
    cdef int milli
    cdef time_t when
    cdef tm parts
    if not _number(c, &t) or not (0.0 <= t < _MAX_TIME):
        return 0
    ms = <long long>floor(t * 1000.0)
    secs = ms // 1000
    milli = <int>(ms % 1000)
    if secs != clock.secs:
        when = <time_t>secs
        if gmtime_r(&when, &parts) == NULL:
            return 0
        snprintf(
            clock.text, 21, b"%04d-%02d-%02dT%02d:%02d:%02d.",
            parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec,
        )
        clock.secs = secs
    memcpy(buf, clock.text, 20)
    buf[20] = <char>(48 + milli // 100)
    buf[21] = <char>(48 + milli // 10 % 10)
    buf[22] = <char>(48 + milli % 10)
    buf[23] = 0x5A  # Z
    return 24


cdef int _decimal(unsigned long long v, char* buf) noexcept nogil:
    """``v`` in decimal into ``buf``; its length."""
    cdef char tmp[24]
    cdef int n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        buf[i] = tmp[n - 1 - i]
    return n


cdef int _duration(Cell* received, Cell* finished, char* buf) noexcept nogil:
    """Milliseconds from ``received`` to ``finished``, one decimal, into ``buf`` (32 bytes); its length, or 0."""
    cdef double r, f, ms
    if not _number(received, &r) or not _number(finished, &f):
        return 0
    ms = (f - r) * 1000.0
    if not (fabs(ms) < _MAX_DURATION_MS):
        return 0
    return _one_decimal(ms, buf)


cdef int _one_decimal(double x, char* buf) noexcept nogil:
    """``"%.1f" % x``: by hand, unless ``x`` lies near a rounding tie (then printf decides, exactly)."""
    cdef double y = fabs(x) * 10.0, whole = floor(y), frac = y - whole
    cdef unsigned long long tenths
    cdef int n = 0
    if y >= 1e9 or fabs(frac - 0.5) < 1e-3:
        return snprintf(buf, 32, b"%.1f", x)
    tenths = <unsigned long long>whole + (1 if frac > 0.5 else 0)
    if signbit(x):
        buf[0] = 0x2D  # -
        n = 1
    n += _decimal(tenths // 10, buf + n)
    buf[n] = 0x2E  # .
    buf[n + 1] = <char>(48 + tenths % 10)
    return n + 2


cdef int _int(Cell* c, char* buf) noexcept nogil:
    if c.kind != CELL_INT:
        return 0
    if c.i >= 0:
        return _decimal(<unsigned long long>c.i, buf)
    buf[0] = 0x2D  # -
    return 1 + _decimal(<unsigned long long>(-(c.i + 1)) + 1, buf + 1)


cdef int _request_id(Cell* c, char* buf) noexcept nogil:
    cdef unsigned long long v
    cdef int i
    if c.kind != CELL_INT or c.i < 0:
        return 0
    v = <unsigned long long>c.i
    for i in range(16):
        buf[15 - i] = _HEX[v & 15]
        v >>= 4
    return 16


cdef inline void _plain(Out* o, char* buf, int n) noexcept nogil:
    if n > 0:
        _raw(o, buf, n)
    else:
        _dash(o)


cdef inline void _json_number(Out* o, char* buf, int n) noexcept nogil:
    if n > 0:
        _raw(o, buf, n)
    else:
        _null(o)


cdef inline void _json_string(Out* o, char* buf, int n) noexcept nogil:
    if n > 0:
        _json_escaped(o, buf, n)
    else:
        _null(o)


cdef void _console_line(Out* o, Cell* cells, const int* at, Clock* clock) noexcept nogil:
    cdef char buf[32]
    cdef int n
    _plain(o, buf, _time(cells + at[F_RECEIVED], buf, clock))
    _raw(o, b" ", 1)
    _console_text(o, cells + at[F_CLIENT])
    _raw(o, b' "POST ', 7)
    _console_text(o, cells + at[F_PATH])
    _raw(o, b'" ', 2)
    _plain(o, buf, _int(cells + at[F_STATUS], buf))
    _raw(o, b" ", 1)
    n = _duration(cells + at[F_RECEIVED], cells + at[F_FINISHED], buf)
    if n > 0:
        _raw(o, buf, n)
        _raw(o, b"ms", 2)
    else:
        _dash(o)
    _raw(o, b" model=", 7)
    _console_text(o, cells + at[F_MODEL])
    _raw(o, b" node=", 6)
    _console_text(o, cells + at[F_NODE])
    _raw(o, b" tenant=", 8)
    _console_text(o, cells + at[F_TENANT])
    _raw(o, b" in=", 4)
    _plain(o, buf, _int(cells + at[F_BYTES_IN], buf))
    _raw(o, b" out=", 5)
    _plain(o, buf, _int(cells + at[F_BYTES_OUT], buf))
    _raw(o, b" error=", 7)
    _console_text(o, cells + at[F_ERROR])
    _raw(o, b" id=", 4)
    _plain(o, buf, _request_id(cells + at[F_ID], buf))
    if cells[at[F_VARIANT]].kind == CELL_TEXT:
        _raw(o, b" variant=", 9)
        _console_text(o, cells + at[F_VARIANT])
    if cells[at[F_OVERFLOW]].kind == CELL_INT and cells[at[F_OVERFLOW]].i != 0:
        _raw(o, b" overflow=1", 11)
    _raw(o, b"\n", 1)


cdef void _json_line(Out* o, Cell* cells, const int* at, Clock* clock) noexcept nogil:
    cdef char buf[32]
    _raw(o, b'{"time":', 8)
    _json_string(o, buf, _time(cells + at[F_RECEIVED], buf, clock))
    _raw(o, b',"client":', 10)
    _json_text(o, cells + at[F_CLIENT])
    _raw(o, b',"method":"POST","path":', 24)
    _json_text(o, cells + at[F_PATH])
    _raw(o, b',"status":', 10)
    _json_number(o, buf, _int(cells + at[F_STATUS], buf))
    _raw(o, b',"duration_ms":', 15)
    _json_number(o, buf, _duration(cells + at[F_RECEIVED], cells + at[F_FINISHED], buf))
    _raw(o, b',"model":', 9)
    _json_text(o, cells + at[F_MODEL])
    _raw(o, b',"node":', 8)
    _json_text(o, cells + at[F_NODE])
    _raw(o, b',"tenant":', 10)
    _json_text(o, cells + at[F_TENANT])
    _raw(o, b',"bytes_in":', 12)
    _json_number(o, buf, _int(cells + at[F_BYTES_IN], buf))
    _raw(o, b',"bytes_out":', 13)
    _json_number(o, buf, _int(cells + at[F_BYTES_OUT], buf))
    _raw(o, b',"error":', 9)
    _json_text(o, cells + at[F_ERROR])
    _raw(o, b',"request_id":', 14)
    _json_string(o, buf, _request_id(cells + at[F_ID], buf))
    if cells[at[F_VARIANT]].kind == CELL_TEXT:
        _raw(o, b',"variant":', 11)
        _json_text(o, cells + at[F_VARIANT])
    if cells[at[F_OVERFLOW]].kind == CELL_INT and cells[at[F_OVERFLOW]].i != 0:
        _raw(o, b',"overflow":true', 16)
    _raw(o, b"}\n", 2)


@cython.final
cdef class AccessFormatter:
    """Formats batches of packed rows whose fields are ``columns`` (see _accesslog_py.py)."""

    cdef:
        int at[N_FIELDS]
        int ncols
        readonly bint json

    def __init__(self, columns, bint json=False):
        columns = tuple(columns)
        missing = [name for name in _FIELDS if name not in columns]
        if missing:
            raise ValueError(f"the rows have no {', '.join(missing)} column")
        cdef int i
        for i in range(N_FIELDS):
            self.at[i] = columns.index(_FIELDS[i])
        self.ncols = len(columns)
        self.json = json

    def format(self, bytes payload, bytes lengths, Py_ssize_t count):
        """The lines of ``count`` rows, and how many rows gave no line (see _accesslog_py.py)."""
        if count < 0 or PyBytes_GET_SIZE(lengths) != 4 * count:
            raise ValueError("lengths must hold one u32 per row")
        cdef const unsigned char* lp = <const unsigned char*>PyBytes_AS_STRING(lengths)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t total = 0, pos = 0, r, skipped = 0
        cdef unsigned int n
        for r in range(count):
            total += (<unsigned int>lp[4 * r]) | (<unsigned int>lp[4 * r + 1] << 8) | (
                <unsigned int>lp[4 * r + 2] << 16) | (<unsigned int>lp[4 * r + 3] << 24)
        if total != size:
            raise ValueError("row lengths do not add up to the payload")
        cdef Cell* cells = <Cell*>malloc(self.ncols * sizeof(Cell))
        if cells == NULL:
            raise MemoryError()
        cdef Out out
        out.p = NULL
        out.n = out.cap = 0
        out.failed = False
        cdef int ncols = self.ncols
        cdef bint as_json = self.json
        cdef Clock clock
        clock.secs = -1
        try:
            with nogil:
                _room(&out, 256 * count + 2 * size)
                for r in range(count):
                    n = (<unsigned int>lp[4 * r]) | (<unsigned int>lp[4 * r + 1] << 8) | (
                        <unsigned int>lp[4 * r + 2] << 16) | (<unsigned int>lp[4 * r + 3] << 24)
                    if _parse_row(p + pos, n, cells, ncols) != PARSE_OK:
                        skipped += 1
                    elif as_json:
                        _json_line(&out, cells, self.at, &clock)
                    else:
                        _console_line(&out, cells, self.at, &clock)
                    pos += n
            if out.failed:
                raise MemoryError()
            return PyBytes_FromStringAndSize(out.p, out.n), skipped
        finally:
            free(out.p)
            free(cells)
