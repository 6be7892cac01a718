"""One turn at a time per chat, with an explicit policy for messages that arrive meanwhile.

Each chat (and forum topic / thread) has a lane. A message for an idle lane starts a turn
at once; a message for a busy lane follows the chat's busy policy:

- `queue`: wait in a bounded queue -- bounded *per person*: each sender may have up to
  `queue_max` messages waiting in a chat. A sender's first waiting message is
  acknowledged, later ones silently join it; a sender whose queue is full is told once,
  and further messages of theirs are refused silently until their queue has drained
  (a flood earns one notice, not one per message).
- `interrupt`: stop the running turn (its partial answer is kept, marked interrupted)
  and run the new message next. Messages that pile up while the interrupted turn winds
  down are merged into that next turn rather than interrupting each other in turn --
  one person's messages only: another person's wait for their own turn.

Fairness: a group is shared by people, and one of them flooding it must not make the
others wait behind the flood. So the waiting messages are kept per person, and the next
turn goes to the waiting person whose last turn in this chat started longest ago (people
who have not had one yet first, in the order they started waiting) -- round-robin between
people, FIFO within one person's messages. Whoever writes while someone else's backlog
waits is answered by the very next turn, whatever the size of that backlog.

Edits: a waiting message that its sender edits is replaced where it waits (`revise`);
the message of the running turn, edited, restarts the turn (`restart`): the running turn
is asked to stop and the edited message runs next, ahead of everyone waiting -- it is
the same question, asked again, not a new one.

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
    QUEUED = "queued"  # joined the queue; an acknowledgement is due (the sender's first waiting message)
    QUEUED_QUIETLY = "queued_quietly"  # joined the queue; the sender was acknowledged already
    INTERRUPTING = "interrupting"  # the running turn was asked to stop; this one runs next
    FULL = "full"  # the sender's queue is full: refused, and the sender is due a notice
    FULL_QUIETLY = "full_quietly"  # refused; the sender was told already (until their queue drains)
    CLOSED = "closed"  # shutting down: refused


@dataclass(eq=False)
class _Lane:
    key: str
    running: asyncio.Task[None] | None = None
    current: Inbound | None = None  # the message the running turn answers
    interrupt: asyncio.Event | None = None
    # Waiting messages, per sender (user_key), each sender's in arrival order. Only
    # senders with something waiting have an entry.
    waiting: dict[str, deque[tuple[int, Inbound]]] = field(default_factory=dict)
    # The senders with something waiting, next first: ordered by when their last turn in
    # this lane started (`served`), never-served first; ties keep the order they started
    # waiting in. Short: one entry per person waiting in this one chat.
    order: list[str] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # sender -> number of their latest turn start
    starts: int = 0  # turns started in this lane (while it exists: a lane is forgotten when idle)
    arrivals: int = 0  # messages queued (their arrival number orders `leftovers`)
    told_full: set[str] = field(default_factory=set)  # senders told their queue is full
    merge_next: bool = False  # interrupt policy: pending messages merge into the next turn
    restart: Inbound | None = None  # the running turn's message, edited: it runs next

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def enqueue(self, inbound: Inbound) -> None:
        user = inbound.user_key
        queue = self.waiting.get(user)
        if queue is None:
            queue = self.waiting[user] = deque()
            rank = self.served.get(user, -1)
            at = next((i for i, u in enumerate(self.order) if self.served.get(u, -1) > rank), len(self.order))
            self.order.insert(at, user)
        queue.append((self.arrivals, inbound))
        self.arrivals += 1

    def take(self, *, merge: bool) -> Inbound:
        """The next sender's first waiting message -- or all of theirs, merged."""
        user = self.order.pop(0)
        queue = self.waiting[user]
        if merge:
            taken = [m for _, m in queue]
            queue.clear()
        else:
            taken = [queue.popleft()[1]]
        if queue:
            self.order.append(user)  # this turn makes them the most recently served
        else:
            del self.waiting[user]
            self.told_full.discard(user)  # drained: a new burst may be told again
        return taken[0] if len(taken) == 1 else _merge(taken)

    def drain(self) -> list[Inbound]:
        """Remove every waiting message (an edited one due to restart first); returns them in arrival order."""
        thrown = sorted((entry for q in self.waiting.values() for entry in q), key=lambda e: e[0])
        self.waiting.clear()
        self.order.clear()
        self.told_full.clear()
        restart, self.restart = self.restart, None
        return ([restart] if restart is not None else []) + [m for _, m in thrown]


