"""LiveReply against an in-memory outbox on a virtual clock: the reconciler's behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.events import ToolCall, ToolResult
from bots.errors import BadFormatting, RateLimited, TargetGone, TooLong, Transient, Undeliverable
from bots.live_reply import (
    EMPTY_REPLY,
    STILL_WORKING_TEXT,
    STOPPED_MARKER,
    Delivery,
    LiveReply,
    NullObserver,
    ReplyOptions,
    shown_messages,
)
from bots.outbox import ChatRef
from bots.pacing import Budget, Pacing, PacingPolicy
from tests.support.fakeclock import FakeClock
from tests.support.memory_outbox import MemoryOutbox


class Harness:
    def __init__(
        self,
        *,
        limit: int = 100,
        budget: Budget = Budget(1.0, 2),
        options: ReplyOptions = ReplyOptions(),
        private: bool = True,
        observer_for: Callable[[FakeClock], NullObserver] | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.observer = observer_for(self.clock) if observer_for is not None else None
        self.outbox = MemoryOutbox(limit=limit, now=self.clock.now, typing_interval=4.0)
        self.pacing = Pacing(PacingPolicy(budget, budget, Budget(1000, 1000)), self.clock)
        self.chat = ChatRef("memory", "1", is_private=private)
        self.reply = LiveReply(
            self.outbox,
            self.chat,
            self.pacing.for_chat(self.chat),
            reply_to="u1",
            options=options,
            clock=self.clock,
            observer=self.observer,
        )
        self.reply.start()

    async def finish(self, horizon: float = 60.0, **kw) -> Delivery:
        task = asyncio.create_task(self.reply.finish(**kw))
        await self.clock.advance(horizon)
        assert task.done(), "finish() did not complete within the virtual horizon"
        return task.result()

    def edits_without_change(self) -> int:
        bad = 0
        for msg in self.outbox.messages.values():
            for (_, a, am), (_, b, bm) in zip(msg.history, msg.history[1:]):
                bad += a == b and am == bm
        return bad


async def test_first_text_is_sent_at_once_then_edited_in_place() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_first_delta()
    h.reply.on_text("Hello")
    await h.clock.settle()
    assert h.outbox.texts() == ["Hello"]  # no waiting for an interval
    first = h.outbox.visible()[0]
    assert first.reply_to == "u1"
    for word in [" there,", " how", " are", " you?"]:
        h.reply.on_text(word)
        await h.clock.advance(0.3)
    delivery = await h.finish(final_text="Hello there, how are you?")
    assert delivery.complete
    assert h.outbox.texts() == ["Hello there, how are you?"]
    assert len(h.outbox.messages) == 1
    assert h.outbox.visible()[0].markdown  # the last edit carries final formatting
    assert h.edits_without_change() == 0


async def test_deltas_coalesce_into_paced_edits() -> None:
    h = Harness(budget=Budget(1.0, 1), limit=10_000)
    await h.clock.settle()
    text = ""
    for i in range(100):  # 100 deltas over 5 virtual seconds
        delta = f"w{i} "
        text += delta
        h.reply.on_text(delta)
        await h.clock.advance(0.05)
    edits = h.outbox.count("edit") + h.outbox.count("send")
    assert 4 <= edits <= 6  # about one call per second, not one per delta
    # Each call carried the newest text at the moment its slot was granted.
    history = h.outbox.visible()[0].history
    assert all(len(b) > len(a) for (_, a, _), (_, b, _) in zip(history, history[1:]))
    await h.finish(final_text=text)
    assert h.outbox.texts() == [text.strip()] or h.outbox.texts() == [text]


async def test_pacing_gap_between_calls_respects_budget() -> None:
    h = Harness(budget=Budget(1.0, 2), limit=10_000)
    await h.clock.settle()
    for i in range(60):
        h.reply.on_text(f"token{i} ")
        await h.clock.advance(0.1)
    await h.finish(final_text="".join(f"token{i} " for i in range(60)))
    times = [c.t for c in h.outbox.calls if c.kind in ("send", "edit", "typing")]
    for i, t in enumerate(times):
        in_window = [u for u in times[i:] if u < t + 3.0]
        assert len(in_window) <= 2 + 3


async def test_typing_until_visible() -> None:
    h = Harness()
    await h.clock.advance(9.0)  # nothing visible for 9 s: typing after 1 s, then at 5 and 9
    assert [c.t - 1000.0 for c in h.outbox.calls if c.kind == "typing"] == pytest.approx([1.0, 5.0, 9.0])
    h.reply.on_text("hi")
    await h.clock.advance(10.0)
    assert h.outbox.count("typing") == 3
    await h.finish(final_text="hi")


async def test_a_reply_whose_first_words_come_quickly_spends_no_token_on_typing() -> None:
    h = Harness(budget=Budget(1.0, 2))
    await h.clock.advance(0.5)
    h.reply.on_text("Hi!")
    await h.clock.advance(0.1)
    delivery = await h.finish(final_text="Hi!")  # a short reply: send, then the final edit
    assert delivery.complete and h.outbox.count("typing") == 0
    sent, final = h.outbox.calls
    assert (sent.kind, final.kind) == ("send", "edit")
    assert final.t == pytest.approx(1000.6)  # at once: the send left the reserve untouched


async def test_typing_after_zero_types_at_once() -> None:
    h = Harness(options=ReplyOptions(typing_after=0.0))
    await h.clock.settle()
    assert h.outbox.count("typing") == 1
    await h.finish(final_text="hi")


async def test_pre_tool_text_hidden_and_answer_lands_in_same_message() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_first_delta()
    h.reply.on_text("Let me look that up")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Let me look that up"]
    call = ToolCall("c1", "web_search", "{}")
    h.reply.on_tool_started(call)
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["⚙️ web_search…"]
    h.reply.on_tool_finished(call, ToolResult("c1", "web_search", "results"))
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["✅ web_search"]
    h.reply.on_first_delta()
    h.reply.on_text("The answer is 42.")
    await h.clock.advance(1.0)
    await h.finish(final_text="The answer is 42.")
    assert h.outbox.texts() == ["The answer is 42."]
    assert len(h.outbox.messages) == 1


async def test_keep_mode_keeps_pre_tool_text() -> None:
    h = Harness(options=ReplyOptions(pre_tool_text="keep"))
    await h.clock.settle()
    h.reply.on_text("Let me check.")
    await h.clock.advance(1.0)
    call = ToolCall("c1", "clock", "{}")
    h.reply.on_tool_started(call)
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Let me check.\n\n⚙️ clock…"]
    h.reply.on_tool_finished(call, ToolResult("c1", "clock", "12:00"))
    h.reply.on_text("It is noon.")
    await h.finish(final_text="It is noon.")
    assert h.outbox.texts() == ["Let me check.\n\nIt is noon."]


async def test_fallback_replaces_partial_preview_without_duplicates() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_first_delta()
    h.reply.on_text("The quick brown")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["The quick brown"]
    h.reply.on_fallback("The quick brown fox jumps over the lazy dog.")
    await h.finish(final_text="The quick brown fox jumps over the lazy dog.")
    assert h.outbox.texts() == ["The quick brown fox jumps over the lazy dog."]
    assert len(h.outbox.messages) == 1


async def test_fallback_with_nothing_shown_posts_complete_reply_once() -> None:
    h = Harness(limit=40)
    await h.clock.settle()
    full = "Paragraph one is here.\n\nParagraph two follows it.\n\nAnd three."
    h.reply.on_fallback(full)
    await h.finish(final_text=full)
    texts = h.outbox.texts()
    assert len(texts) == len(h.outbox.messages) >= 2
    assert " ".join(t.strip() for t in texts).split() == full.split()


async def test_overflow_continues_in_new_messages_nothing_lost() -> None:
    h = Harness(limit=60, budget=Budget(5.0, 5))
    await h.clock.settle()
    words = [f"word{i:03d}" for i in range(80)]
    for w in words:
        h.reply.on_text(w + " ")
        await h.clock.advance(0.05)
        assert all(len(m.text) <= 60 for m in h.outbox.visible())
    delivery = await h.finish(final_text=" ".join(words) + " ")
    texts = h.outbox.texts()
    assert len(texts) > 5
    assert " ".join(texts).split() == words
    assert all(m.markdown for m in h.outbox.visible())
    assert h.edits_without_change() == 0
    assert len(delivery.message_ids) == len(texts)


async def test_rate_limited_edit_pauses_then_delivers_final_once() -> None:
    h = Harness(budget=Budget(5.0, 2))
    await h.clock.settle()
    h.reply.on_text("Hello")
    await h.clock.advance(0.5)
    h.outbox.fail_next("edit", RateLimited(7))
    h.reply.on_text(" world")
    await h.clock.advance(0.5)
    failed_at = [c.t for c in h.outbox.calls if c.kind == "edit" and not c.ok]
    assert len(failed_at) == 1
    h.reply.on_text(" again")
    h.reply.on_text(" and again")
    await h.clock.advance(3.0)
    assert h.outbox.texts() == ["Hello"]  # paused: nothing was sent in the penalty
    delivery = await h.finish(final_text="Hello world again and again")
    assert delivery.complete
    assert h.outbox.texts() == ["Hello world again and again"]
    after = [c.t for c in h.outbox.calls if c.t > failed_at[0]]
    assert min(after) >= failed_at[0] + 7 - 1e-9
    # Interim texts queued during the pause collapsed: one call after the pause carries everything.
    assert len(h.outbox.messages) == 1


async def test_user_deleting_live_message_continues_in_new_message() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_text("Part one")
    await h.clock.advance(1.0)
    (first,) = h.outbox.visible()
    h.outbox.user_deletes(first.id)
    h.reply.on_text(" and part two")
    await h.finish(final_text="Part one and part two")
    assert h.outbox.texts() == ["Part one and part two"]
    assert len(h.outbox.messages) == 2


async def test_formatting_rejected_resends_as_plain_text() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_text("This is **bold**")
    await h.clock.advance(1.0)
    h.outbox.fail_next("edit", BadFormatting("can't parse entities"))
    delivery = await h.finish(final_text="This is **bold**")
    assert delivery.complete
    (msg,) = h.outbox.visible()
    assert msg.text == "This is bold" and not msg.markdown


async def test_too_long_after_rendering_is_cut_smaller() -> None:
    h = Harness(limit=100, budget=Budget(10, 10))
    await h.clock.settle()
    text = " ".join(["abcdefghi"] * 9) + " abcde"  # 95 characters: fits by our measure
    h.reply.on_text(text)
    await h.clock.advance(1.0)
    h.outbox.fail_next("edit", TooLong("MESSAGE_TOO_LONG"))
    delivery = await h.finish(final_text=text)
    assert delivery.complete
    assert " ".join(h.outbox.texts()).split() == text.split()
    assert len(h.outbox.visible()) == 2


async def test_interrupted_turn_gets_stopped_marker() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_text("Partial ans")
    await h.clock.advance(1.0)
    await h.finish(final_text="ignored when interrupted", interrupted=True)
    assert h.outbox.texts() == [f"Partial ans\n\n{STOPPED_MARKER}"]


async def test_notice_is_appended_and_empty_reply_is_explained() -> None:
    h = Harness()
    await h.clock.settle()
    await h.finish(final_text="", notice="The model provider is unavailable. Try again in a minute.")
    assert h.outbox.texts() == ["The model provider is unavailable. Try again in a minute."]
    h2 = Harness()
    await h2.finish(final_text="")
    assert h2.outbox.texts() == [EMPTY_REPLY]


async def test_transient_errors_are_retried_without_duplicates() -> None:
    h = Harness()
    await h.clock.settle()
    h.outbox.fail_next("send", Transient("502"), times=3)
    h.reply.on_text("Hi there")
    delivery = await h.finish(final_text="Hi there")
    assert delivery.complete
    assert h.outbox.texts() == ["Hi there"]
    assert h.outbox.count("send", ok=False) == 3


async def test_gives_up_after_persistent_failures_and_says_so() -> None:
    h = Harness(options=ReplyOptions(give_up_after=30))
    await h.clock.settle()
    h.outbox.fail_next("any", Transient("down"), times=1000)
    h.reply.on_text("Hi")
    delivery = await h.finish(final_text="Hi", horizon=120)
    assert not delivery.complete and "kept failing" in (delivery.failure or "")


async def test_undeliverable_stops_at_once() -> None:
    h = Harness()
    await h.clock.settle()
    h.outbox.fail_next("send", Undeliverable("bot was blocked by the user"))
    h.reply.on_text("Hi")
    delivery = await h.finish(final_text="Hi")
    assert not delivery.complete
    assert h.outbox.count("send") == 1


async def test_drafts_stream_then_one_send_persists() -> None:
    h = Harness(options=ReplyOptions(drafts=True))
    await h.clock.settle()
    h.reply.on_text("Hello")
    await h.clock.advance(1.0)
    h.reply.on_text(" world")
    await h.clock.advance(1.0)
    assert h.outbox.count("draft") == 2
    assert h.outbox.messages == {}
    await h.finish(final_text="Hello world")
    assert h.outbox.texts() == ["Hello world"]
    assert h.outbox.count("send") == 1


async def test_drafts_refresh_before_expiry_and_fall_back_to_edits_on_failure() -> None:
    h = Harness(options=ReplyOptions(drafts=True, draft_refresh=20))
    await h.clock.settle()
    h.reply.on_text("Thinking out loud")
    await h.clock.advance(45.0)
    assert h.outbox.count("draft") == 3  # at 0, 20 and 40 s: never left to expire
    h.outbox.fail_next("draft", Undeliverable("drafts are not supported"))
    h.reply.on_text(" more")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Thinking out loud more"]
    h.reply.on_text(" done")
    await h.finish(final_text="Thinking out loud more done")
    assert h.outbox.texts() == ["Thinking out loud more done"]
    assert h.outbox.count("send") == 1


async def test_drafts_only_in_private_chats() -> None:
    h = Harness(options=ReplyOptions(drafts=True), private=False)
    await h.clock.settle()
    h.reply.on_text("Hello")
    await h.finish(final_text="Hello")
    assert h.outbox.count("draft") == 0


async def test_reasoning_shown_as_quote_above_answer_when_enabled() -> None:
    h = Harness(options=ReplyOptions(show_reasoning=True))
    await h.clock.settle()
    h.reply.on_reasoning("I should add 2 and 2.")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["> I should add 2 and 2."]
    h.reply.on_text("4")
    await h.finish(final_text="4")
    assert h.outbox.texts() == ["> I should add 2 and 2.\n\n4"]
    off = Harness()
    off.reply.on_reasoning("secret thoughts")
    off.reply.on_text("4")
    await off.finish(final_text="4")
    assert off.outbox.texts() == ["4"]


async def test_final_text_wins_when_stream_missed_text() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_text("Hel")
    await h.finish(final_text="Hello!")
    assert h.outbox.texts() == ["Hello!"]


@pytest.mark.parametrize("seed", range(5))
async def test_random_failures_never_lose_or_duplicate(seed: int) -> None:
    import random

    rng = random.Random(seed)
    h = Harness(limit=80, budget=Budget(3.0, 2))
    await h.clock.settle()
    words = [f"w{i}" for i in range(150)]
    for w in words:
        if rng.random() < 0.05:
            h.outbox.fail_next(rng.choice(["send", "edit"]), rng.choice([RateLimited(rng.randint(1, 5)), Transient("x")]))
        if rng.random() < 0.02 and h.outbox.visible():
            h.outbox.user_deletes(h.outbox.visible()[-1].id)
        h.reply.on_text(w + " ")
        await h.clock.advance(0.1)
    delivery = await h.finish(final_text=" ".join(words) + " ", horizon=600)
    assert delivery.complete
    shown = " ".join(h.outbox.texts()).split()
    assert len(shown) == len(set(shown)), "a word is shown twice"
    assert shown == [w for w in words if w in set(shown)], "out of order"
    # Only what sat in a message the user deleted (and parley never had to touch again) may be missing.
    deleted = {w for m in h.outbox.messages.values() if m.deleted for w in m.text.split()}
    assert set(words) - set(shown) <= deleted
    assert shown[-1] == words[-1]
    assert h.edits_without_change() == 0


async def test_target_gone_on_send_means_the_chat_is_gone() -> None:
    h = Harness()
    await h.clock.settle()
    h.outbox.fail_next("send", TargetGone("message thread not found"))
    h.reply.on_text("Hi")
    delivery = await h.finish(final_text="Hi", horizon=5)
    assert not delivery.complete
    assert h.outbox.count("send") == 1  # given up at once, not retried for minutes


async def test_stopped_marker_follows_the_text_without_trailing_blanks() -> None:
    h = Harness()
    await h.clock.settle()
    h.reply.on_text("The beginning of \n\n")
    await h.clock.advance(1.0)
    await h.finish(interrupted=True)
    assert h.outbox.texts() == [f"The beginning of\n\n{STOPPED_MARKER}"]


# ---- "still working…" (chat.still_working_after) ------------------------------------------


class FirstVisible(NullObserver):
    """Records when the reply told its observer that something became visible."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.times: list[float] = []

    def on_first_visible(self) -> None:
        self.times.append(self.clock.now())


