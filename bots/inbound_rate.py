"""How fast one person may send messages that start turns (`access.user_rate`).

A flood from one person -- 200 messages in ten seconds -- must cost that person alone:
every accepted message is a model call, a queue slot and, sooner or later, a reply in a
shared chat. So before a message enters a lane, its sender's recent messages are counted
in a moving window (e.g. 20 per minute); past the limit the message is dropped, and the
sender is told so at most once per window -- one notice per burst, never one per
dropped message (a notice is itself a message in the chat, paced like every other).

The counting is the `limits` library's (https://limits.readthedocs.io): its moving-window
strategy over its async storage. Today that is the in-process memory storage; with
several replicas it becomes its Redis storage (`InboundRate(rate, storage=...)`), and
nothing else here changes. Owners are exempt, and commands are not counted (the gateway
decides both): /stop must work for the very person who flooded.
"""

from __future__ import annotations

import logging
from enum import Enum

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, MovingWindowSupport, Storage
from limits.aio.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

DEFAULT_USER_RATE = "20/minute"
"""Generous for a person typing (a message every 3 s, sustained for a minute), yet it
caps what a script or a stuck key can make the bot spend."""

OFF = ("off", "none", "")


class Verdict(Enum):
    ALLOWED = "allowed"
    LIMITED = "limited"  # over the limit: drop it, and tell the sender (first drop of a burst)
    LIMITED_QUIETLY = "limited_quietly"  # over the limit: drop it; the sender was told already


def parse_rate(value: object) -> RateLimitItem | None:
    """`access.user_rate` as a `limits` item; None for "off". Raises ValueError saying what to write.

    Accepted: `limits`' notation, `N/unit` or `N per [M] unit(s)` with second, minute,
    hour or day -- e.g. "20/minute", "20 per minute", "5 per 10 seconds".
    """
    if value is None or value is False:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be a rate like '20/minute' or 'off', got {value!r}")
    text = value.strip()
    if text.lower() in OFF:
        return None
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(
            f"must be a rate like '20/minute', '20 per minute' or '5 per 10 seconds' (units: second, minute, "
            f"hour, day), or 'off'; got {text[:40]!r}"
        ) from None
    if len(items) != 1:
        raise ValueError(f"must be one rate, like '20/minute'; got {len(items)} in {text[:40]!r}")
    item = items[0]
    if item.amount < 1:
        raise ValueError(f"must allow at least 1 message (write 'off' to disable the limit); got {text[:40]!r}")
    return item


def describe(item: RateLimitItem) -> str:
    """"20 per minute", "5 per 10 seconds": the limit as a person reads it."""
    unit = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{item.amount} per {unit}"
    return f"{item.amount} per {item.multiples} {unit}s"


class InboundRate:
    """Counts each sender's messages in a moving window; says whether the next one may pass.

    `storage`: a `limits` async storage with moving-window support (default: this
    process's memory). Time is the storage's own (`time.time` for the memory storage,
    the server's for Redis); tests move the memory storage's clock instead of sleeping
    (tests/test_flood.py).
    """

    def __init__(self, rate: RateLimitItem | str, *, storage: Storage | None = None) -> None:
        item = parse_rate(rate) if isinstance(rate, str) else rate
        if item is None:
            raise ValueError("InboundRate needs a rate; 'off' means: build no InboundRate at all")
        self.item = item
        # One notice per window and sender: a burst that lasts a minute earns one.
        self.notice_item = parse_rate(f"1 per {item.multiples} {item.GRANULARITY.name}")
        assert self.notice_item is not None
        self.storage = storage if storage is not None else MemoryStorage()
        if not isinstance(self.storage, MovingWindowSupport):
            raise ValueError(f"{type(self.storage).__name__} cannot count a moving window")
        self._limiter = MovingWindowRateLimiter(self.storage)

    @property
    def description(self) -> str:
        return describe(self.item)

    async def hit(self, sender: str) -> Verdict:
        """Count one message of `sender` (a `platform:user_id`), if it is within the limit."""
        if await self._limiter.hit(self.item, "inbound", sender):
            return Verdict.ALLOWED
        if await self._limiter.hit(self.notice_item, "inbound-notice", sender):
            log.info("%s is over the inbound rate limit (%s): dropping messages", sender, self.description)
            return Verdict.LIMITED
        return Verdict.LIMITED_QUIETLY

    async def aclose(self) -> None:
        """Stop the memory storage's expiry task (it would outlive the event loop)."""
        timer = getattr(self.storage, "timer", None)
        if timer is not None and not timer.done():
            timer.cancel()
