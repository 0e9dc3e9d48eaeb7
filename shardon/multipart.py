"""The few fields of a ``multipart/form-data`` body that routing needs, read without copying the files.

An audio transcription or an image edit is uploaded as a form (RFC 7578): its ``model`` field routes
it like the ``model`` member of a JSON body. `form_fields` finds named text fields by scanning for the
boundary (``bytes.find``, so a 25 MB file part costs a memory scan, not a parse); `replace_field`
rewrites one field's value (a model the node knows by another name) and keeps every other byte.
"""

from __future__ import annotations

__all__ = ["FormError", "boundary_of", "form_data", "form_fields", "replace_field"]


class FormError(ValueError):
    """The body is not the multipart form its Content-Type announces."""


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type (FormError if it is not one)."""
    if not content_type:
        raise FormError("Content-Type must be multipart/form-data")
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise FormError(f"Content-Type must be multipart/form-data, got {kind.strip()!r}")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if 1 <= len(value) <= 70:
                return value.encode("latin-1")
    raise FormError("multipart/form-data without a boundary")


def _parts(body: bytes, boundary: bytes) -> list[tuple[str | None, bool, int, int]]:
    """Each part as (field name, whether it is a file, value start, value end)."""
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise FormError("the body has no part")
    parts: list[tuple[str | None, bool, int, int]] = []
    closing = b"\r\n" + delimiter
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts
        if not body.startswith(b"\r\n", pos):
            raise FormError("a boundary is not followed by a line break")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise FormError("a part's headers do not end")
        name, is_file = _disposition(body[pos + 2 : head_end])
        start = head_end + 4
        end = body.find(closing, start)
        if end < 0:
            raise FormError("the form does not end with its boundary")
        parts.append((name, is_file, start, end))
        pos = end + 2


def _disposition(head: bytes) -> tuple[str | None, bool]:
    for line in head.split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() != b"content-disposition":
            continue
        name = None
        is_file = False
        for param in value.decode("utf-8", "replace").split(";")[1:]:
            key, _, raw = param.strip().partition("=")
            key = key.strip().lower()
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            if key == "name":
                name = raw
            elif key in ("filename", "filename*"):
                is_file = True
        return name, is_file
    return None, False


def form_fields(body: bytes, boundary: bytes, names: frozenset[str]) -> dict[str, str]:
    """The text fields among ``names`` (the first of each), decoded as UTF-8."""
    found: dict[str, str] = {}
    for name, is_file, start, end in _parts(body, boundary):
        if name in names and not is_file and name not in found:
            try:
                found[name] = body[start:end].decode("utf-8")
            except UnicodeDecodeError:
                raise FormError(f"the form field {name!r} is not UTF-8 text") from None
    return found


def form_data(body: bytes, boundary: bytes) -> list[tuple[str | None, bool, bytes]]:
    """Every part: (field name, whether it is a file, its bytes)."""
    return [(name, is_file, body[start:end]) for name, is_file, start, end in _parts(body, boundary)]


def replace_field(body: bytes, boundary: bytes, name: str, value: str) -> bytes:
    """The same form with the (first) text field ``name`` set to ``value``."""
    for part, is_file, start, end in _parts(body, boundary):
        if part == name and not is_file:
            return body[:start] + value.encode() + body[end:]
    raise FormError(f"the form has no field {name!r}")
