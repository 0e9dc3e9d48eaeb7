# cython: language_level=3
"""Batch row writer for the request log: SQLite's C API, the GIL released for the whole batch.

Why: Python's ``sqlite3`` binds every parameter of every row through Python objects while holding
the GIL, and releases and re-takes it around each ``sqlite3_step``: several times SQLite's own
work per row, and each re-take contends with the event loop thread.

Algorithm (one call of ``insert`` or ``insert_packed`` = one transaction):

1. Turn every value into a ``Cell`` (NULL, int64, double, or a pointer to UTF-8 text that a live
   Python object already holds; the caller's list keeps those objects alive for the whole call).
   - ``insert(records)``, with the GIL: read each column's attribute of each record.
   - ``insert_packed(rows)``: with the GIL, only collect each ``bytes`` row's pointer and size;
     then, without it, parse each row (a msgpack array, as ``msgspec`` writes an ``array_like``
     Struct; ``_msgpack_row.pxi``) straight into cells, the text cells pointing into the ``bytes``.
     This is the request log's path: the thread writing holds the GIL for almost nothing, so it
     does not stall the event loop even when it runs on another core.
   A value of another type, or an int out of int64 range, raises before anything is written.
2. Without the GIL: ``BEGIN IMMEDIATE``, then bind, step and reset the prepared INSERT once per
   row (text bound ``SQLITE_STATIC``: no copy), then ``COMMIT``. On any error: ``ROLLBACK``.
3. With the GIL again: an error becomes ``sqlite3.OperationalError`` when the database could not
   be written (busy, locked, I/O, full, read-only: retry later) and ``sqlite3.DatabaseError``
   otherwise (a row SQLite refused: the caller retries row by row).

SQLite is reached through the library the ``sqlite3`` module itself loaded (found in
``/proc/self/maps``), never through a second copy: two copies of SQLite in one process defeat its
POSIX locks and can corrupt the database. Where that library cannot be found (no ``/proc``, or a
Python with SQLite linked in statically), importing this module raises ImportError and the
pure-Python twin is used. No SQLite header or library is needed to build it.
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLong
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import ctypes
import sqlite3

cdef extern from *:
    """
    typedef struct sqlite3 sqlite3;
    typedef struct sqlite3_stmt sqlite3_stmt;
    """
    ctypedef struct Db "sqlite3"
    ctypedef struct Stmt "sqlite3_stmt"

ctypedef void (*destructor_t)(void*) noexcept nogil
ctypedef int (*open_v2_t)(const char*, Db**, int, const char*) noexcept nogil
ctypedef int (*close_t)(Db*) noexcept nogil
ctypedef int (*exec_t)(Db*, const char*, void*, void*, char**) noexcept nogil
ctypedef int (*prepare_v2_t)(Db*, const char*, int, Stmt**, const char**) noexcept nogil
ctypedef int (*bind_int64_t)(Stmt*, int, long long) noexcept nogil
ctypedef int (*bind_double_t)(Stmt*, int, double) noexcept nogil
ctypedef int (*bind_text_t)(Stmt*, int, const char*, int, destructor_t) noexcept nogil
ctypedef int (*bind_null_t)(Stmt*, int) noexcept nogil
ctypedef int (*stmt_t)(Stmt*) noexcept nogil
ctypedef const char* (*errmsg_t)(Db*) noexcept nogil
ctypedef int (*busy_timeout_t)(Db*, int) noexcept nogil
ctypedef void (*free_t)(void*) noexcept nogil
ctypedef int (*version_t)() noexcept nogil

cdef struct Api:
    open_v2_t open_v2
    close_t close
    exec_t exec_
    prepare_v2_t prepare_v2
    bind_int64_t bind_int64
    bind_double_t bind_double
    bind_text_t bind_text
    bind_null_t bind_null
    stmt_t step
    stmt_t reset
    stmt_t finalize
    errmsg_t errmsg
    busy_timeout_t busy_timeout
    free_t free_
    version_t libversion_number

cdef Api api

cdef enum:
    SQLITE_OK = 0
    SQLITE_DONE = 101
    SQLITE_OPEN_READWRITE = 0x00000002
    SQLITE_OPEN_NOMUTEX = 0x00008000

# Result codes (primary, rc & 0xff) that mean "the database could not be written now": retry later.
_RETRYABLE = frozenset({5, 6, 7, 8, 10, 13, 14, 15, 26})  # BUSY LOCKED NOMEM READONLY IOERR FULL CANTOPEN PROTOCOL NOTADB

include "_msgpack_row.pxi"


def _sqlite_library_path():
    """The SQLite shared library the ``sqlite3`` module loaded, from this process's memory map."""
    import _sqlite3  # noqa: F401  (makes sure it is loaded)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and "/libsqlite3.so" in fields[5]:
                    return fields[5].rstrip("\n")
    except OSError:
        pass
    return None