async def test_still_working_shows_after_a_silence_and_gives_way_to_text() -> None:
    h = Harness(options=ReplyOptions(still_working_after=15))
    await h.clock.advance(14.5)
    assert h.outbox.texts() == []  # typing only, so far
    await h.clock.advance(1.0)
    assert h.outbox.texts() == [STILL_WORKING_TEXT]
    h.reply.on_first_delta()
    h.reply.on_text("Hello")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Hello"]  # the text replaces the note, in the same message
    await h.clock.advance(13.0)
    assert h.outbox.texts() == ["Hello"]  # quiet for 14 s of 15
    await h.clock.advance(2.0)
    assert h.outbox.texts() == [f"Hello\n\n{STILL_WORKING_TEXT}"]  # below what was said
    h.reply.on_text(" world")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Hello world"]
    delivery = await h.finish(final_text="Hello world")
    assert delivery.complete and delivery.text == "Hello world"
    assert h.outbox.texts() == ["Hello world"] and len(h.outbox.messages) == 1
    assert h.edits_without_change() == 0


async def test_a_steady_stream_never_says_still_working() -> None:
    h = Harness(options=ReplyOptions(still_working_after=15), limit=10_000)
    for i in range(12):  # a delta every 10 s for two minutes
        h.reply.on_text(f"w{i} ")
        await h.clock.advance(10.0)
    await h.finish(final_text="".join(f"w{i} " for i in range(12)))
    shown = [text for msg in h.outbox.messages.values() for _, text, _ in msg.history]
    assert shown and not any(STILL_WORKING_TEXT in text for text in shown)


