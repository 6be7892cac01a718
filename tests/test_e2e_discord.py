"""End to end on Discord: real discord.py, real openai SDK, fake servers, real config.

Every test starts the whole parley App from a parley.yaml (`parley` fixture) with the
real Discord connector logged into the fake Discord (`tests/fakes/discord.py`) over
127.0.0.1, and the agent talking to the fake provider through the real openai SDK.

Formatting rejection has no Discord counterpart: Discord renders Markdown natively and
never rejects a message for its markup (the only content error is the 2000-character
limit, covered by the long-reply test), so there is no "falls back to plain text" test here.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from bots.outbox import ChatRef
from tests.fakes.discord import EDIT, SEND, DiscordLimits
from tests.fakes.llm import CHAT_FAULTS, Reply
from tests.support.stack import OWNER_DC

NO_PINGS = {"parse": []}  # discord.py's AllowedMentions.none(): no @everyone/@here, roles or users


def chat_key(channel) -> str:  # noqa: ANN001
    return f"discord:{channel.id}"


def stripped(texts: list[str]) -> list[str]:
    """Interim edits may end in whitespace (the newest delta); compare what people read."""
    return [t.rstrip() for t in texts]


def rate_limited_count(p) -> float:  # noqa: ANN001
    return p.app.metrics.rate_limited.labels("discord")._value.get()


def bot_messages(fake, channel) -> list:  # noqa: ANN001
    return [m for m in fake.messages(channel) if m.from_bot]


def assert_streamed(msg, answer: str) -> None:  # noqa: ANN001
    """One message, edited progressively, that ends with exactly the model's text."""
    versions = msg.versions
    assert len(versions) >= 3, f"the reply was not streamed progressively: {versions}"
    assert all(answer.startswith(v.rstrip()) for v in versions), "a version was not a prefix of the answer"
    assert all(a != b for a, b in zip(versions, versions[1:])), "an edit repeated the text already shown"
    assert msg.content == answer


# ---- streaming, in each kind of channel ---------------------------------------------------


@pytest.mark.parametrize("where", ["guild", "dm", "thread"])
async def test_streamed_reply_is_one_message_edited_progressively(where, fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    if where == "dm":
        channel = fast_discord.dm_channel(owner)
    elif where == "thread":
        channel = fast_discord.thread(fast_discord.default_channel, "questions", owner=owner)
    else:
        channel = fast_discord.default_channel
    answer = " ".join(f"word{i}" for i in range(120))
    fake_llm.script(Reply.text(answer, chunk=12, delay=0.01))
    asked = fast_discord.user_says(channel, owner, "tell me something", mentions_bot=where != "dm")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [answer], timeout=15)
    await p.gateway.settle(chat_key(channel))

    (msg,) = bot_messages(fast_discord, channel)
    assert_streamed(msg, answer)
    assert msg.reference == asked["id"], "the reply does not reference the user's message"
    assert fake_llm.requests[-1].messages[-1]["content"] == "tell me something", "the bot mention was not stripped"
    assert fast_discord.count_429() == 0


# ---- length limit --------------------------------------------------------------------------


def paragraphs(n: int, words: int = 40) -> str:
    return "\n\n".join(" ".join(f"p{i}w{j}" for j in range(words)) for i in range(n))


_FENCE_LINE = re.compile(r"^```(\w*)$")


