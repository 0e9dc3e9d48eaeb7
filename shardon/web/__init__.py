"""The web dashboard served by the gateway at ``/ui`` (see `shardon.web.dashboard`)."""

from .dashboard import Dashboard

__all__ = ["Dashboard"]
