"""Capped exponential back-off, for loops that retry a platform forever.

A connection that heals must not hammer a platform that is down (every retry of a
getUpdates storm is one more request to a struggling server), yet must notice quickly
when it is back. Doubling from a short first delay up to a cap does both; a little
jitter keeps several processes (or several loops in one) from retrying in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """The delays between attempts: `initial`, then ×`factor` each time, never above `cap`.

    A policy, not a state: each retry loop takes a fresh `delays()` and starts over
    with a new one after a success.
    """

    initial: float = 1.0
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1  # each delay is shortened by up to this fraction, at random

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.cap < self.initial or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid back-off {self!r}")

    def delays(self) -> Iterator[float]:
        """An endless sequence of delays (seconds)."""
        delay = self.initial
        while True:
            yield delay * (1.0 - self.jitter * random.random())
            delay = min(self.cap, delay * self.factor)


PLATFORM_BACKOFF = Backoff(initial=1.0, cap=30.0)
"""Receiving from a platform: retried after 1, 2, 4 ... 30, 30 ... seconds, forever."""

STORE_BACKOFF = Backoff(initial=0.5, cap=10.0)
"""Handing received messages to a store that failed: sooner, since nothing is read meanwhile."""