async def test_long_reply_becomes_several_messages_fences_intact(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    code = "\n".join(f"    print('line {i}')" for i in range(200))
    answer = paragraphs(10) + "\n\n```python\ndef main():\n" + code + "\n```\n\n" + paragraphs(3)
    assert len(answer) > 3 * 2000
    fake_llm.script(Reply.text(answer, chunk=40, delay=0.002))
    fast_discord.user_says(channel, owner, "long please")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(channel))

    msgs = [m for m in bot_messages(fast_discord, channel) if not m.deleted]
    assert len(msgs) >= 4
    assert all(len(m.content) <= 2000 for m in msgs)
    assert all(len(v) <= 2000 for m in bot_messages(fast_discord, channel) for v in m.versions)
    # Each message's fences are balanced; a code block cut in two is closed at the end of
    # one message and reopened, with its language, at the start of the next.
    for m in msgs:
        fences = [line for line in m.content.split("\n") if _FENCE_LINE.match(line)]
        assert len(fences) % 2 == 0, f"unbalanced fences in a message: {m.content[:80]!r}…"
    texts = [m.content for m in msgs]
    shown = list(texts)
    continued = 0
    for i in range(1, len(texts)):
        if texts[i].startswith("```python\n") and texts[i - 1].rstrip().endswith("\n```"):
            shown[i - 1] = shown[i - 1].rstrip()[: -len("```")]
            shown[i] = shown[i][len("```python\n") :]
            continued += 1
        else:
            assert not texts[i].startswith("    print("), "code continued without its fence reopened"
    assert continued >= 1, "the code block was not split across messages"
    # Nothing lost, nothing doubled: without the fence lines added at the cuts, the
    # messages put together are the answer.
    assert [w for w in " ".join(shown).split()] == answer.split()
    assert fast_discord.count_429() == 0


# ---- tools ---------------------------------------------------------------------------------


async def test_pre_tool_text_hidden_and_answer_lands_in_same_message(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    before_answer = asyncio.Event()
    fake_llm.script(
        Reply.tool_calls([("current_time", {"timezone": "UTC"})], text_before="Let me check the clock first."),
        Reply.text("It is noon in UTC.", hold=before_answer),
    )
    fast_discord.user_says(channel, owner, "what time is it?", mentions_bot=True)
    await fast_discord.wait_for(lambda: any("current_time" in t for t in fast_discord.bot_texts(channel)), timeout=10)
    assert all("Let me check" not in t for t in fast_discord.bot_texts(channel))
    before_answer.set()
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["It is noon in UTC."], timeout=10)
    await p.gateway.settle(chat_key(channel))
    (msg,) = bot_messages(fast_discord, channel)
    assert any("Let me check the clock first." in v for v in msg.versions), "pre-tool text was streamed first"
    assert any("current_time" in v and "Let me check" not in v for v in msg.versions), "no tool progress shown"
    assert msg.content == "It is noon in UTC."


# ---- provider faults -----------------------------------------------------------------------

_NOT_STREAM_BREAKS = {"tool_std", "tool_all_at_once", "stop_with_tools", "double_finish", "tool_repeat_id_name",
                      "tool_no_index", "tool_ollama_index0", "tool_int_id", "tool_args_dict", "hermes_xml",
                      "think_in_content", "reasoning", "reasoning_openrouter", "reasoning_mirrored",
                      "nonstream_500", "nonstream_400", "nonstream_429", "nonstream_200_error", "slow_cancel"}
STREAM_FAULTS = sorted(set(CHAT_FAULTS) - _NOT_STREAM_BREAKS)


@pytest.mark.parametrize("fault", STREAM_FAULTS)
async def test_every_streaming_fault_ends_with_complete_reply_once(fault, fast_discord, fake_llm, parley) -> None:
    p = await parley(
        discord=fast_discord,
        overrides={"provider": {"max_retries": 2, "timeouts": {"connect": 1, "first_token": 2, "idle": 1, "total": 20}}},
    )
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    answer = "The complete answer, streamed in small pieces so a fault can strike in the middle of it."
    fake_llm.script(Reply.text(answer, chunk=6, fault=fault))
    fast_discord.user_says(channel, owner, "hello")
    await fast_discord.wait_for(lambda: answer in fast_discord.bot_texts(channel), timeout=20)
    await p.gateway.settle(chat_key(channel))
    assert fast_discord.bot_texts(channel) == [answer]
    assert len(bot_messages(fast_discord, channel)) == 1


# ---- rate limits ---------------------------------------------------------------------------


async def _stream_through_429s(fake, fake_llm, p, channel, owner) -> str:  # noqa: ANN001
    answer = " ".join(f"token{i}" for i in range(60))
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.05))
    fake.user_says(channel, owner, "go", mentions_bot=True)
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=10)
    await p.gateway.settle(chat_key(channel))
    return answer


