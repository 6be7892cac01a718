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
    # The interrupted turn was person 1's: person 2 goes next (fairness), alone; then
    # everything person 1 sent meanwhile, as one turn -- never mixed with person 2's.
    await runner.until(lambda: runner.started == ["a", "c"])
    assert lanes.running("memory:1").user_key == "memory:2"
    runner.finish("c")
    await runner.until(lambda: runner.started == ["a", "c", "b\n\nd"])
    assert lanes.running("memory:1").user_key == "memory:1"
    runner.finish("b\n\nd")
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


# ---- floods: limits and fairness per person -------------------------------------------


def group_msg(text: str, user: str) -> Inbound:
    return Inbound(ChatRef("memory", "-5", is_private=False), user, text, message_id=text, update_id=text)


GROUP = "memory:-5"


async def test_the_queue_limit_is_per_person_and_a_full_queue_is_told_once() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=2)
    assert lanes.submit(group_msg("f0", "flood"), policy="queue") is Submitted.STARTED
    outcomes = [lanes.submit(group_msg(f"f{i}", "flood"), policy="queue") for i in range(1, 7)]
    assert outcomes == [
        Submitted.QUEUED, Submitted.QUEUED_QUIETLY,  # two may wait
        Submitted.FULL,  # the third is refused, and the sender is due one notice...
        Submitted.FULL_QUIETLY, Submitted.FULL_QUIETLY, Submitted.FULL_QUIETLY,  # ...not one per message
    ]
    # Someone else in the same chat has a queue of their own, and their own acknowledgement.
    assert lanes.submit(group_msg("m1", "member"), policy="queue") is Submitted.QUEUED
    assert lanes.submit(group_msg("m2", "member"), policy="queue") is Submitted.QUEUED_QUIETLY
    assert lanes.submit(group_msg("m3", "member"), policy="queue") is Submitted.FULL
    assert lanes.waiting(GROUP) == {"memory:member": 2, "memory:flood": 2}
    assert lanes.queue_depths() == {GROUP: 4}
    for text in ("f0", "m1", "f1", "m2", "f2"):
        runner.finish(text)
    await lanes.wait_idle(GROUP)


async def test_a_flooders_backlog_delays_another_member_by_one_turn_at_most() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=50)
    lanes.submit(group_msg("f0", "flood"), policy="queue")
    for i in range(1, 41):
        lanes.submit(group_msg(f"f{i}", "flood"), policy="queue")
    assert lanes.submit(group_msg("question", "member"), policy="queue") is Submitted.QUEUED
    await runner.until(lambda: runner.started == ["f0"])
    runner.finish("f0")
    # The very next turn is the member's, though 40 messages were queued before it.
    await runner.until(lambda: len(runner.started) == 2)
    assert runner.started == ["f0", "question"]
    # While the flooder's backlog is answered, a member who writes again is next again.
    runner.finish("question")
    await runner.until(lambda: runner.started[-1] == "f1")
    assert lanes.submit(group_msg("follow-up", "member"), policy="queue") is Submitted.QUEUED
    runner.finish("f1")
    await runner.until(lambda: runner.started[-1] == "follow-up")
    assert runner.started == ["f0", "question", "f1", "follow-up"]
    lanes.stop(GROUP)
    await lanes.wait_idle(GROUP)


async def test_turns_go_round_robin_between_people_fifo_within_each() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=5)
    lanes.submit(group_msg("a0", "a"), policy="queue")
    for text, user in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")):
        lanes.submit(group_msg(text, user), policy="queue")
    expected = ["a0", "b1", "c1", "a1", "b2", "a2", "a3"]
    for i, text in enumerate(expected):
        await runner.until(lambda i=i: len(runner.started) == i + 1)
        runner.finish(text)
    await lanes.wait_idle(GROUP)
    assert runner.started == expected


async def test_a_drained_queue_may_be_told_it_is_full_again() -> None:
    runner = Runner()
    lanes = Lanes(runner, queue_max=1)
    lanes.submit(group_msg("a", "flood"), policy="queue")
    assert lanes.submit(group_msg("b", "flood"), policy="queue") is Submitted.QUEUED
    assert lanes.submit(group_msg("c", "flood"), policy="queue") is Submitted.FULL
    assert lanes.submit(group_msg("d", "flood"), policy="queue") is Submitted.FULL_QUIETLY
    runner.finish("a")
    await runner.until(lambda: runner.started == ["a", "b"])  # the sender's queue drained
    assert lanes.submit(group_msg("e", "flood"), policy="queue") is Submitted.QUEUED
    assert lanes.submit(group_msg("f", "flood"), policy="queue") is Submitted.FULL, "a new burst"
    assert lanes.stop(GROUP) == (True, 1)
    await lanes.wait_idle(GROUP)
    assert lanes.submit(group_msg("g", "flood"), policy="queue") is Submitted.STARTED
    assert lanes.submit(group_msg("h", "flood"), policy="queue") is Submitted.QUEUED
    assert lanes.submit(group_msg("i", "flood"), policy="queue") is Submitted.FULL, "stop emptied the queue"
    lanes.stop(GROUP)
    await lanes.wait_idle(GROUP)


