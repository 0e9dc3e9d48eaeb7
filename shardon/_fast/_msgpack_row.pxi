# The request log's packed rows, read in C without the GIL: one msgpack array per row, as msgspec
# writes an ``array_like`` Struct (a RequestRecord). Included by ``_rowwriter_c.pyx`` (rows into
# SQLite) and ``_accesslog_c.pyx`` (rows into access lines), so both read a row the same way.

cdef enum:
    CELL_NULL = 0
    CELL_INT = 1
    CELL_FLOAT = 2
    CELL_TEXT = 3

cdef struct Cell:
    int kind
    long long i
    double d
    const char* s
    Py_ssize_t n


cdef struct Packed:
    const unsigned char* p
    Py_ssize_t n


cdef enum:
    PARSE_OK = 0
    PARSE_MALFORMED = -1
    PARSE_OVERFLOW = -2
    PARSE_ARITY = -3


# -- msgpack, the subset msgspec writes for a row of None/bool/int/float/str ---------------------
#
# A packed row is one msgpack array of exactly ``ncols`` values, each nil, false/true, an integer
# (fixint, int8..int64, uint8..uint64 up to int64's max), a float (float32/float64) or a UTF-8
# string (fixstr, str8/16/32). Multi-byte numbers are big-endian. Anything else, a short buffer,
# bytes left over, or another arity is refused before the transaction starts.

cdef inline unsigned long long _be(const unsigned char* p, int width) noexcept nogil:
    cdef unsigned long long v = 0
    cdef int k
    for k in range(width):
        v = (v << 8) | p[k]
    return v


cdef int _parse_row(const unsigned char* p, Py_ssize_t n, Cell* cells, int ncols) noexcept nogil:
    cdef Py_ssize_t pos = 0
    cdef unsigned char tag
    cdef unsigned long long count, u, slen
    cdef int width, c
    cdef Cell* cell
    cdef double d
    cdef float f
    cdef unsigned int u32
    if n < 1:
        return PARSE_MALFORMED
    tag = p[0]
    if tag >= 0x90 and tag <= 0x9F:
        count = tag & 0x0F
        pos = 1
    elif tag == 0xDC:
        if n < 3:
            return PARSE_MALFORMED
        count = _be(p + 1, 2)
        pos = 3
    elif tag == 0xDD:
        if n < 5:
            return PARSE_MALFORMED
        count = _be(p + 1, 4)
        pos = 5
    else:
        return PARSE_MALFORMED
    if count != <unsigned long long>ncols:
        return PARSE_ARITY
    for c in range(ncols):
        cell = cells + c
        if pos >= n:
            return PARSE_MALFORMED
        tag = p[pos]
        pos += 1
        if tag <= 0x7F:  # positive fixint
            cell.kind = CELL_INT
            cell.i = tag
        elif tag >= 0xE0:  # negative fixint
            cell.kind = CELL_INT
            cell.i = <long long>tag - 256
        elif tag >= 0xA0 and tag <= 0xBF:  # fixstr
            slen = tag & 0x1F
            if pos + <Py_ssize_t>slen > n:
                return PARSE_MALFORMED
            cell.kind = CELL_TEXT
            cell.s = <const char*>(p + pos)
            cell.n = <Py_ssize_t>slen
            pos += <Py_ssize_t>slen
        elif tag == 0xC0:
            cell.kind = CELL_NULL
        elif tag == 0xC2 or tag == 0xC3:
            cell.kind = CELL_INT
            cell.i = tag - 0xC2
        elif tag >= 0xCC and tag <= 0xCF:  # uint8..uint64
            width = 1 << (tag - 0xCC)
            if pos + width > n:
                return PARSE_MALFORMED
            u = _be(p + pos, width)
            if u > 0x7FFFFFFFFFFFFFFFULL:
                return PARSE_OVERFLOW
            cell.kind = CELL_INT
            cell.i = <long long>u
            pos += width
        elif tag >= 0xD0 and tag <= 0xD3:  # int8..int64
            width = 1 << (tag - 0xD0)
            if pos + width > n:
                return PARSE_MALFORMED
            u = _be(p + pos, width)
            if width < 8 and (u >> (8 * width - 1)) & 1:  # sign-extend
                u |= ~((1ULL << (8 * width)) - 1)
            cell.kind = CELL_INT
            cell.i = <long long>u
            pos += width
        elif tag == 0xCB:
            if pos + 8 > n:
                return PARSE_MALFORMED
            u = _be(p + pos, 8)
            memcpy(&d, &u, 8)
            cell.kind = CELL_FLOAT
            cell.d = d
            pos += 8
        elif tag == 0xCA:
            if pos + 4 > n:
                return PARSE_MALFORMED
            u32 = <unsigned int>_be(p + pos, 4)
            memcpy(&f, &u32, 4)
            cell.kind = CELL_FLOAT
            cell.d = f
            pos += 4
        elif tag >= 0xD9 and tag <= 0xDB:  # str8/16/32
            width = 1 << (tag - 0xD9)
            if pos + width > n:
                return PARSE_MALFORMED
            slen = _be(p + pos, width)
            pos += width
            if slen > <unsigned long long>(n - pos):
                return PARSE_MALFORMED
            cell.kind = CELL_TEXT
            cell.s = <const char*>(p + pos)
            cell.n = <Py_ssize_t>slen
            pos += <Py_ssize_t>slen
        else:
            return PARSE_MALFORMED
    if pos != n:
        return PARSE_MALFORMED
    return PARSE_OK
