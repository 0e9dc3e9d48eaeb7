"""The routing tests' fixtures: the fleet's TLS mock nodes (an https:// overflow endpoint)."""

from tests.fleet.conftest import certificates, make_tls_mock

__all__ = ["certificates", "make_tls_mock"]
