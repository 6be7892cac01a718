"""Conversations end to end on Telegram: memory, de-duplication, busy chats, /stop, sessions.

Real python-telegram-bot connector, real openai SDK, real config and a real SQLite
store, against the fake Telegram and the fake provider (see tests/support/conversations.py).
"""

from __future__ import annotations

import asyncio

from bots.history import INTERRUPTED_NOTE
from bots.live_reply import STOPPED_MARKER
from tests.fakes.llm import Reply
from tests.support.conversations import contents, key, last_request_messages, start

SYSTEM = ("system", "You are a helpful assistant.")
QUEUED_ACK = "⏳ I'll answer this right after the current reply."


# ---- memory ------------------------------------------------------------------------------


async def test_history_survives_a_restart(store_url, fast_telegram, fake_llm, parley) -> None:
    """On SQLite and PostgreSQL (`store_url` is parametrized over both)."""
    s = await start(parley, fast_telegram, fake_llm, store=store_url)
    chat = s.owner_chat()
    fake_llm.script(Reply.text("Nice to meet you, Ann."))
    assert await s.turn(chat, s.owner, "My name is Ann.") == "Nice to meet you, Ann."
    await s.p.stop()

    # A new process on the same store file (and the same Telegram bot).
    s2 = await start(parley, fast_telegram, fake_llm, store=store_url)
    assert s2.p is not s.p
    fake_llm.script(Reply.text("Your name is Ann."))
    assert await s2.turn(chat, s2.owner, "What is my name?") == "Your name is Ann."
    assert contents(last_request_messages(fake_llm)) == [
        SYSTEM,
        ("user", "My name is Ann."),
        ("assistant", "Nice to meet you, Ann."),
        ("user", "What is my name?"),
    ]


async def test_redelivered_update_gets_no_second_reply(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    fake_llm.script(Reply.text("Only once."))
    update_id = s.say(chat, s.owner, "hello")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Only once."], timeout=10)
    await s.settle(chat)

    fast_telegram.redeliver(update_id)
    await fast_telegram.wait_for(lambda: not fast_telegram.pending_updates, timeout=10)
    await s.barrier()
    assert s.bot_texts(chat) == ["Only once."]
    assert len(fake_llm.requests) == 1
    # The redelivered command is not run twice either.
    update_id = s.say(chat, s.owner, "/model")
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 2, timeout=10)
    fast_telegram.redeliver(update_id)
    await s.barrier()
    assert len(s.bot_msgs(chat)) == 2


# ---- busy chats ------------------------------------------------------------------------------


async def test_queue_policy_acknowledges_once_then_answers_in_order(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, chat={"busy_policy": "queue", "queue_max": 3})
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(
        Reply.text("First answer, complete.", chunk=7, hold=gate, hold_at=1),
        Reply.text("Second answer."),
        Reply.text("Third answer."),
        Reply.text("Fourth answer."),
    )
    s.say(chat, s.owner, "one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["First a"], timeout=10)
    s.say(chat, s.owner, "two")
    await fast_telegram.wait_for(lambda: QUEUED_ACK in s.bot_texts(chat), timeout=10)
    s.say(chat, s.owner, "three")
    s.say(chat, s.owner, "four")
    s.say(chat, s.owner, "five")  # the queue (3) is full now
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 3, timeout=10)
    full = s.bot_msgs(chat)[2]
    assert "queue" in full.text and "full" in full.text and "resend" in full.text
    assert len(fake_llm.requests) == 1, "nothing else reached the model while the first turn ran"

    gate.set()
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 4, timeout=10)
    await s.settle(chat)
    assert s.bot_texts(chat) == [
        "First answer, complete.",
        QUEUED_ACK,
        full.text,
        "Second answer.",
        "Third answer.",
        "Fourth answer.",
    ]
    # The acknowledgement quotes the message it acknowledges; each answer quotes its question.
    user_ids = {m.text: m.message_id for m in fast_telegram.messages(chat.id) if not m.from_bot}
    msgs = s.bot_msgs(chat)
    assert msgs[1].reply_to == user_ids["two"]
    assert msgs[2].reply_to == user_ids["five"]
    assert [m.reply_to for m in msgs[3:]] == [user_ids["two"], user_ids["three"], user_ids["four"]]
    # Each turn saw the ones before it, complete and in order.
    assert contents(fake_llm.requests[3].messages) == [
        SYSTEM,
        ("user", "one"), ("assistant", "First answer, complete."),
        ("user", "two"), ("assistant", "Second answer."),
        ("user", "three"), ("assistant", "Third answer."),
        ("user", "four"),
    ]  # fmt: skip


