"""No orphans: a send whose answer was lost never leaves a second copy of the reply.

End to end with the real python-telegram-bot / discord.py against the fakes (a send that
the fake applies and then drops or times out), and LiveReply against the in-memory outbox
for the exact rules of the probe (bots/orphans.py): only ids that can hold nothing but the
reply's own lost copy are edited, a person's message is never touched, another message of
the bot is never altered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bots.errors import Transient
from bots.live_reply import Delivery, LiveReply, ReplyOptions, leftover_sends
from bots.orphans import SendLedger
from bots.outbox import ChatRef, MessageRef
from bots.pacing import Budget, Pacing, PacingPolicy
from tests.fakes.llm import Reply
from tests.support.fakeclock import FakeClock
from tests.support.memory_outbox import MemoryOutbox
from tests.support.stack import OWNER_DC, OWNER_TG

# ---------------------------------------------------------------------------- Telegram, end to end


def tg_key(chat: Any) -> str:
    return f"telegram:{chat.id}"


def bot_messages(fake: Any, chat: Any) -> list[Any]:
    return [m for m in fake.messages(chat.id) if m.from_bot and not m.deleted]


def is_first_piece(params: Any) -> bool:
    return "reply_parameters" in params


def is_continuation(params: Any) -> bool:
    return "reply_parameters" not in params


@pytest.mark.parametrize("kind", ["drop_after_apply", "timeout_after_apply"])
async def test_lost_answer_to_the_first_send_leaves_one_reply(kind, fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    lost = fast_telegram.inject(kind, method="sendMessage", chat_id=chat.id, hold=8.0)
    answer = "You said hello, and here is the whole answer, streamed in small pieces to the end."
    fake_llm.script(Reply.text(answer, chunk=8, delay=0.05))
    fast_telegram.user_says(chat, owner, "hello")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(tg_key(chat))
    assert lost.hits == 1
    (reply,) = bot_messages(fast_telegram, chat)
    assert reply.text == answer
    gone = [m for m in fast_telegram.messages(chat.id) if m.from_bot and m.deleted]
    assert len(gone) == 1 and gone[0].deleted_by == "bot" and answer.startswith(gone[0].text)
    assert gone[0].edit_count == 0, "the lost copy was changed before it was deleted"


async def test_lost_formatted_send_is_matched_with_its_entities(fast_telegram, fake_llm, parley) -> None:
    """Streaming off: the one send carries the final formatting (entities); the probe's edit
    carries the same, so Telegram answers "not modified" and the copy goes."""
    p = await parley(telegram=fast_telegram, overrides={"chat": {"streaming": False}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    lost = fast_telegram.inject("drop_after_apply", method="sendMessage", chat_id=chat.id)
    fake_llm.script(Reply.text("Here is **bold** and `code`."))
    fast_telegram.user_says(chat, owner, "format please")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(tg_key(chat))
    assert lost.hits == 1
    (reply,) = bot_messages(fast_telegram, chat)
    assert reply.text == "Here is bold and code." and {e["type"] for e in reply.entities} == {"bold", "code"}
    (gone,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot and m.deleted]
    assert gone.edit_count == 0 and gone.entities == reply.entities


async def test_lost_answer_to_a_continuation_send_leaves_one_reply(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    lost = fast_telegram.inject("drop_after_apply", method="sendMessage", chat_id=chat.id, when=is_continuation)
    answer = "\n\n".join(" ".join(f"p{i}w{j}" for j in range(60)) for i in range(18))
    assert 4096 < len(answer) < 2 * 4000
    fake_llm.script(Reply.text(answer, chunk=200, delay=0.01))
    fast_telegram.user_says(chat, owner, "a long one please")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(tg_key(chat))
    assert lost.hits == 1
    shown = bot_messages(fast_telegram, chat)
    assert len(shown) == 2
    assert " ".join(m.text for m in shown).split() == answer.split()
    gone = [m for m in fast_telegram.messages(chat.id) if m.from_bot and m.deleted]
    assert len(gone) == 1 and gone[0].deleted_by == "bot"


async def test_a_persons_message_between_is_never_touched_and_other_bot_messages_never_altered(
    fast_telegram, fake_llm, parley
) -> None:
    """The lost copy lies below a message the user wrote after it, and below the bot's
    "I'll answer this right after" for that message: the probe skips both."""
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    interjected: list[dict[str, Any]] = []

    def lose_and_interject(params: Any) -> bool:
        return is_first_piece(params) and params.get("text", "").startswith("You")

    lost = fast_telegram.inject("timeout_after_apply", method="sendMessage", chat_id=chat.id, hold=8.0,
                                when=lose_and_interject)
    first = "You asked first, so here is the first answer in full, after a lost send."
    second = "And the second answer."
    release = asyncio.Event()
    fake_llm.script(Reply.text(first, chunk=4, delay=0.05, hold=release, hold_at=3), Reply.text(second))
    asked = fast_telegram.user_says(chat, owner, "first question")
    await fast_telegram.wait_for(lambda: lost.hits == 1, timeout=10)
    # While parley waits for the lost answer, the person writes again (and is told to wait).
    interjected.append(fast_telegram.user_says(chat, owner, "second question"))
    await fast_telegram.wait_for(
        lambda: any("right after" in m.text for m in bot_messages(fast_telegram, chat)), timeout=10
    )
    release.set()
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(tg_key(chat))

    person = fast_telegram.message(chat.id, interjected[0]["message_id"])
    assert not person.deleted and person.edit_count == 0
    assert not fast_telegram.message(chat.id, asked["message_id"]).deleted
    ack = next(m for m in fast_telegram.messages(chat.id) if m.from_bot and "right after" in m.text)
    assert not ack.deleted and ack.edit_count == 0, "another message of the bot was altered by the probe"
    texts = [m.text for m in bot_messages(fast_telegram, chat)]
    assert texts.count(first) == 1 and texts.count(second) == 1
    assert not any(t != first and first.startswith(t) for t in texts), f"a lost copy is left: {texts}"
    # The person's message was probed once (refused: not the bot's), and never deleted.
    probes = [c for c in fast_telegram.calls_to("editMessageText", chat_id=chat.id)
              if int(c.params.get("message_id", 0)) == person.message_id]
    assert len(probes) == 1 and not probes[0].ok and "can't be edited" in probes[0].description
    assert not [c for c in fast_telegram.calls_to("deleteMessage", chat_id=chat.id)
                if int(c.params.get("message_id", 0)) in (person.message_id, ack.message_id)]


async def _left_by_a_killed_process(tmp_path: Any, fake: Any, owner: Any, chat: Any, *, clean: bool,
                                    ack: bool) -> tuple[int, int, int | None]:
    """The state a process killed mid-send leaves: the question in the inbox, its reply's
    journal saying "sending You sa" -- and, in the chat, the copy that send did create.
    Returns (question id, copy id, id of an acknowledgement the dead process sent, if any)."""
    import telegram

    from bots.inbound import Inbound
    from bots.inbound import to_json as inbound_json
    from bots.store import NewMessage, Store

    asked = fake.user_says(chat, owner, "hello")
    (update,) = fake.pending_updates
    async with telegram.Bot(fake.token, base_url=fake.base_url) as bot:
        copy = await bot.send_message(chat.id, "You sa", reply_parameters=telegram.ReplyParameters(asked["message_id"]))
        sent_ack = None
        if ack:
            later = fake.user_says(chat, owner, "and another thing")
            sent_ack = await bot.send_message(chat.id, "⏳ I'll answer this right after the current reply.",
                                              reply_parameters=telegram.ReplyParameters(later["message_id"]))
    inbound = Inbound(
        chat=ChatRef("telegram", str(chat.id), is_private=True), user_id=str(owner.id), text="hello",
        message_id=str(asked["message_id"]), update_id=str(update["update_id"]),
    )
    store = await Store.open(f"sqlite:///{tmp_path / 'parley.db'}")
    try:
        (row,) = await store.accept([NewMessage("telegram", inbound.update_id, inbound.chat.key,
                                                inbound.user_key, inbound_json(inbound))])
        assert row is not None
        await store.note_reply([row], {"pieces": [], "sending": {
            "index": 0, "text": "You sa", "markdown": False, "after": asked["message_id"], "clean": clean}})
    finally:
        await store.close()
    return asked["message_id"], copy.message_id, sent_ack.message_id if sent_ack else None


async def test_after_a_restart_the_copy_a_killed_send_left_is_removed(tmp_path, fast_telegram, fake_llm,
                                                                      parley) -> None:
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    _, copy, _ = await _left_by_a_killed_process(tmp_path, fast_telegram, owner, chat, clean=True, ack=False)
    answer = "You said hello, and this is the answer after the restart."
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.02))
    p = await parley(telegram=fast_telegram)
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await fast_telegram.wait_for(lambda: fast_telegram.message(chat.id, copy).deleted, timeout=10)
    await p.gateway.settle(tg_key(chat))
    assert [m.text for m in bot_messages(fast_telegram, chat)] == [answer]
    assert fast_telegram.message(chat.id, copy).edit_count == 0


async def test_after_a_restart_nothing_is_probed_when_the_dead_process_wrote_more(tmp_path, fast_telegram, fake_llm,
                                                                                  parley) -> None:
    """The dead process sent an acknowledgement after the lost send (its journal says so:
    `clean` false). The new process cannot tell that message from the copy: it touches
    neither, and the copy stays -- a duplicate line, never a changed message."""
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    _, copy, ack = await _left_by_a_killed_process(tmp_path, fast_telegram, owner, chat, clean=False, ack=True)
    fake_llm.script(Reply.text("The answer to hello."), Reply.text("The answer to the other thing."))
    p = await parley(telegram=fast_telegram)
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(tg_key(chat))
    for mid in (copy, ack):
        assert not fast_telegram.message(chat.id, mid).deleted and fast_telegram.message(chat.id, mid).edit_count == 0
    touched = [c for c in fast_telegram.calls if c.method in ("editMessageText", "deleteMessage")
               and int(c.params.get("message_id", 0)) in (copy, ack)]
    assert touched == []


# ---------------------------------------------------------------------------- Discord, end to end


def dc_key(channel: Any) -> str:
    return f"discord:{channel.id}"


@pytest.mark.parametrize("kind", ["drop_after_apply", "timeout_after_apply"])
async def test_discord_lost_continuation_send_is_found_by_its_nonce(kind, fast_discord, fake_llm, parley) -> None:
    from tests.fakes.discord import SEND

    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    answer = "\n\n".join(" ".join(f"p{i}w{j}" for j in range(40)) for i in range(9))
    assert 2000 < len(answer) < 2 * 1900
    gate = asyncio.Event()
    fake_llm.script(Reply.text(answer, chunk=150, delay=0.01, hold=gate, hold_at=2))
    fast_discord.user_says(channel, owner, "go", mentions_bot=True)
    await fast_discord.wait_for(lambda: len(fast_discord.bot_texts(channel)) == 1, timeout=10)
    lost = fast_discord.inject(kind, route=SEND, channel_id=channel.id, times=1, hold=2.0)  # the next send
    gate.set()
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=30)
    await p.gateway.settle(dc_key(channel))
    assert lost.hits == 1
    assert len(fast_discord.bot_texts(channel)) == 2
    assert " ".join(fast_discord.bot_texts(channel)).split() == answer.split()
    assert not [m for m in fast_discord.messages(channel) if m.from_bot and m.deleted]


# ---------------------------------------------------------------------------- LiveReply, in memory


class Harness:
    def __init__(self, *, limit: int = 100, unsure: list[dict[str, Any]] | None = None,
                 adopt: list[str] | None = None, outbox: MemoryOutbox | None = None,
                 clock: FakeClock | None = None, reply_to: str = "1") -> None:
        self.clock = clock or FakeClock()
        self.outbox = outbox or MemoryOutbox(limit=limit, now=self.clock.now)
        budget = Budget(1.0, 2)
        self.pacing = Pacing(PacingPolicy(budget, budget, Budget(1000, 1000)), self.clock)
        self.chat = ChatRef("memory", "1")
        self.states: list[dict[str, Any]] = []
        self.reply = LiveReply(
            self.outbox, self.chat, self.pacing.for_chat(self.chat), reply_to=reply_to,
            options=ReplyOptions(), clock=self.clock, journal=self,
            adopt=[MessageRef(self.chat, m) for m in adopt or ()], unsure=unsure,
        )

    async def record(self, state: dict[str, Any]) -> None:
        self.states.append(state)

    async def finish(self, text: str, horizon: float = 120.0) -> Delivery:
        task = asyncio.create_task(self.reply.finish(final_text=text))
        await self.clock.advance(horizon)
        assert task.done(), "finish() did not complete within the virtual horizon"
        return task.result()

    def bot_texts(self) -> list[str]:
        return [m.text for m in self.outbox.visible() if m.from_bot]


def person(outbox: MemoryOutbox, chat: ChatRef, text: str = "hi") -> str:
    return outbox.user_says(chat, text).id


async def test_unit_lost_send_is_found_and_deleted_and_the_journal_forgets_it() -> None:
    h = Harness()
    person(h.outbox, h.chat, "question")  # id 1, the message replied to
    h.outbox.fail_next("send", Transient("timed out"), applied=True)
    h.reply.start()
    h.reply.on_text("You sa")
    await h.clock.advance(0.1)
    assert [e["text"] for e in leftover_sends(h.states[-1])] == ["You sa"], "the lost send is not on record"
    lost = h.outbox.messages["2"]
    h.reply.on_text("id hello")
    delivery = await h.finish("You said hello")
    assert delivery.complete
    assert h.bot_texts() == ["You said hello"]
    assert lost.deleted and lost.history == [(lost.history[0][0], "You sa", False)]
    assert "unsure" not in h.states[-1] and "sending" not in h.states[-1]
    assert leftover_sends(h.states[-1]) == []


async def test_unit_a_person_writing_between_is_skipped_and_never_deleted() -> None:
    h = Harness()
    person(h.outbox, h.chat, "question")  # 1
    h.outbox.fail_next("send", Transient("connection dropped"), applied=True)
    h.reply.start()
    h.reply.on_text("Hello")
    await h.clock.settle()  # the send of #2 was lost
    mine = person(h.outbox, h.chat, "are you there?")  # 3
    delivery = await h.finish("Hello there")  # the retry is #4
    assert delivery.complete
    assert not h.outbox.messages[mine].deleted and h.outbox.messages[mine].history[-1][1] == "are you there?"
    assert h.outbox.messages["2"].deleted
    assert h.bot_texts() == ["Hello there"]


async def test_unit_another_bot_message_in_the_window_is_never_altered() -> None:
    """Another sender's send (an acknowledgement) is lost too: its message may lie where
    the reply's lost copy may be, and nothing tells the two apart -- so neither id is
    probed, and the copy stays (the safe failure: a duplicate, never a changed message)."""
    h = Harness()
    person(h.outbox, h.chat, "question")  # 1
    h.outbox.fail_next("send", Transient("timed out"), applied=True)
    h.reply.start()
    h.reply.on_text("Hello")
    await h.clock.settle()  # #2, lost
    h.outbox.fail_next("send", Transient("timed out"), applied=True)
    with pytest.raises(Transient):
        await h.outbox.send(h.chat, "⏳ I'll answer this right after the current reply.")  # #3, lost too
    ack = h.outbox.messages["3"]
    delivery = await h.finish("Hello there")
    assert delivery.complete
    assert not ack.deleted and len(ack.history) == 1, "a message of another sender was touched"
    assert not [c for c in h.outbox.calls if c.kind in ("edit", "delete") and c.target in ("2", "3")]


async def test_unit_known_bot_messages_are_never_probed() -> None:
    h = Harness()
    person(h.outbox, h.chat, "question")  # 1
    h.outbox.fail_next("send", Transient("timed out"), applied=True)
    h.reply.start()
    h.reply.on_text("Hello")
    await h.clock.settle()  # #2, lost
    await h.outbox.send(h.chat, "Hello")  # #3: another reply's message, same text, known
    delivery = await h.finish("Hello there")
    assert delivery.complete
    assert not h.outbox.messages["3"].deleted
    assert not [c for c in h.outbox.calls if c.kind in ("edit", "delete") and c.target == "3"]
    assert h.outbox.messages["2"].deleted


async def test_unit_a_send_refused_outright_is_not_looked_for() -> None:
    from bots.errors import RateLimited

    h = Harness()
    person(h.outbox, h.chat, "question")
    h.outbox.fail_next("send", RateLimited(1.0))
    h.reply.start()
    h.reply.on_text("Hello")
    await h.finish("Hello")
    assert h.bot_texts() == ["Hello"]
    assert not [c for c in h.outbox.calls if c.kind in ("edit", "delete")]
    assert all("unsure" not in s for s in h.states)


async def test_unit_after_a_restart_a_clean_leftover_send_is_found() -> None:
    """A crash cut a send off: the journal's "sending" entry goes to the new reply, which
    removes the copy once its own first message is out."""
    clock = FakeClock()
    outbox = MemoryOutbox(now=clock.now)
    chat = ChatRef("memory", "1")
    asked = person(outbox, chat, "question")  # 1
    # The earlier process: its send of "You sa" arrived, then it died before the answer.
    old = Harness(outbox=outbox, clock=clock, reply_to=asked)
    outbox.fail_next("send", Transient("killed"), applied=True)
    old.reply.start()
    old.reply.on_text("You sa")
    await clock.settle()
    state = old.states[-1]
    await old.reply.aclose()
    leftovers = leftover_sends(state)
    assert len(leftovers) == 1 and leftovers[0]["clean"] is True and leftovers[0]["text"] == "You sa"
    outbox.ledger = SendLedger()  # a new process knows nothing of the old one's sends

    new = Harness(outbox=outbox, clock=clock, reply_to=asked, unsure=leftovers)
    new.reply.start()
    delivery = await new.finish("You said hello")
    assert delivery.complete
    assert [m.text for m in outbox.visible() if m.from_bot] == ["You said hello"]
    assert outbox.messages["2"].deleted
    assert "unsure" not in new.states[-1]


async def test_unit_after_a_restart_a_leftover_send_is_not_probed_if_others_wrote_meanwhile() -> None:
    """While the lost send was pending, the old process sent another message in the chat:
    a new process could not tell that one from the copy, so it probes nothing."""
    clock = FakeClock()
    outbox = MemoryOutbox(now=clock.now)
    chat = ChatRef("memory", "1")
    asked = person(outbox, chat, "question")  # 1
    old = Harness(outbox=outbox, clock=clock, reply_to=asked)
    outbox.fail_next("send", Transient("killed"), applied=True)
    old.reply.start()
    old.reply.on_text("You sa")
    await clock.settle()  # #2 lost; the reply waits to retry
    person(outbox, chat, "more")  # 3
    await outbox.send(chat, "⏳ I'll answer this right after the current reply.")  # 4: written down first
    state = old.states[-1]
    await old.reply.aclose()
    leftovers = leftover_sends(state)
    assert leftovers and all(e["clean"] is False for e in leftovers)
    outbox.ledger = SendLedger()

    new = Harness(outbox=outbox, clock=clock, reply_to=asked, unsure=leftovers)
    new.reply.start()
    await new.finish("You said hello")
    assert not outbox.messages["4"].deleted and len(outbox.messages["4"].history) == 1
    assert not [c for c in outbox.calls if c.kind in ("edit", "delete") and c.target in ("2", "3", "4")]


class KeyedOutbox(MemoryOutbox):
    """Records the idempotency key each send was made with (Discord uses it as the nonce)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.keys: list[str | None] = []

    async def send(self, chat: ChatRef, text: str, **kw: Any) -> MessageRef:
        from bots.orphans import send_key

        self.keys.append(send_key())
        return await super().send(chat, text, **kw)


async def test_unit_a_piece_sent_again_carries_the_same_key_a_new_piece_a_new_one() -> None:
    clock = FakeClock()
    outbox = KeyedOutbox(limit=30, now=clock.now)
    h = Harness(outbox=outbox, clock=clock)
    outbox.fail_next("send", Transient("timed out"), applied=True)
    h.reply.start()
    h.reply.on_text("First part.")
    await clock.advance(2.0)  # lost, then sent again
    h.reply.on_text(" And a second part that needs a message of its own.")
    await h.finish("First part. And a second part that needs a message of its own.")
    first, again, *rest = outbox.keys
    assert first is not None and again == first
    assert rest and all(k not in (None, first) for k in rest)
    assert len(set(rest)) == len(rest)


async def test_unit_after_a_restart_the_piece_is_sent_with_the_key_in_the_journal() -> None:
    clock = FakeClock()
    outbox = KeyedOutbox(now=clock.now)
    leftover = {"index": 0, "text": "You sa", "markdown": False, "after": 1, "clean": False, "key": "k-from-before"}
    h = Harness(outbox=outbox, clock=clock, unsure=[leftover])
    h.reply.start()
    await h.finish("You said hello")
    assert outbox.keys[0] == "k-from-before"
