"""A weighted traffic split: one public name, several variants (A/B tests, canaries).

Without a session (or without ``sticky: session``) requests are dealt out by smooth weighted round
robin, so any run of requests matches the weights as closely as whole requests can. With
``sticky: session``, a session's variant is a hash of the session into the weights: the same
variant for every request of the session, on every gateway, while the weights stay the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["Split"]


class Split:
    __slots__ = ("credit", "names", "sticky", "total", "weights")

    def __init__(self, weights: Mapping[str, float], sticky: bool = False) -> None:
        self.names = list(weights)
        self.weights = [float(w) for w in weights.values()]
        self.total = sum(self.weights)
        self.credit = [0.0] * len(self.names)
        self.sticky = sticky

    def choose(self, session: str | None) -> str:
        """The variant of a request (its session, if any)."""
        if self.sticky and session:
            return self.of_session(session)
        credit = self.credit
        weights = self.weights
        best = 0
        for i in range(len(credit)):
            credit[i] += weights[i]
            if credit[i] > credit[best]:
                best = i
        credit[best] -= self.total
        return self.names[best]

    def of_session(self, session: str) -> str:
        """A session's variant: its hash, as a point in [0, total), falls in one variant's weight."""
        digest = hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2.0**64 * self.total
        for name, weight in zip(self.names, self.weights, strict=True):
            if point < weight:
                return name
            point -= weight
        return self.names[-1]