async def test_429_with_via_is_slept_through_and_nothing_is_lost(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    fast_discord.inject("429", route=SEND, channel_id=channel.id, times=1, retry_after=0.5)
    fast_discord.inject("429", route=EDIT, channel_id=channel.id, times=2, retry_after=0.5)
    answer = await _stream_through_429s(fast_discord, fake_llm, p, channel, owner)
    assert fast_discord.bot_texts(channel) == [answer]
    assert len(bot_messages(fast_discord, channel)) == 1
    assert fast_discord.count_429(channel_id=channel.id) == 3
    calls = [c for c in fast_discord.calls if c.channel_id == channel.id and c.route in (SEND, EDIT)]
    for prev, nxt in zip(calls, calls[1:]):
        if prev.status == 429:
            assert nxt.t_received - prev.t_responded >= 0.5 - 0.05, "a call went out before retry_after passed"
    assert rate_limited_count(p) == 3, "each 429 is counted exactly once"


@pytest.mark.parametrize(("kind", "pause"), [("429", 1.5), ("429_no_via", 1.0)], ids=["long_retry_after", "no_via"])
async def test_429_surfacing_as_rate_limited_pauses_the_chat(kind, pause, fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    connector = p.gateway.connectors["discord"]
    # discord.py sleeps through a 429 (with `Via`) up to max_ratelimit_timeout -- 30 s,
    # unless parley lowers it -- and raises RateLimited above it. A low threshold keeps
    # this test fast. A Cloudflare-style 429 without `Via` is never slept through.
    connector.max_ratelimit_timeout = 1.0
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    fast_discord.inject(kind, route=SEND, channel_id=channel.id, times=1, retry_after=pause)
    fast_discord.inject(kind, route=EDIT, channel_id=channel.id, times=2, retry_after=pause)
    answer = await _stream_through_429s(fast_discord, fake_llm, p, channel, owner)
    assert fast_discord.bot_texts(channel) == [answer]
    assert len(bot_messages(fast_discord, channel)) == 1
    assert fast_discord.count_429(channel_id=channel.id) == 3
    calls = [c for c in fast_discord.calls if c.channel_id == channel.id and c.route in (SEND, EDIT)]
    for prev, nxt in zip(calls, calls[1:]):
        if prev.status == 429:
            assert nxt.t_received - prev.t_responded >= pause - 0.05, "parley did not pause for retry_after"
    pacer = connector.pacing.for_chat(ChatRef("discord", channel.id, is_private=False))
    assert pacer.paused_until > float("-inf"), "the 429 did not reach parley's pacer"
    assert rate_limited_count(p) == 3, "each 429 is counted exactly once"


# ---- the user deletes the live message -------------------------------------------------------


async def test_user_deleting_the_live_message_continues_in_a_new_one(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    gate = asyncio.Event()
    answer = "First part of the answer. " + "Second part arrives after the user deleted the preview."
    fake_llm.script(Reply.text(answer, chunk=26, hold=gate, hold_at=1))
    fast_discord.user_says(channel, owner, "go", mentions_bot=True)
    await fast_discord.wait_for(lambda: stripped(fast_discord.bot_texts(channel)) == ["First part of the answer."],
                               timeout=10)
    (live,) = bot_messages(fast_discord, channel)
    fast_discord.user_deletes(channel, live.id)
    gate.set()
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(channel))
    assert fast_discord.bot_texts(channel) == [answer]
    live_now = [m for m in bot_messages(fast_discord, channel) if not m.deleted]
    assert len(live_now) == 1 and live_now[0].id != live.id


async def test_a_send_lost_in_transit_is_not_posted_twice(fast_discord, fake_llm, parley) -> None:
    # Discord created the message, but the connection dropped before the answer came
    # back: the retry must find that message (same nonce), not post a second one.
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    lost = fast_discord.inject("drop_after_apply", route=SEND, channel_id=channel.id, times=1)
    answer = "An answer whose first message was created, though parley never heard back."
    fake_llm.script(Reply.text(answer, chunk=6, delay=0.02))
    asked = fast_discord.user_says(channel, owner, "go", mentions_bot=True)
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(chat_key(channel))
    assert lost.hits == 1
    assert fast_discord.bot_texts(channel) == [answer]
    (msg,) = bot_messages(fast_discord, channel)
    assert msg.reference == asked["id"]


# ---- who the bot listens to ------------------------------------------------------------------


async def test_guild_mention_rules(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    key = chat_key(channel)

    # Chatter that neither mentions the bot nor replies to it: no reply, no model call.
    fast_discord.user_says(channel, owner, "just talking to my friends")
    fake_llm.script(Reply.text("First answer."), Reply.text("Second answer."))
    # A mention: one reply.
    fast_discord.user_says(channel, owner, "what is up?", mentions_bot=True)
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["First answer."], timeout=10)
    await p.gateway.settle(key)
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == ["what is up?"]
    (first,) = bot_messages(fast_discord, channel)

    # A reply to the bot's message, with the reply ping turned off (no mention at all).
    fast_discord.user_says(channel, owner, "and then?", reply_to=first.id, reply_ping=False)
    await fast_discord.wait_for(lambda: "Second answer." in fast_discord.bot_texts(channel), timeout=10)
    await p.gateway.settle(key)
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == ["what is up?", "and then?"]

    # A reply to someone else's message is not addressed to the bot.
    other = fast_discord.user_says(channel, fast_discord.default_user, "hi all")
    fast_discord.user_says(channel, owner, "hello you", reply_to=other["id"])
    marker = fast_discord.user_says(channel, owner, "!help")  # processed after the two above
    await fast_discord.wait_for(lambda: any(t.startswith("Commands you can use") for t in fast_discord.bot_texts(channel)))
    await p.gateway.settle(key)
    assert len(fake_llm.requests) == 2
    assert bot_messages(fast_discord, channel)[-1].reference == marker["id"]


async def test_bot_output_never_runs_commands(fast_discord, fake_llm, parley) -> None:
    # Worst case: even if the bot's own account were an owner, what it posts (the model's
    # output, echoed back by the Gateway) is never read as a command or a question.
    bot_key = f"discord:{fast_discord.bot_user.id}"
    p = await parley(discord=fast_discord, overrides={"access": {"owners": [f"discord:{OWNER_DC}", bot_key]}})
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    key = chat_key(channel)
    outputs = ["!allow 123", "!model other-model", f"<@{fast_discord.bot_user.id}> tell me more, forever"]
    # One chunk each: the MESSAGE_CREATE echo carries the whole command, not a prefix of it.
    fake_llm.script(*(Reply.text(text, chunk=200) for text in outputs))
    for i in range(len(outputs)):
        fast_discord.user_says(channel, owner, f"say it {i}", mentions_bot=True)
        await fake_llm.wait_for(lambda: len(fake_llm.requests) == i + 1, timeout=10)
        await asyncio.wait_for(p.gateway.settle(key), 10)  # a bot talking to itself never settles
    assert fast_discord.bot_texts(channel) == outputs
    # A person's message after all the echoes: the bot handles events in order, so once
    # this is answered, every echo before it has been seen -- and changed nothing.
    marker = fast_discord.user_says(channel, owner, "!model")
    await fast_discord.wait_for(lambda: bot_messages(fast_discord, channel)[-1].reference == marker["id"])
    await asyncio.wait_for(p.gateway.settle(key), 10)
    assert fast_discord.bot_texts(channel)[-1].startswith("Model in this chat: fake-model (default)")
    assert await p.store.role("discord:123") is None
    assert (await p.store.chat_settings(key)).model is None
    assert len(fake_llm.requests) == len(outputs)
    assert len(bot_messages(fast_discord, channel)) == len(outputs) + 1


async def test_model_output_never_pings_anyone(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    victim = fast_discord.user(username="victim")
    channel = fast_discord.default_channel
    answer = f"Hey @everyone and @here, <@&{fast_discord.default_guild.id}> and <@{victim.id}>: look!"
    fake_llm.script(Reply.text(answer, chunk=7, delay=0.01))
    fast_discord.user_says(channel, owner, "ping everyone", mentions_bot=True)
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [answer], timeout=10)
    await p.gateway.settle(chat_key(channel))
    calls = [c for c in fast_discord.calls if c.channel_id == channel.id and c.route in (SEND, EDIT)]
    assert [c.route for c in calls[:2]] == [SEND, EDIT]
    for c in calls:
        assert c.json.get("allowed_mentions") == NO_PINGS, f"{c.route} allowed pings: {c.json.get('allowed_mentions')}"


# ---- slash commands and their text form -------------------------------------------------------


async def test_slash_model_round_trip(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord, overrides={"access": {"allow_everyone": True}})
    owner = fast_discord.user(OWNER_DC, "owner")
    user = fast_discord.default_user
    channel = fast_discord.default_channel
    key = chat_key(channel)
    # The slash commands are the gateway's one command list (the same as Telegram's menu).
    registered = {c["name"]: c for c in fast_discord.commands()}
    assert set(registered) == {c.name for c in p.gateway.commands.all()}
    (policy,) = registered["mode"]["options"]
    assert [c["value"] for c in policy["choices"]] == ["queue", "interrupt"]

    async def run(who, name: str, options=None, *, private: bool | None = None) -> str:  # noqa: ANN001
        rec = fast_discord.user_runs_command(channel, who, name, options or {})
        await fast_discord.wait_for(
            lambda: rec.original is not None and (rec.followups or not (rec.original.loading or rec.original.deleted)),
            timeout=5,
        )
        await p.gateway.settle(key)
        # Deferred ephemerally (the fake rejects a late acknowledgement with 10062), then
        # answered once: privately by editing that response, or for everyone by deleting
        # it and following up (tests/test_e2e_discord_private.py has the details).
        assert rec.deferred and not rec.rejected and rec.original.ephemeral
        if rec.original.deleted:
            assert private is not True, f"/{name} was answered publicly"
            (answer,) = rec.followups
            assert not answer.ephemeral and answer.versions == [answer.content]
            return answer.content
        assert private is not False, f"/{name} was answered privately"
        assert rec.original.versions[0] == "" and len(rec.original.edits) == 1
        assert not rec.followups
        return rec.original.content

    assert await run(user, "model") == "Model in this chat: fake-model (default)\nAvailable: fake-model, other-model"
    refused = await run(user, "model", {"name": "other-model"}, private=True)
    assert refused.startswith("⛔") and "admin" in refused
    assert (await p.store.chat_settings(key)).model is None
    switched = await run(owner, "model", {"name": "other-model"}, private=False)
    assert switched == "Model for this chat set to other-model."
    assert (await p.store.chat_settings(key)).model == "other-model"
    assert (await run(user, "help", private=True)).startswith("Commands you can use here:")
    assert await run(user, "stop") == "Nothing is running."
    assert fake_llm.requests == []

    # The next turn runs on the model the owner chose.
    fake_llm.script(Reply.text("Answered."))
    fast_discord.user_says(channel, user, "question", mentions_bot=True)
    await fast_discord.wait_for(lambda: "Answered." in fast_discord.bot_texts(channel), timeout=10)
    await p.gateway.settle(key)
    assert fake_llm.requests[-1].model == "other-model"

    # The text form works too, with the same role checks.
    asked = fast_discord.user_says(channel, user, "!model fake-model")
    await fast_discord.wait_for(lambda: bot_messages(fast_discord, channel)[-1].reference == asked["id"])
    assert fast_discord.bot_texts(channel)[-1].startswith("⛔")
    assert (await p.store.chat_settings(key)).model == "other-model"
    fast_discord.user_says(channel, owner, "!model fake-model")
    await fast_discord.wait_for(lambda: "Model for this chat set to fake-model." in fast_discord.bot_texts(channel))
    await p.gateway.settle(key)
    assert (await p.store.chat_settings(key)).model == "fake-model"


async def test_slash_stop_interrupts_the_running_reply(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.default_channel
    key = chat_key(channel)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("The beginning of a long story that will never end", chunk=17, hold=gate, hold_at=1))
    fast_discord.user_says(channel, owner, "tell me a story", mentions_bot=True)
    await fast_discord.wait_for(lambda: stripped(fast_discord.bot_texts(channel)) == ["The beginning of"], timeout=10)
    rec = fast_discord.user_runs_command(channel, owner, "stop")
    await fast_discord.wait_for(lambda: [m.content for m in rec.followups] == ["⏹️ Stopped."], timeout=10)
    await p.gateway.settle(key)
    gate.set()
    assert rec.deferred and not rec.rejected
    # "Stopped" is for everyone in the channel: the ephemeral "thinking…" gave way to it.
    assert rec.original.ephemeral and rec.original.deleted
    (reply, answer) = [m for m in bot_messages(fast_discord, channel) if not m.ephemeral]
    assert reply.content.startswith("The beginning of") and reply.content.endswith("\n\n⏹️ stopped")
    assert "long story" not in reply.content
    assert answer.id == rec.followups[0].id and not answer.ephemeral


# ---- typing and pacing -----------------------------------------------------------------------


async def test_typing_shows_while_nothing_is_visible(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Thought about it.", hold=gate))
    fast_discord.user_says(channel, owner, "think first")
    await fast_discord.wait_for(lambda: fast_discord.typing_events(channel), timeout=5)
    assert fast_discord.bot_texts(channel) == []
    gate.set()
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["Thought about it."], timeout=10)
    await p.gateway.settle(chat_key(channel))
    (msg,) = bot_messages(fast_discord, channel)
    assert all(t < msg.created_at for t in fast_discord.typing_events(channel)), "typing after the text was visible"


async def test_ten_channels_streaming_at_default_limits_get_no_429(make_fake_discord, fake_llm, parley) -> None:
    fake = await make_fake_discord(limits=DiscordLimits())  # Discord's (observed) default limits
    p = await parley(discord=fake, fast=False)
    owner = fake.user(OWNER_DC, "owner")
    channels = [fake.text_channel(name=f"room{i}") for i in range(10)]
    await fake.wait_for(lambda: all(s.delivered >= s.seq for s in fake.sessions if not s.closed))
    # Each reply streams for about 4 s: more edits than a channel's 5-per-5-s bucket takes
    # at once, so the pacing (parley's budget, then discord.py's own bucket) must hold back.
    answers = [f"Channel {i}: " + " ".join(f"w{j}" for j in range(120)) for i in range(len(channels))]
    fake_llm.script(*(Reply.text(answer, chunk=8, delay=0.05) for answer in answers))
    for i, ch in enumerate(channels):
        fake.user_says(ch, owner, f"question {i}", mentions_bot=True)
    await fake_llm.wait_for(lambda: fake_llm.pending == 0, timeout=20)
    for ch in channels:
        await p.gateway.settle(chat_key(ch))
    # Scripted replies go to requests in arrival order, so compare the set of replies.
    assert all(len(bot_messages(fake, ch)) == 1 for ch in channels)
    assert sorted(t for ch in channels for t in fake.bot_texts(ch)) == sorted(answers)
    assert all(len(bot_messages(fake, ch)[0].versions) >= 5 for ch in channels), "some replies were not streamed"
    assert fake.count_429() == 0


async def test_group_trigger_all_for_one_channel(fast_discord, fake_llm, parley) -> None:
    chatty = fast_discord.default_channel
    quiet = fast_discord.text_channel(name="quiet")
    p = await parley(discord=fast_discord, overrides={"discord": {"group_triggers": {str(chatty.id): "all"}}})
    owner = fast_discord.user(OWNER_DC, "owner")
    fake_llm.script(Reply.text("Heard without a mention."))
    fast_discord.user_says(quiet, owner, "nobody called the bot")
    fast_discord.user_says(chatty, owner, "nobody called the bot here either")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(chatty) == ["Heard without a mention."], timeout=10)
    await p.gateway.settle(chat_key(chatty))
    await p.gateway.settle(chat_key(quiet))
    assert fast_discord.bot_texts(quiet) == []
    assert len(fake_llm.requests) == 1
