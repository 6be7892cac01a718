"""Lanes: one turn at a time per chat, queue and interrupt policies, shutdown.

The runner is controllable: each turn waits until the test finishes it (or until it is
interrupted), so races between messages are exact, not timing-dependent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bots.inbound import Inbound
from bots.lanes import Lanes, Submitted
from bots.outbox import ChatRef


def msg(text: str, chat: str = "1", user: str = "7") -> Inbound:
    return Inbound(ChatRef("memory", chat), user, text, message_id=text, update_id=text)


@dataclass
class Runner:
    """Records turns; each runs until `finish(text)` or its interrupt is set."""

    started: list[str] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)  # (text, "finished" | "interrupted" | "crashed")
    _release: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    crash: set[str] = field(default_factory=set)

    async def __call__(self, inbound: Inbound, interrupt: asyncio.Event) -> None:
        self.started.append(inbound.text)
        self._poke()
        release = self._release.setdefault(inbound.text, asyncio.Event())
        done = asyncio.ensure_future(release.wait())
        stop = asyncio.ensure_future(interrupt.wait())
        try:
            await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            stop.cancel()
        if inbound.text in self.crash:
            self.ended.append((inbound.text, "crashed"))
            self._poke()
            raise RuntimeError("runner bug")
        self.ended.append((inbound.text, "finished" if release.is_set() else "interrupted"))
        self._poke()

    def finish(self, text: str) -> None:
        self._release.setdefault(text, asyncio.Event()).set()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate, timeout: float = 2.0) -> None:  # noqa: ANN001
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()


async def test_two_racing_messages_never_both_start() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=5)
    assert lanes.submit(msg("a"), policy="queue") is Submitted.STARTED
    assert lanes.submit(msg("b"), policy="queue") is Submitted.QUEUED  # no await in between
    await runner.until(lambda: runner.started == ["a"])
    assert lanes.is_busy("memory:1") and lanes.queue_depths() == {"memory:1": 1}
    runner.finish("a")
    await runner.until(lambda: runner.started == ["a", "b"])
    runner.finish("b")
    await lanes.wait_idle("memory:1")
    assert runner.ended == [("a", "finished"), ("b", "finished")]
    assert not lanes.is_busy("memory:1") and lanes.active == 0


async def test_queue_is_fifo_acknowledged_once_and_bounded() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=2)
    outcomes = [lanes.submit(msg(t), policy="queue") for t in ("a", "b", "c", "d")]
    assert outcomes == [Submitted.STARTED, Submitted.QUEUED, Submitted.QUEUED_QUIETLY, Submitted.FULL]
    for text in ("a", "b", "c"):
        runner.finish(text)
    await lanes.wait_idle("memory:1")
    assert runner.started == ["a", "b", "c"]


async def test_a_new_wait_after_the_queue_drained_is_acknowledged_again() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("a"), policy="queue")
    assert lanes.submit(msg("b"), policy="queue") is Submitted.QUEUED
    runner.finish("a")
    await runner.until(lambda: runner.started == ["a", "b"])
    assert lanes.submit(msg("c"), policy="queue") is Submitted.QUEUED
    assert lanes.submit(msg("d"), policy="queue") is Submitted.QUEUED_QUIETLY
    for text in "bcd":
        runner.finish(text)
    await lanes.wait_idle("memory:1")


async def test_interrupt_stops_the_running_turn_and_runs_the_new_message() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("a"), policy="interrupt")
    await runner.until(lambda: runner.started == ["a"])
    assert lanes.submit(msg("b"), policy="interrupt") is Submitted.INTERRUPTING
    await runner.until(lambda: runner.started == ["a", "b"])
    assert runner.ended == [("a", "interrupted")]
    runner.finish("b")
    await lanes.wait_idle("memory:1")


async def test_messages_piling_up_during_an_interrupt_merge_into_one_turn() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("a"), policy="interrupt")
    # b and c arrive before "a" even got to run: one interrupt, one next turn.
    assert lanes.submit(msg("b"), policy="interrupt") is Submitted.INTERRUPTING
    assert lanes.submit(msg("c"), policy="interrupt") is Submitted.INTERRUPTING
    await runner.until(lambda: len(runner.started) == 2)
    assert runner.started == ["a", "b\n\nc"]
    runner.finish("b\n\nc")
    await lanes.wait_idle("memory:1")


async def test_only_one_persons_messages_merge() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("a", user="1"), policy="interrupt")
    for text, user in (("b", "1"), ("c", "2"), ("d", "1")):
        assert lanes.submit(msg(text, user=user), policy="interrupt") is Submitted.INTERRUPTING
    await runner.until(lambda: runner.started == ["a", "b"])
    assert lanes.running("memory:1").user_key == "memory:1"
    runner.finish("b")
    await runner.until(lambda: runner.started == ["a", "b", "c"])
    assert lanes.running("memory:1").user_key == "memory:2"
    runner.finish("c")
    await runner.until(lambda: runner.started == ["a", "b", "c", "d"])
    runner.finish("d")
    await lanes.wait_idle("memory:1")
    assert lanes.running("memory:1") is None


async def test_stop_interrupts_and_drops_the_queue() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    assert lanes.stop("memory:1") == (False, 0)
    lanes.submit(msg("a"), policy="queue")
    lanes.submit(msg("b"), policy="queue")
    lanes.submit(msg("c"), policy="queue")
    assert lanes.stop("memory:1") == (True, 2)
    await lanes.wait_idle("memory:1")
    assert runner.ended == [("a", "interrupted")]
    assert runner.started == ["a"]


async def test_chats_run_concurrently() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("slow", chat="1"), policy="queue")
    lanes.submit(msg("quick", chat="2"), policy="queue")
    await runner.until(lambda: sorted(runner.started) == ["quick", "slow"])
    runner.finish("quick")
    await lanes.wait_idle("memory:2")
    assert lanes.is_busy("memory:1") and not lanes.is_busy("memory:2")
    assert lanes.busy_keys() == ["memory:1"]
    runner.finish("slow")
    await lanes.wait_idle("memory:1")


async def test_a_crashing_turn_does_not_block_the_lane() -> None:
    runner = Runner(crash={"a"})
    lanes = Lanes(runner)
    lanes.submit(msg("a"), policy="queue")
    lanes.submit(msg("b"), policy="queue")
    runner.finish("a")
    await runner.until(lambda: runner.started == ["a", "b"])
    runner.finish("b")
    await lanes.wait_idle("memory:1")
    assert runner.ended == [("a", "crashed"), ("b", "finished")]


async def test_close_returns_queued_messages_and_interrupts_after_the_timeout() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    lanes.submit(msg("a"), policy="queue")
    lanes.submit(msg("b"), policy="queue")
    lanes.submit(msg("x", chat="2"), policy="queue")
    await runner.until(lambda: len(runner.started) == 2)
    runner.finish("x")
    await runner.until(lambda: ("x", "finished") in runner.ended)
    leftovers = await lanes.close(timeout=0.05)  # "a" outlives the grace period
    assert [m.text for m in leftovers] == ["b"]
    assert sorted(runner.ended) == [("a", "interrupted"), ("x", "finished")]
    assert lanes.submit(msg("c"), policy="queue") is Submitted.CLOSED
    assert await lanes.close(timeout=0) == []  # closing twice is harmless