class Lanes:
    """All lanes of the gateway."""

    def __init__(
        self, runner: Runner, *, queue_max: int = 5, on_dropped: Callable[[list[Inbound]], None] | None = None
    ) -> None:
        """`queue_max`: messages each sender may have waiting per chat (the `queue` policy).

        `on_dropped` hears of queued messages that `stop` threw away (they will never run).
        """
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
            lane.enqueue(inbound)
            lane.merge_next = True
            return Submitted.INTERRUPTING
        user = inbound.user_key
        limit = self._queue_max if queue_max is None else queue_max
        waiting = len(lane.waiting.get(user, ()))
        if waiting >= limit:
            if user in lane.told_full:
                return Submitted.FULL_QUIETLY
            lane.told_full.add(user)
            return Submitted.FULL
        lane.enqueue(inbound)
        return Submitted.QUEUED if waiting == 0 else Submitted.QUEUED_QUIETLY

    def stop(self, key: str, *, clear_queue: bool = True) -> tuple[bool, int]:
        """Interrupt the running turn of a lane; returns (was running, queued messages dropped)."""
        lane = self._lanes.get(key)
        if lane is None:
            return False, 0
        # An edited message due to restart the running turn is that turn: stopped with it.
        restart, lane.restart = lane.restart, None
        if restart is not None and self._on_dropped is not None:
            self._on_dropped([restart])
        dropped = 0
        if clear_queue:
            thrown = lane.drain()
            dropped = len(thrown)
            lane.merge_next = False
            if thrown and self._on_dropped is not None:
                self._on_dropped(thrown)
        running = lane.running is not None and lane.interrupt is not None and (
            not lane.interrupt.is_set() or restart is not None
        )
        if lane.interrupt is not None:
            lane.interrupt.set()
        return running, dropped

    def abandon(self, key: str) -> list[Inbound]:
        """Forget a lane as a dying process would: its running turn is cancelled (not asked
        to stop), its queued messages are dropped without a word; returns them.

        Cluster mode, when this replica must assume another has taken the conversation
        over (it lost the database): nothing is finalized, the next owner recovers it.
        """
        lane = self._lanes.get(key)
        if lane is None:
            return []
        thrown = lane.drain()
        lane.merge_next = False
        if lane.running is not None:
            lane.running.cancel()
        return thrown

    def drop_queued(self, key: str, user_key: str) -> int:
        """Throw away one sender's waiting messages in a lane (their /stop); returns how many.

        Everyone else's wait on, in their places; the running turn is left alone.
        """
        lane = self._lanes.get(key)
        if lane is None or user_key not in lane.waiting:
            return 0
        thrown = [m for _, m in lane.waiting.pop(user_key)]
        lane.order.remove(user_key)
        lane.told_full.discard(user_key)
        lane.merge_next = lane.merge_next and bool(lane.waiting)
        if self._on_dropped is not None:
            self._on_dropped(thrown)
        return len(thrown)

    def restart(self, key: str, inbound: Inbound) -> bool:
        """Stop the running turn and run `inbound` (its message, edited) next; False: nothing runs.

        The edited message goes ahead of everything waiting, whatever the busy policy: it
        replaces the question being answered. Edited again before it started, the newer
        version replaces it.
        """
        lane = self._lanes.get(key)
        if lane is None or lane.running is None or self._closed:
            return False
        lane.restart = inbound
        if lane.interrupt is not None:
            lane.interrupt.set()
        return True

    def revise(self, key: str, inbox_id: int, revise: Callable[[Inbound], Inbound]) -> bool:
        """Replace the waiting message that carries `inbox_id` by `revise(it)` (its sender
        edited it before its turn started); False: no such message waits here."""
        lane = self._lanes.get(key)
        if lane is None:
            return False
        for queue in lane.waiting.values():
            for i, (arrival, waiting) in enumerate(queue):
                if inbox_id in waiting.inbox_ids:
                    queue[i] = (arrival, revise(waiting))
                    return True
        return False

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
        """Waiting messages per chat (all senders together)."""
        return {key: lane.depth for key, lane in self._lanes.items() if lane.waiting}

    def waiting(self, key: str) -> dict[str, int]:
        """Waiting messages per sender in one chat, the sender who goes next first."""
        lane = self._lanes.get(key)
        if lane is None:
            return {}
        return {user: len(lane.waiting[user]) for user in lane.order}

    # ---- shutdown --------------------------------------------------------------------

    def interrupt_all(self) -> int:
        """Ask every running turn to stop now (a second shutdown signal); returns how many."""
        count = 0
        for lane in self._lanes.values():
            if lane.interrupt is not None and not lane.interrupt.is_set():
                lane.interrupt.set()
                count += 1
        return count

    def refuse(self) -> None:
        """Refuse new messages from now on (`Submitted.CLOSED`); `close` does it too."""
        self._closed = True

    async def close(self, timeout: float) -> list[Inbound]:
        """Refuse new messages, give running turns `timeout` seconds, then interrupt them.

        Returns the queued messages that will not run in this process (they stay in the
        inbox, and the next start answers them).
        """
        self._closed = True
        leftovers = [m for lane in self._lanes.values() for m in lane.drain()]
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
        lane.served[inbound.user_key] = lane.starts
        lane.starts += 1
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
        if lane.restart is not None and not self._closed:
            nxt, lane.restart = lane.restart, None
            self._start(lane, nxt)
            return
        if self._closed or not lane.waiting:
            lane.merge_next = False
            if not lane.waiting and lane.running is None:
                self._lanes.pop(lane.key, None)  # idle: forgotten, with who was served when
            return
        # Interrupt policy: one person's pending messages merge; another person's never
        # join theirs (in a group they would be answered, billed and remembered as
        # someone else's).
        nxt = lane.take(merge=lane.merge_next)
        lane.merge_next = lane.merge_next and bool(lane.waiting)
        self._start(lane, nxt)


def _merge(messages: list[Inbound]) -> Inbound:
    """Several messages sent while a turn was being interrupted become one turn."""
    last = messages[-1]
    return replace(
        last,
        text="\n\n".join(m.text for m in messages if m.text),
        inbox_ids=tuple(i for m in messages for i in m.inbox_ids),
    )