async def test_a_running_tool_counts_as_silence_too() -> None:
    h = Harness(options=ReplyOptions(still_working_after=15))
    call = ToolCall(id="c1", name="fetch_url", arguments="{}")
    h.reply.on_tool_started(call)
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["⚙️ fetch_url…"]
    await h.clock.advance(15.0)
    assert h.outbox.texts() == [f"⚙️ fetch_url…\n\n{STILL_WORKING_TEXT}"]
    h.reply.on_tool_finished(call, ToolResult(call.id, call.name, "page text"))
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["✅ fetch_url"]


@pytest.mark.parametrize("end", ["answer", "interrupted", "error"])
async def test_the_final_message_never_keeps_the_note(end: str) -> None:
    h = Harness(options=ReplyOptions(still_working_after=15))
    h.reply.on_text("Partial")
    await h.clock.advance(16.0)
    assert h.outbox.texts() == [f"Partial\n\n{STILL_WORKING_TEXT}"]
    assert shown_messages(h.reply.state())[0][1] == "Partial"  # what a restart would continue from
    kwargs = {"answer": {"final_text": "Partial answer"}, "interrupted": {"interrupted": True},
              "error": {"notice": "⚠️ The model took too long to answer."}}[end]
    delivery = await h.finish(**kwargs)
    assert delivery.complete
    (text,) = h.outbox.texts()
    assert STILL_WORKING_TEXT not in text and STILL_WORKING_TEXT not in delivery.text


