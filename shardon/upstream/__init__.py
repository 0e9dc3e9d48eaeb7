"""Upstream side of the gateway: keep-alive pool, response streaming, mock inference node."""
