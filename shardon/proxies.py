"""The client's address, when Shardon sits behind reverse proxies (``server.trusted_proxies``).

A request whose TCP peer is a trusted proxy is attributed to the address that proxy forwarded:
``X-Forwarded-For`` read right to left (each proxy appends the address it was reached from), the
first entry that is not itself a trusted proxy; without that header, ``X-Real-IP``. Any other peer's
headers are ignored, so a client cannot choose the address it is logged under or pass the
loopback-only admin check. The answer is what the request log records (``client_addr``) and what
the admin API's loopback rule sees. With no trusted proxy (the default) it is the TCP peer itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Protocol

__all__ = ["ClientAddress", "parse_trusted", "peer_host"]

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_CACHE_LIMIT = 4096  # trust decisions kept per peer address (a proxy fleet is small)


class _Headers(Protocol):
    def get(self, key: str, default: str | None = None) -> str | None: ...


class _Scope(Protocol):
    """What the engines' request objects share: the peer as ``host:port`` and the headers."""

    @property
    def client(self) -> str: ...
    @property
    def headers(self) -> _Headers: ...


def parse_trusted(entries: Sequence[str]) -> tuple[Network, ...]:
    """The networks of ``server.trusted_proxies``; ValueError ``"[i]: why"`` for a bad entry."""
    networks: list[Network] = []
    for i, entry in enumerate(entries):
        try:
            networks.append(ip_network(entry.strip()))
        except ValueError as exc:
            raise ValueError(f"[{i}]: not an address or network ({exc})") from None
    return tuple(networks)


def _parse(text: str) -> Address | None:
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener's IPv4 peer
    return address


def peer_host(peer: str) -> Address | None:
    """The address in ``host:port``, ``[v6]:port`` or a bare address; None when there is none."""
    if peer.startswith("["):
        return _parse(peer[1 : peer.find("]")])
    host, sep, port = peer.rpartition(":")
    if sep and port.isdigit():
        # The engines write IPv6 peers without brackets ("::1:51234"): the port is the last group.
        address = _parse(host)
        if address is not None:
            return address
    return _parse(peer)


class ClientAddress:
    """``client_address(scope)``: the address a request is attributed to (see the module)."""

    __slots__ = ("_decided", "networks")

    def __init__(self, trusted: Sequence[str] = ()) -> None:
        self.networks = parse_trusted(trusted)
        self._decided: dict[str, bool] = {}

    def __call__(self, scope: _Scope) -> str:
        if not self.networks:
            return scope.client
        return self.resolve(scope.client, scope.headers)

    def resolve(self, peer: str, headers: _Headers) -> str:
        """The client of a request from ``peer`` (``host:port``) with these headers."""
        if not self._peer_trusted(peer):
            return peer
        forwarded = headers.get("x-forwarded-for")
        if forwarded:
            client = peer
            for entry in reversed(forwarded.split(",")):
                address = peer_host(entry.strip())
                if address is None:
                    break  # not an address: the hop that passed it on is the last one known
                client = str(address)
                if not self.trusted(address):
                    break
            return client
        real = headers.get("x-real-ip")
        if real:
            address = peer_host(real.strip())
            if address is not None:
                return str(address)
        return peer

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def _peer_trusted(self, peer: str) -> bool:
        decided = self._decided.get(peer)
        if decided is None:
            address = peer_host(peer)
            decided = address is not None and self.trusted(address)
            if len(self._decided) >= _CACHE_LIMIT:
                self._decided.clear()
            self._decided[peer] = decided
        return decided