async def test_the_note_alone_is_not_the_first_visible_text() -> None:
    h = Harness(options=ReplyOptions(still_working_after=15), observer_for=FirstVisible)
    observer = h.observer
    assert isinstance(observer, FirstVisible)
    await h.clock.advance(16.0)
    assert h.outbox.texts() == [STILL_WORKING_TEXT] and observer.times == []
    h.reply.on_text("Hi")
    await h.clock.advance(1.0)
    assert h.outbox.texts() == ["Hi"] and len(observer.times) == 1
    await h.finish(final_text="Hi")


async def test_still_working_off_by_default_and_with_zero() -> None:
    for options in (ReplyOptions(), ReplyOptions(still_working_after=0)):
        h = Harness(options=options)
        await h.clock.advance(120.0)
        assert h.outbox.texts() == []
        h.reply.on_text("late answer")
        await h.finish(final_text="late answer")
        assert h.outbox.texts() == ["late answer"]


# ---- the final edit does not wait behind interim edits -----------------------------------------


async def _stream_until_an_interim_edit(h: Harness, words: list[str]) -> float:
    """Feed a word every 50 ms until an interim edit went out (after the first few
    seconds, when the budget paces them); returns that edit's time, < 50 ms ago."""
    edits = h.outbox.count("edit")
    for i in range(10_000):
        words.append(f"w{i}")
        h.reply.on_text(f"w{i} ")
        await h.clock.advance(0.05)
        if h.outbox.count("edit") > edits and i > 40:
            return [c.t for c in h.outbox.calls if c.kind == "edit"][-1]
        edits = h.outbox.count("edit")
    raise AssertionError("no interim edit")


