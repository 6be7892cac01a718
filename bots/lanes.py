"""One turn at a time per chat, with an explicit policy for messages that arrive meanwhile.

Each chat (and forum topic / thread) has a lane. A message for an idle lane starts a turn
at once; a message for a busy lane follows the chat's busy policy:

- `queue`: wait in a bounded FIFO; the first message queued in a busy period is
  acknowledged, later ones silently join it; a full queue refuses the message, and says so.
- `interrupt`: stop the running turn (its partial answer is kept, marked interrupted)
  and run the new message next. Messages that pile up while the interrupted turn winds
  down are merged into that next turn rather than interrupting each other in turn --
  one person's messages only: another person's wait for their own turn.

The busy check and the state change happen synchronously in `submit`, with no await in
between, so two racing messages can never both start a turn. Control commands (/stop,
/new, /status...) never enter a lane.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Awaitable, Callable

from bots.inbound import Inbound

log = logging.getLogger(__name__)

Runner = Callable[[Inbound, asyncio.Event], Awaitable[None]]


class Submitted(Enum):
    STARTED = "started"
    QUEUED = "queued"  # joined the queue; an acknowledgement is due (first in this busy period)
    QUEUED_QUIETLY = "queued_quietly"  # joined the queue; already acknowledged
    INTERRUPTING = "interrupting"  # the running turn was asked to stop; this one runs next
    FULL = "full"  # the queue is full: refused
    CLOSED = "closed"  # shutting down: refused


@dataclass(eq=False)
class _Lane:
    key: str
    running: asyncio.Task[None] | None = None
    current: Inbound | None = None  # the message the running turn answers
    interrupt: asyncio.Event | None = None
    queue: deque[Inbound] = field(default_factory=deque)
    acknowledged: bool = False
    merge_next: bool = False  # interrupt policy: pending messages merge into the next turn


class Lanes:
    """All lanes of the gateway."""

    def __init__(
        self, runner: Runner, *, queue_max: int = 5, on_dropped: Callable[[list[Inbound]], None] | None = None
    ) -> None:
        """`on_dropped` hears of queued messages that `stop` threw away (they will never run)."""
        self._runner = runner
        self._on_dropped = on_dropped
        self._queue_max = queue_max
        self._lanes: dict[str, _Lane] = {}
        self._closed = False

    # ---- submitting ------------------------------------------------------------------

    def submit(self, inbound: Inbound, *, policy: str, queue_max: int | None = None) -> Submitted:
        """Start, queue or interrupt -- decided and recorded without awaiting anything."""
        if self._closed:
            return Submitted.CLOSED
        lane = self._lanes.setdefault(inbound.chat.key, _Lane(inbound.chat.key))
        if lane.running is None:
            self._start(lane, inbound)
            return Submitted.STARTED
        if policy == "interrupt":
            if lane.interrupt is not None:
                lane.interrupt.set()
            lane.queue.append(inbound)
            lane.merge_next = True
            return Submitted.INTERRUPTING
        limit = self._queue_max if queue_max is None else queue_max
        if len(lane.queue) >= limit:
            return Submitted.FULL
        lane.queue.append(inbound)
        if lane.acknowledged:
            return Submitted.QUEUED_QUIETLY
        lane.acknowledged = True
        return Submitted.QUEUED

    def stop(self, key: str, *, clear_queue: bool = True) -> tuple[bool, int]:
        """Interrupt the running turn of a lane; returns (was running, queued messages dropped)."""
        lane = self._lanes.get(key)
        if lane is None:
            return False, 0
        dropped = 0
        if clear_queue:
            dropped = len(lane.queue)
            thrown = list(lane.queue)
            lane.queue.clear()
            lane.merge_next = False
            if thrown and self._on_dropped is not None:
                self._on_dropped(thrown)
        running = lane.running is not None and lane.interrupt is not None and not lane.interrupt.is_set()
        if lane.interrupt is not None:
            lane.interrupt.set()
        return running, dropped

    async def wait_idle(self, key: str) -> None:
        """Wait until the lane has no running turn and nothing queued."""
        while True:
            lane = self._lanes.get(key)
            if lane is None or lane.running is None:
                return
            await asyncio.shield(lane.running)

    # ---- introspection ---------------------------------------------------------------

    def is_busy(self, key: str) -> bool:
        lane = self._lanes.get(key)
        return lane is not None and lane.running is not None

    def running(self, key: str) -> Inbound | None:
        """The message whose turn is running in this lane, if any."""
        lane = self._lanes.get(key)
        return lane.current if lane is not None and lane.running is not None else None

    def busy_keys(self) -> list[str]:
        """The lanes with a running turn."""
        return [key for key, lane in self._lanes.items() if lane.running is not None]

    @property
    def active(self) -> int:
        return sum(1 for lane in self._lanes.values() if lane.running is not None)

    def queue_depths(self) -> dict[str, int]:
        return {key: len(lane.queue) for key, lane in self._lanes.items() if lane.queue}

    # ---- shutdown --------------------------------------------------------------------

    def interrupt_all(self) -> int:
        """Ask every running turn to stop now (a second shutdown signal); returns how many."""
        count = 0
        for lane in self._lanes.values():
            if lane.interrupt is not None and not lane.interrupt.is_set():
                lane.interrupt.set()
                count += 1
        return count

    async def close(self, timeout: float) -> list[Inbound]:
        """Refuse new messages, give running turns `timeout` seconds, then interrupt them.

        Returns the queued messages that will not run in this process (they stay in the
        inbox, and the next start answers them).
        """
        self._closed = True
        leftovers = [m for lane in self._lanes.values() for m in lane.queue]
        for lane in self._lanes.values():
            lane.queue.clear()
        tasks = [lane.running for lane in self._lanes.values() if lane.running is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                self.interrupt_all()
                await asyncio.wait(pending)
        return leftovers

    # ---- internals -------------------------------------------------------------------

    def _start(self, lane: _Lane, inbound: Inbound) -> None:
        lane.current = inbound
        lane.interrupt = asyncio.Event()
        lane.running = asyncio.create_task(self._run(lane, inbound, lane.interrupt), name=f"turn:{lane.key}")

    async def _run(self, lane: _Lane, inbound: Inbound, interrupt: asyncio.Event) -> None:
        try:
            await self._runner(inbound, interrupt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("chat %s: turn crashed", lane.key)
        finally:
            lane.running = None
            lane.interrupt = None
            lane.current = None
            self._next(lane)

    def _next(self, lane: _Lane) -> None:
        if self._closed or not lane.queue:
            lane.acknowledged = False
            lane.merge_next = False
            if not lane.queue and lane.running is None:
                self._lanes.pop(lane.key, None)
            return
        if lane.merge_next:
            # One person's messages merge; another person's never join theirs (in a
            # group they would be answered, billed and remembered as someone else's).
            first = lane.queue[0].user_key
            pending = []
            while lane.queue and lane.queue[0].user_key == first:
                pending.append(lane.queue.popleft())
            lane.merge_next = bool(lane.queue)
            nxt = pending[0] if len(pending) == 1 else _merge(pending)
        else:
            nxt = lane.queue.popleft()
        if not lane.queue:
            # Everyone waiting has now been served: the next message to wait is a new
            # wait, and deserves its own acknowledgement.
            lane.acknowledged = False
        self._start(lane, nxt)


def _merge(messages: list[Inbound]) -> Inbound:
    """Several messages sent while a turn was being interrupted become one turn."""
    last = messages[-1]
    return replace(
        last,
        text="\n\n".join(m.text for m in messages if m.text),
        inbox_ids=tuple(i for m in messages for i in m.inbox_ids),
    )