cdef size_t _address(lib, str name) except 0:
    cdef object value = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    if not value:
        raise ImportError(f"SQLite symbol {name} not found")
    return <size_t>value


cdef int _load_api() except -1:
    path = _sqlite_library_path()
    if path is None:
        raise ImportError("the SQLite library used by the sqlite3 module is not a shared library here")
    lib = ctypes.CDLL(path)
    api.open_v2 = <open_v2_t>_address(lib, "sqlite3_open_v2")
    api.close = <close_t>_address(lib, "sqlite3_close_v2")
    api.exec_ = <exec_t>_address(lib, "sqlite3_exec")
    api.prepare_v2 = <prepare_v2_t>_address(lib, "sqlite3_prepare_v2")
    api.bind_int64 = <bind_int64_t>_address(lib, "sqlite3_bind_int64")
    api.bind_double = <bind_double_t>_address(lib, "sqlite3_bind_double")
    api.bind_text = <bind_text_t>_address(lib, "sqlite3_bind_text")
    api.bind_null = <bind_null_t>_address(lib, "sqlite3_bind_null")
    api.step = <stmt_t>_address(lib, "sqlite3_step")
    api.reset = <stmt_t>_address(lib, "sqlite3_reset")
    api.finalize = <stmt_t>_address(lib, "sqlite3_finalize")
    api.errmsg = <errmsg_t>_address(lib, "sqlite3_errmsg")
    api.busy_timeout = <busy_timeout_t>_address(lib, "sqlite3_busy_timeout")
    api.free_ = <free_t>_address(lib, "sqlite3_free")
    api.libversion_number = <version_t>_address(lib, "sqlite3_libversion_number")
    major, minor, patch = sqlite3.sqlite_version_info
    if api.libversion_number() != major * 1000000 + minor * 1000 + patch:
        raise ImportError("the SQLite library found is not the one the sqlite3 module uses")
    return 0


_load_api()

SQLITE_LIBRARY = _sqlite_library_path()


cdef object _error(int rc, str message):
    cls = sqlite3.OperationalError if (rc & 0xFF) in _RETRYABLE else sqlite3.DatabaseError
    err = cls(message)
    err.sqlite_errorcode = rc
    return err


