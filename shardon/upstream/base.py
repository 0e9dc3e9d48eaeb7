"""The upstream contract, and the errors raised at its boundary.

An *upstream* is an OpenAI-compatible HTTP/1.1 node (llama.cpp's ``llama-server``,
llama-cpp-python's server, ``vllm serve``, the mock node). Shardon speaks to it as follows:

- ``http://`` or ``https://``: over TLS the node's certificate is verified (against its ``ca_file``,
  else the system's trust store) and its host name sent as SNI (`node_tls`);
- requests are ``POST``/``GET`` with a ``Content-Length`` body; the body is the client's bytes unless
  Shardon had to change them (model alias), and ``Authorization`` carries the *node's* key from the
  config, never the client's;
- a response is read with httptools; its body, de-chunked, is handed to the caller chunk by chunk as
  it arrives, without re-encoding (SSE events pass through untouched);
- connections are kept alive and reused per node; one that is closed by the node while idle is
  dropped; one whose response is abandoned by the caller (client gone) is closed, which makes
  llama.cpp and vLLM stop generating;
- every low-level failure (refused, reset, timed out, unparsable) is translated here, once, into
  :class:`UpstreamError`; ``before_first_byte`` says whether any response byte had arrived, which is
  what decides whether the request may be retried on another node.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import urlsplit


class UpstreamError(Exception):
    """A node failed to answer properly."""

    # Nothing listens at the node's address (the connection was refused): it is down, not slow.
    refused = False

    def __init__(self, message: str, *, before_first_byte: bool, reused: bool = False) -> None:
        super().__init__(message)
        self.before_first_byte = before_first_byte
        # The failure happened on a kept-alive connection the node may have closed meanwhile:
        # a retry on a fresh connection to the same node is always safe.
        self.reused = reused


class UpstreamConnectError(UpstreamError):
    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message, before_first_byte=True)
        self.refused = refused


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


def node_tls(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS settings of an ``https://`` node (None for ``http://``): certificate and host name
    verified, against ``ca_file`` (PEM, a private CA) when given, else the system's trust store."""
    if urlsplit(url).scheme != "https":
        return None
    return ssl.create_default_context(cafile=os.path.expanduser(ca_file) if ca_file else None)
