"""The chat commands end to end on Telegram: what each does, and how bad arguments are answered.

Real python-telegram-bot connector, real openai SDK, real config and store, against the
fake servers (helpers in tests/support/conversations.py). Refusals by role are
covered table-driven in tests/test_commands_permissions.py.
"""

from __future__ import annotations

import asyncio

from bots.commands import builtin_commands
from tests.fakes.llm import Reply
from tests.support.conversations import Stack, contents, key, last_request_messages, start

SYSTEM = ("system", "You are a helpful assistant.")


async def allowed_user(s: Stack, uid: int = 61, role: str = "user"):  # noqa: ANN201
    await s.store.set_role(f"telegram:{uid}", role)
    user = s.user(uid, f"User{uid}")
    return user, s.private(user)


async def test_model_shows_and_switches_within_the_configured_list(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    assert await s.ask(chat, s.owner, "/model") == (
        "Model in this chat: fake-model (default)\nAvailable: fake-model, other-model"
    )
    answer = await s.ask(chat, s.owner, "/model gpt-imaginary")
    assert answer == "Unknown model 'gpt-imaginary'. Available: fake-model, other-model"
    assert (await s.chat_settings(chat)).model is None
    assert await s.ask(chat, s.owner, "/model other-model") == "Model for this chat set to other-model."
    await s.turn(chat, s.owner, "hi")
    assert fake_llm.requests[-1].model == "other-model"
    assert (await s.ask(chat, s.owner, "/model")).startswith("Model in this chat: other-model\n")
    # Other chats keep the default.
    user, user_chat = await allowed_user(s)
    await s.turn(user_chat, user, "hi")
    assert fake_llm.requests[-1].model == "fake-model"
    assert (await s.ask(user_chat, user, "/model")).startswith("Model in this chat: fake-model (default)")
    assert await s.ask(chat, s.owner, "/model default") == "Model reset to the default, fake-model."
    await s.turn(chat, s.owner, "hi")
    assert fake_llm.requests[-1].model == "fake-model"


async def test_system_prompt_shows_sets_and_resets(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    assert await s.ask(chat, s.owner, "/system") == "System prompt (default):\nYou are a helpful assistant."
    assert await s.ask(chat, s.owner, "/system Talk like a pirate.") == "System prompt updated for this chat."
    await s.turn(chat, s.owner, "hello")
    assert last_request_messages(fake_llm)[0] == {"role": "system", "content": "Talk like a pirate."}
    assert await s.ask(chat, s.owner, "/system") == "System prompt:\nTalk like a pirate."
    assert await s.ask(chat, s.owner, "/system reset") == "System prompt reset to the default."
    await s.turn(chat, s.owner, "hello")
    assert contents(last_request_messages(fake_llm))[0] == SYSTEM


async def test_a_long_answer_to_a_command_arrives_whole_in_several_messages(fast_telegram, fake_llm, parley) -> None:
    prompt = "\n".join(f"Rule {i}: be kind and precise, always, whatever happens." for i in range(120))
    assert len(prompt) > 6000
    s = await start(parley, fast_telegram, fake_llm, agent={"system_prompt": prompt})
    chat = s.owner_chat()
    s.say(chat, s.owner, "/system")
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 2, timeout=10)
    await s.settle(chat)
    first, second = s.bot_msgs(chat)
    assert all(len(m.text) <= 4096 for m in (first, second))
    assert first.reply_to is not None and second.reply_to is None
    assert (first.text + second.text).replace("\n", "") == ("System prompt (default):\n" + prompt).replace("\n", "")


async def test_mode_switches_the_busy_policy(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    assert await s.ask(chat, s.owner, "/mode") == "Busy policy: queue (default) — new messages wait in a queue."
    assert await s.ask(chat, s.owner, "/mode interrupt") == (
        "Busy policy set to interrupt: new messages interrupt the running reply."
    )
    assert (await s.chat_settings(chat)).busy_policy == "interrupt"
    assert await s.ask(chat, s.owner, "/mode") == "Busy policy: interrupt — new messages interrupt the running reply."
    assert await s.ask(chat, s.owner, "/mode queue") == "Busy policy set to queue: new messages wait in a queue."


async def test_stream_off_sends_the_reply_in_one_piece(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    answer = " ".join(f"word{i}" for i in range(60))
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.01), Reply.text(answer, chunk=10, delay=0.01))
    streamed = await s.turn(chat, s.owner, "stream it")
    assert streamed == answer
    assert s.bot_msgs(chat)[-1].edit_count >= 2, "with streaming on, the reply grew by edits"
    assert await s.ask(chat, s.owner, "/stream off") == "Streaming off."
    assert await s.ask(chat, s.owner, "/stream") == "Streaming is off."
    assert await s.turn(chat, s.owner, "again, in one piece") == answer
    final = s.bot_msgs(chat)[-1]
    assert final.edit_count == 0, f"interim versions were shown: {[t for _, t, _ in final.edits]}"
    assert await s.ask(chat, s.owner, "/stream on") == "Streaming on."


async def test_new_starts_a_fresh_conversation(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    await s.turn(chat, s.owner, "remember the number 42")
    assert await s.ask(chat, s.owner, "/new") == "🆕 Started a new conversation."
    await s.turn(chat, s.owner, "which number?")
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", "which number?")]
    assert await s.ask(chat, s.owner, "/reset") == "🆕 Started a new conversation."
    await s.turn(chat, s.owner, "and now?")
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", "and now?")]


async def test_new_right_before_a_message_applies_to_that_message(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    await s.turn(chat, s.owner, "old topic")
    s.say(chat, s.owner, "/new")
    await s.turn(chat, s.owner, "new topic")  # sent at once, without waiting for /new's answer
    assert contents(last_request_messages(fake_llm)) == [SYSTEM, ("user", "new topic")]


async def test_retry_reruns_the_last_message_without_the_superseded_turn(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    assert await s.ask(chat, s.owner, "/retry") == "There is no earlier message in this conversation to retry."
    fake_llm.script(Reply.text("Answer A."), Reply.text("Answer B."), Reply.text("Answer C."), Reply.text("D."))
    await s.turn(chat, s.owner, "first question")
    await s.turn(chat, s.owner, "a question")
    assert await s.turn(chat, s.owner, "/retry") == "Answer C."
    assert contents(last_request_messages(fake_llm)) == [
        SYSTEM,
        ("user", "first question"),
        ("assistant", "Answer A."),
        ("user", "a question"),
    ], "the superseded answer B is not sent again"
    await s.turn(chat, s.owner, "thanks")
    assert contents(last_request_messages(fake_llm)) == [
        SYSTEM,
        ("user", "first question"),
        ("assistant", "Answer A."),
        ("user", "a question"),
        ("assistant", "Answer C."),
        ("user", "thanks"),
    ]
    assert s.bot_texts(chat)[-3:] == ["Answer B.", "Answer C.", "D."]


async def test_retry_while_the_answer_is_still_running_is_refused(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Slowly answering.", chunk=7, hold=gate, hold_at=1))
    s.say(chat, s.owner, "question")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Slowly"], timeout=10)
    assert (await s.ask(chat, s.owner, "/retry")).startswith("That message is still being answered.")
    gate.set()
    await s.settle(chat)
    assert len(fake_llm.requests) == 1


async def test_usage_own_and_for_admins_chat_and_all(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(
        parley,
        fast_telegram,
        fake_llm,
        access={"allowed_chats": [key(group)]},
        provider={"prices": {"fake-model": {"prompt": 1.0, "completion": 2.0}}},
    )
    user, user_chat = await allowed_user(s)
    assert await s.ask(user_chat, user, "/usage") == "Your usage:\n• today: nothing yet\n• this month: nothing yet"
    usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    fake_llm.script(*(Reply.text("ok", usage=usage) for _ in range(3)))
    await s.turn(user_chat, user, "one")
    await s.turn(group, user, "@parley_bot two")
    await s.turn(s.owner_chat(), s.owner, "three")
    mine = await s.ask(user_chat, user, "/usage")
    assert mine.splitlines()[:3] == [
        "Your usage:",
        "• today: 240 tokens in 2 turns, $0.0003",
        "    fake-model: 200 in / 40 out tokens",
    ]
    chat_usage = await s.ask(group, s.owner, "/usage chat")
    assert chat_usage.splitlines()[:2] == ["This chat's usage:", "• today: 120 tokens in 1 turn, $0.0001"]
    everyone = await s.ask(s.owner_chat(), s.owner, "/usage all")
    assert everyone.splitlines()[:2] == ["Everyone's usage:", "• today: 360 tokens in 3 turns, $0.0004"]
    theirs = await s.ask(s.owner_chat(), s.owner, "/usage 61")
    assert theirs.splitlines()[:2] == ["Usage of User61 (telegram:61):", "• today: 240 tokens in 2 turns, $0.0003"]


async def test_budget_exhaustion_stops_the_next_turn_before_the_model_is_called(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, chat = await allowed_user(s)
    usage = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
    fake_llm.script(Reply.text("First.", usage=usage))
    await s.turn(chat, user, "hello")
    assert await s.ask(s.owner_chat(), s.owner, "/budget 61 40") == "User61 (telegram:61) may now use 40 tokens per day."
    assert await s.ask(s.owner_chat(), s.owner, "/budget 61") == (
        "Budget of User61 (telegram:61): 40 tokens per day\nUsed today: 50 tokens"
    )
    requests = len(fake_llm.requests)
    refusal = await s.ask(chat, user, "are you there?")
    assert refusal == "⏳ You've used your daily budget of 40 tokens. It resets at 00:00 UTC."
    await s.barrier()
    assert len(fake_llm.requests) == requests, "the model was not called"
    assert s.bot_texts(chat) == ["First.", refusal]
    # Lifted again: the next turn runs.
    assert await s.ask(s.owner_chat(), s.owner, "/budget 61 off") == "User61 (telegram:61) has no daily budget now."
    assert await s.turn(chat, user, "now?") == "You said: now?"


async def test_budget_by_reply_in_a_group(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]})
    user = s.user(61, "Uma")
    await s.turn(group, user, "@parley_bot hi")
    (theirs,) = [m for m in fast_telegram.messages(group.id) if not m.from_bot]
    answer = await s.ask(group, s.owner, "/budget 1000", reply_to=theirs.message_id)
    assert answer == "Uma (telegram:61) may now use 1,000 tokens per day."
    assert await s.store.budget("telegram:61") == 1000


async def test_status_reports_uptime_platforms_turns_and_queues(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, chat = await allowed_user(s)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Busy for a while.", chunk=5, hold=gate, hold_at=1))
    s.say(chat, user, "one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Busy"], timeout=10)
    s.say(chat, user, "two")
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 2, timeout=10)
    status = (await s.ask(s.owner_chat(), s.owner, "/status")).splitlines()
    assert status[0].startswith("Uptime: 0h 0m ")
    assert status[1] == "Platforms: telegram ✅"
    assert status[2] == "Running: 1 turn; queued: 1 message in 1 chat"
    assert status[3].startswith("Provider: ")
    gate.set()
    await s.settle(chat)


async def test_help_lists_only_what_this_role_may_run(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, user_chat = await allowed_user(s, 61, "user")
    admin, admin_chat = await allowed_user(s, 62, "admin")

    def listed(text: str) -> set[str]:
        return {line.split()[0][1:] for line in text.splitlines()[1:]}

    by_role = {c.name: c.role.label for c in builtin_commands().all()}
    user_help = listed(await s.ask(user_chat, user, "/help"))
    admin_help = listed(await s.ask(admin_chat, admin, "/help"))
    owner_help = listed(await s.ask(s.owner_chat(), s.owner, "/help"))
    assert user_help == {n for n, r in by_role.items() if r == "user"}
    assert admin_help == {n for n, r in by_role.items() if r in ("user", "admin")}
    assert owner_help == set(by_role)
    assert "system" not in user_help and "status" not in user_help and "promote" not in admin_help
    # Telegram's /start (the first thing every new user sends) shows the same list.
    assert listed(await s.ask(user_chat, user, "/start")) == user_help


BAD_ARGUMENTS = [
    ("/budget 61 lots", "Usage: /budget [user] [tokens] — the budget is a positive whole number of tokens per day, or 'off'"),
    ("/budget 61 -5", "Usage: /budget [user] [tokens] — the budget is a positive whole number of tokens per day, or 'off'"),
    ("/budget alice lots", "Usage: /budget [user] [tokens] — the budget is a positive whole number of tokens per day, or 'off'"),
    ("/budget 61 5 6", "Usage: /budget [user] [tokens]"),
    ("/budget", "Usage: /budget [user] [tokens]"),
    ("/mode sometimes", "Usage: /mode [queue|interrupt]"),
    ("/stream maybe", "Usage: /stream [on|off]"),
    ("/promote", "Usage: /promote [user] — name a user by id or @username, or reply to one of their messages"),
    ("/allow @nobody_known", "I don't know @nobody_known yet: they need to write to me once, or use their numeric id (or reply to one of their messages)."),
    ("/deny telegram:@nobody_known", "I don't know nobody_known yet: they need to write to me once, or use their numeric id (or reply to one of their messages)."),
    ("/usage someone", "I don't know someone yet: they need to write to me once, or use their numeric id (or reply to one of their messages)."),
    ("/allow chat", "/allow chat is for groups: it lets everyone in the group use the bot."),
    ("/frobnicate", "Unknown command /frobnicate. Send /help for the list."),
]  # fmt: skip


async def test_bad_arguments_get_one_line_never_a_stack_trace(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    await s.store.set_role("telegram:61", "user")
    before = s.state()
    failures = []
    for text, expected in BAD_ARGUMENTS:
        answer = await s.ask(s.owner_chat(), s.owner, text)
        if answer != expected:
            failures.append(f"{text!r}: answered {answer!r}, expected {expected!r}")
        if "\n" in answer or "Traceback" in answer or "Error" in answer:
            failures.append(f"{text!r}: not one clean line: {answer!r}")
    assert not failures, "\n".join(failures)
    await s.barrier()
    assert s.state() == before
    assert fake_llm.requests == []