async def test_queue_acknowledges_again_in_a_later_busy_period(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    first, second = asyncio.Event(), asyncio.Event()
    fake_llm.script(
        Reply.text("Answer one.", chunk=6, hold=first, hold_at=1),
        Reply.text("Answer two.", chunk=6, hold=second, hold_at=1),
        Reply.text("Answer three."),
    )
    s.say(chat, s.owner, "one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Answer"], timeout=10)
    s.say(chat, s.owner, "two")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat)[-1:] == [QUEUED_ACK], timeout=10)
    first.set()
    # "two" runs now; its queue is empty, so a new message is a new wait: acknowledged again.
    await fast_telegram.wait_for(lambda: s.bot_texts(chat)[-1:] == ["Answer"], timeout=10)
    s.say(chat, s.owner, "three")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat).count(QUEUED_ACK) == 2, timeout=10)
    second.set()
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 3, timeout=10)
    await s.settle(chat)
    assert s.bot_texts(chat) == ["Answer one.", QUEUED_ACK, "Answer two.", QUEUED_ACK, "Answer three."]


async def test_interrupt_policy_stops_the_running_reply_and_keeps_its_partial_text(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    assert (await s.ask(chat, s.owner, "/mode interrupt")).startswith("Busy policy set to interrupt")
    gate = asyncio.Event()
    fake_llm.script(
        Reply.text("The long story begins. And then it goes on and on.", chunk=23, hold=gate, hold_at=1),
        Reply.text("Sure, a short one."),
    )
    s.say(chat, s.owner, "tell me a long story")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat)[-1:] == ["The long story begins."], timeout=10)
    s.say(chat, s.owner, "actually, a short one")
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 2, timeout=10)
    await s.settle(chat)

    stopped, answer = s.bot_msgs(chat)[1:]
    assert stopped.text == f"The long story begins.\n\n{STOPPED_MARKER}"
    assert answer.text == "Sure, a short one."
    assert fake_llm.requests[0].disconnected, "the interrupted stream was closed"
    assert contents(fake_llm.requests[1].messages) == [
        SYSTEM,
        ("user", "tell me a long story"),
        ("assistant", f"The long story begins.\n\n{INTERRUPTED_NOTE}"),
        ("user", "actually, a short one"),
    ]
    assert "Busy policy" not in answer.text and QUEUED_ACK not in s.bot_texts(chat)
    gate.set()