async def test_stop_and_close_hand_back_every_person_s_waiting_messages_in_arrival_order() -> None:
    dropped: list[str] = []
    runner = Runner()
    lanes = Lanes(runner, on_dropped=lambda ms: dropped.extend(m.text for m in ms))
    lanes.submit(group_msg("a0", "a"), policy="queue")
    for text, user in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("c1", "c")):
        lanes.submit(group_msg(text, user), policy="queue")
    assert lanes.stop(GROUP) == (True, 4)
    assert dropped == ["a1", "b1", "a2", "c1"]
    await lanes.wait_idle(GROUP)
    lanes.submit(group_msg("x0", "a"), policy="queue")
    for text, user in (("x1", "b"), ("x2", "a"), ("x3", "b")):
        lanes.submit(group_msg(text, user), policy="queue")
    leftovers = await lanes.close(timeout=0)
    assert [m.text for m in leftovers] == ["x1", "x2", "x3"]


async def test_one_sender_s_waiting_messages_can_be_dropped_alone() -> None:
    dropped: list[str] = []
    runner = Runner()
    lanes = Lanes(runner, queue_max=1, on_dropped=lambda ms: dropped.extend(m.text for m in ms))
    lanes.submit(group_msg("a0", "a"), policy="queue")
    lanes.submit(group_msg("b1", "b"), policy="queue")
    lanes.submit(group_msg("a1", "a"), policy="queue")
    assert lanes.submit(group_msg("a2", "a"), policy="queue") is Submitted.FULL
    assert lanes.drop_queued(GROUP, "memory:a") == 1
    assert lanes.drop_queued(GROUP, "memory:a") == 0 and lanes.drop_queued("memory:nowhere", "memory:a") == 0
    assert dropped == ["a1"] and lanes.waiting(GROUP) == {"memory:b": 1}
    assert lanes.submit(group_msg("a3", "a"), policy="queue") is Submitted.QUEUED, "a new wait"
    for text in ("a0", "b1", "a3"):
        runner.finish(text)
    await lanes.wait_idle(GROUP)
    assert runner.started == ["a0", "b1", "a3"]


# ---- edits -------------------------------------------------------------------------------


async def test_an_edited_running_message_restarts_ahead_of_everyone_waiting() -> None:
    runner = Runner()
    lanes = Lanes(runner)
    key = msg("a").chat.key
    assert lanes.submit(msg("question"), policy="queue") is Submitted.STARTED
    assert lanes.submit(msg("other", user="8"), policy="queue") is Submitted.QUEUED
    assert lanes.restart(key, msg("question, edited"))
    await runner.until(lambda: runner.started == ["question", "question, edited"])
    assert runner.ended == [("question", "interrupted")]
    assert lanes.waiting(key) == {"memory:8": 1}, "the one waiting keeps their place, after the edit"
    runner.finish("question, edited")
    runner.finish("other")
    await lanes.wait_idle(key)
    assert runner.started == ["question", "question, edited", "other"]


async def test_stop_drops_a_restart_due_with_the_turn_it_replaces() -> None:
    runner = Runner()
    dropped: list[Inbound] = []
    lanes = Lanes(runner, on_dropped=dropped.extend)
    key = msg("a").chat.key
    lanes.submit(msg("question"), policy="queue")
    await runner.until(lambda: runner.started == ["question"])
    lanes.restart(key, msg("question, edited"))
    assert lanes.stop(key, clear_queue=False) == (True, 0)
    await lanes.wait_idle(key)
    assert runner.started == ["question"] and [m.text for m in dropped] == ["question, edited"]


async def test_a_waiting_message_is_revised_in_its_place() -> None:
    from dataclasses import replace

    runner = Runner()
    lanes = Lanes(runner)
    key = msg("a").chat.key
    lanes.submit(msg("busy"), policy="queue")
    lanes.submit(replace(msg("typo"), inbox_ids=(5,)), policy="queue")
    lanes.submit(replace(msg("next"), inbox_ids=(6,)), policy="queue")
    assert lanes.revise(key, 5, lambda m: replace(m, text="fixed"))
    assert not lanes.revise(key, 99, lambda m: m)
    for text in ("busy", "fixed", "next"):
        await runner.until(lambda text=text: text in runner.started)
        runner.finish(text)
    await lanes.wait_idle(key)
    assert runner.started == ["busy", "fixed", "next"]
