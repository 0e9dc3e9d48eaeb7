"""The common request served by callbacks alone: no task, no coroutine, no future.

Most requests a gateway sees are the same shape: a non-streamed completion (or embedding) from a
caller with no rate limit, for a model whose node has a free slot and a kept-alive connection. For
those, the native engine hands the whole request to `FastPath` before starting any coroutine::

    client bytes parsed (engine) ─► FastPath(request): auth, routing fields, admit, the node's
    connection ─► request written to the node ─► (later) the node's bytes parsed ─►
    FastRequest.upstream_event: response written to the client, slot released, usage, record

Two loop callbacks per request, and none of the task/coroutine/future machinery the general path
needs in order to wait. Everything else goes the general way (`Gateway._serve`), decided before
anything is sent:

- `FastPath` returns False, with no side effect, and the engine then starts the RSGI application
  as usual, for: a stream, a draining gateway, a caller that fails auth or is rate-limited, a body
  the general path must answer with a 4xx, an unknown model, a model started on demand, a request
  that must queue, a node without an idle connection.
- After the request was sent, anything unusual is handed to the general path where it would have
  happened there (`Gateway.resume`): a failure before the response (with its retry rules), or an
  answer that is not whole within ``_WHOLE_LIMIT`` bytes (relayed as it arrives). The general path
  then finishes the request on the same record: the log still gets one row.
- The client leaving closes the node connection (which stops the generation), frees the slot and
  logs 499, at once.

The outcome is the general path's, byte for byte and field for field; the end-to-end tests run
with the callback path on and off. The code is in ``shardon._fast`` (compiled, with the
pure-Python reference in ``_wire_py.py``).
"""

from __future__ import annotations

from ._fast.wire import FastPath, FastRequest

__all__ = ["FastPath", "FastRequest"]
