"""Output receipts: the SHA-256 of the text a model generated, and the receipt dict.

The digest (``output_sha256``) is of the UTF-8 text generated for choice 0 of a completion, whether
the response was streamed or not, so the same text gives the same digest either way:

- `hash_response(body)` for a non-streamed response: ``choices[0].message.content`` (chat) or
  ``choices[0].text`` (completions); missing or null fields hash as empty text. It also returns the
  response's ``usage``.
- `OutputHasher` for a stream, fed each network chunk as it is forwarded to the client
  (``feed_sse``), then ``hexdigest()``.

Both run on every request, so they live in ``shardon._fast`` (compiled, with their pure-Python
twins; ``_sse_py.py`` documents how SSE is read: chunk boundaries, data lines, usage events, what
is hashed).

Only ``content``/``text`` is hashed: tool calls, reasoning content and logprobs are not part of the
digest.

`receipt_for(record)` builds the receipt of a finished request (node, backend, model file hash,
timings, token counts, output hash) from a `RequestRecord` or a request-log row dict; it lives with
the records (`shardon.store.records`).
"""

from __future__ import annotations

from ._fast.sse import OutputHasher, hash_response
from .store.records import receipt_for

__all__ = ["OutputHasher", "hash_response", "receipt_for"]