@cython.final
cdef class RowWriter:
    """Inserts records into one table of a SQLite database, one transaction per `insert` call.

    ``columns`` name both the table's columns and the records' attributes. ``verb`` is the start
    of the statement (``INSERT`` or ``INSERT OR REPLACE``). The connection is opened read-write
    (the database and table must exist), with ``busy_timeout_ms``, ``synchronous=NORMAL`` and then
    each of ``pragmas`` (e.g. ``"cache_size = -32768"``). Use it from one thread at a time.
    """

    cdef:
        Db* db
        Stmt* stmt
        tuple names
        int ncols
        Cell* cells
        Py_ssize_t capacity
        readonly str path
        readonly Py_ssize_t written

    def __cinit__(self):
        self.db = NULL
        self.stmt = NULL
        self.cells = NULL
        self.capacity = 0
        self.written = 0

    def __init__(
        self, str path, str table, columns, *, str verb="INSERT OR REPLACE", int busy_timeout_ms=5000, pragmas=()
    ):
        self.names = tuple(columns)
        self.ncols = len(self.names)
        if self.ncols == 0:
            raise ValueError("no columns")
        self.path = path
        sql = "{} INTO {} ({}) VALUES ({})".format(verb, table, ", ".join(self.names), ", ".join("?" * self.ncols))
        cdef bytes bpath = path.encode()
        cdef bytes bsql = sql.encode()
        cdef int rc = api.open_v2(bpath, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
        if rc != SQLITE_OK:
            message = self._message()
            self.close()
            raise _error(rc, f"cannot open {path}: {message}")
        api.busy_timeout(self.db, busy_timeout_ms)
        self._exec(b"PRAGMA synchronous = NORMAL")
        for pragma in pragmas:
            self._exec(f"PRAGMA {pragma}".encode())
        rc = api.prepare_v2(self.db, bsql, -1, &self.stmt, NULL)
        if rc != SQLITE_OK:
            message = self._message()
            self.close()
            raise _error(rc, message)

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self.stmt != NULL:
            api.finalize(self.stmt)
            self.stmt = NULL
        if self.db != NULL:
            api.close(self.db)
            self.db = NULL
        if self.cells != NULL:
            free(self.cells)
            self.cells = NULL
            self.capacity = 0

    def close(self):
        """Close the connection. Idempotent."""
        self._release()

    @property
    def closed(self):
        return self.db == NULL

    cdef str _message(self):
        if self.db == NULL:
            return "out of memory"
        return (<bytes>api.errmsg(self.db)).decode("utf-8", "replace")

    cdef int _exec(self, const char* sql) except -1:
        cdef char* err = NULL
        cdef int rc = api.exec_(self.db, sql, NULL, NULL, &err)
        if rc != SQLITE_OK:
            message = (<bytes>err).decode("utf-8", "replace") if err != NULL else self._message()
            if err != NULL:
                api.free_(err)
            raise _error(rc, message)
        return 0

    cdef int _reserve(self, Py_ssize_t rows) except -1:
        cdef Py_ssize_t need = rows * self.ncols
        cdef Cell* grown
        if need > self.capacity:
            grown = <Cell*>realloc(self.cells, need * sizeof(Cell))
            if grown == NULL:
                raise MemoryError()
            self.cells = grown
            self.capacity = need
        return 0

    cdef int _fill(self, Cell* cell, object value) except -1:
        if value is None:
            cell.kind = CELL_NULL
        elif type(value) is str:
            cell.kind = CELL_TEXT
            cell.s = PyUnicode_AsUTF8AndSize(value, &cell.n)
            if cell.n > 0x7FFFFFFF:
                raise OverflowError("text too long for SQLite")
        elif type(value) is float:
            cell.kind = CELL_FLOAT
            cell.d = PyFloat_AS_DOUBLE(value)
        elif isinstance(value, int):  # bool included, as sqlite3 binds it
            cell.kind = CELL_INT
            cell.i = PyLong_AsLongLong(value)
        elif isinstance(value, float):
            cell.kind = CELL_FLOAT
            cell.d = float(value)
        elif isinstance(value, str):
            cell.kind = CELL_TEXT
            cell.s = PyUnicode_AsUTF8AndSize(value, &cell.n)
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in the request log")
        return 0

    cdef int _write(self, Py_ssize_t nrows) except -1:
        """Insert the first ``nrows`` rows of ``self.cells`` in one transaction, without the GIL."""
        cdef int rc = SQLITE_OK
        cdef Py_ssize_t failed_row = -1
        cdef Py_ssize_t r
        cdef int c
        cdef int ncols = self.ncols
        cdef Db* db = self.db
        cdef Stmt* stmt = self.stmt
        cdef Cell* row
        cdef Cell* cell
        with nogil:
            rc = api.exec_(db, b"BEGIN IMMEDIATE", NULL, NULL, NULL)
            if rc == SQLITE_OK:
                for r in range(nrows):
                    row = self.cells + r * ncols
                    for c in range(ncols):
                        cell = row + c
                        if cell.kind == CELL_INT:
                            rc = api.bind_int64(stmt, c + 1, cell.i)
                        elif cell.kind == CELL_FLOAT:
                            rc = api.bind_double(stmt, c + 1, cell.d)
                        elif cell.kind == CELL_TEXT:
                            rc = api.bind_text(stmt, c + 1, cell.s, <int>cell.n, NULL)  # NULL: SQLITE_STATIC
                        else:
                            rc = api.bind_null(stmt, c + 1)
                        if rc != SQLITE_OK:
                            break
                    if rc == SQLITE_OK:
                        rc = api.step(stmt)
                        if rc == SQLITE_DONE:
                            rc = SQLITE_OK
                    api.reset(stmt)
                    if rc != SQLITE_OK:
                        failed_row = r
                        break
                if rc == SQLITE_OK:
                    rc = api.exec_(db, b"COMMIT", NULL, NULL, NULL)
        if rc != SQLITE_OK:
            message = self._message()
            with nogil:
                api.exec_(db, b"ROLLBACK", NULL, NULL, NULL)
            if failed_row >= 0:
                message = f"row {failed_row}: {message}"
            raise _error(rc, message)
        self.written += nrows
        return 0

    def insert_frame(self, bytes body, Py_ssize_t count):
        """`insert_packed` for ``count`` rows laid out as the request log's backlog frames them:
        ``count`` little-endian u32 lengths, then the rows back to back (one transaction).

        The rows are located, parsed and written without the GIL: the low-priority thread that
        calls this never holds the GIL through a per-row loop (a thread holding it while the OS
        keeps it off the CPU would stall the event loop). ValueError when the lengths do not add
        up to ``body``.
        """
        if self.db == NULL:
            raise sqlite3.ProgrammingError("RowWriter is closed")
        if count == 0:
            return 0
        cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
        if count < 0 or size < 4 * count:
            raise ValueError("frame too short for its row count")
        self._reserve(count)
        cdef Packed* packed = <Packed*>malloc(count * sizeof(Packed))
        if packed == NULL:
            raise MemoryError()
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(body)
        cdef Py_ssize_t r, pos = 4 * count
        cdef unsigned int n
        cdef int status = PARSE_OK
        cdef Py_ssize_t bad = -1
        cdef bint short = False
        cdef int ncols = self.ncols
        try:
            with nogil:
                for r in range(count):
                    n = (<unsigned int>base[4 * r]) | (<unsigned int>base[4 * r + 1] << 8) | (
                        <unsigned int>base[4 * r + 2] << 16) | (<unsigned int>base[4 * r + 3] << 24)
                    if pos + n > size:
                        short = True
                        break
                    packed[r].p = base + pos
                    packed[r].n = n
                    pos += n
                if not short and pos == size:
                    for r in range(count):
                        status = _parse_row(packed[r].p, packed[r].n, self.cells + r * ncols, ncols)
                        if status != PARSE_OK:
                            bad = r
                            break
        finally:
            free(packed)
        if short or pos != size:
            raise ValueError("frame lengths do not add up to its size")
        if status == PARSE_OVERFLOW:
            raise OverflowError(f"row {bad}: integer out of SQLite's range")
        if status == PARSE_ARITY:
            raise ValueError(f"row {bad}: not an array of {ncols} values")
        if status != PARSE_OK:
            raise ValueError(f"row {bad}: not a msgpack array of None/bool/int/float/str")
        self._write(count)
        return count

    def insert_packed(self, list rows):
        """Like `insert`, for rows packed as msgpack arrays (``bytes``), one per row, in column order.

        This is what ``msgspec.msgpack`` writes for an ``array_like`` Struct or a tuple. The rows
        are parsed and written without the GIL. Raises ValueError for a row that is not such an
        array of ``len(columns)`` None/bool/int/float/str values, OverflowError for an integer
        beyond int64 (nothing written in either case), and what `insert` raises.
        """
        if self.db == NULL:
            raise sqlite3.ProgrammingError("RowWriter is closed")
        cdef Py_ssize_t nrows = len(rows)
        if nrows == 0:
            return 0
        self._reserve(nrows)
        cdef Packed* packed = <Packed*>malloc(nrows * sizeof(Packed))
        if packed == NULL:
            raise MemoryError()
        cdef Py_ssize_t r
        cdef int status = PARSE_OK
        cdef Py_ssize_t bad = -1
        cdef int ncols = self.ncols
        try:
            for r in range(nrows):
                item = rows[r]
                if type(item) is not bytes:
                    raise TypeError(f"row {r}: expected bytes, got {type(item).__name__}")
                packed[r].p = <const unsigned char*>PyBytes_AS_STRING(item)
                packed[r].n = PyBytes_GET_SIZE(item)
            with nogil:
                for r in range(nrows):
                    status = _parse_row(packed[r].p, packed[r].n, self.cells + r * ncols, ncols)
                    if status != PARSE_OK:
                        bad = r
                        break
        finally:
            free(packed)
        if status == PARSE_OVERFLOW:
            raise OverflowError(f"row {bad}: integer out of SQLite's range")
        if status == PARSE_ARITY:
            raise ValueError(f"row {bad}: not an array of {ncols} values")
        if status != PARSE_OK:
            raise ValueError(f"row {bad}: not a msgpack array of None/bool/int/float/str")
        self._write(nrows)
        return nrows

    def insert(self, list records):
        """Write ``records`` in one transaction; return how many. All or nothing.

        Raises ValueError/TypeError/OverflowError for a value it cannot store (nothing written),
        ``sqlite3.OperationalError`` when the database cannot be written now (nothing written),
        ``sqlite3.DatabaseError`` when SQLite refused a row (nothing written).
        """
        if self.db == NULL:
            raise sqlite3.ProgrammingError("RowWriter is closed")
        cdef Py_ssize_t nrows = len(records)
        if nrows == 0:
            return 0
        self._reserve(nrows)
        cdef Py_ssize_t r, c
        cdef int ncols = self.ncols
        cdef tuple names = self.names
        cdef Cell* row
        for r in range(nrows):
            record = records[r]
            row = self.cells + r * ncols
            for c in range(ncols):
                self._fill(row + c, getattr(record, <str>names[c]))
        self._write(nrows)
        return nrows