# The default shapes: a Telegram private chat, a Telegram group, a Discord channel.
@pytest.mark.parametrize("budget", [Budget(1.0, 2), Budget(0.3, 2), Budget(0.9, 3)])
async def test_the_final_edit_goes_at_once_when_the_stream_ends_right_after_an_interim_edit(budget: Budget) -> None:
    h = Harness(budget=budget, limit=10_000)
    await h.clock.settle()
    words: list[str] = []
    interim_at = await _stream_until_an_interim_edit(h, words)
    ended_at = h.clock.now()
    assert ended_at - interim_at < 0.05
    text = " ".join(words)
    delivery = await h.finish(final_text=text)
    assert delivery.complete and h.outbox.texts() == [text]
    final = h.outbox.calls[-1]
    assert final.kind == "edit" and h.outbox.visible()[0].markdown
    assert final.t == pytest.approx(ended_at)  # not one interval later, when the next token came


@pytest.mark.parametrize("budget", [Budget(1.0, 2), Budget(0.3, 2)])
async def test_an_interim_edit_waiting_for_its_slot_becomes_the_final_edit_at_once(budget: Budget) -> None:
    h = Harness(budget=budget, limit=10_000)
    await h.clock.settle()
    words: list[str] = []
    interim_at = await _stream_until_an_interim_edit(h, words)
    words.append("last")
    h.reply.on_text("last")  # the flusher now waits for its next interim slot...
    await h.clock.advance(0.4)
    ended_at = h.clock.now()
    assert h.outbox.calls[-1].t == pytest.approx(interim_at)  # ... which is not there yet
    delivery = await h.finish(final_text=" ".join(words))  # ... and the stream ends
    assert delivery.complete
    final = h.outbox.calls[-1]
    assert final.kind == "edit" and final.t == pytest.approx(ended_at)
    assert h.outbox.texts() == [" ".join(words)]


async def test_interim_edits_keep_their_pace_and_every_call_stays_within_the_budget() -> None:
    h = Harness(budget=Budget(1.0, 2), limit=10_000)
    await h.clock.settle()
    words = [f"w{i}" for i in range(200)]
    for word in words:  # 10 s of words at 20/s
        h.reply.on_text(word + " ")
        await h.clock.advance(0.05)
    await h.finish(final_text=" ".join(words))
    times = [c.t for c in h.outbox.calls if c.kind in ("send", "edit", "typing")]
    interims = [c.t for c in h.outbox.calls if c.kind == "edit"][:-1]
    # One interim edit a second once the first send has gone: the reserve costs no rate.
    assert all(b - a == pytest.approx(1.0) for a, b in zip(interims[1:], interims[2:]))
    for i, t in enumerate(times):
        for w in (0.5, 1.0, 3.0, 10.0):
            assert sum(1 for u in times[i:] if u < t + w) <= 2 + 1.0 * w + 1e-9