async def test_stop_mid_stream_ends_the_reply_and_closes_the_model_stream(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Counting: one two three four five six.", chunk=15, hold=gate, hold_at=1))
    s.say(chat, s.owner, "count")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Counting: one t"], timeout=10)
    answer = await s.ask(chat, s.owner, "/stop")
    assert answer == "⏹️ Stopped."
    await s.settle(chat)
    live = s.bot_msgs(chat)[0]
    assert live.text == f"Counting: one t\n\n{STOPPED_MARKER}"
    await fake_llm.wait_for(lambda: fake_llm.requests[0].t_done is not None, timeout=10)
    assert fake_llm.requests[0].disconnected
    edits = len(live.edits)

    gate.set()  # the provider would go on now; nobody listens any more
    assert await s.turn(chat, s.owner, "next") == "You said: next"
    assert len(live.edits) == edits, "the stopped reply was edited after it was finalized"
    assert contents(last_request_messages(fake_llm))[-2:] == [
        ("assistant", f"Counting: one t\n\n{INTERRUPTED_NOTE}"),
        ("user", "next"),
    ]
    assert await s.ask(chat, s.owner, "/stop") == "Nothing is running."


async def test_stop_also_drops_queued_messages(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Working on it, slowly.", chunk=8, hold=gate, hold_at=1))
    s.say(chat, s.owner, "one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Working"], timeout=10)
    s.say(chat, s.owner, "two")
    s.say(chat, s.owner, "three")
    await fast_telegram.wait_for(lambda: QUEUED_ACK in s.bot_texts(chat), timeout=10)
    assert await s.ask(chat, s.owner, "/stop") == "⏹️ Stopped. Dropped 2 queued messages."
    await s.barrier()
    assert len(fake_llm.requests) == 1
    gate.set()


async def test_a_slow_chat_never_delays_another_chat(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, access={"allow_everyone": True})
    slow_chat = s.owner_chat()
    fast_chat = s.private(s.user(42, "Bo"))
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Slow answer, finally.", chunk=6, hold=gate, hold_at=1), Reply.text("Quick answer."))
    s.say(slow_chat, s.owner, "slow question")
    await fast_telegram.wait_for(lambda: s.bot_texts(slow_chat) == ["Slow a"], timeout=10)
    s.say(fast_chat, s.user(42), "quick question")
    await fast_telegram.wait_for(lambda: s.bot_texts(fast_chat) == ["Quick answer."], timeout=10)
    await s.settle(fast_chat)
    assert s.gateway.lanes.is_busy(key(slow_chat)), "the slow turn is still running"
    assert s.bot_texts(slow_chat) == ["Slow a"]
    gate.set()
    await fast_telegram.wait_for(lambda: s.bot_texts(slow_chat) == ["Slow answer, finally."], timeout=10)


# ---- sessions --------------------------------------------------------------------------------


async def test_sessions_per_user_in_groups(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(
        parley,
        fast_telegram,
        fake_llm,
        chat={"sessions_per_user_in_groups": True},
        access={"allowed_chats": [key(group)]},
    )
    ann, bo = s.user(51, "Ann"), s.user(52, "Bo")
    await s.turn(group, ann, "@parley_bot I am Ann")
    await s.turn(group, bo, "@parley_bot I am Bo")
    await s.turn(group, ann, "@parley_bot who am I?")
    assert contents(last_request_messages(fake_llm)) == [
        SYSTEM,
        ("user", "I am Ann"),
        ("assistant", "You said: I am Ann"),
        ("user", "who am I?"),
    ]
    # /new by Bo starts over for Bo only.
    assert (await s.ask(group, bo, "/new")).startswith("🆕")
    await s.turn(group, bo, "@parley_bot hello again")
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", "hello again")]
    await s.turn(group, ann, "@parley_bot still me")
    assert ("user", "who am I?") in contents(last_request_messages(fake_llm))


async def test_with_sessions_per_user_nobody_interrupts_someone_elses_reply(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(
        parley,
        fast_telegram,
        fake_llm,
        chat={"sessions_per_user_in_groups": True, "busy_policy": "interrupt"},
        access={"allowed_chats": [key(group)]},
    )
    ann, bo = s.user(51, "Ann"), s.user(52, "Bo")
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Ann's answer, in full.", chunk=6, hold=gate, hold_at=1), Reply.text("Bo's answer."))
    s.say(group, ann, "@parley_bot a long question")
    await fast_telegram.wait_for(lambda: s.bot_texts(group) == ["Ann's"], timeout=10)
    s.say(group, bo, "@parley_bot my question")
    await fast_telegram.wait_for(lambda: s.bot_texts(group)[-1:] == [QUEUED_ACK], timeout=10)
    gate.set()
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 2, timeout=10)
    await s.settle(group)
    assert s.bot_texts(group) == ["Ann's answer, in full.", QUEUED_ACK, "Bo's answer."]
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", "my question")]


async def test_groups_share_one_session_by_default(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]})
    ann, bo = s.user(51, "Ann"), s.user(52, "Bo")
    await s.turn(group, ann, "@parley_bot I am Ann")
    await s.turn(group, bo, "@parley_bot and I am Bo")
    assert contents(last_request_messages(fake_llm))[1:3] == [("user", "I am Ann"), ("assistant", "You said: I am Ann")]


# ---- history budget --------------------------------------------------------------------------


async def test_history_trimming_keeps_system_prompt_and_current_turn(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, agent={"history": {"max_tokens": 150}})
    chat = s.owner_chat()
    # Each earlier turn costs about 2 x (4 + 200/4) = 108 estimated tokens: only one fits.
    old = ["a" * 200, "b" * 200, "c" * 200]
    for text in old:
        fake_llm.script(Reply.text(text.upper()))
        await s.turn(chat, s.owner, text)
    await s.turn(chat, s.owner, "short?")
    assert contents(last_request_messages(fake_llm)) == [
        SYSTEM,
        ("user", old[2]),
        ("assistant", old[2].upper()),
        ("user", "short?"),
    ]
    # A current message that alone exceeds the budget still goes out, with the system prompt.
    huge = "z" * 2000
    await s.turn(chat, s.owner, huge)
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", huge)]


# ---- the model cannot command ------------------------------------------------------------


async def test_text_from_the_model_never_runs_a_command(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]})
    chat = s.owner_chat()
    before = s.state()
    for evil in ("/model other-model", "/allow 5", "/system pwned", "/promote 5", "/mode interrupt"):
        fake_llm.script(Reply.text(evil))
        assert await s.turn(chat, s.owner, "say it") == evil
        fake_llm.script(Reply.text(evil))
        assert await s.turn(group, s.owner, "@parley_bot say it") == evil
    await s.barrier()
    after = s.state()
    for table in ("chats", "roles", "budgets"):
        assert after[table] == before[table], table
    settings = await s.chat_settings(chat)
    assert settings.model is None and settings.system_prompt is None and settings.busy_policy is None
    assert await s.store.role("telegram:5") is None
    assert fake_llm.requests[-1].model == "fake-model"
    assert fake_llm.requests[-1].messages[0] == {"role": "system", "content": "You are a helpful assistant."}
